"""SWE-Gym / SWE-bench: instances from a local JSONL (public format), held-out split selection,
one Docker container per instance (``DockerSWEEnv``) and evaluation through the ``swebench`` harness.

Nothing here imports ``docker`` or ``swebench`` until it is used; without them (or without a running
Docker engine) the error names what is missing.
"""

from unipost.envs.swe.docker_env import DockerExecutor, DockerSWEEnv, DockerUnavailableError, docker_client
from unipost.envs.swe.harness import evaluate_predictions, harness_command, write_dataset, write_predictions
from unipost.envs.swe.instances import (
    IMAGE_SCHEMES,
    InstanceFormatError,
    SWEInstance,
    heldout_bucket,
    image_name,
    load_instances,
    parse_instance,
    split_instances,
)

__all__ = [
    "IMAGE_SCHEMES",
    "DockerExecutor",
    "DockerSWEEnv",
    "DockerUnavailableError",
    "InstanceFormatError",
    "SWEInstance",
    "docker_client",
    "evaluate_predictions",
    "harness_command",
    "heldout_bucket",
    "image_name",
    "load_instances",
    "parse_instance",
    "split_instances",
    "write_dataset",
    "write_predictions",
]

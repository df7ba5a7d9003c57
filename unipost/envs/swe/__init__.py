"""SWE-Gym / SWE-bench: instances from a local JSONL (public format), held-out split selection,
one Docker container per instance (``DockerSWEEnv``, which grades each submitted episode in it:
``grading``), evaluation through the ``swebench`` harness, and the instance selection of SWE-bench
Verified (running a trained run on it, ``evaluate_run``, is in :mod:`unipost.train.swe_verified`: it
needs the Trainer, a higher layer).

Nothing here imports ``docker`` or ``swebench`` until it is used; without them (or without a running
Docker engine) the error names what is missing.
"""

from unipost.envs.swe.docker_env import DockerExecutor, DockerSWEEnv, DockerUnavailableError, docker_client
from unipost.envs.swe.grading import GradeReport, GradingSpec, GradingUnavailableError, grading_spec
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
from unipost.envs.swe.verified import PAPER_EXCLUDED_REPOS, VerifiedResult, patches_from, select_instances

__all__ = [
    "IMAGE_SCHEMES",
    "PAPER_EXCLUDED_REPOS",
    "DockerExecutor",
    "DockerSWEEnv",
    "DockerUnavailableError",
    "GradeReport",
    "GradingSpec",
    "GradingUnavailableError",
    "InstanceFormatError",
    "SWEInstance",
    "VerifiedResult",
    "docker_client",
    "evaluate_predictions",
    "grading_spec",
    "harness_command",
    "heldout_bucket",
    "image_name",
    "load_instances",
    "parse_instance",
    "patches_from",
    "select_instances",
    "split_instances",
    "write_dataset",
    "write_predictions",
]

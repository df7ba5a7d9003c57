"""The paper's scaffold: embedded tasks acted on through the real OpenHands agent SDK tools.

``OpenHandsEnv`` (main process, any Python >= 3.10) drives :mod:`.worker` (run by the Python >= 3.12
interpreter of ``.venv-openhands``, inside the bubblewrap sandbox). Nothing here imports OpenHands;
a missing venv is reported by ``OpenHandsUnavailableError`` with the command that builds it.
"""

from unipost.envs.openhands.client import (
    OpenHandsUnavailableError,
    WorkerError,
    default_venv,
    venv_python,
)
from unipost.envs.openhands.env import OPENHANDS_TOOL_NAMES, OpenHandsEnv
from unipost.envs.openhands.normalize import comparable_pair, normalize_embedded, normalize_openhands

__all__ = [
    "OPENHANDS_TOOL_NAMES",
    "OpenHandsEnv",
    "OpenHandsUnavailableError",
    "WorkerError",
    "comparable_pair",
    "default_venv",
    "normalize_embedded",
    "normalize_openhands",
    "venv_python",
]

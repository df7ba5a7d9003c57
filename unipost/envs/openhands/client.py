"""Start :mod:`unipost.envs.openhands.worker` under ``.venv-openhands``'s Python, sandboxed, and talk to it.

Sandbox layout (the same bubblewrap sandbox as the embedded environment, see docs/sandbox.md): the
task workspace is the only writable bind, at ``/testbed``; ``/usr`` and the worker's interpreter (the
venv and the base Python prefix it points to) are bound read-only at their own paths; the worker
script's folder is bound read-only; ``/tmp`` (tmux's socket, the SDK's scratch files, ``$HOME``) is a
fresh tmpfs; no network. Every shell command the OpenHands terminal runs is a child of the worker,
so it inherits all of that.

Running as root, the sandbox drops to an unprivileged uid (for RLIMIT_NPROC); that uid cannot look
inside ``/root``, where pyenv keeps its interpreters. ``scripts/setup-openhands-venv.sh`` then makes a
world-readable copy of the base prefix at ``<venv>/.base-python``, which is bound at the original path,
so the interpreter sees exactly the paths it was built with.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from unipost._optional import OPENHANDS_VENV_ENV_VAR, openhands_venv
from unipost.envs.embedded.sandbox import WORKSPACE, Limits, Sandbox, SandboxUnavailableError

VENV_ENV_VAR = OPENHANDS_VENV_ENV_VAR
WORKER_DIR_INSIDE = "/opt/unipost-openhands"
SETUP_HINT = "Build it with: bash scripts/setup-openhands-venv.sh (needs Python >= 3.12 and tmux)."
# The worker imports litellm and the SDK (several seconds of CPU), then hosts a shell for the episode:
# per-process CPU and address-space limits are wider than for one embedded command.
WORKER_LIMITS = Limits(timeout_s=600.0, cpu_s=3600, memory_bytes=8 << 30, max_processes=256)


class OpenHandsUnavailableError(RuntimeError):
    """``.venv-openhands`` (or something it needs) is missing; the message says how to build it."""


class WorkerError(RuntimeError):
    """The worker died, timed out or answered something that is not the protocol."""


default_venv = openhands_venv  # decided in unipost._optional, so doctor need not import this layer


def venv_python(venv: str | Path | None = None) -> Path:
    """The venv's interpreter, or OpenHandsUnavailableError naming the fix."""
    venv = Path(venv) if venv is not None else default_venv()
    python = venv / "bin" / "python"
    if not python.exists():
        raise OpenHandsUnavailableError(
            f"The OpenHands environment needs a Python >= 3.12 venv with openhands-sdk and openhands-tools "
            f"at {venv} (or ${VENV_ENV_VAR}), and there is none. {SETUP_HINT}"
        )
    return python


@cache
def _interpreter_paths(python: str) -> tuple[str, str]:
    """(sys.prefix, sys.base_prefix) of the venv interpreter; quick, the SDK is not imported."""
    out = subprocess.run(
        [python, "-c", "import sys; print(sys.prefix); print(sys.base_prefix)"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split("\n")
    return out[0].strip(), out[1].strip()


def _world_traversable(path: Path) -> bool:
    """Whether an unprivileged uid can reach ``path`` (every ancestor has o+x)."""
    p = path.resolve()
    for part in [p, *p.parents]:
        try:
            if not os.stat(part).st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def interpreter_binds(python: Path, *, drops_uid: bool) -> dict[str, str]:
    """Read-only binds (host path -> path inside) that make ``python`` start inside the sandbox."""
    prefix, base_prefix = _interpreter_paths(str(python))
    binds: dict[str, str] = {}
    for path in dict.fromkeys([prefix, base_prefix]):
        host = Path(path)
        if not drops_uid or _world_traversable(host):
            binds[str(host)] = path
            continue
        copy = Path(prefix) / ".base-python"
        if path == base_prefix and copy.is_dir() and _world_traversable(copy):
            binds[str(copy)] = path
            continue
        raise SandboxUnavailableError(
            f"The sandboxed OpenHands worker runs as an unprivileged uid that cannot read {path} (a parent "
            "folder is not world-readable, as /root usually is). Re-run scripts/setup-openhands-venv.sh: "
            "as root it makes a readable copy of the base interpreter at <venv>/.base-python."
        )
    return binds


@dataclass
class WorkerSandbox(Sandbox):
    """The embedded environment's :class:`Sandbox`, able to start a long-lived process with pipes."""

    def spawn(self, argv: list[str], *, ro_binds: dict[str, str], env: dict[str, str]) -> subprocess.Popen:
        if not self.isolated:
            host_env = {**os.environ, **env}
            return subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=str(self.workspace),
                env=host_env,
                start_new_session=True,
            )
        command = " ".join(_shell_quote(a) for a in argv)
        bwrap_argv, run_env = self._argv("exec " + command, WORKSPACE, ro_binds, env)
        return subprocess.Popen(
            bwrap_argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=run_env,
            cwd=str(self.workspace),
            preexec_fn=self._preexec,
            start_new_session=True,
        )


class WorkerProcess:
    """One running worker: JSON-lines requests with a wall-clock limit each; stderr kept for messages."""

    def __init__(
        self,
        workspace: Path,
        *,
        venv: str | Path | None = None,
        sandbox_uid: int | None = None,
        unsafe_local: bool = False,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.python = venv_python(venv)
        if shutil.which("tmux") is None:
            raise OpenHandsUnavailableError(
                "The OpenHands terminal tool needs tmux, which is not installed (apt-get install tmux)."
            )
        self.sandbox = WorkerSandbox(
            Path(workspace), WORKER_LIMITS, unsafe_local=unsafe_local, sandbox_uid=sandbox_uid
        )
        worker_dir = Path(__file__).resolve().parent
        env = {"HOME": "/tmp/home", "OPENHANDS_SUPPRESS_BANNER": "1", "PYTHONUNBUFFERED": "1"}
        env["TMUX_TMPDIR"] = "/tmp"
        if self.sandbox.isolated:
            binds = interpreter_binds(self.python, drops_uid=self.sandbox._drop_to is not None)
            binds[str(worker_dir)] = WORKER_DIR_INSIDE
            script = f"{WORKER_DIR_INSIDE}/worker.py"
            argv = [str(self.python), "-I", script]
            self.workdir = WORKSPACE
            command = f"mkdir -p /tmp/home && exec {' '.join(_shell_quote(a) for a in argv)}"
            argv, binds = ["bash", "-c", command], binds
        else:  # unsafe local mode (bwrap missing, opted in): the host's own paths
            env["HOME"] = str(workspace)
            self.workdir = str(Path(workspace).resolve())
            argv, binds = [str(self.python), "-I", str(worker_dir / "worker.py")], {}
        self.proc = _spawn_from_long_lived_thread(lambda: self.sandbox.spawn(argv, ro_binds=binds, env=env))
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._pump_stdout, daemon=True).start()
        threading.Thread(target=self._pump_stderr, daemon=True).start()
        hello = self._read(start_timeout_s, "start")
        if not hello.get("ready"):
            raise WorkerError(f"The OpenHands worker did not start: {hello}")

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self._lines.put(raw.decode("utf-8", errors="replace"))
        self._lines.put(None)

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._stderr.append(raw.decode("utf-8", errors="replace"))
            del self._stderr[:-200]

    def stderr_tail(self, chars: int = 2000) -> str:
        return "".join(self._stderr)[-chars:]

    def _read(self, timeout_s: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            try:
                line = self._lines.get(timeout=max(left, 0.0))
            except queue.Empty:
                self.kill()
                raise WorkerError(
                    f"The OpenHands worker did not answer {what} within {timeout_s:g} s."
                ) from None
            if line is None:
                code = self.proc.wait()
                raise WorkerError(
                    f"The OpenHands worker exited (code {code}) during {what}. Its stderr ends with:\n"
                    f"{self.stderr_tail()}"
                )
            line = line.strip()
            if not line:
                continue
            try:
                return json.loads(line)
            except json.JSONDecodeError as exc:
                raise WorkerError(f"The OpenHands worker wrote a non-protocol line: {line[:200]!r}") from exc

    def request(self, timeout_s: float, **payload: Any) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise WorkerError(f"The OpenHands worker is not running (exit code {self.proc.returncode}).")
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"Cannot write to the OpenHands worker: {exc}") from exc
        reply = self._read(timeout_s, f"the {payload.get('op')!r} request")
        if not reply.get("ok"):
            raise WorkerError(f"The OpenHands worker failed: {reply.get('error')}\n{reply.get('trace', '')}")
        return reply

    def close(self, timeout_s: float = 10.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(WorkerError):
                self.request(timeout_s, op="close")
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, 9)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)


_SPAWN_REQUESTS: queue.Queue[tuple[Any, queue.Queue]] = queue.Queue()
_SPAWNER: threading.Thread | None = None
_SPAWNER_LOCK = threading.Lock()


def _spawner_loop() -> None:
    while True:
        fn, reply = _SPAWN_REQUESTS.get()
        try:
            reply.put((fn(), None))
        except BaseException as exc:
            reply.put((None, exc))


def _spawn_from_long_lived_thread(fn: Any) -> subprocess.Popen:
    """Start the sandbox from one thread that lives as long as this process.

    bubblewrap's ``--die-with-parent`` is PR_SET_PDEATHSIG, which fires when the *thread* that forked
    the child exits. The rollout engine resets environments in a thread pool whose threads end when a
    collection ends; a worker forked there would be killed with its thread.
    """
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None or not _SPAWNER.is_alive():
            _SPAWNER = threading.Thread(target=_spawner_loop, name="unipost-openhands-spawner", daemon=True)
            _SPAWNER.start()
    reply: queue.Queue = queue.Queue()
    _SPAWN_REQUESTS.put((fn, reply))
    proc, exc = reply.get()
    if exc is not None:
        raise exc
    return proc


def _shell_quote(s: str) -> str:
    import shlex

    return shlex.quote(s)


__all__ = [
    "VENV_ENV_VAR",
    "OpenHandsUnavailableError",
    "WorkerError",
    "WorkerProcess",
    "WorkerSandbox",
    "default_venv",
    "interpreter_binds",
    "venv_python",
]

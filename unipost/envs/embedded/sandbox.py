"""Run an agent's shell commands under bubblewrap, with resource limits and a scrubbed environment.

Why bubblewrap and not Docker: it needs no daemon, starts in milliseconds and is an ordinary Debian
package, so the embedded environment runs on a laptop and on CI. What it does and does not guarantee
is written down in docs/sandbox.md; for untrusted models at scale use the Docker-based OpenHands runtime.

Layout inside the sandbox: the episode's workspace is the ONLY writable bind, at ``/testbed``; ``/usr``
(and the symlinked ``/bin``, ``/lib``, ``/lib64``) are read-only; a fresh tmpfs is ``/tmp``; nothing else
of the host is visible (no ``/etc``, ``/root``, ``/home``). ``--unshare-all`` leaves the command without
network. Optional extra read-only binds (the verifier's hidden tests) are given per call.

Process-count limit: RLIMIT_NPROC is counted per *real* user and ignored for root, so when the host
process is root the sandboxed command runs as an unprivileged uid of its own (one per ``Sandbox``, from a
range no real account uses): bwrap then builds an unprivileged user namespace and the limit stops a fork
bomb (verified in tests/test_sandbox.py) without starving the episodes running beside it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

WORKSPACE = "/testbed"  # where the agent sees its repository (as in the paper's SWE-Gym setup)
CHANNEL_ENV = "UNIPOST_CHANNEL_FD"  # names the result pipe's descriptor to the command (run(channel=N))
MAX_TIMEOUT_FACTOR = 6  # a model may ask for at most this multiple of Limits.timeout_s
READ_CHUNK = 1 << 16
UNSAFE_ENV_VAR = "UNIPOST_UNSAFE_LOCAL"
_PROBED: dict[tuple[str | None, bool], str | None] = {}  # bwrap setup -> failure text (None: works)


class SandboxUnavailableError(RuntimeError):
    """bubblewrap is missing and the user did not opt into unsafe local execution."""


@dataclass(frozen=True)
class Limits:
    """Per-command resource limits. Defaults suit the embedded tasks (a tiny package + unittest)."""

    timeout_s: float = 10.0  # wall clock; the whole process tree is killed after it
    cpu_s: int = 10  # RLIMIT_CPU
    memory_bytes: int = 1 << 30  # RLIMIT_AS (address space)
    file_bytes: int = 8 << 20  # RLIMIT_FSIZE: the largest file a command may write
    max_processes: int = 64  # RLIMIT_NPROC for the sandbox uid
    max_output_chars: int = 200_000  # raw stdout+stderr kept before the tool's own truncation


@dataclass
class CommandResult:
    output: str  # stdout and stderr, interleaved as the command wrote them
    exit_code: int
    timed_out: bool = False
    channel: bytes = b""  # what the command wrote to its result pipe (``Sandbox.run(channel=N)``)


@dataclass
class Sandbox:
    """Executes commands for one episode's workspace (a host directory shown as ``/testbed``).

    ``unsafe_local=True`` (or ``UNIPOST_UNSAFE_LOCAL=1``) runs commands directly on the host when bwrap
    is absent: only for trusted policies (e.g. the scripted expert) on a developer machine.
    """

    workspace: Path
    limits: Limits = field(default_factory=Limits)
    unsafe_local: bool = False
    sandbox_uid: int | None = None  # as root: the uid commands run as (None: a fresh one per Sandbox)

    def __post_init__(self) -> None:
        self.workspace = Path(self.workspace).resolve()
        if not self.workspace.is_dir():
            raise ValueError(f"Sandbox workspace {self.workspace} does not exist or is not a directory.")
        # the host spellings of the workspace, longest first, for hide_host_paths
        names = {str(self.workspace), os.path.realpath(self.workspace)}
        self._host_names = sorted(names, key=len, reverse=True)
        self.bwrap = shutil.which("bwrap")
        self.unsafe_local = self.unsafe_local or os.environ.get(UNSAFE_ENV_VAR) == "1"
        if self.bwrap is None:
            if not self.unsafe_local:
                raise SandboxUnavailableError(
                    "bubblewrap (bwrap) is not installed, so model actions cannot be executed safely. "
                    "Install it (Debian/Ubuntu: apt-get install bubblewrap) or, for trusted policies only, "
                    f"opt into unsafe local execution with unsafe_local=True or {UNSAFE_ENV_VAR}=1."
                )
            warnings.warn(
                "UNSAFE LOCAL MODE: bwrap is missing; agent commands run directly on this host with only "
                "rlimits and a timeout. Never use this with untrusted models.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._drop_to = None
        if os.geteuid() == 0 and self.bwrap is not None:
            self._drop_to = self.sandbox_uid if self.sandbox_uid is not None else _fresh_uid()
        if self._drop_to is not None:
            _chown_tree(self.workspace, self._drop_to)
        if self.isolated:
            self._probe()

    def _probe(self) -> None:
        """Fail at construction, with the reason, when bwrap cannot actually start (once per process)."""
        key = (self.bwrap, self._drop_to is not None)
        if key not in _PROBED:
            res = self.run("python3 -c 'import sys; print(sys.version_info[0])'")
            _PROBED[key] = None if res.output.strip().endswith("3") else res.output.strip()[-500:]
        if _PROBED[key] is not None:
            raise SandboxUnavailableError(
                f"bubblewrap is installed but a sandboxed probe command failed: {_PROBED[key]!r}. "
                "Common causes: unprivileged user namespaces are disabled (sysctl "
                "kernel.unprivileged_userns_clone=1, or kernel.apparmor_restrict_unprivileged_userns=0 on "
                "Ubuntu), or there is no python3 under /usr/bin."
            )

    @property
    def isolated(self) -> bool:
        return self.bwrap is not None

    # -- public -------------------------------------------------------------------------------------
    def run(
        self,
        command: str,
        *,
        cwd: str = WORKSPACE,
        timeout_s: float | None = None,
        ro_binds: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        channel: int = 0,
    ) -> CommandResult:
        """Run ``bash -c command`` in the sandbox; never raises for the command's own failures.

        The output is read as a bounded stream (only its last ``max_output_chars`` bytes plus one read
        are ever held), and the command's whole process group is killed before this returns, whatever
        happened (timeout, an exception while reading, KeyboardInterrupt): no agent process outlives its
        call. ``channel > 0`` opens a second pipe whose descriptor number the command finds in
        ``$UNIPOST_CHANNEL_FD``; at most ``channel`` bytes of it are kept (``CommandResult.channel``):
        the verifier's result pipe, separate from what package code prints.
        """
        timeout = _clamp_timeout(timeout_s, self.limits.timeout_s)
        read_fd = write_fd = -1
        env = dict(env or {})
        if channel > 0:
            read_fd, write_fd = os.pipe()
            env[CHANNEL_ENV] = str(write_fd)
        try:
            argv, run_env = self._argv(command, cwd, ro_binds or {}, env)
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=run_env,
                cwd=str(self.workspace),
                preexec_fn=self._preexec,
                start_new_session=True,
                pass_fds=(write_fd,) if channel > 0 else (),
            )
        except BaseException:
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            raise
        if write_fd >= 0:
            os.close(write_fd)  # only the command holds the write end now: EOF when it is gone
        cap = max(self.limits.max_output_chars, 1)
        try:
            assert proc.stdout is not None
            raw, side, timed_out = _drain(proc, proc.stdout.fileno(), read_fd, cap, channel, timeout)
        finally:
            _kill_group(proc)  # every path, including exceptions: nothing the command started survives
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
            if read_fd >= 0:
                os.close(read_fd)
        output = raw.decode("utf-8", errors="replace")[-self.limits.max_output_chars :]
        output = self.hide_host_paths(output)
        code = proc.returncode if not timed_out else -1
        return CommandResult(output=output, exit_code=code, timed_out=timed_out, channel=side)

    def hide_host_paths(self, text: str) -> str:
        """Name the workspace ``/testbed`` wherever its host path appears (e.g. /proc/self/mountinfo).

        Observations must never tell the agent where on the host its workspace lives.
        """
        for host in self._host_names:
            if host in text:
                text = text.replace(host, WORKSPACE)
        return text

    def fix_ownership(self, path: Path) -> None:
        """Make a host-written file writable from inside the sandbox (host edits run as root)."""
        if self._drop_to is not None and path.exists():
            os.chown(path, self._drop_to, self._drop_to, follow_symlinks=False)

    # -- internals ----------------------------------------------------------------------------------
    def _argv(self, command: str, cwd: str, ro_binds: dict[str, str], env: dict[str, str]):
        base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKSPACE, "LANG": "C.UTF-8"}
        base_env |= {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": WORKSPACE} | env
        if not self.isolated:  # unsafe local: translate /testbed to the host directory
            host_env = {k: v.replace(WORKSPACE, str(self.workspace)) for k, v in base_env.items()}
            host_env["PATH"] = os.path.dirname(sys.executable) + ":" + host_env["PATH"]
            host_cwd = cwd.replace(WORKSPACE, str(self.workspace), 1)
            script = f"cd {_quote(host_cwd)} 2>/dev/null; " + command.replace(WORKSPACE, str(self.workspace))
            return ["/bin/bash", "-c", script], host_env
        argv = [self.bwrap, "--unshare-all", "--die-with-parent", "--new-session"]
        argv += ["--ro-bind", "/usr", "/usr"]
        for name in ("bin", "lib", "lib64", "sbin"):
            host = Path("/" + name)
            if host.is_symlink():
                argv += ["--symlink", os.readlink(host), "/" + name]
            elif host.is_dir():
                argv += ["--ro-bind", str(host), "/" + name]
        if Path("/etc/alternatives").is_dir():
            argv += ["--ro-bind", "/etc/alternatives", "/etc/alternatives"]
        argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        argv += ["--bind", str(self.workspace), WORKSPACE]
        for host_path, inside in ro_binds.items():
            argv += ["--ro-bind", host_path, inside]
        argv += ["--chdir", cwd, "--clearenv"]
        for key, value in base_env.items():
            argv += ["--setenv", key, value]
        argv += ["/bin/bash", "-c", command]
        return argv, dict(base_env)

    def _preexec(self) -> None:
        lim = self.limits
        resource.setrlimit(resource.RLIMIT_CPU, (lim.cpu_s, lim.cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (lim.memory_bytes, lim.memory_bytes))
        resource.setrlimit(resource.RLIMIT_FSIZE, (lim.file_bytes, lim.file_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        if self._drop_to is not None:
            os.setgroups([])
            os.setgid(self._drop_to)
            os.setuid(self._drop_to)
            resource.setrlimit(resource.RLIMIT_NPROC, (lim.max_processes, lim.max_processes))
        elif os.geteuid() != 0:
            # NPROC counts all processes of this user; leave room for the ones already running.
            mine = _count_user_processes(os.getuid())
            n = mine + lim.max_processes
            resource.setrlimit(resource.RLIMIT_NPROC, (n, n))


_UID_BASE = 3_000_000  # far above real accounts (and the usual /etc/subuid ranges)
_uid_counter = itertools.count()


def _fresh_uid() -> int:
    """A uid for one sandbox: process-count limits then apply per episode, not across episodes."""
    return _UID_BASE + (os.getpid() % 50_000) * 1000 + next(_uid_counter) % 1000


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None


def _clamp_timeout(asked: float | None, default: float) -> float:
    """The wall clock for one command: ``asked`` when it is a finite number in [1, 6x default].

    A NaN or infinite timeout must never reach the wait (NaN made ``communicate`` raise while the
    command kept running), so anything not finite falls back to the default.
    """
    default = default if math.isfinite(default) and default > 0 else 10.0
    if asked is None or isinstance(asked, bool) or not isinstance(asked, (int, float)):
        return default
    if not math.isfinite(asked) or asked <= 0:
        return default
    return min(max(float(asked), 1.0), max(default, 1.0) * MAX_TIMEOUT_FACTOR)


def _drain(
    proc: subprocess.Popen, out_fd: int, side_fd: int, cap: int, side_cap: int, timeout: float
) -> tuple[bytes, bytes, bool]:
    """Read stdout (keeping its last ``cap`` bytes) and the side channel (its first ``side_cap``)
    until both reach EOF or ``timeout`` passes; returns (output, channel, timed_out).

    Memory stays bounded by cap + side_cap + one chunk whatever the command writes (300 MB of output
    used to be held in full before it was cut).
    """
    deadline = time.monotonic() + timeout
    out = bytearray()
    side = bytearray()
    poller = select.poll()
    fds = {out_fd}
    poller.register(out_fd, select.POLLIN)
    if side_fd >= 0:
        fds.add(side_fd)
        poller.register(side_fd, select.POLLIN)
    while fds:
        left = deadline - time.monotonic()
        if left <= 0:
            return bytes(out), bytes(side), True
        for fd, _event in poller.poll(min(left, 1.0) * 1000):
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                poller.unregister(fd)
                fds.discard(fd)
            elif fd == out_fd:
                out += chunk
                if len(out) > cap:
                    del out[: len(out) - cap]
            elif len(side) < side_cap:
                side += chunk[: side_cap - len(side)]
    try:
        proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
    except subprocess.TimeoutExpired:
        return bytes(out), bytes(side), True
    return bytes(out), bytes(side), False


def _kill_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def _count_user_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                continue
    return count


def _quote(s: str) -> str:
    import shlex

    return shlex.quote(s)

"""Run an agent's shell commands under bubblewrap, with resource limits and a scrubbed environment.

Why bubblewrap and not Docker: it needs no daemon, starts in milliseconds and is an ordinary Debian
package, so the embedded environment runs on a laptop and on CI. What it does and does not guarantee
is written down in docs/sandbox.md; for untrusted models at scale use the Docker-based OpenHands runtime.

Layout inside the sandbox: ``/usr`` (and the symlinked ``/bin``, ``/lib``, ``/lib64``) read-only, with
every ``site-packages``/``dist-packages`` directory under it and the directory of the running unipost
package (wherever it is installed) covered by an empty read-only tmpfs: the task generator is the answer
key, and the tasks need only the stdlib. ``/tmp`` and ``/testbed`` are size-limited tmpfs mounts
(``Limits.tmp_bytes``, ``Limits.workspace_bytes``); everything else, ``/`` and ``/dev`` included, is
read-only, so nothing the agent writes lands anywhere unbounded, on disk or in memory. ``--unshare-all``
leaves the command without network. Optional extra read-only binds (the verifier's hidden tests) are
given per call.

Why the workspace is copied in and out instead of bound: a bind of the host workspace (the old design)
put the host path into the agent's mount table (``/proc/self/mountinfo``, readable in any encoding) and
let the agent fill the host filesystem at the speed of ``head -c``. Now the host directory is only the
persistent store between commands: each command's ``/testbed`` is a fresh tmpfs of bounded size, seeded
from a tar stream the host writes on the command's stdin (from a thread: it may exceed a pipe buffer).
A small wrapper script inside bwrap unpacks it, runs the agent's command (stdin ``/dev/null``) under
``timeout -s KILL`` (so the copy-out still happens after a timeout), kills every other process of the
namespace (``kill -KILL -1``, repeated until none is left), and writes ``tar -c`` of ``/testbed`` to a
dedicated pipe. The host treats that stream as hostile: at most ``workspace_bytes`` of content and
``workspace_inodes`` entries, a byte cap on the stream, GNU-format headers only (no pax, no sparse, long
names at most 8 KiB, checked as the bytes arrive), no absolute or ``..`` names, no hard links, devices
or duplicates, no entry below anything but a directory it created itself; symlinks stay symlinks and
are never followed. It is unpacked into a private staging directory and only a complete, valid copy
replaces the workspace's contents (entry by entry, so the workspace directory keeps its inode for
anyone holding it); anything else leaves the previous workspace and becomes
``CommandResult.workspace_error`` (an ``ERROR:`` observation; the episode goes on). The inode bound is
checked at copy-out only (bwrap cannot pass ``nr_inodes``): within one command the count of files is
bounded by the command's CPU and wall-clock limits. Cost: a few milliseconds per command on a task
workspace (docs/sandbox.md has the figures).

Process-count limit: RLIMIT_NPROC is counted per *real* user and ignored for root, so when the host
process is root the sandboxed command runs as an unprivileged uid of its own (one per ``Sandbox``, from a
range no real account uses): bwrap then builds an unprivileged user namespace and the limit stops a fork
bomb (verified in tests/test_sandbox.py) without starving the episodes running beside it.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import math
import os
import resource
import select
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    # Everything the agent can write is bounded per episode: /testbed (a tmpfs of this size in each
    # command, and the host store between commands, checked at copy-out and by the file editor) ...
    workspace_bytes: int = 256 << 20
    workspace_inodes: int = 20_000  # files, directories, links and FIFOs kept between commands
    tmp_bytes: int = 64 << 20  # ... and /tmp, a fresh tmpfs of this size per command


@dataclass
class CommandResult:
    output: str  # stdout and stderr, interleaved as the command wrote them
    exit_code: int
    timed_out: bool = False
    channel: bytes = b""  # what the command wrote to its result pipe (``Sandbox.run(channel=N)``)
    # why the command's changes to /testbed were not kept (over a bound, an invalid copy-out); None: kept
    workspace_error: str | None = None


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
        # found per sandbox (i.e. per episode), so a package installed while training runs is hidden too
        self.hidden_paths: list[str] = hidden_paths() if self.isolated else []
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
                "Ubuntu), there is no python3 under /usr/bin, or bwrap is older than 0.5 (no --size)."
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
        persist: bool = True,
    ) -> CommandResult:
        """Run ``bash -c command`` in the sandbox; never raises for the command's own failures.

        The output is read as a bounded stream (only its last ``max_output_chars`` bytes plus one read
        are ever held), and the command's whole process group is killed before this returns, whatever
        happened (timeout, an exception while reading, KeyboardInterrupt): no agent process outlives its
        call. ``channel > 0`` opens a second pipe whose descriptor number the command finds in
        ``$UNIPOST_CHANNEL_FD``; at most ``channel`` bytes of it are kept (``CommandResult.channel``):
        the verifier's result pipe, separate from what package code prints. ``persist=False`` runs the
        command on a copy of the workspace and keeps none of its changes.
        """
        timeout = _clamp_timeout(timeout_s, self.limits.timeout_s)
        if not self.isolated:
            return self._run_local(command, cwd, timeout, env or {}, channel)
        env = dict(env or {})
        pipes: dict[str, tuple[int, int]] = {}
        try:
            if channel > 0:
                pipes["channel"] = os.pipe()
                env[CHANNEL_ENV] = str(pipes["channel"][1])
            if persist:
                pipes["out"] = os.pipe()
            out_w = pipes["out"][1] if persist else -1
            argv, run_env = self._wrapped_argv(command, cwd, ro_binds or {}, env, timeout, out_w)
            started = time.monotonic()
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=run_env,
                cwd="/",
                preexec_fn=self._preexec,
                start_new_session=True,
                pass_fds=tuple(w for _r, w in pipes.values()),
            )
        except BaseException:
            for pair in pipes.values():
                for fd in pair:
                    os.close(fd)
            raise
        for _r, w in pipes.values():
            os.close(w)  # only the sandbox holds the write ends now: EOF when it is gone
        read_fd = pipes["channel"][0] if channel > 0 else -1
        seeded = _Manifest()
        seeder = threading.Thread(target=self._seed, args=(proc.stdin, seeded), daemon=True)
        seeder.start()
        stop = threading.Event()
        adopter = _Adopter(self, pipes["out"][0], stop, seeded) if persist else None
        if adopter is not None:
            adopter.start()
        cap = max(self.limits.max_output_chars, 1)
        hard = timeout + _copy_grace_s(self.limits)  # the wrapper enforces `timeout`; this is the backstop
        host_timeout = False
        try:
            assert proc.stdout is not None
            raw, side, host_timeout = _drain(proc, proc.stdout.fileno(), read_fd, cap, channel, hard)
            if adopter is not None and not host_timeout:
                adopter.join(max(started + hard - time.monotonic(), 0.1))
        finally:
            _kill_group(proc)  # every path, including exceptions: nothing the command started survives
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            stop.set()
            if adopter is not None:
                adopter.join(10)
            seeder.join(10)
            if proc.stdout is not None:
                proc.stdout.close()
            if read_fd >= 0:
                os.close(read_fd)
            if adopter is not None:
                adopter.finish()  # swaps a complete, valid copy in, or removes the staging directory
        elapsed = time.monotonic() - started
        timed_out = host_timeout or (proc.returncode == 128 + signal.SIGKILL and elapsed >= timeout)
        output = raw.decode("utf-8", errors="replace")[-self.limits.max_output_chars :]
        output = self.hide_host_paths(output)
        code = proc.returncode if not timed_out else -1
        error = adopter.error if adopter is not None else None
        result = CommandResult(output=output, exit_code=code, timed_out=timed_out, channel=side)
        result.workspace_error = self.hide_host_paths(error) if error else None
        return result

    def _run_local(
        self, command: str, cwd: str, timeout: float, env: dict[str, str], channel: int
    ) -> CommandResult:
        """Unsafe local mode (no bwrap): the command runs on the host workspace itself, as before; the
        workspace bound can only be checked afterwards (and nothing is undone)."""
        read_fd = write_fd = -1
        if channel > 0:
            read_fd, write_fd = os.pipe()
            env[CHANNEL_ENV] = str(write_fd)
        try:
            argv, run_env = self._argv(command, cwd, {}, env)
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
            os.close(write_fd)
        cap = max(self.limits.max_output_chars, 1)
        try:
            assert proc.stdout is not None
            raw, side, timed_out = _drain(proc, proc.stdout.fileno(), read_fd, cap, channel, timeout)
        finally:
            _kill_group(proc)
            with contextlib.suppress(Exception):
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
            if read_fd >= 0:
                os.close(read_fd)
        output = raw.decode("utf-8", errors="replace")[-self.limits.max_output_chars :]
        output = self.hide_host_paths(output)
        code = proc.returncode if not timed_out else -1
        result = CommandResult(output=output, exit_code=code, timed_out=timed_out, channel=side)
        used, count = workspace_usage(self.workspace, stop_after=self.limits.workspace_inodes + 1)
        if used > self.limits.workspace_bytes or count > self.limits.workspace_inodes:
            result.workspace_error = (
                f"The workspace now exceeds its bounds ({_bounds(self.limits)}); in unsafe local mode "
                "the command's changes could not be undone."
            )
        return result

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
    def _env(self, env: dict[str, str]) -> dict[str, str]:
        base_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKSPACE, "LANG": "C.UTF-8"}
        return base_env | {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": WORKSPACE} | env

    def _system_args(self, ro_binds: dict[str, str]) -> list[str]:
        """The bwrap arguments every sandboxed process shares: the read-only system with the packages
        hidden, /proc, /dev, a bounded /tmp, the extra read-only binds."""
        assert self.bwrap is not None
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
        for path in self.hidden_paths:  # an empty, read-only tmpfs over each (4 KiB: nothing fits anyway)
            argv += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
        argv += ["--proc", "/proc", "--dev", "/dev"]
        argv += ["--size", str(max(self.limits.tmp_bytes, 4096)), "--tmpfs", "/tmp"]
        for host_path, inside in ro_binds.items():
            argv += ["--ro-bind", host_path, inside]
        return argv

    def _argv(self, command: str, cwd: str, ro_binds: dict[str, str], env: dict[str, str]):
        """``bash -c command`` with the host workspace *bound* at /testbed: what a long-lived process
        (the OpenHands worker, ``spawn``) gets, and the unsafe local mode's host command. ``run`` uses
        :meth:`_wrapped_argv` instead (no bind of any host workspace path)."""
        base_env = self._env(env)
        if not self.isolated:  # unsafe local: translate /testbed to the host directory
            host_env = {k: v.replace(WORKSPACE, str(self.workspace)) for k, v in base_env.items()}
            host_env["PATH"] = os.path.dirname(sys.executable) + ":" + host_env["PATH"]
            host_cwd = cwd.replace(WORKSPACE, str(self.workspace), 1)
            script = f"cd {_quote(host_cwd)} 2>/dev/null; " + command.replace(WORKSPACE, str(self.workspace))
            return ["/bin/bash", "-c", script], host_env
        argv = self._system_args(ro_binds)
        argv += ["--bind", str(self.workspace), WORKSPACE, "--remount-ro", "/dev", "--remount-ro", "/"]
        argv += ["--chdir", cwd, "--clearenv"]
        for key, value in base_env.items():
            argv += ["--setenv", key, value]
        argv += ["/bin/bash", "-c", command]
        return argv, dict(base_env)

    def _wrapped_argv(
        self,
        command: str,
        cwd: str,
        ro_binds: dict[str, str],
        env: dict[str, str],
        timeout: float,
        out_fd: int,
    ) -> tuple[list[str], dict[str, str]]:
        """bwrap running :data:`_WRAPPER` with /testbed a size-limited tmpfs; ``out_fd < 0``: no copy-out."""
        base_env = self._env(env)
        argv = self._system_args(ro_binds)
        argv += ["--size", str(max(self.limits.workspace_bytes, 4096)), "--tmpfs", WORKSPACE]
        argv += ["--remount-ro", "/dev", "--remount-ro", "/", "--chdir", WORKSPACE, "--clearenv"]
        for key, value in base_env.items():
            argv += ["--setenv", key, value]
        argv += ["/bin/bash", "-c", _WRAPPER, "unipost-sandbox", str(out_fd), f"{timeout:.3f}", cwd, command]
        return argv, dict(base_env)

    def _seed(self, pipe: Any, seeded: _Manifest | None = None) -> None:
        """Write the workspace as a tar stream to the wrapper's stdin (thread; errors only end it);
        ``seeded`` gets the manifest of what was sent, complete only if all of it was."""
        try:
            with pipe, tarfile.open(fileobj=pipe, mode="w|", format=tarfile.GNU_FORMAT) as tf:
                _add_tree(tf, self.workspace, seeded)
            if seeded is not None:
                seeded.complete = True
        except (OSError, ValueError, tarfile.TarError):
            pass  # the sandbox went away (killed, timed out): nothing to deliver to

    def _adopt(self, stream: Any) -> str | None:
        """Replace the workspace's contents with the tar ``stream`` (a copy-out) if it is complete and
        within the bounds; otherwise leave the workspace as it was. Returns the reason it was refused,
        or None. ``stream`` needs only ``read(n)``."""
        stage = Path(tempfile.mkdtemp(prefix=".unipost-stage-", dir=self.workspace.parent))
        try:
            error = _extract(
                _GuardedStream(stream.read, _stream_cap(self.limits)), stage, self.limits, self._drop_to
            )
            if error is None:
                _swap_contents(self.workspace, stage)
            return error
        finally:
            shutil.rmtree(stage, ignore_errors=True)

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


# -- the answer key stays outside --------------------------------------------------------------------
# Where third-party Python packages live under the bound /usr: Debian's dist-packages, the official
# images' /usr/local/lib/python3.X/site-packages, prefixes installed under /usr/local (conda, pyenv).
_SITE_GLOBS = (
    "/usr/lib*/python*/*-packages",
    "/usr/local/lib*/python*/*-packages",
    "/usr/*/lib*/python*/*-packages",  # a venv or prefix directly under /usr (/usr/venv, /usr/.venv)
    "/usr/local/*/lib*/python*/*-packages",
    "/usr/local/*/envs/*/lib*/python*/*-packages",
    "/usr/share/python*/*-packages",
)
_HIDDEN_TOO: dict[str, Any] = {"include_hidden": True} if sys.version_info >= (3, 11) else {}
_BOUND_ROOTS = ("/usr/",)  # host trees the sandbox sees (the rest of its root is its own tmpfs)


_PROJECT_MARKERS = ("pyproject.toml", "setup.py", "setup.cfg", ".git")


def package_dirs() -> list[Path]:
    """The directory of the running unipost package, as imported and with links resolved, and, when it
    runs from a source checkout (its parent holds ``pyproject.toml``, ``setup.py``, ``setup.cfg`` or
    ``.git``), that whole checkout: its ``.git`` objects, ``build/lib`` copy, sdists and tests hold the
    same source.

    Hidden inside the sandbox wherever it is installed: it holds the task generator, and the tasks,
    hidden tests and expected values are a pure function of (split, index, difficulty).
    """
    here = Path(__file__).parents[2]  # .../unipost (this file is unipost/envs/embedded/sandbox.py)
    found = {here, here.resolve()}
    for pkg in list(found):
        root = pkg.parent
        if root.name.endswith("-packages") or not any((root / m).exists() for m in _PROJECT_MARKERS):
            continue
        if not _holds_the_interpreter(root):  # never hide the python3 the commands run
            found |= {root, root.resolve()}
    return sorted(found)


def _holds_the_interpreter(root: Path) -> bool:
    import sysconfig

    real = os.path.realpath(root).rstrip("/") + "/"
    inside = [sys.base_prefix, sysconfig.get_paths().get("stdlib", "")]
    inside += [shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin") or ""]
    return any(p and os.path.realpath(p).startswith(real) for p in inside)


def hidden_paths() -> list[str]:
    """Host directories under a bound path that each command sees as an empty, read-only directory:
    every site-packages/dist-packages (the tasks need only the stdlib) and the running unipost package.

    Each is a real directory given by its resolved path (bwrap mounts on the path as the sandbox sees
    it, and ``/lib`` is a link there too); one inside another is covered by the outer one.
    """
    import site
    import sysconfig

    found: set[str] = set()
    candidates: list[str] = []
    for pattern in _SITE_GLOBS:
        candidates += glob.glob(pattern, **_HIDDEN_TOO)
    with contextlib.suppress(Exception):
        candidates += site.getsitepackages()
    with contextlib.suppress(Exception):
        candidates += [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    candidates += [str(p) for p in package_dirs()]
    for cand in candidates:
        real = os.path.realpath(cand)
        if real.startswith(_BOUND_ROOTS) and os.path.isdir(real):
            found.add(real)
    ordered = sorted(found)
    kept: list[str] = []
    for path in ordered:  # sorted: a parent comes before what is inside it
        if not any(path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return kept


# -- the workspace, copied in and out ----------------------------------------------------------------
# The wrapper run by bash inside bwrap: $1 the copy-out descriptor (-1: none), $2 the wall clock in
# seconds, $3 the working directory, $4 the agent's command. Its exit status is the command's.
_WRAPPER = r"""
out=$1 limit=$2 wd=$3 cmd=$4
umask 022
if ! tar -x -p -f - -C /testbed --no-same-owner --delay-directory-restore; then
  echo "unipost: the workspace could not be copied into the sandbox" >&2
  exit 125
fi
cd -- "$wd" 2>/dev/null || cd /testbed
(
  if [ "$out" -ge 0 ]; then eval "exec $out>&-"; fi
  exec timeout -s KILL "$limit" /bin/bash -c "$cmd"
) </dev/null
rc=$?
[ "$out" -ge 0 ] || exit $rc
kill -KILL -1 2>/dev/null
tries=0
while :; do
  alive=
  for p in /proc/[0-9]*; do
    q=${p#/proc/}
    if [ "$q" = 1 ] || [ "$q" = $$ ]; then continue; fi
    read -r st < "$p/stat" 2>/dev/null || continue
    st=${st##*) }
    case ${st%% *} in Z|X) ;; *) alive=1; break ;; esac
  done
  [ -z "$alive" ] && break
  tries=$((tries + 1))
  [ $tries -gt 300 ] && break
  kill -KILL -1 2>/dev/null
  sleep 0.01
done
chmod -R u+rX /testbed 2>/dev/null
tar -c -f - -C /testbed --format=gnu --hard-dereference --numeric-owner . 2>/dev/null >&"$out"
exit $rc
"""
_PAGE = 4096
_MAX_LONG_HEADER = 8192  # a GNU long name or link target (PATH_MAX is 4096)
_MEMBER_OVERHEAD = 2 * (512 + _MAX_LONG_HEADER) + 512  # headers of one member, at most


def _pages(n: int) -> int:
    """Bytes a file of ``n`` bytes takes on tmpfs (whole pages): the unit of the workspace bound."""
    return -(-n // _PAGE) * _PAGE


def _link_cost(target: str) -> int:
    return _PAGE if len(target) >= 128 else 0  # tmpfs keeps short link targets in the inode


def _bounds(limits: Limits) -> str:
    return (
        f"at most {limits.workspace_bytes} bytes (Limits.workspace_bytes) and {limits.workspace_inodes} "
        "files and directories (Limits.workspace_inodes)"
    )


def _stream_cap(limits: Limits) -> int:
    return limits.workspace_bytes + (limits.workspace_inodes + 2) * _MEMBER_OVERHEAD + (1 << 20)


def _copy_grace_s(limits: Limits) -> float:
    """Time allowed beyond the command's own clock for the copy in and out (~32 MiB/s, plus 10 s)."""
    return 10.0 + limits.workspace_bytes / (32 << 20)


def workspace_usage(root: Path, stop_after: int | None = None) -> tuple[int, int]:
    """(bytes, entries) of a host workspace as the bounds count them: regular files in whole pages,
    long link targets a page, directories and FIFOs nothing but an entry. Never follows links.
    ``stop_after``: stop counting once this many entries were seen (the bound is already exceeded)."""
    used = count = 0
    todo = [os.fspath(root)]
    while todo:
        try:
            it = os.scandir(todo.pop())
        except OSError:
            continue
        with it:
            for entry in it:
                count += 1
                if stop_after is not None and count >= stop_after:
                    return used, count
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    todo.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    used += _pages(st.st_size)
                elif stat.S_ISLNK(st.st_mode):
                    used += _PAGE if st.st_size >= 128 else 0
    return used, count


def _add_tree(tf: tarfile.TarFile, root: Path, seeded: _Manifest | None = None) -> None:
    """Add a host workspace to a tar stream: directories, regular files, links (as links) and FIFOs;
    files are opened without following links or blocking, and only regular ones are read. ``seeded``
    records each entry as sent (see :class:`_Manifest`)."""
    note = seeded.entries.append if seeded is not None else (lambda _entry: None)
    base = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = os.path.relpath(dirpath, base)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            try:
                st = os.lstat(path)
            except OSError:
                continue
            info = tarfile.TarInfo(rel)
            info.mode, info.mtime = stat.S_IMODE(st.st_mode), int(st.st_mtime)
            if stat.S_ISDIR(st.st_mode):
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
                note((rel, "d", info.mode, 0, 0, "", 0))
            elif stat.S_ISLNK(st.st_mode):
                info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
                tf.addfile(info)
                note((rel, "l", 0, 0, 0, info.linkname, 0))
            elif stat.S_ISFIFO(st.st_mode):
                info.type = tarfile.FIFOTYPE
                tf.addfile(info)
                note((rel, "p", info.mode, 0, 0, "", 0))
            elif stat.S_ISREG(st.st_mode):
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError:
                    continue
                with os.fdopen(fd, "rb") as fh:
                    fst = os.fstat(fd)
                    if not stat.S_ISREG(fst.st_mode):
                        continue
                    info.size = fst.st_size
                    summed = _Summed(fh)
                    tf.addfile(info, summed)
                    note((rel, "f", info.mode, info.size, info.mtime, "", summed.crc))


class _RefusedError(Exception):
    """The copy-out is refused as a whole; the message says why (it becomes the observation)."""


class _StoppedError(Exception):
    """The run ended (or its backstop passed) before the copy-out did."""


_KEPT = "The command's changes to /testbed were not kept"
_ALLOWED_TYPES = {b"0", b"\0", b"7", b"5", b"2", b"6", b"L", b"K"}  # what GNU tar -c of a tmpfs writes


class _GuardedStream:
    """A byte cap and a header check over a copy-out stream, as the bytes pass to ``tarfile``.

    ``tarfile`` reads GNU long names and pax headers into memory whole, and ends its iteration quietly
    at a bad or missing header (a stream cut short or with garbage in it would look complete). So every
    512-byte header is checked here first: a valid checksum, a known member type, a long name of at
    most 8 KiB, an octal size; ``done`` is set by the end-of-archive block only.
    """

    def __init__(self, read: Callable[[int], bytes], cap: int) -> None:
        self._read, self._cap = read, cap
        self.total = 0
        self.done = False
        self._next = 0  # stream offset of the next header
        self._hdr = bytearray()

    def read(self, n: int = -1) -> bytes:
        chunk = self._read(n if n is not None and n > 0 else 1 << 16)
        start = self.total
        self.total += len(chunk)
        if self.total > self._cap:
            raise _RefusedError(f"{_KEPT}: the copy-out is larger than the workspace bound allows.")
        if not self.done:
            self._scan(chunk, start)
        return chunk

    def _scan(self, chunk: bytes, start: int) -> None:
        end = start + len(chunk)
        while not self.done:
            at = self._next + len(self._hdr)
            if at >= end:
                return
            take = chunk[at - start : at - start + 512 - len(self._hdr)]
            self._hdr += take
            if len(self._hdr) < 512:
                return
            self._check(bytes(self._hdr))
            self._hdr.clear()

    def _check(self, hdr: bytes) -> None:
        if hdr == bytes(512):
            self.done = True
            return
        try:
            want = int(hdr[148:156].replace(b"\0", b" ").strip() or b"0", 8)
            size_field = hdr[124:136]
            if size_field[0] & 0x80:
                raise ValueError("base-256 size")
            size = int(size_field.replace(b"\0", b" ").strip() or b"0", 8)
        except ValueError:
            raise _RefusedError(f"{_KEPT}: the copy-out is not a valid archive.") from None
        unsigned = sum(hdr[:148]) + 256 + sum(hdr[156:])
        signed = sum(b - 256 if b > 127 else b for b in hdr[:148] + hdr[156:]) + 256
        if want not in (unsigned, signed):
            raise _RefusedError(f"{_KEPT}: the copy-out is not a valid archive.")
        kind = hdr[156:157]
        if kind not in _ALLOWED_TYPES:
            raise _RefusedError(f"{_KEPT}: the copy-out holds an entry of a refused type ({kind!r}).")
        if kind in (b"L", b"K") and size > _MAX_LONG_HEADER:
            raise _RefusedError(f"{_KEPT}: the copy-out holds a name longer than {_MAX_LONG_HEADER} bytes.")
        data = size if kind in (b"0", b"\0", b"7", b"L", b"K") else 0
        self._next += 512 + -(-data // 512) * 512


def _member_name(name: str) -> str | None:
    """The member's path relative to /testbed ("" for /testbed itself), or None when unsafe."""
    if name.startswith("/") or "\0" in name or len(name) > 4096:
        return None
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None
    return "/".join(parts)


def _extract(
    stream: _GuardedStream, stage: Path, limits: Limits, uid: int | None, got: _Manifest | None = None
) -> str | None:
    """Unpack a copy-out into the empty, private ``stage``; None when it is complete and valid.

    Only this function writes below ``stage`` (the agent has no bind of any host path), and every entry
    is created below a directory created here: never through a link, never over an existing entry.
    """
    kinds: dict[str, str] = {"": "d"}
    used = count = 0
    note = got.entries.append if got is not None else (lambda _entry: None)
    root = os.open(stage, _O_DIR)
    cached: tuple[str, int] | None = None

    def parent_fd(parent: str) -> int:
        nonlocal cached
        if cached is not None and cached[0] == parent:
            return cached[1]
        if cached is not None:
            os.close(cached[1])
            cached = None
        fd = os.open(".", _O_DIR, dir_fd=root)
        for comp in parent.split("/") if parent else []:
            nxt = os.open(comp, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        cached = (parent, fd)
        return fd

    try:
        try:
            tf = tarfile.open(fileobj=stream, mode="r|")  # type: ignore[call-overload]  # noqa: SIM115
        except tarfile.ReadError:
            return f"{_KEPT}: the sandbox returned no copy of it (the command ended its own sandbox?)."
        with tf:
            for m in tf:
                name = _member_name(m.name)
                if name is None:
                    raise _RefusedError(f"{_KEPT}: the copy-out names a path outside /testbed.")
                if name == "":
                    if not m.isdir():
                        raise _RefusedError(f"{_KEPT}: the copy-out is not a valid archive.")
                    continue
                parent, _, base = name.rpartition("/")
                if name in kinds or kinds.get(parent) != "d":
                    raise _RefusedError(f"{_KEPT}: the copy-out is not a valid archive (entry order).")
                count += 1
                if count > limits.workspace_inodes:
                    raise _RefusedError(f"{_KEPT}: /testbed would hold more than {_bounds(limits)}.")
                pfd = parent_fd(parent)
                if m.isdir():
                    os.mkdir(base, 0o700, dir_fd=pfd)
                    fd = os.open(base, _O_DIR, dir_fd=pfd)
                    _settle(fd, (m.mode & 0o755) | 0o700, None, uid)
                    kinds[name] = "d"
                    note((name, "d", (m.mode & 0o755) | 0o700, 0, 0, "", 0))
                elif m.type in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE):
                    used += _pages(m.size)
                    if used > limits.workspace_bytes or m.size > limits.file_bytes:
                        raise _RefusedError(f"{_KEPT}: /testbed would hold more than {_bounds(limits)}.")
                    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
                    fd = os.open(base, flags, 0o600, dir_fd=pfd)
                    src = tf.extractfile(m)
                    assert src is not None
                    left, crc = m.size, 0
                    while left > 0:
                        data = src.read(min(left, 1 << 16))
                        if not data:
                            raise _RefusedError(f"{_KEPT}: the copy-out was cut short.")
                        left -= len(data)
                        crc = zlib.crc32(data, crc)
                        view = memoryview(data)
                        while view:
                            view = view[os.write(fd, view) :]
                    _settle(fd, (m.mode & 0o755) | 0o600, m.mtime, uid)
                    kinds[name] = "f"
                    note((name, "f", (m.mode & 0o755) | 0o600, m.size, int(m.mtime), "", crc))
                elif m.issym():
                    if len(m.linkname) > 4096 or "\0" in m.linkname:
                        raise _RefusedError(f"{_KEPT}: the copy-out is not a valid archive.")
                    used += _link_cost(m.linkname)
                    if used > limits.workspace_bytes:
                        raise _RefusedError(f"{_KEPT}: /testbed would hold more than {_bounds(limits)}.")
                    os.symlink(m.linkname, base, dir_fd=pfd)
                    if uid is not None:
                        os.chown(base, uid, uid, dir_fd=pfd, follow_symlinks=False)
                    kinds[name] = "l"
                    note((name, "l", 0, 0, 0, m.linkname, 0))
                elif m.isfifo():
                    os.mkfifo(base, 0o600, dir_fd=pfd)
                    fd = os.open(base, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
                    _settle(fd, (m.mode & 0o755) | 0o600, None, uid)
                    kinds[name] = "p"
                    note((name, "p", (m.mode & 0o755) | 0o600, 0, 0, "", 0))
                else:  # hard links (tar -c dereferences them), devices, anything else: forged
                    raise _RefusedError(f"{_KEPT}: the copy-out holds an entry of a refused type.")
        if not stream.done:
            return f"{_KEPT}: the copy-out was cut short."
    except _RefusedError as exc:
        return str(exc)
    except (tarfile.TarError, OSError, ValueError, UnicodeError, EOFError) as exc:
        return f"{_KEPT}: the copy-out could not be unpacked ({type(exc).__name__})."
    finally:
        if cached is not None:
            os.close(cached[1])
        os.close(root)
    return None


def _settle(fd: int, mode: int, mtime: float | None, uid: int | None) -> None:
    """Mode, time and owner of an entry just created, then close its descriptor."""
    try:
        os.fchmod(fd, mode)
        if mtime is not None:
            with contextlib.suppress(OSError, OverflowError, ValueError):
                os.utime(fd, (mtime, mtime))
        if uid is not None:
            os.fchown(fd, uid, uid)
    finally:
        os.close(fd)


def _swap_contents(workspace: Path, stage: Path) -> None:
    """Move the staged entries into the workspace in place of its current ones.

    Entry by entry, not a rename of the directory: whoever holds the workspace directory (an open
    descriptor, a long-lived sandbox's bind) keeps seeing the workspace. No process of the agent is
    alive while this runs; a rename that fails puts the old entries back.
    """
    trash = Path(tempfile.mkdtemp(prefix=".unipost-old-", dir=workspace.parent))
    wfd, sfd, tfd = os.open(workspace, _O_DIR), os.open(stage, _O_DIR), os.open(trash, _O_DIR)
    try:
        old = os.listdir(wfd)
        try:
            for name in old:
                os.rename(name, name, src_dir_fd=wfd, dst_dir_fd=tfd)
            for name in os.listdir(sfd):
                os.rename(name, name, src_dir_fd=sfd, dst_dir_fd=wfd)
        except OSError:
            for name in os.listdir(wfd):
                with contextlib.suppress(OSError):
                    os.rename(name, name, src_dir_fd=wfd, dst_dir_fd=sfd)
            for name in os.listdir(tfd):
                with contextlib.suppress(OSError):
                    os.rename(name, name, src_dir_fd=tfd, dst_dir_fd=wfd)
            raise
    finally:
        for fd in (wfd, sfd, tfd):
            os.close(fd)
        shutil.rmtree(trash, ignore_errors=True)


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _PipeReader:
    """Blocking reads from a pipe that give up once ``stop`` is set (polled every 100 ms)."""

    def __init__(self, fd: int, stop: threading.Event) -> None:
        self.fd, self.stop = fd, stop

    def read(self, n: int) -> bytes:
        while True:
            if self.stop.is_set():
                raise _StoppedError
            ready, _, _ = select.select([self.fd], [], [], 0.1)
            if ready:
                return os.read(self.fd, min(n, 1 << 16))


class _Manifest:
    """What a tar stream held, entry by entry, as the host itself read or wrote it: (path, kind, mode,
    size, mtime, link target, CRC-32 of the content) per entry. The seeding thread records the workspace
    it sends; the adopter records the copy-out it validated and unpacked (modes as it sets them). Both
    come from bytes the host handled, never from anything the sandbox reports about itself."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, str, int, int, int, str, int]] = []
        self.complete = False

    def same_as(self, other: _Manifest) -> bool:
        return self.complete and other.complete and sorted(self.entries) == sorted(other.entries)


class _Summed:
    """A file object whose reads update a CRC-32 (the seeded content's, for the manifest)."""

    def __init__(self, fh: Any) -> None:
        self.fh, self.crc = fh, 0

    def read(self, n: int = -1) -> bytes:
        data = self.fh.read(n)
        self.crc = zlib.crc32(data, self.crc)
        return data


class _Adopter(threading.Thread):
    """Reads and unpacks one command's copy-out while the command runs; ``finish`` (called once the
    sandbox is gone) puts a complete copy in place, or records why not in ``error``."""

    def __init__(
        self, sandbox: Sandbox, fd: int, stop: threading.Event, seeded: _Manifest | None = None
    ) -> None:
        super().__init__(daemon=True)
        self.sandbox, self.fd, self.stop = sandbox, fd, stop
        self.seeded, self.got = seeded, _Manifest()
        self.error: str | None = f"{_KEPT}: the copy-out did not complete in time."
        self.ok = False
        self.stage: Path | None = None
        self._lock = threading.Lock()
        self._abandoned = False

    def run(self) -> None:
        sb = self.sandbox
        try:
            self.stage = Path(tempfile.mkdtemp(prefix=".unipost-stage-", dir=sb.workspace.parent))
            stream = _GuardedStream(_PipeReader(self.fd, self.stop).read, _stream_cap(sb.limits))
            error = _extract(stream, self.stage, sb.limits, sb._drop_to, self.got)
            self.error, self.ok = error, error is None
            self.got.complete = self.ok
        except _StoppedError:
            pass
        except Exception as exc:  # never let a copy-out take the host down; report it
            self.error = f"{_KEPT}: {type(exc).__name__} while unpacking the copy-out."
        finally:
            os.close(self.fd)
            with self._lock:
                if self._abandoned and self.stage is not None:
                    shutil.rmtree(self.stage, ignore_errors=True)

    def _unchanged(self) -> bool:
        """The validated copy-out holds exactly what was seeded (names, kinds, modes as they would be
        set, sizes, file times, link targets, content checksums): moving it in would rebuild the same
        workspace, so the swap (renames and a tree removal on the host) is skipped. Decided from the
        host's own records of both streams; a copy-out that merely claims to match can only make the
        host keep the workspace it already had, which is valid and within the bounds."""
        return self.seeded is not None and self.seeded.same_as(self.got)

    def finish(self) -> None:
        with self._lock:
            if self.is_alive():
                self._abandoned = True
                self.ok = False
                self.error = f"{_KEPT}: the copy-out did not complete in time."
                return
        try:
            if self.ok and self.stage is not None and not self._unchanged():
                try:
                    _swap_contents(self.sandbox.workspace, self.stage)
                except OSError as exc:
                    self.ok, self.error = False, f"{_KEPT}: {os.strerror(exc.errno or 0)}."
        finally:
            if self.stage is not None:
                shutil.rmtree(self.stage, ignore_errors=True)

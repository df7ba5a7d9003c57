"""``DockerSWEEnv``: one SWE-Gym / SWE-bench instance in its own Docker container (the paper's setup).

Per episode: the instance's evaluation image (SWE-bench or SWE-Gym naming scheme) is pulled if
absent; its ``/testbed`` repository is copied to a host folder, which a fresh container (no network,
memory and process limits) mounts back at ``/testbed``. Then the OpenHands-style tools of the embedded
env act on it unchanged: ``terminal`` commands run in the container (``docker exec`` with a kill
timeout; the working directory persists), ``file_editor`` edits the mounted folder. ``verify`` extracts
the agent's patch with ``git diff`` against the base commit inside the container (``Outcome.detail``)
and, with ``grade=True`` (the default), grades a submitted episode in the same container: the test
patch is applied, FAIL_TO_PASS / PASS_TO_PASS run, and ``resolved`` / ``reward`` / ``failure_mode``
come from the log (:mod:`unipost.envs.swe.grading`), as training needs per episode. Reported
SWE-bench numbers still come from the official harness on the collected patches
(:func:`unipost.envs.swe.harness.evaluate_predictions`); ``grade=False`` leaves grading to it.

The ``docker`` package and a reachable engine are required at ``reset``; without them a
``DockerUnavailableError`` / ``OptionalDependencyError`` says which is missing.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unipost.data import Message, Outcome
from unipost.envs.embedded.env import EmbeddedEnv
from unipost.envs.embedded.sandbox import WORKSPACE, CommandResult, Limits
from unipost.envs.embedded.tools import FileEditor, Terminal
from unipost.envs.embedded.verifier import EndedBy, unsubmitted_mode
from unipost.envs.swe.grading import GradeReport, GradingSpec, grade_in_container, grading_spec
from unipost.envs.swe.instances import ImageScheme, SWEInstance

SWE_SYSTEM_PROMPT = (
    "You are a software engineering agent. The repository is at /testbed. Use the tools to inspect the "
    "code, find the cause of the issue, edit the source to fix it, check your fix, and then call `finish`."
)


class DockerUnavailableError(RuntimeError):
    """The docker SDK is installed but no Docker engine answers."""


def docker_client() -> Any:
    """``docker.from_env()`` after checking that the package and an engine are there."""
    from unipost._optional import require

    docker = require("docker")
    try:
        client = docker.from_env()
        client.ping()
    except Exception as exc:
        host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
        raise DockerUnavailableError(
            f"No Docker engine is reachable at {host} ({type(exc).__name__}: {exc}). DockerSWEEnv and the "
            "SWE-bench harness run each instance in its own container: start Docker (or set DOCKER_HOST), "
            "or use env.name='openhands' / 'embedded', which need no Docker."
        ) from exc
    return client


# Run as the agent's uid before verification: SIGKILL to every process that uid owns in the container.
STOP_AGENT_COMMAND = "kill -KILL -1 2>/dev/null; true"
DEFAULT_AGENT_UID = 1000  # the agent's uid when the host runs as root (SWE images' own user is root)


def _remove(path: Path) -> None:
    """Delete ``path`` whatever it is, never following a link (a link is removed, not its target)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)
    elif os.path.lexists(path):  # a fifo, socket or device node
        path.unlink()


def agent_user_for_host(uid: int | None = None, gid: int | None = None) -> str:
    """The ``uid:gid`` the agent's commands run as: the host user's own ids, or 1000:1000 under root.

    The workspace is a host folder the container mounts, and the host-side file editor writes it, so
    the agent's uid must own it: a non-root host user's files already belong to that uid; a root host
    hands the folder to an unprivileged uid (``reset`` chowns it), never running the agent as root.
    """
    uid = os.getuid() if uid is None else uid
    gid = os.getgid() if gid is None else gid
    if uid == 0:
        return f"{DEFAULT_AGENT_UID}:{DEFAULT_AGENT_UID}"
    return f"{uid}:{gid}"


@dataclass
class DockerExecutor:
    """The embedded ``Terminal``'s sandbox interface (``run``, ``limits``) on a running container.

    ``user`` (``uid:gid``) is who the agent's commands run as; None runs them as the image's user.
    """

    container: Any
    limits: Limits
    user: str | None = None

    def run(self, command: str, *, cwd: str = WORKSPACE, timeout_s: float | None = None, **_: Any):
        timeout = int(max(1, min(timeout_s or self.limits.timeout_s, self.limits.timeout_s * 6)))
        # the image's HOME (/root) is not the agent's: tools that write under HOME (pip, git) get /tmp
        as_user = {"user": self.user, "environment": {"HOME": "/tmp"}} if self.user else {}
        code, output = self.container.exec_run(
            ["timeout", "-s", "KILL", str(timeout), "bash", "-c", command],
            workdir=cwd,
            demux=False,
            **as_user,
        )
        text = (output or b"").decode("utf-8", errors="replace")[-self.limits.max_output_chars :]
        timed_out = code in (124, 137)
        return CommandResult(output=text, exit_code=-1 if timed_out else int(code), timed_out=timed_out)


class DockerSWEEnv(EmbeddedEnv):
    """One SWE instance in its own container, with the embedded env's tools and error handling."""

    def __init__(
        self,
        instance: SWEInstance,
        *,
        image_scheme: ImageScheme = "swebench",
        image: str | None = None,
        max_observation_chars: int = 4000,
        limits: Limits | None = None,
        memory: str = "4g",
        pids_limit: int = 512,
        full_tool_descriptions: bool = True,
        pull: bool = True,
        grade: bool = True,
        grading_timeout_s: float = 1800.0,
        agent_user: str | None = "auto",
    ) -> None:
        if not isinstance(instance, SWEInstance):
            raise TypeError(f"DockerSWEEnv needs an SWEInstance, got {type(instance).__name__}")
        # built now, so an instance that cannot be graded fails before any container starts
        self.grading: GradingSpec | None = (
            grading_spec(instance, timeout_s=grading_timeout_s) if grade else None
        )
        self.grade_report: GradeReport | None = None
        super().__init__(
            instance,  # type: ignore[arg-type]  # EmbeddedEnv stores it as .task; tools never read it
            max_observation_chars=max_observation_chars,
            limits=limits or Limits(timeout_s=120.0, cpu_s=600, memory_bytes=4 << 30),
            full_tool_descriptions=full_tool_descriptions,
        )
        self.instance = instance
        self.image = image or instance.image_name(image_scheme)
        self.memory = memory
        self.pids_limit = pids_limit
        self.pull = pull
        if agent_user == "auto":
            agent_user = agent_user_for_host()
        if agent_user is not None and not _is_uid_gid(agent_user):
            raise ValueError(
                f"DockerSWEEnv agent_user must be 'auto', None or 'uid:gid' numbers, got {agent_user!r}"
            )
        self.agent_user = agent_user
        self.container: Any = None
        self.patch: str | None = None
        self._git_config: bytes | None = None  # the image's .git/config, put back before verify

    def reset(self) -> list[Message]:
        self.close()
        self._reset_state()
        client = docker_client()
        self._ensure_image(client)
        self.workspace = Path(tempfile.mkdtemp(prefix="unipost-swe-"))
        self._copy_testbed_out(client)
        config = self.workspace / ".git" / "config"
        self._git_config = config.read_bytes() if config.is_file() and not config.is_symlink() else None
        self._hand_workspace_to_agent()
        self.container = client.containers.run(
            self.image,
            command=["sleep", "infinity"],
            detach=True,
            network_mode="none",
            mem_limit=self.memory,
            pids_limit=self.pids_limit,
            working_dir=WORKSPACE,
            volumes={str(self.workspace): {"bind": WORKSPACE, "mode": "rw"}},
            # no setuid/setgid escalation (sudo, su, a planted setuid binary) for the agent's uid
            security_opt=["no-new-privileges"],
        )
        # the agent's commands run unprivileged; so does patch extraction; grading stays the image's user
        executor = DockerExecutor(self.container, self.limits, user=self.agent_user)
        self._check_agent_can_write()
        self.sandbox = None
        owner = int(self.agent_user.split(":")[0]) if self.agent_user and os.getuid() == 0 else None
        self.editor = FileEditor(self.workspace, self.max_observation_chars, owner_uid=owner)
        self.terminal = Terminal(executor, self.max_observation_chars)  # type: ignore[arg-type]
        return [
            {"role": "system", "content": SWE_SYSTEM_PROMPT},
            {"role": "user", "content": self.instance.problem_statement},
        ]

    def verify(self, ended_by: EndedBy = None) -> Outcome:
        """The agent's patch (``git diff`` vs the base commit), graded in the container when submitted."""
        if self.container is None:
            raise RuntimeError("DockerSWEEnv.verify() called before reset().")
        self.stop_agent_processes()
        self.restore_git_metadata()
        self.patch = self.extract_patch()
        self.grade_report = None
        edited = bool(self.patch.strip())
        if not self.submitted or not edited:  # `finish` with an empty patch submits nothing
            mode = unsubmitted_mode(self.turn_tool_errors, self.actions, ended_by, edited=edited)
            return Outcome(resolved=False, submitted=False, failure_mode=mode, detail=self.patch)
        if self.grading is None:  # the harness decides later
            return Outcome(resolved=False, submitted=True, detail=self.patch)
        report = grade_in_container(self.container, self.instance, self.patch, spec=self.grading)
        self.grade_report = report
        return Outcome(
            resolved=report.resolved,
            submitted=True,
            reward=1.0 if report.resolved else 0.0,
            failure_mode=report.failure_mode,  # type: ignore[arg-type]  # a Table-4 left-block mode
            detail=self.patch,
        )

    def _check_agent_can_write(self) -> None:
        """Fail at reset, naming the fix, when the agent's uid cannot write /testbed.

        Why: under rootless Docker or userns-remap the container's uid maps to another host uid, and an
        explicit ``agent_user`` on a non-root host is not the folder's owner; every agent write would then
        fail with EACCES while the host-side editor still works, and training would quietly degrade.
        """
        if self.agent_user is None:
            return
        code, _ = self.container.exec_run(["test", "-w", WORKSPACE], demux=False, user=self.agent_user)
        if code != 0:
            user = self.agent_user
            self.close()
            raise RuntimeError(
                f"the agent's uid {user} cannot write {WORKSPACE} in the container (rootless Docker or "
                "userns-remap maps container uids to other host uids; on a non-root host agent_user must be "
                "the host user's uid:gid, the default 'auto'): use the default, or agent_user=None "
                "(env.swe_agent_user: null) to run the agent as the image's user"
            )

    def stop_agent_processes(self) -> None:
        """Kill every process of the agent's uid left in the container (daemons outlive their command).

        Why: verification runs after the episode, partly with more privileges than the agent; a process
        the agent left behind could rewrite the tree or the grader's files while it runs. ``kill -1`` from
        the agent's own uid reaches exactly that uid's processes (never root's, never the caller itself).
        Nothing to do when the agent runs as the image's user (``agent_user=None``).
        """
        if self.agent_user is None:
            return
        self.container.exec_run(["bash", "-c", STOP_AGENT_COMMAND], demux=False, user=self.agent_user)

    def restore_git_metadata(self) -> None:
        """Put ``.git/config`` back as the image had it and drop the hooks and ``info/attributes``.

        Why: git runs commands named in the repository's own metadata (``core.fsmonitor``, hooks, clean
        and smudge filters, diff drivers, ``include.path``), and grading runs git on the agent's tree as
        the image's user. The agent owned ``.git`` during the episode; after its processes are gone
        (``stop_agent_processes``), this host-side reset leaves nothing of its git settings for grading.
        Every path is checked without following links: the workspace is a host folder, and a link the
        agent planted must not redirect a host-side write or delete.
        """
        if self.workspace is None:
            return
        git = self.workspace / ".git"
        if git.is_symlink() or not git.is_dir():
            raise RuntimeError(f"{WORKSPACE}/.git is no longer a directory (the agent replaced it): no patch")
        if self._git_config is not None:
            config = git / "config"
            _remove(config)
            fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as f:
                f.write(self._git_config)
        hooks = git / "hooks"
        _remove(hooks)
        hooks.mkdir()
        info = git / "info"
        if info.is_symlink():
            _remove(info)
        elif info.is_dir():
            _remove(info / "attributes")

    def extract_patch(self) -> str:
        """``git add -A && git diff --cached`` against the base commit, run as the agent's uid.

        The agent owns ``.git`` (its config, hooks and attributes included), and git runs commands from
        them (``core.fsmonitor``, hooks, diff drivers, clean filters): run as the agent they can do nothing
        it could not do itself; the flags below switch off what git allows switching off anyway.
        """
        # the mounted copy belongs to the host's uid: git >= 2.35.2 refuses it without safe.directory
        git = f"git -c safe.directory={WORKSPACE} -c core.fsmonitor=false -c core.hooksPath=/dev/null"
        diff = f"diff --cached --no-color --no-ext-diff --no-textconv {self.instance.base_commit}"
        cmd = f"cd {WORKSPACE} && {git} add -A && {git} {diff}"
        code, out = self.container.exec_run(["bash", "-c", cmd], demux=False, user=self.agent_user)
        text = (out or b"").decode("utf-8", errors="replace")
        if code != 0:
            raise RuntimeError(f"git diff failed in the container (exit {code}): {text[-500:]}")
        return text

    def close(self) -> None:
        if self.container is not None:
            with contextlib.suppress(Exception):  # already gone: nothing to clean
                self.container.remove(force=True)
            self.container = None
        super().close()

    # -- internals ----------------------------------------------------------------------------------
    def _hand_workspace_to_agent(self) -> None:
        """Make the agent's uid own the copied /testbed (only a root host must: agent_user_for_host)."""
        assert self.workspace is not None
        if self.agent_user is None or os.getuid() != 0:
            return
        uid, gid = (int(x) for x in self.agent_user.split(":"))
        for root, dirs, files in os.walk(self.workspace):
            for name in (*dirs, *files):
                os.chown(os.path.join(root, name), uid, gid, follow_symlinks=False)
        os.chown(self.workspace, uid, gid)

    def _ensure_image(self, client: Any) -> None:
        import docker

        try:
            client.images.get(self.image)
        except docker.errors.ImageNotFound:
            if not self.pull:
                raise
            client.images.pull(self.image)

    def _copy_testbed_out(self, client: Any) -> None:
        """Copy the image's /testbed (repository + .git) to the host folder the container will mount."""
        assert self.workspace is not None
        tmp = client.containers.create(self.image, command=["true"])
        try:
            stream, _ = tmp.get_archive(WORKSPACE)
            buf = io.BytesIO(b"".join(stream))
        finally:
            tmp.remove(force=True)
        with tarfile.open(fileobj=buf) as tar:
            members = []
            for m in tar.getmembers():
                name = m.name.split("/", 1)[1] if "/" in m.name else ""
                if not name or name.startswith("/") or ".." in Path(name).parts:
                    continue
                m.name = name
                members.append(m)
            if hasattr(tarfile, "tar_filter"):  # Python >= 3.10.12 / 3.11.4: refuse unsafe members
                tar.extractall(self.workspace, members=members, filter="tar")
            else:  # pragma: no cover - older interpreters; members were sanitised above
                tar.extractall(self.workspace, members=members)


def _is_uid_gid(text: str) -> bool:
    uid, sep, gid = text.partition(":")
    return bool(sep) and uid.isdigit() and gid.isdigit()

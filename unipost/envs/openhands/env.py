"""``OpenHandsEnv``: an embedded task executed through the real OpenHands agent SDK tools.

Same Environment protocol, same tasks, same workspace files and the same verifier (hidden tests) as
:class:`~unipost.envs.embedded.env.EmbeddedEnv`; only the tools differ: every tool call goes to the
real ``terminal`` / ``file_editor`` / ``finish`` / ``think`` of openhands-tools, run by
:mod:`unipost.envs.openhands.worker` in ``.venv-openhands`` (Python >= 3.12) inside the bubblewrap
sandbox, with the workspace at ``/testbed``. Observations are OpenHands' own tool messages, verbatim
(capped at ``max_observation_chars``); :func:`unipost.envs.openhands.normalize.normalize_observation`
maps them onto the embedded wording, and docs/openhands.md lists every difference.

``step`` never raises for the agent's mistakes or the worker's faults: a malformed call is OpenHands'
own validation error; a worker that dies or exceeds ``call_timeout_s`` becomes an ``ERROR: ...``
observation with ``tool_error=True`` and a fresh worker (terminal state such as ``cd`` is lost; the
workspace files are not).
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unipost.data import Message, Outcome
from unipost.envs.base import StepResult
from unipost.envs.embedded.env import SYSTEM_PROMPT, execute_tool_calls, tool_call_name
from unipost.envs.embedded.sandbox import WORKSPACE, Limits, Sandbox
from unipost.envs.embedded.tasks import Difficulty, Task, generate_task
from unipost.envs.embedded.tools import tool_schemas, truncate_middle
from unipost.envs.embedded.verifier import EndedBy, verify_episode
from unipost.envs.openhands.client import WorkerError, WorkerProcess, venv_python

OPENHANDS_TOOL_NAMES = ("terminal", "file_editor", "finish", "think")


class OpenHandsEnv:
    """One episode of an embedded task, acted on through the real OpenHands tools.

    Args:
        task: an embedded task (``generate_task(split, index, difficulty)``).
        venv: the Python >= 3.12 venv with openhands-sdk/tools (default ``.venv-openhands`` or
            ``$UNIPOST_OPENHANDS_VENV``; built by scripts/setup-openhands-venv.sh).
        max_observation_chars: cap on each observation, cut in the middle as in the embedded env.
        call_timeout_s: wall clock for one tool call, after which the worker is killed and restarted.
        terminal_type: OpenHands' terminal backend, ``"tmux"`` (its default on Linux) or ``"subprocess"``.
        no_change_timeout_s: OpenHands' soft timeout: a command that prints nothing new for this long
            returns with exit code -1 and keeps running (the agent may send ``C-c``).
        full_tool_descriptions: advertise OpenHands' own ~4k-character descriptions (the paper's action
            space, default) or the embedded env's compact ones (for tiny models' contexts).
        limits: resource limits of the verifier's hidden-test run (as in the embedded env).
        reuse_worker: on ``close``, park the sandboxed worker (and its workspace folder) for the next
            episode instead of stopping it: the SDK import (~10 s of CPU) is paid once per worker, not
            per episode. The next ``reset`` rewrites the folder, kills every process the previous
            episode left in the sandbox and starts fresh tools (new terminal session, empty editor
            history), so episodes do not see each other. Never used without bubblewrap.
    """

    def __init__(
        self,
        task: Task,
        *,
        venv: str | Path | None = None,
        max_observation_chars: int = 4000,
        call_timeout_s: float = 180.0,
        start_timeout_s: float = 240.0,
        terminal_type: str = "tmux",
        no_change_timeout_s: int = 30,
        full_tool_descriptions: bool = True,
        limits: Limits | None = None,
        unsafe_local: bool = False,
        reuse_worker: bool = True,
    ) -> None:
        if terminal_type not in ("tmux", "subprocess"):
            raise ValueError(f"terminal_type must be 'tmux' or 'subprocess', got {terminal_type!r}")
        self.task = task
        self.venv = venv
        self.max_observation_chars = max_observation_chars
        self.call_timeout_s = call_timeout_s
        self.start_timeout_s = start_timeout_s
        self.terminal_type = terminal_type
        self.no_change_timeout_s = no_change_timeout_s
        self.limits = limits or Limits()
        self.unsafe_local = unsafe_local
        self.reuse_worker = reuse_worker
        self.tools: list[dict[str, Any]] = advertised_schemas(full_tool_descriptions)
        self.live_tools: list[dict[str, Any]] | None = None  # what the SDK itself produced (after reset)
        self.versions: dict[str, str] = {}
        self.workspace: Path | None = None
        self.sandbox: Sandbox | None = None
        self.worker: WorkerProcess | None = None
        self._reset_state()

    @classmethod
    def from_split(
        cls, split: str, index: int, difficulty: str | Difficulty = "medium", **kwargs: Any
    ) -> OpenHandsEnv:
        return cls(generate_task(split, index, difficulty), **kwargs)

    def _reset_state(self) -> None:
        self.done = False
        self.submitted = False
        self.turn_tool_errors: list[bool] = []
        self.actions: list[str] = []
        self.worker_restarts = 0

    # -- Environment protocol -------------------------------------------------------------------------
    def reset(self) -> list[Message]:
        self.close()
        self._reset_state()
        venv_python(self.venv)  # a missing venv is named before anything else is built
        if not (self.reuse_worker and self._reuse_parked()):
            self.workspace = Path(tempfile.mkdtemp(prefix="unipost-oh-ws-"))
            self._write_task_files()
            # The verifier's sandbox first: the worker's sandbox reuses its uid, so both can write files.
            self.sandbox = Sandbox(self.workspace, self.limits, unsafe_local=self.unsafe_local)
            self._start_worker()
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self.task.issue},
        ]

    def step(self, action: Message) -> StepResult:
        result = execute_tool_calls(self, action)
        if result.info.get("tools"):
            result.info["worker_restarts"] = self.worker_restarts
        return result

    def verify(self, ended_by: EndedBy = None) -> Outcome:
        """The embedded verifier: hidden tests in the sandbox (when submitted), Table-4 classification."""
        return verify_episode(self, ended_by)

    def close(self) -> None:
        worker, workspace = self.worker, self.workspace
        self.worker = self.workspace = None
        if worker is not None and workspace is not None and self.reuse_worker and self._can_park(worker):
            uid = self.sandbox._drop_to if self.sandbox is not None else None
            slot = _Parked(worker, workspace, uid, self.live_tools or [], self.versions)
            if _PARKED.give(self._pool_key(), slot):
                return
        if worker is not None:
            worker.close()
        if workspace is not None:
            shutil.rmtree(workspace, ignore_errors=True)

    def __enter__(self) -> OpenHandsEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host_path(self, path: str) -> Path:
        """The host file behind an agent-visible /testbed path (privileged; used by the scripted expert)."""
        assert self.workspace is not None
        return self.workspace / path[len(WORKSPACE) :].lstrip("/")

    # -- internals ----------------------------------------------------------------------------------
    def _write_task_files(self) -> None:
        assert self.workspace is not None
        for rel, text in self.task.files.items():
            path = self.workspace / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)

    def _pool_key(self) -> tuple[Any, ...]:
        return (str(self.venv), self.terminal_type, self.no_change_timeout_s)

    @staticmethod
    def _can_park(worker: WorkerProcess) -> bool:
        return worker.sandbox.isolated and worker.proc.poll() is None

    def _reuse_parked(self) -> bool:
        """Take a parked worker: fresh task files in its folder, strays killed, fresh tools."""
        slot = _PARKED.take(self._pool_key())
        if slot is None:
            return False
        try:
            for child in slot.workspace.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
            self.workspace = slot.workspace
            self._write_task_files()
            self.sandbox = Sandbox(
                slot.workspace, self.limits, unsafe_local=self.unsafe_local, sandbox_uid=slot.uid
            )
            slot.worker.request(self.start_timeout_s, op="reset", kill_strays=True)
        except Exception:  # a broken parked worker: discard it, start a fresh one
            slot.worker.kill()
            shutil.rmtree(slot.workspace, ignore_errors=True)
            self.workspace = self.sandbox = None
            return False
        self.worker, self.live_tools, self.versions = slot.worker, slot.live_tools, slot.versions
        return True

    def _start_worker(self) -> None:
        assert self.workspace is not None and self.sandbox is not None
        worker = WorkerProcess(
            self.workspace,
            venv=self.venv,
            sandbox_uid=self.sandbox._drop_to,
            unsafe_local=self.unsafe_local,
            start_timeout_s=self.start_timeout_s,
        )
        try:
            reply = worker.request(
                self.start_timeout_s,
                op="init",
                workdir=worker.workdir,
                terminal_type=self.terminal_type,
                no_change_timeout_s=self.no_change_timeout_s,
            )
        except BaseException:
            worker.kill()
            raise
        self.worker = worker
        self.live_tools = reply["tools"]
        self.versions = reply["versions"]

    def _execute(self, call: Any, i: int) -> tuple[str, str, bool, str]:
        call_id = str(call.get("id") or f"call_{i}") if isinstance(call, dict) else f"call_{i}"
        raw_name = tool_call_name(call)
        if not isinstance(call, dict):
            return f"ERROR:\nTool call must be an object, got {type(call).__name__}.", raw_name, True, call_id
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments, default=str)
        if self.worker is None:
            try:
                self._start_worker()
                self.worker_restarts += 1
            except Exception as exc:
                return f"ERROR:\nThe tool runtime could not be restarted: {exc}", raw_name, True, call_id
        assert self.worker is not None
        try:
            reply = self.worker.request(
                self.call_timeout_s, op="call", name=raw_name, arguments=arguments, call_id=call_id
            )
        except WorkerError as exc:  # the runtime's fault (timeout, crash): report it, restart next call
            self.worker.kill()
            self.worker = None
            return f"ERROR:\nThe tool runtime failed: {exc}", raw_name, True, call_id
        tool = reply.get("tool", raw_name)
        error = bool(reply.get("is_error"))
        text = truncate_middle(reply.get("content", ""), self.max_observation_chars)
        if tool == "finish" and not error:
            self.done = self.submitted = True
        return text, raw_name, error, call_id


@dataclass
class _Parked:
    worker: WorkerProcess
    workspace: Path
    uid: int | None
    live_tools: list[dict[str, Any]]
    versions: dict[str, str]


class _ParkedWorkers:
    """Idle sandboxed workers between episodes, per (venv, terminal type, timeout); at most ``limit``."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._idle: dict[tuple[Any, ...], list[_Parked]] = {}
        self._lock = threading.Lock()

    def take(self, key: tuple[Any, ...]) -> _Parked | None:
        with self._lock:
            while self._idle.get(key):
                slot = self._idle[key].pop()
                if slot.worker.proc.poll() is None:
                    return slot
                shutil.rmtree(slot.workspace, ignore_errors=True)
        return None

    def give(self, key: tuple[Any, ...], slot: _Parked) -> bool:
        with self._lock:
            if sum(len(v) for v in self._idle.values()) >= self.limit:
                return False
            self._idle.setdefault(key, []).append(slot)
            return True

    def close_all(self) -> None:
        with self._lock:
            slots = [s for v in self._idle.values() for s in v]
            self._idle.clear()
        for slot in slots:
            slot.worker.close()
            shutil.rmtree(slot.workspace, ignore_errors=True)


_PARKED = _ParkedWorkers()
atexit.register(_PARKED.close_all)


def close_parked_workers() -> None:
    """Stop every parked OpenHands worker now (they are also stopped at interpreter exit)."""
    _PARKED.close_all()


def advertised_schemas(full: bool = True) -> list[dict[str, Any]]:
    """The tools offered to the model: OpenHands 1.58.0's schemas (the fixture), as its agent sends them.

    The SDK writes the workspace into ``file_editor``'s description ("Your current working directory
    is: ..."); the fixture was captured on ``/workspace``, our tasks live in ``/testbed``, so that one
    sentence is rewritten (the live schemas from the worker then match exactly; tested).
    ``full=False`` gives the embedded env's compact descriptions for small contexts.
    """
    schemas = tool_schemas(full=full)
    if full:
        for schema in schemas:
            fn = schema["function"]
            fn["description"] = fn["description"].replace(
                "Your current working directory is: /workspace\n",
                f"Your current working directory is: {WORKSPACE}\n",
            )
    return schemas


def _user(text: str) -> Message:
    return {"role": "user", "content": text}

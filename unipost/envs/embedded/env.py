"""``EmbeddedEnv``: one episode of the mini software-engineering world (unipost.envs.base.Environment).

``reset`` writes the task's buggy package into a fresh temporary workspace (seen by the agent as
``/testbed``) and returns the system + issue messages; ``step`` executes the assistant message's tool
calls and never raises (bad calls become ``ERROR: ...`` observations with ``tool_error=True``);
``verify`` runs the hidden tests and classifies the outcome. The rollout engine owns the turn and context
budgets, so it passes ``ended_by`` to ``verify`` when it stopped the episode.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from unipost.data import Message, Outcome
from unipost.envs.base import StepResult
from unipost.envs.embedded.sandbox import WORKSPACE, Limits, Sandbox
from unipost.envs.embedded.tasks import Difficulty, Task, generate_task
from unipost.envs.embedded.tools import (
    FileEditor,
    Terminal,
    ToolError,
    call_id_of,
    parse_tool_call,
    tool_schemas,
)
from unipost.envs.embedded.verifier import EndedBy, verify_episode
from unipost.rendering.toolcalls import loads_bounded
from unipost.rendering.toolcalls import value_depth as nesting_depth

SYSTEM_PROMPT = (
    "You are a software engineering agent. A Python repository is at /testbed. Use the tools to inspect "
    "the code, find the cause of the issue, edit the source to fix it, check your fix, and then call "
    "`finish`. Make exactly one tool call per message."
)
NO_TOOL_CALL = (
    "Your last message contained no tool call. Continue working on the task using the tools, "
    "and call `finish` when you are done."
)


class EmbeddedEnv:
    """One episode on one task. ``max_observation_chars`` caps every tool observation."""

    def __init__(
        self,
        task: Task,
        *,
        max_observation_chars: int = 4000,
        limits: Limits | None = None,
        unsafe_local: bool = False,
        full_tool_descriptions: bool = False,
        prompt_tools: bool = True,
    ) -> None:
        self.task = task
        self.max_observation_chars = max_observation_chars
        self.limits = limits or Limits()
        self.unsafe_local = unsafe_local
        # ``tools`` is what the prompt advertises; calls are validated against the full schemas either
        # way, so prompt_tools=False (the tiny lab: students learn the format from demos) changes no rule
        self.tools: list[dict[str, Any]] = tool_schemas(full=full_tool_descriptions) if prompt_tools else []
        self.workspace: Path | None = None
        self.sandbox: Sandbox | None = None
        self._reset_state()

    @classmethod
    def from_split(cls, split: str, index: int, difficulty: str | Difficulty = "medium", **kwargs: Any):
        return cls(generate_task(split, index, difficulty), **kwargs)

    def _reset_state(self) -> None:
        self.done = False
        self.submitted = False
        self.turn_tool_errors: list[bool] = []
        self.actions: list[str] = []  # canonical (name, args) of each turn's calls, for loop detection

    # -- Environment protocol -------------------------------------------------------------------------
    def reset(self) -> list[Message]:
        self.close()
        self._reset_state()
        self.workspace = Path(tempfile.mkdtemp(prefix="unipost-ws-"))
        for rel, text in self.task.files.items():
            path = self.workspace / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        self.sandbox = Sandbox(self.workspace, self.limits, unsafe_local=self.unsafe_local)
        self.editor = FileEditor(self.workspace, self.max_observation_chars, self.sandbox)
        self.terminal = Terminal(self.sandbox, self.max_observation_chars)
        return [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": self.task.issue},
        ]

    def step(self, action: Message) -> StepResult:
        return execute_tool_calls(self, action)

    def verify(self, ended_by: EndedBy = None) -> Outcome:
        """Run the hidden tests (when submitted) and classify; ``ended_by`` comes from the rollout engine."""
        return verify_episode(self, ended_by)

    def close(self) -> None:
        if self.workspace is not None:
            shutil.rmtree(self.workspace, ignore_errors=True)
            self.workspace = None

    def __enter__(self) -> EmbeddedEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------------
    def _execute(self, call: Any, i: int) -> tuple[str, str, str | None, str]:
        """(observation text, tool name, tool-error kind or None, call id) of one call."""
        call_id = call_id_of(call, i)
        raw_name = tool_call_name(call)
        parsed = None
        try:
            parsed = parse_tool_call(call)
            if parsed.name == "finish":
                self.done = self.submitted = True
                return parsed.arguments.get("message", ""), raw_name, None, call_id
            if parsed.name == "think":
                return "Your thought has been logged.", raw_name, None, call_id
            if parsed.name == "file_editor":
                return self.editor(parsed.arguments), raw_name, None, call_id
            text, _code = self.terminal(parsed.arguments)  # a non-zero exit is an answer, not an error
            return text, raw_name, None, call_id
        except ToolError as exc:  # refused by the schema check (not parsed yet) or by the tool that ran
            kind = exc.kind or ("tool_failure" if parsed is not None else "invalid_arguments")
            return f"ERROR:\n{exc}", raw_name, kind, call_id
        except Exception as exc:  # an environment fault must not crash the rollout
            text = f"ERROR:\n{type(exc).__name__}: {exc}"
            if self.sandbox is not None:
                text = self.sandbox.hide_host_paths(text)
            if self.workspace is not None:  # never a host path, even in an unexpected error
                text = text.replace(str(self.workspace), WORKSPACE)
            return text, raw_name, "other", call_id

    def host_path(self, path: str) -> Path:
        """The host file behind an agent-visible /testbed path (privileged; used by the scripted expert)."""
        assert self.workspace is not None
        return self.workspace / path[len(WORKSPACE) :].lstrip("/")


def execute_tool_calls(env: Any, action: Message) -> StepResult:
    """One assistant turn: run its tool calls in order through ``env._execute`` until one ends the episode.

    Shared by every environment with the embedded tool semantics (EmbeddedEnv, DockerSWEEnv,
    OpenHandsEnv), so a malformed turn is an error observation and a tool-use error the same way in all
    of them. ``env`` provides ``workspace``, ``done``, ``turn_tool_errors``, ``actions`` and ``_execute``;
    ``_execute``'s third element is the call's tool-error kind (None: no error; an environment that only
    knows *that* a call failed returns True, recorded as "other"). The turn's first error kind goes to
    ``StepResult.info["tool_error_kind"]``.
    """
    if env.workspace is None:
        raise RuntimeError(f"{type(env).__name__}.step() called before reset().")
    if env.done:
        ended = [_user("The episode has ended; no more actions are executed.")]
        return StepResult(ended, True, True, info={"tool_error_kind": "other"})
    calls = (action.get("tool_calls") or []) if isinstance(action, dict) else []
    if not isinstance(calls, list) or not calls:
        env.turn_tool_errors.append(True)
        content = action.get("content", "") if isinstance(action, dict) else action
        env.actions.append(json.dumps(["<no tool call>", _bounded_text(content)]))
        info = {"tools": [], "tool_error_kind": "unparseable"}  # the model's text held no tool call
        return StepResult([_user(NO_TOOL_CALL)], done=False, tool_error=True, info=info)
    observation: list[Message] = []
    any_error, names, kinds = False, [], []
    for i, call in enumerate(calls):
        if nesting_depth(call, MAX_ACTION_DEPTH) > MAX_ACTION_DEPTH:
            text, name, error = (
                f"ERROR:\nTool call nested more than {MAX_ACTION_DEPTH} levels deep.",
                "unknown",
                "invalid_arguments",
            )
            call_id = f"call_{i}"
        else:
            text, name, error, call_id = env._execute(call, i)
        text = printable(text)  # undecodable bytes echoed back become escapes, never lone surrogates
        any_error |= bool(error)
        if error:
            kinds.append(error if isinstance(error, str) else "other")
        names.append(name)
        observation.append({"role": "tool", "tool_call_id": call_id, "name": name, "content": text})
        if env.done:
            break
    env.turn_tool_errors.append(any_error)
    env.actions.append(json.dumps([_canonical(c) for c in calls]))
    info: dict[str, Any] = {"tools": names}
    if kinds:
        info["tool_error_kind"] = kinds[0]
    return StepResult(observation, done=env.done, tool_error=any_error, info=info)


def _user(text: str) -> Message:
    return {"role": "user", "content": text}


def tool_call_name(call: Any) -> str:
    """The name a (possibly malformed) tool call gives, printable and at most 200 characters, or
    ``"unknown"``: what error messages and statistics may show of an untrusted call."""
    if isinstance(call, dict):
        fn = call.get("function") if isinstance(call.get("function"), dict) else call
        name = fn.get("name")
        if isinstance(name, str):
            return printable(name[:200])
    return "unknown"


MAX_ACTION_DEPTH = 32  # a tool call is {"function": {"arguments": {...: [..]}}}: 4 levels; more is hostile


def printable(text: str) -> str:
    """``text`` with lone surrogates (from undecodable bytes) as ``\\udcXX`` escapes: storable as UTF-8."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bounded_text(value: Any, limit: int = 10_000) -> str:
    """A short, storable text for any value (a repr of something deep or huge must not crash a step)."""
    if isinstance(value, str):
        return printable(value[:limit])
    if nesting_depth(value, MAX_ACTION_DEPTH) > MAX_ACTION_DEPTH:
        return f"<{type(value).__name__} nested too deeply>"
    try:
        return printable(repr(value)[:limit])
    except Exception:  # a hostile __repr__
        return f"<unprintable {type(value).__name__}>"


def _canonical(call: Any) -> list[Any]:
    """(name, sorted-JSON arguments) of a call, so identical actions compare equal."""
    if not isinstance(call, dict) or nesting_depth(call, MAX_ACTION_DEPTH) > MAX_ACTION_DEPTH:
        return [_bounded_text(call)]
    fn = call.get("function") if isinstance(call.get("function"), dict) else call
    args = fn.get("arguments", "")
    name = _bounded_text(fn.get("name"), 200)
    if isinstance(args, str):
        try:
            args = loads_bounded(args, MAX_ACTION_DEPTH)
        except ValueError:
            return [name, printable(args)]
    try:
        return [name, printable(json.dumps(args, sort_keys=True, default=str))]
    except (TypeError, ValueError):  # keys of mixed types cannot be sorted
        return [name, _bounded_text(args)]

"""Executes OpenHands tool calls with the real OpenHands agent SDK; run by ``.venv-openhands``'s Python.

Why a separate process: openhands-sdk / openhands-tools need Python >= 3.12 and pull litellm and a
large dependency tree, while unipost runs on Python >= 3.10. So this file imports ONLY the standard
library and the OpenHands packages (never unipost), and talks JSON lines: one request per line on
stdin, one response per line on the protocol stream (the original stdout; everything the SDK prints
goes to stderr, so a stray print can never corrupt the protocol).

Requests (``{"op": ...}``) and responses (``{"ok": true, ...}`` or ``{"ok": false, "error": ...}``):

- ``init``  ``{"workdir", "terminal_type", "no_change_timeout_s"}``: build a LocalWorkspace on
  ``workdir``, a real ``LocalConversation`` (its LLM is never called) and the tools ``terminal``,
  ``file_editor`` (resolved through the SDK's tool registry), ``finish`` and ``think``; returns the
  tools' OpenAI schemas exactly as the SDK's agent sends them to a model and the package versions.
- ``call``  ``{"name", "arguments", "call_id"}``: one tool call, turned into an action and executed the
  way ``openhands.sdk.agent.Agent`` does it (``_get_action_event`` then ``_execute_action_event`` in
  openhands-sdk 1.58.0: argument parsing, name normalisation (``execute_bash`` -> ``terminal``, ...),
  malformed-argument repair, ``security_risk`` / ``summary`` removal, pydantic validation, execution);
  returns the tool message text the agent would put in the model's context and whether it is an error.
- ``reset`` ``{"kill_strays"}``: close the tools and build fresh ones (a new terminal session, empty
  editor history) for the next episode; with ``kill_strays`` (only ever sent when the worker runs in
  its own bubblewrap pid namespace) first SIGKILL every other process of the sandbox, so nothing the
  previous episode started in the background survives into the next.
- ``close``: close the tools and exit.

The caller (unipost.envs.openhands.env.OpenHandsEnv) starts this script inside the bubblewrap sandbox
with the task workspace as the only writable directory, so commands never touch the host's files.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import uuid
from typing import Any

PROTOCOL_VERSION = 1


def _open_protocol_stream():
    """Keep the real stdout for the protocol and point fd 1 at stderr for everything else."""
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return proto


class ToolHost:
    """The OpenHands tools of one episode on one working directory."""

    def __init__(self, workdir: str, terminal_type: str | None, no_change_timeout_s: int | None) -> None:
        from openhands.sdk import LLM, Agent, Conversation, Tool
        from openhands.sdk.tool.builtins import FinishTool, ThinkTool
        from openhands.sdk.tool.registry import resolve_tool
        from openhands.sdk.workspace import LocalWorkspace
        from openhands.tools.file_editor import FileEditorTool
        from openhands.tools.terminal import TerminalTool

        terminal_params: dict[str, Any] = {}
        if terminal_type:
            terminal_params["terminal_type"] = terminal_type
        if no_change_timeout_s:
            terminal_params["no_change_timeout_seconds"] = int(no_change_timeout_s)
        specs = [Tool(name=TerminalTool.name, params=terminal_params), Tool(name=FileEditorTool.name)]
        # The LLM is never called: it only exists because a ConversationState belongs to an agent.
        agent = Agent(llm=LLM(model="openai/unused", usage_id="unipost-worker"), tools=specs)
        self.conversation = Conversation(
            agent=agent,
            workspace=LocalWorkspace(working_dir=workdir),
            visualizer=None,
            conversation_id=uuid.uuid4(),
        )
        state = self.conversation.state
        tools = [t for spec in specs for t in resolve_tool(spec, state)]
        tools += [*FinishTool.create(), *ThinkTool.create()]
        self.tools = {tool.name: tool for tool in tools}

    def schemas(self) -> list[dict[str, Any]]:
        """What the SDK's agent sends: ``to_openai_tool(add_security_risk_prediction=True)``."""
        return [
            json.loads(json.dumps(tool.to_openai_tool(add_security_risk_prediction=True)))
            for tool in self.tools.values()
        ]

    def call(self, name: str, raw_arguments: Any, call_id: str) -> dict[str, Any]:
        """One tool call, as ``Agent._get_action_event`` + ``Agent._execute_action_event`` do it."""
        from openhands.sdk.agent.utils import (
            fix_malformed_tool_arguments,
            normalize_tool_call,
            parse_tool_call_arguments,
        )
        from openhands.sdk.event import AgentErrorEvent, ObservationEvent
        from pydantic import ValidationError

        if not isinstance(raw_arguments, str):
            raw_arguments = json.dumps(raw_arguments)
        tool = None
        arguments: Any = None
        tool_name = name
        try:
            arguments = parse_tool_call_arguments(raw_arguments)
            tool_name, arguments = normalize_tool_call(name, arguments, self.tools.keys())
            tool = self.tools.get(tool_name)
            if tool is None:
                err = f"Tool '{tool_name}' not found. Available: {list(self.tools)}"
                return self._error(AgentErrorEvent, err, tool_name, call_id)
            arguments = fix_malformed_tool_arguments(arguments, tool.action_type)
            arguments.pop("security_risk", None)  # ignored by the agent when no analyzer is set
            if "summary" not in tool.action_type.model_fields:
                arguments.pop("summary", None)  # event metadata, not an action field
            action = tool.action_from_arguments(arguments)
        except (ValueError, json.JSONDecodeError, ValidationError) as exc:
            keys = list(arguments.keys()) if isinstance(arguments, dict) else None
            params = f"Parameters provided: {keys}" if keys is not None else "Arguments: unparseable JSON"
            err = f"Error validating tool '{name}': {exc}. {params}"
            return self._error(AgentErrorEvent, err, tool_name, call_id)
        try:
            observation = tool(action, self.conversation)
        except ValueError as exc:
            err = f"Error executing tool '{tool.name}': {exc}"
            return self._error(AgentErrorEvent, err, tool.name, call_id)
        event = ObservationEvent(
            observation=observation, action_id=str(uuid.uuid4()), tool_name=tool.name, tool_call_id=call_id
        )
        message = event.to_llm_message()
        return {
            "ok": True,
            "tool": tool.name,
            "content": _text(message.content),
            "is_error": bool(getattr(observation, "is_error", False)),
            "kind": type(observation).__name__,
        }

    @staticmethod
    def _error(event_type: Any, err: str, tool_name: str, call_id: str) -> dict[str, Any]:
        message = event_type(error=err, tool_name=tool_name, tool_call_id=call_id).to_llm_message()
        return {
            "ok": True,
            "tool": tool_name,
            "content": _text(message.content),
            "is_error": True,
            "kind": "AgentErrorEvent",
        }

    def close(self) -> None:
        for tool in self.tools.values():
            executor = getattr(tool, "executor", None)
            if executor is not None:
                try:
                    executor.close()
                except Exception:
                    traceback.print_exc()
        try:
            self.conversation.close()
        except Exception:
            traceback.print_exc()


def _kill_strays() -> int:
    """SIGKILL every process of this sandbox but bubblewrap's init (pid 1) and this one.

    Refuses unless pid 1 is bubblewrap, i.e. unless this process is in the sandbox's own pid namespace:
    outside one, ``kill(-1)`` would reach every process of the user on the host.
    """
    import signal

    try:
        with open("/proc/1/cmdline", "rb") as f:
            init = f.read().split(b"\0")[0]
    except OSError:
        return 0
    if not init.endswith(b"bwrap"):
        raise RuntimeError(f"kill_strays refused: pid 1 is {init!r}, not bubblewrap's init")
    me, killed = os.getpid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) not in (1, me):
            try:
                os.kill(int(entry), signal.SIGKILL)
                killed += 1
            except (ProcessLookupError, PermissionError):
                pass
    return killed


def _text(content: Any) -> str:
    return "".join(getattr(part, "text", "") for part in content)


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0]}
    for pkg in ("openhands-sdk", "openhands-tools"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "missing"
    return out


def _import_sdk() -> None:
    """Import the SDK once, in the main thread, before the first request.

    openhands.sdk imports litellm, which by default downloads a model price list at import time and,
    when that fails (no network in the sandbox), retries in a background thread whose lazy imports race
    the main thread's ("_DeadlockError: ... litellm.rust_bridge.catalog"). ``main`` sets
    LITELLM_LOCAL_MODEL_COST_MAP=True (use the bundled list, never the network) before this runs.
    """
    import litellm
    import litellm.rust_bridge.catalog  # noqa: F401
    import openhands.sdk
    import openhands.sdk.agent.utils
    import openhands.tools.file_editor
    import openhands.tools.terminal  # noqa: F401


def serve(stdin: Any, proto: Any) -> None:
    host: ToolHost | None = None
    init_args: dict[str, Any] = {}
    for line in stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            op = request.get("op")
            if op == "init":
                init_args = {
                    "workdir": request["workdir"],
                    "terminal_type": request.get("terminal_type"),
                    "no_change_timeout_s": request.get("no_change_timeout_s"),
                }
                host = ToolHost(**init_args)
                reply = {
                    "ok": True,
                    "tools": host.schemas(),
                    "versions": _versions(),
                    "protocol": PROTOCOL_VERSION,
                }
            elif op == "call":
                if host is None:
                    raise RuntimeError("call before init")
                reply = host.call(request["name"], request.get("arguments", "{}"), request.get("call_id", ""))
            elif op == "reset":
                if host is None:
                    raise RuntimeError("reset before init")
                host.close()
                killed = _kill_strays() if request.get("kill_strays") else 0
                host = ToolHost(**init_args)
                reply = {"ok": True, "killed": killed}
            elif op == "close":
                proto.write(json.dumps({"ok": True}) + "\n")
                break
            else:
                raise ValueError(f"unknown op {op!r}")
        except Exception as exc:  # reported to the caller, which turns it into an error observation
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        proto.write(json.dumps(reply) + "\n")
    if host is not None:
        host.close()


def main() -> None:
    os.environ.setdefault("OPENHANDS_SUPPRESS_BANNER", "1")
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    proto = _open_protocol_stream()
    _import_sdk()
    proto.write(json.dumps({"ok": True, "ready": True, "protocol": PROTOCOL_VERSION}) + "\n")
    serve(sys.stdin, proto)


if __name__ == "__main__":
    main()

"""Scripted policies: a Python function as a policy, and a random (often malformed) tool caller.

``ScriptedPolicy`` is how a privileged expert (it may read ``state.env``: the workspace, the ground
truth) plugs into the same engine as a model. ``RandomToolPolicy`` writes tool calls as *text* in a
model's native format, valid or broken, and parses them with the same parser a student's output goes
through; it is the perturbation source for recovery tests ("the expert still solves the task after K
random or wrong actions") and a stand-in for a bad student.
"""

from __future__ import annotations

import json
import random
import string
from collections.abc import Callable, Sequence
from typing import Any

from unipost.data import Message
from unipost.rendering.toolcalls import ToolCallStyle, format_assistant, make_tool_call, parse_assistant
from unipost.rollout.policy import AgentState, PolicyOutput


class ScriptedPolicy:
    """Wraps ``fn(state) -> message | PolicyOutput`` as a black-box policy (one call per state)."""

    white_box = False

    def __init__(self, fn: Callable[[AgentState], Message | PolicyOutput], *, name: str = "scripted"):
        self.fn = fn
        self.name = name

    def __repr__(self) -> str:
        return f"ScriptedPolicy(name={self.name!r}, fn={getattr(self.fn, '__qualname__', self.fn)!r})"

    def act(self, states: list[AgentState], *, greedy: bool = False) -> list[PolicyOutput]:
        outputs = []
        for state in states:
            result = self.fn(state)
            if isinstance(result, PolicyOutput):
                outputs.append(result)
            elif isinstance(result, dict):
                outputs.append(PolicyOutput(message={"role": "assistant", **result}))
            else:
                raise TypeError(
                    f"scripted policy {self.name!r}: fn must return a message dict or a PolicyOutput, "
                    f"got {type(result).__name__}"
                )
        return outputs


MALFORMATIONS = ("bad_json", "unclosed_tag", "unknown_tool", "missing_required", "no_call", "two_calls")
_WORDS = ["ls", "src", "tests", "main.py", "utils", "fix", "grep -rn foo .", "cat setup.py", "x", "pytest -q"]


class RandomToolPolicy:
    """Emits random tool calls; a fraction ``malformed_rate`` is broken in one of ``MALFORMATIONS``.

    The output goes through ``parse_assistant`` (``max_calls=1, require_call=True``), so a broken call
    surfaces exactly as a student's would: ``tool_error`` set, the raw text as the message content.
    Seeded: the same seed and the same sequence of ``act`` calls give the same actions.
    """

    white_box = False

    def __init__(
        self,
        tools: Sequence[dict[str, Any]],
        seed: int = 0,
        *,
        malformed_rate: float = 0.2,
        style: ToolCallStyle = "hermes",
        name: str = "random",
    ):
        if not tools:
            raise ValueError("RandomToolPolicy needs at least one tool schema")
        if not 0.0 <= malformed_rate <= 1.0:
            raise ValueError(f"malformed_rate must be in [0, 1], got {malformed_rate}")
        self.tools = [t.get("function", t) for t in tools]
        self.schemas = list(tools)
        self.rng = random.Random(seed)
        self.malformed_rate = malformed_rate
        self.style: ToolCallStyle = style
        self.name = name

    def __repr__(self) -> str:
        return (
            f"RandomToolPolicy(name={self.name!r}, tools={len(self.tools)}, "
            f"malformed_rate={self.malformed_rate})"
        )

    def _value(self, schema: dict[str, Any]) -> Any:
        rng = self.rng
        if schema.get("enum"):
            return rng.choice(schema["enum"])
        kind = schema.get("type", "string")
        kind = rng.choice(kind) if isinstance(kind, list) else kind
        if kind == "integer":
            return rng.randint(-1, 200)
        if kind == "number":
            return round(rng.uniform(0, 100), 2)
        if kind == "boolean":
            return rng.random() < 0.5
        if kind == "array":
            return sorted(rng.randint(1, 50) for _ in range(2))
        if kind == "object":
            return {rng.choice(_WORDS): rng.choice(_WORDS)}
        if kind == "null":
            return None
        return rng.choice(_WORDS) + (
            "".join(rng.choices(string.ascii_lowercase, k=3)) if rng.random() < 0.3 else ""
        )

    def _call(self) -> tuple[str, dict[str, Any], list[str]]:
        tool = self.rng.choice(self.tools)
        params = tool.get("parameters", {})
        required = list(params.get("required", []))
        args = {}
        for key, schema in params.get("properties", {}).items():
            if key in required or self.rng.random() < 0.3:
                args[key] = self._value(schema)
        return tool["name"], args, required

    def _text(self, state: AgentState) -> str:
        name, args, required = self._call()
        message = {"role": "assistant", "content": "", "tool_calls": [make_tool_call(name, args, "r")]}
        if self.rng.random() >= self.malformed_rate:
            return format_assistant(message, self.style)
        kind = self.rng.choice(MALFORMATIONS)
        if kind == "unknown_tool":
            message["tool_calls"] = [make_tool_call(name + "_v2", args, "r")]
        elif kind == "missing_required" and required:
            args.pop(self.rng.choice(required))
            message["tool_calls"] = [make_tool_call(name, args, "r")]
        elif kind == "two_calls":
            other, other_args, _ = self._call()
            message["tool_calls"].append(make_tool_call(other, other_args, "s"))
        elif kind == "no_call":
            return f"I should probably use {name} with {json.dumps(args)}."
        text = format_assistant(message, self.style)
        if kind == "bad_json" or (kind == "missing_required" and not required):
            cut = text.rfind("}") if self.style == "hermes" else text.rfind("</parameter>")
            return text[:cut] + text[cut + 1 :] if cut != -1 else text.replace("</function>", "")
        if kind == "unclosed_tag":
            return text.removesuffix("</tool_call>")
        return text

    def act(self, states: list[AgentState], *, greedy: bool = False) -> list[PolicyOutput]:
        outputs = []
        for state in states:
            text = self._text(state)
            parsed = parse_assistant(
                text,
                self.style,
                tools=self.schemas,
                max_calls=1,
                require_call=True,
                id_prefix=f"call_t{state.turn}",
            )
            outputs.append(
                PolicyOutput(parsed.message, tool_error=parsed.error, raw=text, tool_error_kind=parsed.kind)
            )
        return outputs

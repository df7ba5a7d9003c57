"""Tool calls in a model family's native text, and back to canonical OpenAI-style messages.

Trajectories store canonical messages (``unipost.data``); a model reads and writes its own format. Two
families matter for the paper (App. G):

- ``"hermes"``: Qwen2.5 / Qwen3 and unipost's own tiny-model template, a JSON object per call
  ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
- ``"qwen3_coder"``: Qwen3-Coder (the paper's teacher family), XML per call
  ``<tool_call>\\n<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>\\n</function>\\n</tool_call>``.

The style names are vLLM's ``--tool-call-parser`` names, so one string configures both sides.

Parsing never raises on model output: a student that writes a broken call must produce an error
observation (a tool-use error in the paper's Table 4), not crash a thousand-episode rollout. On error
the canonical message carries the raw text as ``content`` and no ``tool_calls``, so re-rendering it
through the chat template reproduces what the model actually wrote.

``<think>`` blocks are kept in ``content`` exactly as written; whether earlier reasoning is shown again
is the chat template's decision (Qwen3's template strips it), not the parser's. Tool calls are only
looked for after the reasoning (see ``_reasoning_end``), because reasoning may mention the tags.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from unipost.data import Message

ToolCallStyle = Literal["hermes", "qwen3_coder"]
STYLES: tuple[str, ...] = ("hermes", "qwen3_coder")

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
THINK_CLOSE = "</think>"
_SNIPPET = 160  # characters of offending text quoted in an error message
MAX_JSON_DEPTH = 64  # tool calls are flat objects; deeper nesting is an attack, not an action


@dataclass(frozen=True)
class ParsedAction:
    """A canonical assistant message, and why the raw text was not a valid action (None when it was)."""

    message: Message
    error: str | None = None
    # which of ``unipost.data.TOOL_ERROR_KINDS`` the error is ("unparseable", "unknown_tool",
    # "invalid_arguments"), decided here where it is detected rather than guessed later from its wording
    kind: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _InvalidArguments(str):
    """A body parser's error that is about argument values (well-formed markup, wrong arguments)."""


# ---------------------------------------------------------------------------------------------------
# styles


def detect_style(template: str) -> ToolCallStyle:
    """The tool-call style a chat template renders, read off the template text itself.

    Raises ValueError for a template that renders no tool calls, because silently guessing a format
    the model never saw would turn every action into a tool-use error.
    """
    if "<function=" in template:
        return "qwen3_coder"
    if CALL_OPEN in template:
        return "hermes"
    raise ValueError(
        "cannot detect the tool-call style of this chat template: it renders neither "
        "'<tool_call>' JSON (hermes) nor '<function=...>' XML (qwen3_coder); pass style= explicitly"
    )


def _check_style(style: str) -> None:
    if style not in STYLES:
        raise ValueError(f"unknown tool-call style {style!r}; expected one of {', '.join(STYLES)}")


# ---------------------------------------------------------------------------------------------------
# canonical tool calls and tool schemas


def value_depth(value: Any, stop: int = MAX_JSON_DEPTH) -> int:
    """How deeply lists and dicts nest in ``value``, measured without recursion (stops past ``stop``)."""
    deepest = 0
    todo: list[tuple[Any, int]] = [(value, 1)]
    while todo:
        item, depth = todo.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, (list, tuple)):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if deepest > stop:
            break
        todo.extend((child, depth + 1) for child in children)
    return deepest


def loads_bounded(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses (ValueError) nesting deeper than ``max_depth``.

    Python's json decoder recurses once per level: ``[[[...`` 100,000 deep raises RecursionError, and
    a structure just under the interpreter's limit breaks whoever walks it next. Text with few
    brackets cannot be deep and is parsed directly (the common case, and fast for a large file
    text); otherwise the parsed value's depth is measured iteratively.
    """
    if text.count("[") + text.count("{") <= max_depth:
        return json.loads(text)
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"JSON nested too deeply (at most {max_depth} levels allowed)") from None
    depth = value_depth(value, max_depth)
    if depth > max_depth:
        raise ValueError(f"JSON nested more than {max_depth} levels deep (at most {max_depth} allowed)")
    return value


def make_tool_call(name: str, arguments: dict[str, Any], call_id: str) -> dict[str, Any]:
    """One OpenAI-format tool call; arguments are stored as a JSON string, as the OpenAI API does."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def call_arguments(call: dict[str, Any]) -> dict[str, Any]:
    """A canonical call's arguments as a dict (they are stored as a JSON string)."""
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):
        args = loads_bounded(args) if args.strip() else {}
    if not isinstance(args, dict):
        raise ValueError(f"tool call {fn.get('name')!r} has arguments that are not an object: {args!r}")
    return args


def _tool_index(tools: Sequence[dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """name -> function schema, accepting both {"type": "function", "function": {...}} and bare form."""
    if tools is None:
        return None
    index = {}
    for tool in tools:
        fn = tool.get("function", tool)
        index[fn["name"]] = fn
    return index


def validate_calls(
    calls: Sequence[tuple[str, dict[str, Any]]],
    tools: Sequence[dict[str, Any]] | None = None,
    *,
    max_calls: int | None = None,
) -> str | None:
    """Why a list of (name, arguments) calls is not a valid action, or None.

    Shared by the text parsers and the black-box policy (whose server already parsed the calls), so a
    teacher and a student are held to the same rules.
    """
    problem = call_error(calls, tools, max_calls=max_calls)
    return None if problem is None else problem[0]


def call_error(
    calls: Sequence[tuple[str, dict[str, Any]]],
    tools: Sequence[dict[str, Any]] | None = None,
    *,
    max_calls: int | None = None,
) -> tuple[str, str] | None:
    """``validate_calls`` with the error's kind: (why, "unparseable" | "unknown_tool" |
    "invalid_arguments"), or None. More calls than allowed is "unparseable": the text is not one action."""
    if max_calls is not None and len(calls) > max_calls:
        return f"{len(calls)} tool calls in one turn, but at most {max_calls} allowed", "unparseable"
    index = _tool_index(tools)
    if index is None:
        return None
    for name, args in calls:
        if name not in index:
            return f"unknown tool {name!r} (available: {', '.join(sorted(index))})", "unknown_tool"
        required = index[name].get("parameters", {}).get("required", [])
        missing = [r for r in required if r not in args]
        if missing:
            why = f"tool {name!r} is missing required argument(s): {', '.join(map(repr, missing))}"
            return why, "invalid_arguments"
    return None


def _call_ids(text: str, n: int, id_prefix: str) -> list[str]:
    """Deterministic ids: a seeded rollout reproduces its trajectories byte for byte."""
    digest = hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return [f"{id_prefix}_{digest}_{i}" for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# formatting: canonical -> native text (what the model writes after '<|im_start|>assistant\n')


def _xml_value(value: Any) -> str:
    """Parameter values as Qwen3-Coder writes them: strings verbatim, everything else as JSON.

    The llama.cpp copy of the template applies Jinja's ``|string`` (Python repr: ``True``, ``{'a': 1}``);
    the official template and vLLM's ``qwen3_coder`` parser use JSON for objects and arrays. We render
    JSON everywhere (see ``prepare_messages``) and the parser also reads Python literals.
    """
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def format_tool_call(name: str, arguments: dict[str, Any], style: ToolCallStyle = "hermes") -> str:
    """One call in native text, byte-identical to what the family's chat template renders."""
    _check_style(style)
    if style == "hermes":
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"{CALL_OPEN}\n{body}\n{CALL_CLOSE}"
    params = "".join(f"<parameter={k}>\n{_xml_value(v)}\n</parameter>\n" for k, v in arguments.items())
    return f"{CALL_OPEN}\n<function={name}>\n{params}</function>\n{CALL_CLOSE}"


def format_assistant(message: Message, style: ToolCallStyle = "hermes") -> str:
    """A canonical assistant message as the model would generate it (without the end-of-turn token)."""
    _check_style(style)
    content = message.get("content") or ""
    calls = [
        format_tool_call(c.get("function", c)["name"], call_arguments(c), style)
        for c in message.get("tool_calls") or []
    ]
    if not calls:
        return content
    if style == "hermes":
        return (content + "\n" if content else "") + "\n".join(calls)
    content = content.strip()
    return (content + "\n\n" if content else "") + "\n".join(calls)


# ---------------------------------------------------------------------------------------------------
# parsing: native text -> canonical


def _snippet(text: str) -> str:
    text = text.strip()
    return repr(text if len(text) <= _SNIPPET else text[:_SNIPPET] + "...")


def _split_blocks(text: str) -> tuple[list[str], list[str], str | None]:
    """Text outside <tool_call> blocks, the block bodies, and a structural error."""
    outside, bodies, pos = [], [], 0
    while True:
        start = text.find(CALL_OPEN, pos)
        stray = text.find(CALL_CLOSE, pos)
        if stray != -1 and (start == -1 or stray < start):
            return outside, bodies, f"stray {CALL_CLOSE} without an opening {CALL_OPEN}"
        if start == -1:
            outside.append(text[pos:])
            return outside, bodies, None
        outside.append(text[pos:start])
        body_start = start + len(CALL_OPEN)
        end = text.find(CALL_CLOSE, body_start)
        nested = text.find(CALL_OPEN, body_start)
        if end == -1 or (nested != -1 and nested < end):
            return outside, bodies, f"unclosed {CALL_OPEN} tag (no {CALL_CLOSE}): {_snippet(text[start:])}"
        bodies.append(text[body_start:end])
        pos = end + len(CALL_CLOSE)


def _reasoning_end(text: str) -> int:
    """Where the reasoning block ends (0: none).

    Text that opens with ``<think>`` reasons until the first ``</think>`` (it may mention tool-call
    tags); otherwise a ``</think>`` counts only before the first ``<tool_call>`` (the generation prompt
    may have opened the block), because a tool argument such as a file's text may contain it.
    """
    end = text.find(THINK_CLOSE)
    if end == -1:
        return 0
    first_call = text.find(CALL_OPEN)
    if text.lstrip().startswith("<think>") or first_call == -1 or end < first_call:
        return end + len(THINK_CLOSE)
    return 0


def _parse_hermes_body(body: str, i: int) -> tuple[str, dict[str, Any]] | str:
    if body.strip().startswith("<function="):
        return (
            f"tool call {i}: this model's format is {CALL_OPEN}{{json}}{CALL_CLOSE}, not <function=...> XML"
        )
    try:
        obj = loads_bounded(body)
    except json.JSONDecodeError as exc:
        return f"tool call {i}: invalid JSON in {CALL_OPEN} ({exc.msg} at char {exc.pos}): {_snippet(body)}"
    except ValueError as exc:
        return f"tool call {i}: {exc}"
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return f'tool call {i}: expected {{"name": ..., "arguments": {{...}}}}, got {_snippet(body)}'
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models double-encode the arguments
        try:
            args = loads_bounded(args)
        except ValueError:
            name = obj["name"]
            return f"tool call {i} ({name}): arguments are a string, not a JSON object: {_snippet(args)}"
    if not isinstance(args, dict):
        return _InvalidArguments(
            f"tool call {i} ({obj['name']}): arguments must be a JSON object, got {_snippet(str(args))}"
        )
    return obj["name"], args


_FUNCTION_RE = re.compile(r"^\s*<function=([^>\n]+)>(.*)</function>\s*$", re.DOTALL)
_PARAM_OPEN_RE = re.compile(r"<parameter=([^>\n]+)>")
_PARAM_CLOSE = "</parameter>"


def _decode_xml_value(raw: str, schema: dict[str, Any] | None) -> tuple[bool, Any]:
    """Decode one parameter value using its JSON-schema type, as vLLM's qwen3_coder parser does.

    The XML format is untyped: without a schema, ``5`` could be the string "5" or the integer 5. With a
    schema we follow its type; without one, anything that reads as a JSON or Python literal is decoded
    and the rest stays a string. Returns (ok, value); a value that contradicts its schema type is an
    error, like a JSON type error would be.
    """
    types = (schema or {}).get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if not types:
        ok, value = _literal(raw)
        return True, value if ok else raw
    for t in types:
        if t == "string":
            return True, raw
        ok, value = _literal(raw.strip()) if t != "null" else (raw.strip() in ("null", "None"), None)
        if not ok:
            continue
        if t == "null" or (t == "boolean" and isinstance(value, bool)):
            return True, value
        if t == "integer" and isinstance(value, int) and not isinstance(value, bool):
            return True, value
        if t == "number" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True, value
        if (t == "object" and isinstance(value, dict)) or (t == "array" and isinstance(value, list)):
            return True, value
    return False, raw


def _literal(raw: str) -> tuple[bool, Any]:
    """JSON first; then Python literals (``True``, ``{'a': 1}``), which Jinja's ``|string`` renders."""
    try:
        return True, loads_bounded(raw)
    except ValueError:  # not JSON (JSONDecodeError is a ValueError), or nested too deeply
        pass
    if raw.strip().lower() in ("true", "false"):
        return True, raw.strip().lower() == "true"
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, raw
    return (True, value) if value_depth(value) <= MAX_JSON_DEPTH else (False, raw)


def _parse_xml_body(body: str, i: int, tools: dict[str, dict[str, Any]] | None) -> tuple[str, dict] | str:
    m = _FUNCTION_RE.match(body)
    if m is None:
        if "<function=" not in body:
            return f"tool call {i}: no <function=NAME> inside {CALL_OPEN}: {_snippet(body)}"
        return f"tool call {i}: unclosed <function=...> (no </function>): {_snippet(body)}"
    name, inner = m.group(1).strip(), m.group(2)
    props = ((tools or {}).get(name) or {}).get("parameters", {}).get("properties", {})
    args: dict[str, Any] = {}
    pos = 0
    while True:
        pm = _PARAM_OPEN_RE.search(inner, pos)
        leftover = inner[pos : pm.start() if pm else len(inner)]
        if leftover.strip():
            return f"tool call {i} ({name}): unexpected text outside <parameter=...>: {_snippet(leftover)}"
        if pm is None:
            return name, args
        key = pm.group(1).strip()
        end = inner.find(_PARAM_CLOSE, pm.end())
        nxt = _PARAM_OPEN_RE.search(inner, pm.end())
        if end == -1 or (nxt is not None and nxt.start() < end):
            return f"tool call {i} ({name}): unclosed <parameter={key}> (no {_PARAM_CLOSE})"
        raw = inner[pm.end() : end]
        raw = raw[1:] if raw.startswith("\n") else raw  # the template adds exactly one newline each side
        raw = raw[:-1] if raw.endswith("\n") else raw
        if key in args:
            return _InvalidArguments(f"tool call {i} ({name}): parameter {key!r} given twice")
        ok, value = _decode_xml_value(raw, props.get(key))
        if not ok:
            want = props.get(key, {}).get("type")
            return _InvalidArguments(
                f"tool call {i} ({name}): argument {key!r} should be of type {want}, got {_snippet(raw)}"
            )
        args[key] = value
        pos = end + len(_PARAM_CLOSE)


def parse_assistant(
    text: str,
    style: ToolCallStyle = "hermes",
    *,
    tools: Sequence[dict[str, Any]] | None = None,
    max_calls: int | None = None,
    require_call: bool = False,
    id_prefix: str = "call",
) -> ParsedAction:
    """Parse generated text (everything after ``<|im_start|>assistant\\n``, without ``<|im_end|>``).

    Args:
        text: the model's raw output for one turn.
        style: "hermes" (Qwen JSON) or "qwen3_coder" (XML); see ``detect_style``.
        tools: the tool schemas offered this turn; when given, unknown tool names and missing required
            arguments are errors, and Qwen3-Coder parameter values are typed by the schema.
        max_calls: more calls than this in one turn is an error (OpenHands executes one per turn).
        require_call: a turn without any tool call is an error (agents must act through tools).
        id_prefix: prefix of the deterministic call ids (pass the turn index to keep them unique).

    Returns a ParsedAction; never raises on malformed text.
    """
    _check_style(style)
    split = _reasoning_end(text)
    head, tail = text[:split], text[split:]

    def failed(error: str, kind: str = "unparseable") -> ParsedAction:
        return ParsedAction({"role": "assistant", "content": text}, str(error), kind)

    outside, bodies, error = _split_blocks(tail)
    if error is None and style == "qwen3_coder" and "<function=" in "".join(outside):
        error = f"<function=...> must be inside {CALL_OPEN}...{CALL_CLOSE}"
    if error is not None:
        return failed(error)
    index = _tool_index(tools)
    calls: list[tuple[str, dict[str, Any]]] = []
    for i, body in enumerate(bodies, start=1):
        parsed = _parse_hermes_body(body, i) if style == "hermes" else _parse_xml_body(body, i, index)
        if isinstance(parsed, str):
            return failed(
                parsed, "invalid_arguments" if isinstance(parsed, _InvalidArguments) else "unparseable"
            )
        calls.append(parsed)
    if require_call and not calls:
        return failed(f"no tool call found (expected {CALL_OPEN}...{CALL_CLOSE})")
    problem = call_error(calls, tools, max_calls=max_calls)
    if problem is not None:
        return failed(*problem)
    content = (head + "".join(outside)).strip() if calls else text.strip()
    message: Message = {"role": "assistant", "content": content}
    if calls:
        ids = _call_ids(text, len(calls), id_prefix)
        message["tool_calls"] = [make_tool_call(n, a, cid) for (n, a), cid in zip(calls, ids, strict=True)]
    return ParsedAction(message)


# ---------------------------------------------------------------------------------------------------
# rendering through the tokenizer's own chat template


def prepare_messages(messages: Sequence[Message], style: ToolCallStyle = "hermes") -> list[Message]:
    """Canonical messages in the shape real chat templates expect (copies; inputs are not mutated).

    - ``content`` None -> "" (Qwen3's template does ``'</think>' in message.content``);
    - tool-call ``arguments`` JSON strings -> dicts (Qwen3-Coder iterates ``arguments|items``; the JSON
      templates would otherwise splice the stored string verbatim, unnormalised);
    - for qwen3_coder, non-string argument values -> JSON text, because the template's ``|string``
      would write Python reprs (``True``, ``{'a': 1}``) that the model family was not trained on.
    """
    out = []
    for m in messages:
        m = dict(m)
        if m.get("content") is None:
            m["content"] = ""
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                fn = dict(c.get("function", c))
                args = call_arguments(c)
                if style == "qwen3_coder":
                    args = {k: _xml_value(v) for k, v in args.items()}
                fn["arguments"] = args
                calls.append({**c, "function": fn} if "function" in c else fn)
            m["tool_calls"] = calls
        out.append(m)
    return out


def _style_of(tokenizer: Any, style: ToolCallStyle | None) -> ToolCallStyle:
    if style is not None:
        _check_style(style)
        return style
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        raise ValueError("the tokenizer has no chat template (set tokenizer.chat_template or pass style=)")
    return detect_style(template)


def render_prompt(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[dict[str, Any]] | None = None,
    *,
    style: ToolCallStyle | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """Canonical messages -> the model's prompt text, through its own chat template (transformers 5).

    Text only: encoding it with ``tokenizer(text)`` would turn special-token text inside content into
    control tokens; ids come from :func:`unipost.rendering.encoding.chat_ids`."""
    style = _style_of(tokenizer, style)
    return tokenizer.apply_chat_template(
        prepare_messages(messages, style),
        tools=list(tools) if tools else None,
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
    )


def render_action(
    tokenizer: Any,
    messages: Sequence[Message],
    action: Message,
    tools: Sequence[dict[str, Any]] | None = None,
    *,
    style: ToolCallStyle | None = None,
    end_token: str = "<|im_end|>",
) -> tuple[str, str]:
    """(prompt, action text): the action is what the template renders after the generation prompt,
    up to and including the end-of-turn token (the tokens a model must generate for that action).

    Raises ValueError when the template does not render the context as a prefix of context + action
    (then the action's tokens are not well defined by this split).
    """
    prompt = render_prompt(tokenizer, messages, tools, style=style)
    full = render_prompt(tokenizer, [*messages, action], tools, style=style, add_generation_prompt=False)
    if not full.startswith(prompt):
        pairs = enumerate(zip(prompt, full, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(prompt), len(full)))
        raise ValueError(
            "the chat template does not render the context as a prefix of context + action "
            f"(first difference at char {at}: {prompt[at : at + 40]!r} vs {full[at : at + 40]!r})"
        )
    action_text = full[len(prompt) :]
    end = action_text.rfind(end_token)
    if end != -1:
        action_text = action_text[: end + len(end_token)]
    return prompt, action_text

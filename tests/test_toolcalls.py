"""Tool-call rendering and parsing against the REAL chat templates (Qwen3, Qwen3-Coder, unipost's own).

Round trip: canonical message -> rendered by the template -> the assistant's text -> parse_assistant
-> the same tool calls (name + arguments dict). Malformed model output -> an error string, never an
exception.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest

from unipost.models import load_template
from unipost.rendering import (
    call_arguments,
    detect_style,
    format_assistant,
    make_tool_call,
    parse_assistant,
    render_action,
    render_prompt,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TEMPLATES = {
    "chatml_tools": ("chatml_tools", "hermes"),
    "qwen3": (str(FIXTURES / "chat_templates" / "qwen3.jinja"), "hermes"),
    "qwen3_coder": (str(FIXTURES / "chat_templates" / "qwen3-coder.jinja"), "qwen3_coder"),
}

EDIT_TOOL = {
    "type": "function",
    "function": {
        "name": "edit",
        "description": "A test tool with one parameter of every JSON-schema type.",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "text": {"type": "string"},
                "line": {"type": "integer"},
                "scale": {"type": "number"},
                "dry_run": {"type": "boolean"},
                "options": {"type": "object"},
                "ranges": {"type": "array"},
            },
            "required": ["path"],
        },
    },
}


def _openhands_tools() -> list[dict]:
    path = FIXTURES / "openhands" / "tool_schemas-openhands-tools-1.58.0.json"
    return list(json.loads(path.read_text()).values())


TOOLS = [*_openhands_tools(), EDIT_TOOL]

ARGUMENT_CASES = {
    "quotes": ("terminal", {"command": "grep -n \"def f\" src/a.py && echo 'x' \\ done"}),
    "newlines": (
        "file_editor",
        {"command": "create", "path": "/w/a.py", "file_text": "\ndef f(x):\n    return x + 1\n\n"},
    ),
    "unicode": ("finish", {"message": "Fixed ✓ — naïve 世界 🙂 </think> <b>"}),
    "nested_json": (
        "edit",
        {"path": "cfg.json", "options": {"a": [1, {"b": None}], "s": 'q"uote\n'}, "ranges": [[1, 2], [3, 4]]},
    ),
    "integer_and_scalars": (
        "edit",
        {"path": "5", "line": 42, "scale": 0.5, "dry_run": False, "text": "007"},
    ),
    "openhands_array": ("file_editor", {"command": "view", "path": "/w/b.py", "view_range": [1, -1]}),
}


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def templated(request, tokenizer):
    """(template name, tokenizer carrying that real template, its tool-call style)."""
    source, style = TEMPLATES[request.param]
    tok = copy.deepcopy(tokenizer)  # never mutate the session tokenizer other tests share
    tok.chat_template = load_template(source)
    return request.param, tok, style


def _context() -> list[dict]:
    return [
        {"role": "system", "content": "You are a careful software engineer."},
        {"role": "user", "content": "The parser crashes on empty input."},
    ]


def _strip_empty_think(content: str) -> str:
    return re.sub(r"<think>\s*</think>", "", content).strip()


@pytest.mark.parametrize("case", sorted(ARGUMENT_CASES))
def test_round_trip_last_turn(templated, case):
    """canonical -> template -> generated-text segment -> parse == canonical (name + arguments)."""
    _, tok, style = templated
    name, args = ARGUMENT_CASES[case]
    action = {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [make_tool_call(name, args, "c0")],
    }
    prompt, action_text = render_action(tok, _context(), action, TOOLS)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert action_text.endswith("<|im_end|>")
    parsed = parse_assistant(action_text.removesuffix("<|im_end|>"), style, tools=TOOLS, max_calls=1)
    assert parsed.error is None, parsed.error
    (call,) = parsed.message["tool_calls"]
    assert call["function"]["name"] == name
    assert call_arguments(call) == args
    assert type(call_arguments(call).get("line", 0)) is int
    assert _strip_empty_think(parsed.message["content"]) == "Let me check."


def test_round_trip_earlier_turns_and_several_calls(templated):
    """Assistant turns earlier in the history, several calls per turn, content-less turns."""
    _, tok, style = templated
    calls = [make_tool_call(*ARGUMENT_CASES[c], f"c{i}") for i, c in enumerate(sorted(ARGUMENT_CASES))]
    conversation = [
        *_context(),
        {"role": "assistant", "content": "", "tool_calls": calls[:2]},
        {"role": "tool", "tool_call_id": "c0", "content": "ok"},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        {"role": "assistant", "content": "Two more.", "tool_calls": calls[2:4]},
        {"role": "tool", "tool_call_id": "c2", "content": "ok"},
        {"role": "user", "content": "continue"},
        {"role": "assistant", "content": None, "tool_calls": calls[4:]},
        {"role": "tool", "tool_call_id": "c4", "content": "ok"},
    ]
    text = render_prompt(tok, conversation, TOOLS)
    segments = re.findall(r"<\|im_start\|>assistant\n?(.*?)<\|im_end\|>", text, flags=re.DOTALL)
    assert len(segments) == 3
    got = []
    for segment in segments:
        parsed = parse_assistant(segment, style, tools=TOOLS)
        assert parsed.error is None, parsed.error
        got.extend(parsed.message["tool_calls"])
    assert [(c["function"]["name"], call_arguments(c)) for c in got] == [
        (c["function"]["name"], call_arguments(c)) for c in calls
    ]


def test_formatter_matches_template(templated):
    """format_assistant writes exactly what the template renders for the model to generate."""
    name, tok, style = templated
    for case in sorted(ARGUMENT_CASES):
        action = {
            "role": "assistant",
            "content": "Hm.",
            "tool_calls": [make_tool_call(*ARGUMENT_CASES[case], "x")],
        }
        _, action_text = render_action(tok, _context(), action, TOOLS)
        native = action_text.removesuffix("<|im_end|>")
        if name == "qwen3":  # the last turn always gets a (here empty) reasoning block
            native = native.removeprefix("<think>\n\n</think>\n\n")
        assert native == format_assistant(action, style)


def test_detect_style():
    assert detect_style(load_template("chatml_tools")) == "hermes"
    assert detect_style(load_template(TEMPLATES["qwen3"][0])) == "hermes"
    assert detect_style(load_template(TEMPLATES["qwen3_coder"][0])) == "qwen3_coder"
    with pytest.raises(ValueError, match="cannot detect the tool-call style"):
        detect_style("{% for m in messages %}{{ m.content }}{% endfor %}")
    with pytest.raises(ValueError, match="unknown tool-call style"):
        parse_assistant("hi", "mistral")  # type: ignore[arg-type]


def test_ids_are_deterministic_and_prefixed():
    text = format_assistant({"content": "", "tool_calls": [make_tool_call("think", {"thought": "a"}, "z")]})
    a = parse_assistant(text, tools=TOOLS, id_prefix="t3")
    b = parse_assistant(text, tools=TOOLS, id_prefix="t3")
    assert a.message == b.message
    assert a.message["tool_calls"][0]["id"].startswith("t3_")


def test_reasoning_kept_and_calls_inside_think_ignored():
    call = '<tool_call>\n{"name": "think", "arguments": {"thought": "x"}}\n</tool_call>'
    text = f"<think>\nmaybe {call} ?\n</think>\n\nI will run it.\n{call}"
    parsed = parse_assistant(text, tools=TOOLS)
    assert parsed.ok
    assert len(parsed.message["tool_calls"]) == 1
    assert parsed.message["content"] == f"<think>\nmaybe {call} ?\n</think>\n\nI will run it."
    plain = parse_assistant("<think>\nno tools needed\n</think>\n\nDone.", tools=TOOLS)
    assert plain.ok and "tool_calls" not in plain.message
    assert plain.message["content"] == "<think>\nno tools needed\n</think>\n\nDone."


def test_python_literal_values_from_llama_cpp_template():
    """The llama.cpp copy of Qwen3-Coder renders non-strings with |string (Python repr); still parsed."""
    text = (
        "<tool_call>\n<function=edit>\n<parameter=path>\na.py\n</parameter>\n"
        "<parameter=options>\n{'a': True, 'b': None}\n</parameter>\n"
        "<parameter=dry_run>\nTrue\n</parameter>\n</function>\n</tool_call>"
    )
    parsed = parse_assistant(text, "qwen3_coder", tools=TOOLS)
    assert parsed.ok, parsed.error
    assert call_arguments(parsed.message["tool_calls"][0]) == {
        "path": "a.py",
        "options": {"a": True, "b": None},
        "dry_run": True,
    }


GOOD_H = '<tool_call>\n{"name": "terminal", "arguments": {"command": "ls"}}\n</tool_call>'
GOOD_X = "<tool_call>\n<function=terminal>\n<parameter=command>\nls\n</parameter>\n</function>\n</tool_call>"

MALFORMED = [
    # (style, text, kwargs, expected error fragment)
    ("hermes", GOOD_H.replace("}}\n", "}\n"), {}, "invalid JSON"),
    ("hermes", GOOD_H.removesuffix("</tool_call>"), {}, "unclosed <tool_call>"),
    ("hermes", GOOD_H.replace("<tool_call>\n{", "<tool_call>\n{\n<tool_call>"), {}, "unclosed <tool_call>"),
    ("hermes", GOOD_H.replace("terminal", "bash"), {"tools": TOOLS}, "unknown tool 'bash'"),
    ("hermes", GOOD_H.replace('"command": "ls"', '"cmd": "ls"'), {"tools": TOOLS}, "missing required"),
    ("hermes", GOOD_H + "\n" + GOOD_H, {"max_calls": 1}, "2 tool calls in one turn, but at most 1"),
    ("hermes", GOOD_H.replace("<tool_call>", "", 1), {}, "stray </tool_call>"),
    ("hermes", GOOD_H.replace('{"command": "ls"}', '["ls"]'), {}, "must be a JSON object"),
    (
        "hermes",
        GOOD_H.replace('"arguments": {"command": "ls"}', '"arguments": "ls -la"'),
        {},
        "not a JSON object",
    ),
    ("hermes", '<tool_call>\n{"arguments": {}}\n</tool_call>', {}, 'expected {"name"'),
    ("hermes", "I think I should list files.", {"require_call": True}, "no tool call found"),
    ("hermes", GOOD_X, {}, "not <function=...> XML"),
    ("qwen3_coder", GOOD_X.replace("</parameter>", ""), {}, "unclosed <parameter=command>"),
    ("qwen3_coder", GOOD_X.replace("</function>", ""), {}, "unclosed <function=...>"),
    ("qwen3_coder", GOOD_X.removesuffix("</tool_call>"), {}, "unclosed <tool_call>"),
    ("qwen3_coder", "<tool_call>\nterminal ls\n</tool_call>", {}, "no <function=NAME>"),
    ("qwen3_coder", GOOD_X.replace("<tool_call>\n", "").replace("</tool_call>", ""), {}, "must be inside"),
    ("qwen3_coder", GOOD_X.replace("terminal", "shell"), {"tools": TOOLS}, "unknown tool 'shell'"),
    ("qwen3_coder", GOOD_X.replace("command>", "cmd>"), {"tools": TOOLS}, "missing required"),
    ("qwen3_coder", GOOD_X + GOOD_X, {"max_calls": 1}, "at most 1"),
    (
        "qwen3_coder",
        GOOD_X.replace("</function>", "<parameter=timeout>\nsoon\n</parameter>\n</function>"),
        {"tools": TOOLS},
        "argument 'timeout' should be of type number",
    ),
    (
        "qwen3_coder",
        GOOD_X.replace("</function>", "<parameter=command>\npwd\n</parameter>\n</function>"),
        {},
        "parameter 'command' given twice",
    ),
    ("qwen3_coder", GOOD_X.replace("<parameter=", "junk <parameter="), {}, "unexpected text"),
]


@pytest.mark.parametrize(("style", "text", "kwargs", "fragment"), MALFORMED)
def test_malformed_calls_give_errors_not_exceptions(style, text, kwargs, fragment):
    parsed = parse_assistant(text, style, **kwargs)
    assert parsed.error is not None and fragment in parsed.error, parsed.error
    # the executed message keeps what the model wrote, so re-rendering reproduces it
    assert parsed.message == {"role": "assistant", "content": text}


@pytest.mark.parametrize(("style", "text"), [("hermes", GOOD_H), ("qwen3_coder", GOOD_X)])
def test_the_unmutated_cases_are_valid(style, text):
    """Guards the table above: each malformed case is a small edit of a call that does parse."""
    parsed = parse_assistant(text, style, tools=TOOLS, max_calls=1, require_call=True)
    assert parsed.ok, parsed.error
    assert call_arguments(parsed.message["tool_calls"][0]) == {"command": "ls"}


def test_prepare_messages_does_not_mutate_and_coder_gets_json_values(templated):
    _, tok, style = templated
    action = {
        "role": "assistant",
        "content": None,
        "tool_calls": [make_tool_call(*ARGUMENT_CASES["nested_json"], "c")],
    }
    before = copy.deepcopy(action)
    _, text = render_action(tok, _context(), action, TOOLS)
    assert action == before
    if style == "qwen3_coder":
        assert '{"a": [1, {"b": null}], "s": "q\\"uote\\n"}' in text  # JSON, not Python repr

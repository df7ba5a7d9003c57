"""unipost.rendering: canonical messages <-> each model family's native chat and tool-call text."""

from unipost.rendering.toolcalls import (
    STYLES,
    ParsedAction,
    ToolCallStyle,
    call_arguments,
    detect_style,
    format_assistant,
    format_tool_call,
    make_tool_call,
    parse_assistant,
    prepare_messages,
    render_action,
    render_prompt,
    validate_calls,
)

__all__ = [
    "STYLES",
    "ParsedAction",
    "ToolCallStyle",
    "call_arguments",
    "detect_style",
    "format_assistant",
    "format_tool_call",
    "make_tool_call",
    "parse_assistant",
    "prepare_messages",
    "render_action",
    "render_prompt",
    "validate_calls",
]

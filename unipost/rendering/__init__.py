"""unipost.rendering: canonical messages <-> each model family's native chat and tool-call text.

Messages become token ids only through :func:`chat_ids` / :func:`render_action_ids` (module
``encoding``), where message content is always text and control tokens come from the template alone.
"""

from unipost.rendering.encoding import (
    RenderedChat,
    TemplatePrefixError,
    chat_ids,
    encode_rendered,
    render_action_ids,
    render_chat,
)
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
    "RenderedChat",
    "TemplatePrefixError",
    "ToolCallStyle",
    "call_arguments",
    "chat_ids",
    "detect_style",
    "encode_rendered",
    "format_assistant",
    "format_tool_call",
    "make_tool_call",
    "parse_assistant",
    "prepare_messages",
    "render_action",
    "render_action_ids",
    "render_chat",
    "render_prompt",
    "validate_calls",
]

"""Models built locally from a config: no hub download anywhere in tests or demos."""

from unipost.models.tiny import (
    SPECIAL_TOKENS,
    build_tiny_qwen3,
    build_tokenizer,
    chat_template,
    load_template,
)

__all__ = ["SPECIAL_TOKENS", "build_tiny_qwen3", "build_tokenizer", "chat_template", "load_template"]

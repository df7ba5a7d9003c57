"""``chat_ids`` remembers recent results: same ids as a fresh render, copies out, keyed on what renders."""

from __future__ import annotations

from unipost.rendering import encoding
from unipost.rendering.encoding import chat_ids, encode_rendered, render_chat


def test_memo_returns_fresh_ids_as_copies_and_sees_template_changes(tokenizer):
    messages = [{"role": "system", "content": "Fix it."}, {"role": "user", "content": "a <|im_end|> b"}]
    fresh = encode_rendered(tokenizer, render_chat(tokenizer, messages, add_generation_prompt=True))
    first = chat_ids(tokenizer, messages, add_generation_prompt=True)
    assert first == fresh
    first.append(-1)  # the caller's list is its own
    assert chat_ids(tokenizer, messages, add_generation_prompt=True) == fresh
    assert chat_ids(tokenizer, messages, add_generation_prompt=False) != fresh
    edited = [messages[0], {**messages[1], "content": "a <|im_end|> c"}]
    assert chat_ids(tokenizer, edited, add_generation_prompt=True) != fresh
    template = tokenizer.chat_template
    try:
        tokenizer.chat_template = "PREFIX " + template
        changed = chat_ids(tokenizer, messages, add_generation_prompt=True)
        assert changed != fresh
        rendered = render_chat(tokenizer, messages, add_generation_prompt=True)
        assert changed == encode_rendered(tokenizer, rendered)
    finally:
        tokenizer.chat_template = template
    assert len(encoding._IDS_MEMO[tokenizer]) <= encoding._IDS_MEMO_SIZE

"""Messages -> token ids where message content is always text (DESIGN §5, issue 21 item 3).

Tokenising a rendered chat with added-token matching on (what ``tokenizer(text)`` does) turns any
``<|im_end|>`` or ``<tool_call>`` inside an observation, a tool call's arguments or a task text into the
template's real control token: a tool output can forge a system turn, and a label whose file text
contains ``<|im_end|>`` would be cut there. The rule here: special and added tokens come only from the
chat template's own structure; every content string is encoded as text. Every path that turns messages
into ids (``ChatRenderer``, the local policies' prompts and scoring pairs, hence teacher log-probs, the
reverse-KL diagnostic and the packer) goes through :func:`render_chat` + :func:`encode_rendered`, so the
invariant holds at one place.

How the template's structure is told apart from content (provenance, in three tiers):

1. *Placeholders.* The chat is rendered twice: as is (text ``T``) and with every content string (message
   content, reasoning, tool-call names, argument keys and values, tool-schema strings) replaced by an
   opaque sentinel made of a private-use character absent from ``T`` and every added token. The sentinel
   render is aligned with ``T`` (each sentinel may stand for its string verbatim, stripped as templates
   do, or JSON-escaped); when the alignment reconstructs ``T`` exactly, the added tokens found in the
   sentinel render are exactly the template's own, at known positions of ``T``. Anything else that
   matches an added token in ``T`` (a whole token inside content, or one straddling content and
   structure, e.g. a tool named ``<tool_call`` rendered as ``<function=<tool_call>``) is content.
2. *Markers.* A template that transforms content beyond that (so the alignment fails) gets a second
   render in which only the added-token occurrences inside content strings are replaced by sentinels;
   if that render reproduces ``T`` with the tokens put back, those occurrences were spliced verbatim.
3. *Neutralised render.* If even that differs, the template makes decisions on special text inside
   content (Qwen3 treats a user message that starts with ``<tool_response>`` as a tool turn). Content may
   not steer structure, so the marker render is the chat, with the markers encoded as the text they hid.

Reasoning: a template that reads ``reasoning_content`` (Qwen3) itself splits ``<think>...</think>`` off
assistant content and writes the tags back as its own structure. That split is done here first, with the
template's own rule, and kept only when the template renders the same text from it; the tags are then
structure, the reasoning text is content. A template without reasoning support (the lab's) renders the
tags verbatim inside content, so there they are text, like any other.

Benign content (no added-token text in any content string) encodes to exactly the ids of
``tokenizer(T, add_special_tokens=False)``: when every added token found in ``T`` is structural, those
very ids are returned. Otherwise the text between structural tokens is encoded by a twin of the backend
tokenizer without added tokens; added tokens split the text before the pre-tokenizer runs, so text
between two of them encodes the same either way (byte-level BPE: Qwen, Llama 3, the lab's tokenizer;
a Metaspace tokenizer may add a prefix-space token at such a run's start). Added tokens that are
whitespace (Gemma's ``\\n`` runs) are ordinary text and never counted. ``split_special_tokens=True`` is
not used: it leaves non-special added tokens (``<tool_call>`` in Qwen) matched.
"""

from __future__ import annotations

import contextlib
import json
import re
import weakref
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from unipost.data import Message
from unipost.rendering.toolcalls import prepare_messages

_ALIGN_STEPS = 20_000  # backtracking budget of one alignment (it needs one step per sentinel in practice)


@dataclass(frozen=True)
class RenderedChat:
    """A rendered chat and where the template's own control tokens sit in it.

    ``structure`` lists ``(start, end, token id)`` of every added token the template wrote, in order;
    every other character of ``text`` is encoded as plain text. ``tier`` says how provenance was found
    (1 placeholders, 2 markers, 3 neutralised render: ``text`` then differs from the template's raw
    render, because content carried special text the template acted on).
    """

    text: str
    structure: tuple[tuple[int, int, int], ...]
    tier: int = 1


# ---------------------------------------------------------------------------------------------------
# the tokenizer's added tokens and a twin without them


@dataclass
class _Vocab:
    size: int
    added: dict[str, int]  # non-whitespace added tokens: content -> id
    encode_plain: Callable[[str], list[int]]


_VOCABS: weakref.WeakKeyDictionary[Any, _Vocab] = weakref.WeakKeyDictionary()


def _vocab(tokenizer: Any) -> _Vocab:
    """Added tokens and a plain-text encoder of ``tokenizer``, cached until its vocabulary grows."""
    size = len(tokenizer)
    try:
        cached = _VOCABS.get(tokenizer)
    except TypeError:  # not weak-referenceable
        cached = None
    if cached is not None and cached.size == size:
        return cached
    added = {
        str(tok): idx
        for idx, tok in tokenizer.added_tokens_decoder.items()
        if str(tok) and not str(tok).isspace()
    }
    vocab = _Vocab(size, added, _plain_encoder(tokenizer))
    with contextlib.suppress(TypeError):  # not weak-referenceable: rebuilt per call
        _VOCABS[tokenizer] = vocab
    return vocab


def _plain_encoder(tokenizer: Any) -> Callable[[str], list[int]]:
    """Text -> ids with no added token matched (content text): the backend tokenizer rebuilt without
    its added tokens (whitespace ones kept, they are ordinary text), or a slow tokenizer's model."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return lambda text: list(tokenizer.convert_tokens_to_ids(tokenizer._tokenize(text))) if text else []
    from tokenizers import Tokenizer

    spec = json.loads(backend.to_str())
    spec["added_tokens"] = [t for t in spec.get("added_tokens", []) if t["content"].isspace()]
    spec["truncation"] = spec["padding"] = None
    twin = Tokenizer.from_str(json.dumps(spec))
    return lambda text: twin.encode(text, add_special_tokens=False).ids if text else []


def _encode_with_matches(
    tokenizer: Any, vocab: _Vocab, text: str
) -> tuple[list[int], list[tuple[int, int, int]]]:
    """``tokenizer(text)``'s ids (the encoding every path used before) and its added-token matches."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    added_ids = set(vocab.added.values())
    matches = [(a, b, i) for i, (a, b) in zip(ids, enc["offset_mapping"], strict=True) if i in added_ids]
    return ids, matches


# ---------------------------------------------------------------------------------------------------
# content strings: where they sit in messages and tool schemas


def _map_json(value: Any, sub: Callable[[str], str]) -> Any:
    """Tool-call arguments: keys and string values are content."""
    if isinstance(value, str):
        return sub(value)
    if isinstance(value, dict):
        return {sub(k) if isinstance(k, str) else k: _map_json(v, sub) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_json(v, sub) for v in value]
    return value


def _map_schema(value: Any, sub: Callable[[str], str], parent: str | None = None) -> Any:
    """Tool schemas: string values and property names are content; ``type`` values and other keys are
    the schema's own vocabulary, which templates test (``param_fields.type is defined``)."""
    if isinstance(value, str):
        return sub(value)
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            key = sub(k) if parent == "properties" and isinstance(k, str) else k
            out[key] = v if k == "type" and parent != "properties" else _map_schema(v, sub, k)
        return out
    if isinstance(value, (list, tuple)):
        return [_map_schema(v, sub, parent) for v in value]
    return value


def _map_messages(messages: Sequence[Message], sub: Callable[[str], str]) -> list[Message]:
    out = []
    for m in messages:
        m = dict(m)
        for key in ("content", "reasoning_content", "name"):
            value = m.get(key)
            if isinstance(value, str):
                m[key] = sub(value)
            elif key == "content" and isinstance(value, list):  # content parts: their text is content
                m[key] = [
                    {**p, "text": sub(p["text"])}
                    if isinstance(p, dict) and isinstance(p.get("text"), str)
                    else p
                    for p in value
                ]
        if m.get("tool_calls"):
            calls = []
            for call in m["tool_calls"]:
                fn = dict(call.get("function", call))
                if isinstance(fn.get("name"), str):
                    fn["name"] = sub(fn["name"])
                if "arguments" in fn:
                    fn["arguments"] = _map_json(fn["arguments"], sub)
                calls.append({**call, "function": fn} if "function" in call else fn)
            m["tool_calls"] = calls
        out.append(m)
    return out


def _split_reasoning(messages: Sequence[Message]) -> list[Message] | None:
    """Assistant ``<think>`` blocks moved to ``reasoning_content`` with Qwen3's own rule (None: none)."""
    out, changed = [], False
    for m in messages:
        content = m.get("content")
        if (
            m.get("role") == "assistant"
            and isinstance(content, str)
            and "</think>" in content
            and m.get("reasoning_content") is None
        ):
            head = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
            m = {**m, "content": content.split("</think>")[-1].lstrip("\n"), "reasoning_content": head}
            changed = True
        out.append(m)
    return out if changed else None


# ---------------------------------------------------------------------------------------------------
# provenance


def _sentinel_char(used: str, vocab: _Vocab) -> str:
    """A private-use character in neither the rendered text nor any added token."""
    taken = set(used).union(*map(set, vocab.added))
    for code in range(0xE000, 0xF900):
        if chr(code) not in taken:
            return chr(code)
    raise ValueError("no free private-use character to mark content with")


def _variants(s: str) -> list[str]:
    """How templates write a content string: verbatim, stripped (``|trim``, ``.lstrip('\\n')``), or
    JSON-escaped inside ``|tojson``."""
    forms = [s, s.strip(), s.lstrip(), s.rstrip(), s.strip("\n"), s.lstrip("\n"), s.rstrip("\n")]
    forms += [json.dumps(s, ensure_ascii=False)[1:-1], json.dumps(s)[1:-1]]
    return list(dict.fromkeys(forms))


def _align(parts: list[str], text: str, forms: dict[str, list[str]]) -> list[int] | None:
    """Where each structural piece of a sentinel render lies in ``text`` (None: no consistent fit).

    ``parts`` is ``[S0, key1, S1, key2, S2, ...]``: structure pieces and sentinel keys alternating. A
    sentinel may stand for any of its string's ``forms``; backtracking tries them in order.
    """
    if not text.startswith(parts[0]):
        return None
    n = len(parts) // 2
    at = [0] * (n + 1)  # start of S_k in text
    pos = [len(parts[0])] + [0] * n  # end of S_k in text
    tried = [0] * (n + 1)
    k, steps = 0, 0
    while 0 <= k < n:
        steps += 1
        if steps > _ALIGN_STEPS:
            return None
        options, nxt, p = forms[parts[2 * k + 1]], parts[2 * k + 2], pos[k]
        while tried[k] < len(options):
            form = options[tried[k]]
            tried[k] += 1
            q = p + len(form)
            if (
                text.startswith(form, p)
                and text.startswith(nxt, q)
                and (k < n - 1 or q + len(nxt) == len(text))
            ):
                at[k + 1], pos[k + 1] = q, q + len(nxt)
                k += 1
                if k < n:
                    tried[k] = 0
                break
        else:
            k -= 1
    if k < 0 or (n == 0 and len(parts[0]) != len(text)):
        return None
    return at


def _structure_from(
    tokenizer: Any,
    vocab: _Vocab,
    rendered: str,
    parts: list[str],
    at: list[int],
    key_len: Callable[[str], int],
) -> tuple[tuple[int, int, int], ...] | None:
    """The added tokens of a sentinel render, moved to the positions ``at`` of the real text."""
    starts, pos = [], 0  # start of each structure piece in the sentinel render
    for k in range(0, len(parts), 2):
        starts.append(pos)
        pos += len(parts[k]) + (key_len(parts[k + 1]) if k + 1 < len(parts) else 0)
    _, matches = _encode_with_matches(tokenizer, vocab, rendered)
    out = []
    for a, b, idx in matches:
        k = bisect_right(starts, a) - 1
        if b > starts[k] + len(parts[2 * k]):  # crosses a sentinel: cannot be the template's own
            return None
        out.append((at[k] + a - starts[k], at[k] + b - starts[k], idx))
    return tuple(out)


def render_chat(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[dict] | None = None,
    *,
    add_generation_prompt: bool,
    style: str = "hermes",
) -> RenderedChat:
    """Render ``messages`` through ``tokenizer``'s chat template and find the template's own tokens.

    ``messages`` are canonical (``unipost.data``); they are prepared exactly as the policies prepare
    them at rollout time (``prepare_messages`` with ``style``).
    """
    vocab = _vocab(tokenizer)
    tools = list(tools) if tools else None
    template = tokenizer.chat_template

    def render(msgs: Sequence[Message], tls: Sequence[dict] | None) -> str:
        return tokenizer.apply_chat_template(
            list(msgs), tools=tls, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    prepared = prepare_messages(messages, style)  # type: ignore[arg-type]
    text = render(prepared, tools)
    if "reasoning_content" in str(template):
        split = _split_reasoning(prepared)
        if split is not None and render(split, tools) == text:
            prepared = split

    # tier 1: every content string behind a sentinel
    mark = _sentinel_char(text, vocab)
    key_re = re.compile(f"{mark}([0-9]+){mark}")
    table: dict[str, str] = {}  # content string -> key
    forms: dict[str, list[str]] = {}

    def opaque(s: str) -> str:
        if not s.strip():  # whitespace cannot hide a token, and templates test emptiness
            return s
        key = table.get(s)
        if key is None:
            key = table[s] = str(len(table))
            forms[key] = _variants(s)
        return f"{mark}{key}{mark}"

    def key_len(key: str) -> int:
        return len(key) + 2

    sentinel_text = render(_map_messages(prepared, opaque), _map_schema(tools, opaque) if tools else None)
    parts = key_re.split(sentinel_text)
    at = _align(parts, text, forms)
    if at is not None:
        structure = _structure_from(tokenizer, vocab, sentinel_text, parts, at, key_len)
        if structure is not None:
            return RenderedChat(text, structure, 1)

    # tier 2: only the added-token occurrences inside content behind sentinels
    hidden: list[str] = []

    def neutral(s: str) -> str:
        _, matches = _encode_with_matches(tokenizer, vocab, s)
        if not matches:
            return s
        pieces, prev = [], 0
        for a, b, _ in matches:
            pieces.append(s[prev:a] + f"{mark}{len(hidden)}{mark}")
            hidden.append(s[a:b])
            prev = b
        return "".join(pieces) + s[prev:]

    neutral_text = render(_map_messages(prepared, neutral), _map_schema(tools, neutral) if tools else None)
    if not hidden:  # no content string holds a whole added token: every one in the text is structural
        _, matches = _encode_with_matches(tokenizer, vocab, text)
        return RenderedChat(text, tuple(matches), 2)
    parts = key_re.split(neutral_text)
    token_forms = {str(i): [tok] for i, tok in enumerate(hidden)}
    at = _align(parts, text, token_forms)
    tier = 2
    if at is None:  # tier 3: the template acted on special text in content; render it neutralised
        tier, pieces, at = 3, [], [0]
        for k in range(0, len(parts), 2):
            pieces.append(parts[k])
            if k + 1 < len(parts):
                pieces.append(hidden[int(parts[k + 1])])
                at.append(sum(map(len, pieces)))
        text = "".join(pieces)
    structure = _structure_from(tokenizer, vocab, neutral_text, parts, at, key_len)
    if structure is None:
        raise ValueError("could not tell the chat template's control tokens from content")
    return RenderedChat(text, structure, tier)


# ---------------------------------------------------------------------------------------------------
# encoding


def encode_rendered(tokenizer: Any, chat: RenderedChat, start: int = 0, end: int | None = None) -> list[int]:
    """Ids of ``chat.text[start:end]``: the template's tokens as tokens, all other text as text.

    When every added token the tokenizer finds in the region is structural (benign content), these are
    the ids of ``tokenizer(chat.text[start:end], add_special_tokens=False)``, bitwise.
    """
    vocab = _vocab(tokenizer)
    end = len(chat.text) if end is None else end
    inside = []
    for a, b, idx in chat.structure:
        if a < end and b > start:
            if a < start or b > end:
                raise ValueError(f"the range [{start}, {end}) cuts a control token of the chat template")
            inside.append((a - start, b - start, idx))
    region = chat.text[start:end]
    ids, matches = _encode_with_matches(tokenizer, vocab, region)
    if matches == inside:
        return ids
    out: list[int] = []
    prev = 0
    for a, b, idx in inside:
        out += vocab.encode_plain(region[prev:a])
        out.append(idx)
        prev = b
    return out + vocab.encode_plain(region[prev:])


_IDS_MEMO: weakref.WeakKeyDictionary[Any, OrderedDict[tuple, tuple[int, ...]]] = weakref.WeakKeyDictionary()
_IDS_MEMO_SIZE = 256


def chat_ids(
    tokenizer: Any,
    messages: Sequence[Message],
    tools: Sequence[dict] | None = None,
    *,
    add_generation_prompt: bool,
    style: str = "hermes",
) -> list[int]:
    """THE messages -> ids function (renderer, policies' prompts, KL, teacher scoring, packer).

    The last few results are remembered per tokenizer, keyed by the exact ``repr`` of the messages and
    tools, the flags, the chat template and the vocabulary size: the rollout engine's context budget
    and the policy encode the same context every turn, and that costs one render + encode, not two.
    """
    try:
        memo = _IDS_MEMO.get(tokenizer)
        if memo is None:
            memo = _IDS_MEMO[tokenizer] = OrderedDict()
    except TypeError:  # not weak-referenceable: no memo
        memo = None
    key = None
    if memo is not None:
        key = (
            repr(list(messages)),
            repr(list(tools) if tools else None),
            add_generation_prompt,
            style,
            len(tokenizer),
            str(getattr(tokenizer, "chat_template", None)),
        )
        hit = memo.get(key)
        if hit is not None:
            memo.move_to_end(key)
            return list(hit)
    chat = render_chat(tokenizer, messages, tools, add_generation_prompt=add_generation_prompt, style=style)
    ids = encode_rendered(tokenizer, chat)
    if memo is not None:
        memo[key] = tuple(ids)
        while len(memo) > _IDS_MEMO_SIZE:
            memo.popitem(last=False)
    return ids


class TemplatePrefixError(ValueError):
    """The chat template renders a context differently once a label is appended to it."""


def render_action_ids(
    tokenizer: Any,
    context: Sequence[Message],
    action: Message,
    tools: Sequence[dict] | None = None,
    *,
    end_of_turn_id: int | None,
    style: str = "hermes",
) -> tuple[RenderedChat, list[int]]:
    """(the rendered context with the generation prompt, the action's ids): what a model given the
    context must generate to produce ``action``, cut after the template's own end-of-turn token (never
    at an end-of-turn text inside the action's content).

    The action is the rendered ``context + [action]`` minus the rendered context (a string prefix; a
    template that renders the context differently once the action follows raises
    :class:`TemplatePrefixError`), encoded on its own, as the model generates it after the context.
    """
    ctx = render_chat(tokenizer, context, tools, add_generation_prompt=True, style=style)
    full = render_chat(tokenizer, [*context, action], tools, add_generation_prompt=False, style=style)
    if not full.text.startswith(ctx.text):
        n = len(ctx.text)
        raise TemplatePrefixError(
            "the chat template renders the context differently once the action is appended "
            f"(context ends {ctx.text[-60:]!r}, full text at that point {full.text[max(n - 60, 0) : n]!r}); "
            "unipost cannot tell which tokens the model would generate"
        )
    start = len(ctx.text)
    end = next((b for a, b, idx in full.structure if a >= start and idx == end_of_turn_id), len(full.text))
    ids = encode_rendered(tokenizer, full, start, end)
    if not ids:
        raise TemplatePrefixError("the action renders to no tokens")
    return ctx, ids

"""Canonical trajectories -> token sequences through the model's own chat template.

The tree packer relies on the *prefix property*: the tokens of context s_t (rendered with the
generation prompt, exactly what the model is given at inference) are a prefix of the tokens of the
whole executed conversation. Some real templates break it (Qwen3's template drops the reasoning of
assistant turns that precede the last user query, so an earlier context is not a prefix of a later
one). The renderer checks the property turn by turn on token ids and, where it fails, renders that
context separately as its own document: correctness first, never a silently different context.

A label's tokens are what the model would generate after the context: the rendered
``context + [label]`` string minus the rendered context (string-level prefix; a template for which
even that fails raises :class:`TemplatePrefixError`), tokenised on its own and cut after the
template's own end-of-turn token.

Every messages -> ids step goes through :mod:`unipost.rendering.encoding` (``render_chat`` /
``encode_rendered``), where message content is always text: a ``<|im_end|>`` inside an observation or
a file's text never becomes the template's control token (issue 21 item 3).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from unipost.data import Message, Trajectory
from unipost.kernels.packing import Label, PackSequence
from unipost.rendering.encoding import TemplatePrefixError as TemplatePrefixError
from unipost.rendering.encoding import chat_ids, render_action_ids
from unipost.rendering.toolcalls import ToolCallStyle, detect_style, prepare_messages


@dataclass(frozen=True)
class LabelSpec:
    """One label to imitate: the message at turn ``turn`` (conditioned on context s_turn)."""

    turn: int
    message: Message
    weight: float | tuple[float, ...] = 1.0
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    token_ids: tuple[int, ...] | None = None  # exact sampled tokens of a student action (no re-tokenising)


@dataclass
class RenderStats:
    labels: int = 0
    on_spine_contexts: int = 0
    prefix_breaks: int = 0  # contexts rendered as their own document because the prefix property failed


class ChatRenderer:
    """Renders canonical messages with ``tokenizer``'s chat template and tokenises them."""

    def __init__(
        self, tokenizer: Any, tools: Sequence[dict] | None = None, *, end_of_turn: str | None = None
    ):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("the tokenizer has no chat_template; set one (unipost.models.load_template)")
        self.tokenizer = tokenizer
        self.tools = list(tools) if tools else None
        eot = end_of_turn or tokenizer.eos_token
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(eot) if eot else None
        try:  # the same message preparation the policies use at rollout time
            self.style: ToolCallStyle = detect_style(tokenizer.chat_template)
        except ValueError:  # a template without tool calls: hermes preparation is harmless
            self.style = "hermes"

    def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            prepare_messages(messages, self.style),
            tools=self.tools,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def encode(self, text: str) -> list[int]:
        """``text`` with every added token in it parsed: only for text known to hold no message content
        (content goes through :meth:`chat_ids`, which keeps it text)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def chat_ids(self, messages: Sequence[Message], *, add_generation_prompt: bool) -> list[int]:
        """``messages`` rendered and tokenised; special tokens come only from the template's structure."""
        return chat_ids(
            self.tokenizer,
            messages,
            self.tools,
            add_generation_prompt=add_generation_prompt,
            style=self.style,
        )

    def context_ids(self, messages: Sequence[Message]) -> list[int]:
        """Tokens the model is given before acting: the context with the generation prompt."""
        return self.chat_ids(messages, add_generation_prompt=True)

    def count_tokens(self, messages: Sequence[Message], tools: Sequence[dict] | None = None) -> int:
        """Length of :meth:`context_ids`: the rollout engine's ``count_tokens`` for a context budget.

        The one token counter the Trainer's rollouts, held-out evaluation and KL diagnostic share, so
        all three end an episode at the same context length. ``tools`` is accepted for the engine's
        ``(messages, tools)`` signature; the prompt is rendered with the tools this renderer was built
        with (the same ones the student was trained and is prompted with).
        """
        return len(self.context_ids(messages))

    def label_ids(self, context: Sequence[Message], label: Message) -> list[int]:
        """Tokens the model should generate after ``context`` to produce ``label``, through the
        template's own end-of-turn token (an end-of-turn text inside the label's content is text)."""
        return render_action_ids(
            self.tokenizer, context, label, self.tools, end_of_turn_id=self.end_of_turn_id, style=self.style
        )[1]


def _is_prefix(prefix: Sequence[int], seq: Sequence[int]) -> bool:
    return len(prefix) <= len(seq) and list(seq[: len(prefix)]) == list(prefix)


def trajectory_sequences(
    trajectory: Trajectory,
    labels: Sequence[LabelSpec],
    renderer: ChatRenderer,
    *,
    mode: str = "tree",
    stats: RenderStats | None = None,
) -> list[PackSequence]:
    """Token documents for one trajectory's labelled transitions.

    ``mode="tree"``: the executed conversation is the spine and each label hangs off its context
    (labels equal to the executed action land on spine tokens). ``mode="per_transition"``: every
    (context, label) pair is its own document (the unpacked baseline; also what varlen packing of
    independent transitions uses).
    """
    if mode not in ("tree", "per_transition"):
        raise ValueError(f"unknown mode {mode!r}; use 'tree' or 'per_transition'")
    stats = stats if stats is not None else RenderStats()
    by_turn: dict[int, list[LabelSpec]] = {}
    for spec in labels:
        if not 0 <= spec.turn < max(len(trajectory.turns), 1):
            raise ValueError(f"label turn {spec.turn} outside the trajectory's {len(trajectory.turns)} turns")
        by_turn.setdefault(spec.turn, []).append(spec)

    def make_labels(turn: int, context_len: int) -> list[Label]:
        context = trajectory.context(turn)
        out = []
        for spec in by_turn[turn]:
            ids = list(spec.token_ids) if spec.token_ids else renderer.label_ids(context, spec.message)
            meta = {"turn": turn, "task_id": trajectory.task_id, **spec.meta}
            out.append(Label(context_len, tuple(ids), spec.weight, meta))
            stats.labels += 1
        return out

    documents: list[PackSequence] = []
    if mode == "per_transition":
        for turn in sorted(by_turn):
            context_ids = renderer.context_ids(trajectory.context(turn))
            for label in make_labels(turn, len(context_ids)):
                documents.append(PackSequence(context_ids + list(label.token_ids), [label]))
        return documents

    spine = PackSequence(renderer.chat_ids(trajectory.messages(), add_generation_prompt=False))
    for turn in sorted(by_turn, reverse=True):
        context_ids = renderer.context_ids(trajectory.context(turn))
        if not _is_prefix(context_ids, spine.root):
            # prefix property broken: start a new spine through this turn's executed action
            stats.prefix_breaks += 1
            if spine.labels:
                documents.append(spine)
            through_turn = trajectory.context(turn + 1)
            spine = PackSequence(renderer.chat_ids(through_turn, add_generation_prompt=False))
            if not _is_prefix(context_ids, spine.root):
                spine = PackSequence(list(context_ids))  # a document holding only this context
        else:
            stats.on_spine_contexts += 1
        spine.labels.extend(make_labels(turn, len(context_ids)))
    if spine.labels:
        documents.append(spine)
    documents.reverse()
    for doc in documents:  # labels were attached walking backwards: restore turn order
        doc.labels.sort(key=lambda label: label.meta["turn"])
    return documents

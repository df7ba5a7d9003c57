"""Packing (context, label) transitions into one flat, attention-masked token sequence.

Shape letters used in names: T = packed tokens, L = label tokens (loss positions), S = labels
(transitions), D = documents (root sequences).

A :class:`PackSequence` is one root token sequence (a document) plus the labels conditioned on its
prefixes. Each :class:`Label` says "predict ``token_ids`` given ``root[:context_len]``". Two layouts
fall out of the same rule:

* varlen packing: every transition is its own root (``root = context + label``, one label on it);
  documents are concatenated without padding and may not attend to each other.
* tree packing (paper §3.2, last paragraph): one trajectory's executed token sequence is the root
  (the *spine*) and every turn's label hangs off the end of its context. When the label equals the
  executed continuation (a teacher-executed turn), the loss sits on spine tokens; otherwise the label
  becomes a *branch* appended after the spine whose position ids continue from ``context_len`` and
  which attends only to ``root[:context_len]`` and to itself (causally). Each shared prefix is thus
  encoded once: O(T) tokens for a T-turn trajectory instead of O(T^2).

Every label token t is predicted by the hidden state at flat index ``label_src_L[t]`` (the token just
before it along its own path), so a hidden state can serve several labels (a spine position that is
both the end of a context and the start of the executed action) without any [T x V] target tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


class PackingError(ValueError):
    """A transition cannot be packed as requested (empty label, context out of range, ...)."""


@dataclass(frozen=True)
class Label:
    """Predict ``token_ids`` given ``root[:context_len]``, weighted per token by ``weight``."""

    context_len: int
    token_ids: tuple[int, ...]
    weight: float | tuple[float, ...] = 1.0
    meta: dict = field(default_factory=dict, compare=False, hash=False)  # e.g. turn index, trajectory id

    def weights(self) -> tuple[float, ...]:
        if isinstance(self.weight, (int, float)):
            return (float(self.weight),) * len(self.token_ids)
        if len(self.weight) != len(self.token_ids):
            raise PackingError(
                f"label has {len(self.token_ids)} tokens but {len(self.weight)} per-token weights"
            )
        return tuple(float(w) for w in self.weight)


@dataclass
class PackSequence:
    """One document: a root token sequence and the labels hanging off its prefixes."""

    root: list[int]
    labels: list[Label] = field(default_factory=list)


@dataclass
class PackedBatch:
    """A flat packed batch ready for :func:`unipost.kernels.packed_logprobs`.

    Attention rule (also the FlexAttention ``mask_mod``): query q may attend key k iff
    ``(span_T[q] == span_T[k] and k <= q) or (is_spine_T[k] and doc_T[k] == doc_T[q] and
    position_ids_T[k] < attach_T[q])``. Spine tokens have ``attach_T == 0``; a branch's tokens have
    ``attach_T == context_len`` of their label.
    """

    input_ids_T: torch.Tensor  # int64
    position_ids_T: torch.Tensor  # int64, restarts per document, continues from the branch point
    doc_T: torch.Tensor  # int64 document (root) index
    span_T: torch.Tensor  # int64 globally unique span id (spine or branch)
    is_spine_T: torch.Tensor  # bool
    attach_T: torch.Tensor  # int64 visible spine prefix length for branch tokens, 0 on spines
    label_src_L: torch.Tensor  # int64 flat index whose hidden state predicts the label token
    label_target_L: torch.Tensor  # int64 label token id
    label_weight_L: torch.Tensor  # float32 per-token weight carried by the label
    label_seq_L: torch.Tensor  # int64 which label (transition) the token belongs to
    seq_doc_S: torch.Tensor  # int64 document of each label
    seq_meta: list[dict] = field(default_factory=list)  # Label.meta of each label, in order
    num_branches: int = 0

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids_T.numel())

    @property
    def num_label_tokens(self) -> int:
        return int(self.label_target_L.numel())

    @property
    def num_labels(self) -> int:
        return int(self.seq_doc_S.numel())

    @property
    def num_docs(self) -> int:
        return int(self.doc_T.max().item()) + 1 if self.num_tokens else 0

    @property
    def has_branches(self) -> bool:
        return self.num_branches > 0

    def cu_seqlens(self) -> torch.Tensor:
        """Cumulative document lengths (flash-attn varlen); only meaningful without branches."""
        counts = torch.bincount(self.doc_T, minlength=self.num_docs)
        return torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0)).to(torch.int32)

    def dense_mask(self) -> torch.Tensor:
        """Boolean [T, T] attention mask (True = may attend). O(T^2) memory: the CPU/SDPA path."""
        q = torch.arange(self.num_tokens)
        same_span_causal = (self.span_T[:, None] == self.span_T[None, :]) & (q[None, :] <= q[:, None])
        spine_prefix = (
            self.is_spine_T[None, :]
            & (self.doc_T[None, :] == self.doc_T[:, None])
            & (self.position_ids_T[None, :] < self.attach_T[:, None])
        )
        return same_span_causal | spine_prefix

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {
            name: getattr(self, name).to(device)
            for name in self.__dataclass_fields__
            if isinstance(getattr(self, name), torch.Tensor)
        }
        return PackedBatch(**moved, seq_meta=self.seq_meta, num_branches=self.num_branches)


def _check_ids(ids: Sequence[int], what: str, vocab_size: int | None) -> None:
    for tok in ids:
        if not isinstance(tok, int) or tok < 0 or (vocab_size is not None and tok >= vocab_size):
            raise PackingError(f"{what} contains token id {tok!r} outside [0, {vocab_size})")


def pack(sequences: Sequence[PackSequence], *, vocab_size: int | None = None) -> PackedBatch:
    """Pack documents and their labels into one flat :class:`PackedBatch`.

    A label whose tokens equal the root's continuation at ``context_len`` is scored on the spine;
    any other label becomes a branch. Raises :class:`PackingError` for empty input, empty labels,
    labels without context (nothing can predict their first token) or ids outside the vocabulary.
    """
    if not sequences:
        raise PackingError("pack() got no sequences: an empty batch cannot be packed")
    input_ids: list[int] = []
    positions: list[int] = []
    docs: list[int] = []
    spans: list[int] = []
    is_spine: list[bool] = []
    attach: list[int] = []
    src: list[int] = []
    targets: list[int] = []
    weights: list[float] = []
    label_seq: list[int] = []
    seq_doc: list[int] = []
    seq_meta: list[dict] = []
    span_counter = 0
    num_branches = 0

    for doc, seq in enumerate(sequences):
        root = list(seq.root)
        if not root:
            raise PackingError(f"document {doc} has an empty root sequence")
        _check_ids(root, f"document {doc}", vocab_size)
        base = len(input_ids)
        spine_span = span_counter
        span_counter += 1
        input_ids.extend(root)
        positions.extend(range(len(root)))
        docs.extend([doc] * len(root))
        spans.extend([spine_span] * len(root))
        is_spine.extend([True] * len(root))
        attach.extend([0] * len(root))

        for label in seq.labels:
            n = len(label.token_ids)
            c = label.context_len
            if n == 0:
                raise PackingError(f"document {doc}: a label has no tokens")
            if not 1 <= c <= len(root):
                raise PackingError(
                    f"document {doc}: label context_len={c} must be in [1, {len(root)}] "
                    "(the first label token needs at least one context token to predict it)"
                )
            _check_ids(label.token_ids, f"label of document {doc}", vocab_size)
            label_weights = label.weights()
            s = len(seq_doc)
            seq_doc.append(doc)
            seq_meta.append(label.meta)
            on_spine = tuple(root[c : c + n]) == tuple(label.token_ids)
            if on_spine:
                token_src = [base + c - 1 + j for j in range(n)]
            else:
                # branch: label tokens y_0..y_{n-2} become inputs; y_{n-1} is only ever a target
                branch_span = span_counter
                span_counter += 1
                num_branches += 1
                branch_base = len(input_ids)
                branch_inputs = label.token_ids[: n - 1]
                input_ids.extend(branch_inputs)
                positions.extend(range(c, c + len(branch_inputs)))
                docs.extend([doc] * len(branch_inputs))
                spans.extend([branch_span] * len(branch_inputs))
                is_spine.extend([False] * len(branch_inputs))
                attach.extend([c] * len(branch_inputs))
                token_src = [base + c - 1] + [branch_base + j for j in range(n - 1)]
            src.extend(token_src)
            targets.extend(label.token_ids)
            weights.extend(label_weights)
            label_seq.extend([s] * n)

    def long(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long)

    return PackedBatch(
        input_ids_T=long(input_ids),
        position_ids_T=long(positions),
        doc_T=long(docs),
        span_T=long(spans),
        is_spine_T=torch.tensor(is_spine, dtype=torch.bool),
        attach_T=long(attach),
        label_src_L=long(src),
        label_target_L=long(targets),
        label_weight_L=torch.tensor(weights, dtype=torch.float32),
        label_seq_L=long(label_seq),
        seq_doc_S=long(seq_doc),
        seq_meta=seq_meta,
        num_branches=num_branches,
    )


def split_sequences(sequences: Sequence[PackSequence], max_tokens: int) -> list[list[PackSequence]]:
    """Greedy first-fit grouping of documents into micro-batches of at most ``max_tokens`` packed tokens.

    A document larger than ``max_tokens`` gets a micro-batch of its own (it cannot be split without
    changing what its labels condition on).
    """
    if max_tokens <= 0:
        raise PackingError(f"max_tokens must be positive, got {max_tokens}")
    groups: list[list[PackSequence]] = []
    sizes: list[int] = []
    for seq in sequences:
        size = packed_size(seq)
        for i, used in enumerate(sizes):
            if used + size <= max_tokens:
                groups[i].append(seq)
                sizes[i] += size
                break
        else:
            groups.append([seq])
            sizes.append(size)
    return groups


def packed_size(seq: PackSequence) -> int:
    """Number of flat tokens a document occupies once packed (root + branch inputs)."""
    size = len(seq.root)
    for label in seq.labels:
        n = len(label.token_ids)
        c = label.context_len
        if tuple(seq.root[c : c + n]) != tuple(label.token_ids):
            size += n - 1
    return size


def per_transition(sequences: Sequence[PackSequence]) -> list[PackSequence]:
    """Re-express every label as its own document ``context + label`` (the unpacked baseline)."""
    out = []
    for seq in sequences:
        for label in seq.labels:
            root = list(seq.root[: label.context_len]) + list(label.token_ids)
            out.append(
                PackSequence(
                    root=root, labels=[Label(label.context_len, label.token_ids, label.weight, label.meta)]
                )
            )
    return out

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
* shared-prefix packing (:func:`pack_shared`): the token paths of *all* documents of a micro-batch
  (roots and label branches) are merged into one trie, so a prefix common to several documents (a
  GRPO group's prompt, the system prompt and tool schemas every trajectory of an iteration starts
  with) is encoded once and the documents become branches of one tree. The trie is laid out as
  *spans* (a span follows a path down the trie; every other child starts a new span that attaches
  to its parent span at its first position), nested to any depth: a span attends to the visible
  prefix of each ancestor span and to itself, causally. The same log-probs, loss and gradients as
  :func:`pack` (which is the two-level special case: spine and branches).

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
    ``(span_T[q] == span_T[k] and k <= q) or position_ids_T[k] < limit[span_T[q], span_T[k]]``, where
    ``limit[s, a]`` (:meth:`visible_limits`) is, for a strict ancestor span ``a`` of span ``s``, the
    first position of the child of ``a`` on the path to ``s`` (that child sees ``a``'s tokens before
    it), and 0 otherwise. Spans form a forest through ``span_parent_P`` (-1 for a root span). With
    :func:`pack` the forest has two levels and the rule reads ``(same span and k <= q) or
    (is_spine_T[k] and doc_T[k] == doc_T[q] and position_ids_T[k] < attach_T[q])``. Root (spine)
    tokens have ``attach_T == 0``; a branch's tokens have ``attach_T`` = the span's first position
    (``context_len`` of their label under :func:`pack`).
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
    span_parent_P: torch.Tensor | None = None  # int64 parent span of each span, -1 for roots (None: 2 levels)

    @property
    def num_spans(self) -> int:
        """Span ids in use (a one-token branch under :func:`pack` takes an id but holds no token)."""
        if self.span_parent_P is not None:
            return int(self.span_parent_P.numel())
        return int(self.span_T.max().item()) + 1 if self.num_tokens else 0

    def span_parents(self) -> torch.Tensor:
        """int64 [P]: each span's parent span (-1 for a root); derived from doc/spine under :func:`pack`."""
        if self.span_parent_P is not None:
            return self.span_parent_P.cpu()
        parent = torch.full((self.num_spans,), -1, dtype=torch.long)
        tokens = list(zip(self.span_T.tolist(), self.doc_T.tolist(), self.is_spine_T.tolist(), strict=True))
        spine_of_doc = {d: s for s, d, spine in tokens if spine}
        for s, d, spine in tokens:
            if not spine:
                parent[s] = spine_of_doc[d]
        return parent

    def span_attach(self) -> torch.Tensor:
        """int64 [P]: each span's first position (0 for a root span)."""
        out = torch.zeros(self.num_spans, dtype=torch.long)
        out.scatter_reduce_(0, self.span_T.cpu(), self.position_ids_T.cpu(), "amin", include_self=False)
        return out

    def visible_limits(self) -> torch.Tensor:
        """int64 [P, P]: ``limit[s, a]`` of the attention rule (positions of ``a`` below it are visible)."""
        parent = self.span_parents().tolist()
        attach = self.span_attach().tolist()
        limit = torch.zeros(len(parent), len(parent), dtype=torch.long)
        for s in range(len(parent)):
            child, a = s, parent[s]
            while a >= 0:
                limit[s, a] = attach[child]
                child, a = a, parent[a]
        return limit

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
        """Boolean [T, T] attention mask (True = may attend). O(T^2) memory: the reference path.

        Built span by span (a span's rows are contiguous), so no [T, T] integer temporary exists.
        """
        span = self.span_T.cpu()
        pos = self.position_ids_T.cpu()
        limit = self.visible_limits()
        mask = torch.zeros(self.num_tokens, self.num_tokens, dtype=torch.bool)
        spans, counts = torch.unique_consecutive(span, return_counts=True)
        start = 0
        for s, n in zip(spans.tolist(), counts.tolist(), strict=True):
            end = start + n
            mask[start:end] |= pos < limit[s][span]  # ancestors' visible prefixes
            rows = torch.arange(start, end)
            own = (span == s)[None, :] & (torch.arange(self.num_tokens)[None, :] <= rows[:, None])
            mask[start:end] |= own
            start = end
        return mask.to(self.input_ids_T.device)

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
    span_parent: list[int] = []

    for doc, seq in enumerate(sequences):
        root = list(seq.root)
        if not root:
            raise PackingError(f"document {doc} has an empty root sequence")
        _check_ids(root, f"document {doc}", vocab_size)
        base = len(input_ids)
        spine_span = span_counter
        span_counter += 1
        span_parent.append(-1)
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
                span_parent.append(spine_span)
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

    return _batch_from_lists(
        input_ids=input_ids,
        positions=positions,
        docs=docs,
        spans=spans,
        is_spine=is_spine,
        attach=attach,
        src=src,
        targets=targets,
        weights=weights,
        label_seq=label_seq,
        seq_doc=seq_doc,
        seq_meta=seq_meta,
        num_branches=num_branches,
        span_parent=span_parent,
    )


def split_sequences(
    sequences: Sequence[PackSequence], max_tokens: int, *, share_prefixes: bool = False
) -> list[list[PackSequence]]:
    """Greedy first-fit grouping of documents into micro-batches of at most ``max_tokens`` packed tokens.

    A document larger than ``max_tokens`` gets a micro-batch of its own (it cannot be split without
    changing what its labels condition on). ``share_prefixes=True`` counts tokens as
    :func:`pack_shared` encodes them (a prefix shared with documents already in a micro-batch is free).
    """
    bins = first_fit([[seq] for seq in sequences], max_tokens, share_prefixes)
    return [[sequences[i] for i in group] for group in bins]


def first_fit(
    units: Sequence[Sequence[PackSequence]], max_tokens: int, share_prefixes: bool = False
) -> list[list[int]]:
    """First-fit of units (lists of documents never split, e.g. a GRPO group) into micro-batches.

    Returns the unit indices of each micro-batch. A micro-batch holds at most ``max_tokens`` packed
    tokens (counted as :func:`pack_shared` lays them out when ``share_prefixes``, else as :func:`pack`),
    except a unit larger than that alone, which gets a micro-batch of its own.
    """
    if max_tokens <= 0:
        raise PackingError(f"max_tokens must be positive, got {max_tokens}")
    bins: list[list[int]] = []
    used: list[int] = []
    tries: list[PrefixTrie] = []
    for index, unit in enumerate(units):
        if not share_prefixes:
            size = sum(packed_size(seq) for seq in unit)
        for i in range(len(bins)):
            if share_prefixes:
                size = tries[i].new_tokens(unit)
            if used[i] + size <= max_tokens:
                bins[i].append(index)
                used[i] += size
                if share_prefixes:
                    for seq in unit:
                        tries[i].add(seq)
                break
        else:
            bins.append([index])
            if share_prefixes:
                tries.append(PrefixTrie())
                for seq in unit:
                    tries[-1].add(seq)
                size = len(tries[-1])
            used.append(size)
    return bins


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


def _check_document(doc: int, seq: PackSequence, vocab_size: int | None) -> None:
    """The input checks :func:`pack` makes, for :func:`pack_shared` (same messages)."""
    if not seq.root:
        raise PackingError(f"document {doc} has an empty root sequence")
    _check_ids(seq.root, f"document {doc}", vocab_size)
    for label in seq.labels:
        if not label.token_ids:
            raise PackingError(f"document {doc}: a label has no tokens")
        if not 1 <= label.context_len <= len(seq.root):
            raise PackingError(
                f"document {doc}: label context_len={label.context_len} must be in [1, {len(seq.root)}] "
                "(the first label token needs at least one context token to predict it)"
            )
        _check_ids(label.token_ids, f"label of document {doc}", vocab_size)
        label.weights()  # raises on a per-token weight count mismatch


class PrefixTrie:
    """The token paths of documents merged on their common prefixes: one node per distinct prefix.

    A document contributes its root and, per label, the label's input tokens ``y[:-1]`` hung off the
    root's node at ``context_len - 1``; a label's tokens are then predicted by the nodes of
    ``root[:context_len] + y[:-1]`` (its last context node, then its own inputs). Node ``i`` holds one
    token at position ``depth[i]``; ``len(trie)`` is the number of tokens a pack of it encodes.
    """

    def __init__(self) -> None:
        self.token: list[int] = []
        self.parent: list[int] = []
        self.depth: list[int] = []
        self.children: list[dict[int, int]] = []
        self.roots: dict[int, int] = {}  # first token -> node, in insertion order

    def __len__(self) -> int:
        return len(self.token)

    def _child(self, parent: int, token: int) -> int:
        kids = self.roots if parent < 0 else self.children[parent]
        node = kids.get(token)
        if node is None:
            node = len(self.token)
            kids[token] = node
            self.token.append(token)
            self.parent.append(parent)
            self.depth.append(0 if parent < 0 else self.depth[parent] + 1)
            self.children.append({})
        return node

    def insert(self, tokens: Sequence[int], parent: int = -1) -> list[int]:
        """Insert ``tokens`` below node ``parent`` (-1: a new path from the root); their nodes, in order."""
        nodes = []
        for token in tokens:
            parent = self._child(parent, token)
            nodes.append(parent)
        return nodes

    def add(self, seq: PackSequence) -> list[list[int]]:
        """Insert a document; for each of its labels, the nodes whose hidden states predict its tokens."""
        root_nodes = self.insert(seq.root)
        sources = []
        for label in seq.labels:
            last_context = root_nodes[label.context_len - 1]
            sources.append([last_context, *self.insert(label.token_ids[:-1], last_context)])
        return sources

    def new_tokens(self, sequences: Sequence[PackSequence]) -> int:
        """How many tokens adding ``sequences`` would add (nothing is inserted)."""
        overlay: dict[tuple[int, int], int] = {}
        added = 0

        def child(parent: int, token: int) -> int:
            nonlocal added
            if parent >= -1:  # a node of the trie (or the root): look among its children first
                node = (self.roots if parent == -1 else self.children[parent]).get(token)
                if node is not None:
                    return node
            key = (parent, token)
            node = overlay.get(key)
            if node is None:
                added += 1
                node = overlay[key] = -2 - len(overlay)  # ids <= -2: not in the trie yet
            return node

        for seq in sequences:
            parent, root_nodes = -1, []
            for token in seq.root:
                parent = child(parent, token)
                root_nodes.append(parent)
            for label in seq.labels:
                parent = root_nodes[label.context_len - 1]
                for token in label.token_ids[:-1]:
                    parent = child(parent, token)
        return added


def shared_size(sequences: Sequence[PackSequence]) -> int:
    """Number of flat tokens :func:`pack_shared` encodes for ``sequences``."""
    return PrefixTrie().new_tokens(sequences)


def pack_shared(sequences: Sequence[PackSequence], *, vocab_size: int | None = None) -> PackedBatch:
    """Pack documents as one prefix tree: every prefix common to several documents is encoded once.

    The same labels, in the same order, with the same per-token weights and metadata as
    :func:`pack` (so ``label_*_L``, ``seq_doc_S`` and ``seq_meta`` are interchangeable with its
    output), and the same log-probs; only the token layout differs. Spans: each trie node's first
    child continues its span; any other child starts a new span (a branch) whose parent is the span
    holding that node. ``doc_T`` numbers the trees (documents with no common first token stay apart);
    ``seq_doc_S`` keeps the input document of each label.
    """
    if not sequences:
        raise PackingError("pack_shared() got no sequences: an empty batch cannot be packed")
    trie = PrefixTrie()
    sources: list[list[int]] = []
    for doc, seq in enumerate(sequences):
        _check_document(doc, seq, vocab_size)
        sources.extend(trie.add(seq))

    flat_of_node = [0] * len(trie)
    input_ids: list[int] = []
    positions: list[int] = []
    trees: list[int] = []
    spans: list[int] = []
    is_spine: list[bool] = []
    attach: list[int] = []
    span_parent: list[int] = []
    # depth-first over spans: (first node, parent span, tree); a span's children start after it
    stack = [(node, -1, tree) for tree, node in reversed(list(enumerate(trie.roots.values())))]
    while stack:
        node, parent_span, tree = stack.pop()
        span = len(span_parent)
        span_parent.append(parent_span)
        first_position = trie.depth[node]
        chain = []
        while True:
            chain.append(node)
            kids = trie.children[node]
            if not kids:
                break
            node = next(iter(kids.values()))
        for node in chain:
            flat_of_node[node] = len(input_ids)
            input_ids.append(trie.token[node])
            positions.append(trie.depth[node])
        n = len(chain)
        trees.extend([tree] * n)
        spans.extend([span] * n)
        is_spine.extend([parent_span < 0] * n)
        attach.extend([first_position] * n)
        others = [kid for node in chain for kid in list(trie.children[node].values())[1:]]
        stack.extend((kid, span, tree) for kid in reversed(others))

    src: list[int] = []
    targets: list[int] = []
    weights: list[float] = []
    label_seq: list[int] = []
    seq_doc: list[int] = []
    seq_meta: list[dict] = []
    labels = ((doc, label) for doc, seq in enumerate(sequences) for label in seq.labels)
    for s, ((doc, label), nodes) in enumerate(zip(labels, sources, strict=True)):
        seq_doc.append(doc)
        seq_meta.append(label.meta)
        src.extend(flat_of_node[node] for node in nodes)
        targets.extend(label.token_ids)
        weights.extend(label.weights())
        label_seq.extend([s] * len(label.token_ids))

    return _batch_from_lists(
        input_ids=input_ids,
        positions=positions,
        docs=trees,
        spans=spans,
        is_spine=is_spine,
        attach=attach,
        src=src,
        targets=targets,
        weights=weights,
        label_seq=label_seq,
        seq_doc=seq_doc,
        seq_meta=seq_meta,
        num_branches=len(span_parent) - len(trie.roots),
        span_parent=span_parent,
    )


def _batch_from_lists(
    *,
    input_ids,
    positions,
    docs,
    spans,
    is_spine,
    attach,
    src,
    targets,
    weights,
    label_seq,
    seq_doc,
    seq_meta,
    num_branches,
    span_parent,
) -> PackedBatch:
    """A PackedBatch from the per-token / per-label Python lists both packers build (keyword-only: fourteen
    lists of ints side by side would be easy to pass in the wrong order)."""

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
        span_parent_P=long(span_parent),
    )

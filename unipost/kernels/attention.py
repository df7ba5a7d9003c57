"""Attention backends for packed batches: which mask to hand an unmodified transformers model.

* ``sdpa`` / ``eager`` (CPU training path and reference): a dense additive [1, 1, T, T] mask built
  from the packing rule (faster than the boolean form on CPU, see :func:`additive_mask`). Always
  explicit: SDPA with position ids alone cross-contaminates packed documents (MACHINE-NOTES: the
  second sequence's logits were off by 0.62).
* ``flash_attention_2`` / ``_3`` (GPU): varlen attention, which transformers derives from position
  ids that restart at 0 per document. It cannot express branches, so a tree pack is refused with a
  message pointing at FlexAttention.
* ``flex_attention`` (GPU; forward-only on CPU in torch 2.13): a BlockMask from the same rule as a
  ``mask_mod``, so tree packs stay sparse.

* ``unipost_packed_sdpa`` (:data:`PACKED_SDPA`, the CPU training path): the pack is cut into the
  attention calls it really needs, so no pair of tokens that cannot see each other is ever computed.
  Each document's spine is one ``is_causal=True`` SDPA call (the fused causal kernel, fwd and bwd);
  each branch is one small SDPA call whose queries are the branch tokens and whose keys are the prefix
  it hangs off (its ancestors' visible tokens: ``root[:attach]`` under ``pack``, one segment per
  ancestor span of a cross-trajectory tree under ``pack_shared``) followed by the branch itself,
  causally. A branch longer than its prefix (a trajectory hung off a shared prompt) runs instead as one
  ``is_causal`` call over prefix + branch whose prefix rows are dropped
  (:attr:`AttentionPiece.causal_over_prefix`): the fused causal kernel skips the branch's upper
  triangle, which a masked call computes. Registered with
  transformers' ``AttentionInterface`` (and ``AttentionMaskInterface``, as SDPA's mask), so a model
  switched to it runs every other call (``generate``, a plain forward with a padding mask) exactly as
  ``sdpa`` does; only a pack's marker mask (:func:`packed_layout_mask`) takes the split path.

Automatic selection (``hidden_states(..., attention="auto")``, the default): :func:`select_attention`
picks the implementation per batch and :func:`set_attention` switches the loaded model to it at run time
through transformers' ``PreTrainedModel.set_attn_implementation`` (no reload; the weights are shared by
all implementations). On CUDA: flash-attn varlen for branch-free packs when ``flash_attn`` imports,
FlexAttention for tree packs (and for branch-free packs without flash-attn). On CPU a model loaded with
``sdpa`` (the default) is switched to ``unipost_packed_sdpa``; ``eager`` and ``flex_attention`` are kept
(the dense-mask reference paths). ``attention="model"`` keeps whatever is loaded: a model loaded with
``sdpa`` then runs the dense additive [T, T] mask (the CPU path before this one, kept for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from unipost.kernels.packing import PackedBatch

PACKED_SDPA = "unipost_packed_sdpa"
FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
CPU_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention", PACKED_SDPA)
ATTENTION_MODES = ("auto", "model")


class AttentionBackendError(ValueError):
    pass


def attention_implementation(model: torch.nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def select_attention(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    device: torch.device | str | None = None,
    flash_available: bool | None = None,
) -> str:
    """The attention implementation ``attention="auto"`` runs this batch with (pure: changes nothing).

    Args:
        model: the causal LM (its current ``config._attn_implementation`` and device are read).
        batch: the pack; only ``has_branches`` matters.
        device: where the forward runs; default: the model's parameters' device.
        flash_available: whether ``flash_attn`` imports; default: checked without importing it.

    CUDA: a tree pack needs a mask flash-attn cannot express, so FlexAttention; a branch-free pack
    keeps a flash implementation already loaded, else takes ``flash_attention_2`` when flash-attn is
    installed, else FlexAttention (sparse, unlike SDPA's dense [T, T] mask). CPU: ``eager`` and
    ``flex_attention`` are kept (reference paths); anything else (``sdpa``, the default, or a GPU-only
    implementation) becomes :data:`PACKED_SDPA`, per-document / per-branch SDPA calls.
    """
    current = attention_implementation(model)
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type != "cuda":
        return current if current in ("eager", "flex_attention") else PACKED_SDPA
    if batch.has_branches:
        return "flex_attention"
    if current in FLASH_IMPLEMENTATIONS:
        return current
    if flash_available is None:
        from unipost._optional import available

        flash_available = available("flash_attn")
    return "flash_attention_2" if flash_available else "flex_attention"


def set_attention(model: torch.nn.Module, implementation: str) -> None:
    """Switch a loaded transformers model (PEFT-wrapped or not) to ``implementation`` in place.

    Uses ``PreTrainedModel.set_attn_implementation`` (transformers 5.x), which validates the choice
    (e.g. raises if flash-attn is not installed) and updates every sub-model's config. A no-op when the
    model already uses it. :data:`PACKED_SDPA` is registered with transformers first.
    """
    if implementation == PACKED_SDPA:
        register_packed_sdpa()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if attention_implementation(base) == implementation:
        return
    setter = getattr(base, "set_attn_implementation", None)
    if setter is None:
        raise AttentionBackendError(
            f"{type(base).__name__} cannot switch attention at run time (no set_attn_implementation; "
            f"transformers >= 5 has it); load it with attn_implementation={implementation!r} or pass "
            "attention='model'"
        )
    try:
        setter(implementation)
    except ImportError as exc:  # e.g. flash_attention_2 without the flash-attn package
        raise AttentionBackendError(
            f"cannot switch to attention {implementation!r}: {exc} Install it (flash-attn: pip install "
            "flash-attn --no-build-isolation), or pass attention='model' to keep the loaded implementation"
        ) from exc
    if attention_implementation(base) != implementation:
        raise AttentionBackendError(
            f"{type(base).__name__} did not switch to attention {implementation!r} (it does not support "
            f"switching at run time); load it with attn_implementation={implementation!r} or pass "
            "attention='model'"
        )


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def flex_block_mask(batch: PackedBatch, device: torch.device | str | None = None):
    """A FlexAttention BlockMask encoding the packed tree/document rule."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = device or batch.input_ids_T.device
    span, pos = batch.span_T.to(device), batch.position_ids_T.to(device)
    limit = batch.visible_limits().to(device)  # [spans, spans]: see PackedBatch's attention rule

    def mask_mod(b, h, q, k):
        same_span = (span[q] == span[k]) & (k <= q)
        ancestor_prefix = pos[k] < limit[span[q], span[k]]
        return same_span | ancestor_prefix

    t = batch.num_tokens
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=t, KV_LEN=t, device=device)


def attention_kwargs(model: torch.nn.Module, batch: PackedBatch) -> dict[str, Any]:
    """Keyword arguments for ``backbone(input_ids, position_ids=..., **kwargs)`` for this model."""
    impl = attention_implementation(model)
    if impl in FLASH_IMPLEMENTATIONS:
        if batch.has_branches:
            raise AttentionBackendError(
                f"{impl} cannot express the tree mask of a pack with {batch.num_branches} branches; "
                "load the model with attn_implementation='flex_attention' (GPU) or 'sdpa', or pack "
                "without branches (per-transition / varlen)"
            )
        return {}  # documents are delimited by position ids restarting at 0
    if impl == "flex_attention":
        return {"attention_mask": flex_block_mask(batch)}
    if impl == PACKED_SDPA:
        return {"attention_mask": packed_layout_mask(PackedLayout.from_batch(batch))}
    if impl not in ("sdpa", "eager"):
        raise AttentionBackendError(
            f"attention implementation {impl!r} is not supported for packed batches; use 'sdpa', "
            f"{PACKED_SDPA!r}, 'eager', 'flex_attention' or flash-attention"
        )
    return {"attention_mask": additive_mask(batch, _model_dtype(model))}


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def additive_mask(batch: PackedBatch, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense rule as an additive [1, 1, T, T] mask (0 = attend, dtype min = blocked).

    Measured on CPU (torch 2.13, tiny Qwen3, T=2048): fwd+bwd takes 1.24 s with this mask and
    2.68 s with the equivalent boolean mask, so the CPU path hands SDPA the additive form. Every
    row attends at least to itself, so no row is fully blocked.
    """
    allowed = batch.dense_mask().to(batch.input_ids_T.device)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


@dataclass(frozen=True)
class AttentionPiece:
    """One attention call of a pack: queries ``[start, end)``; keys = ``prefix`` then the piece, causally.

    A root span has no prefix: one ``is_causal=True`` call. A branch's prefix is the tokens of its
    ancestor spans it sees, as flat ``(start, length)`` segments, root first (one segment under
    :func:`~unipost.kernels.packing.pack`: the spine up to the branch's attach point; one per ancestor
    under :func:`~unipost.kernels.packing.pack_shared`).
    """

    start: int
    end: int
    prefix: tuple[tuple[int, int], ...] = ()

    @property
    def prefix_len(self) -> int:
        return sum(length for _, length in self.prefix)

    @property
    def causal_over_prefix(self) -> bool:
        """Run the piece as one ``is_causal`` call over prefix + piece, dropping the prefix's rows.

        A masked call computes every (query, key) pair of the piece: n * (P + n); the causal call
        recomputes the prefix's own triangle but skips the piece's upper one: (P + n)^2 / 2. The causal
        kernel wins when the prefix is shorter than the piece (a trajectory hung off a shared prompt);
        a short branch off a long context keeps the mask.
        """
        return 0 < self.prefix_len < self.end - self.start


@dataclass
class PackedLayout:
    """A pack as the list of attention calls that cover it, in flat order (pieces tile ``[0, T)``)."""

    pieces: tuple[AttentionPiece, ...]
    num_tokens: int
    _masks: dict = field(default_factory=dict, repr=False)  # (piece index, dtype, device) -> branch mask

    @classmethod
    def from_batch(cls, batch: PackedBatch) -> PackedLayout:
        """Cut the pack at span boundaries; each span sees its ancestors' visible prefixes."""
        spans, counts = torch.unique_consecutive(batch.span_T.cpu(), return_counts=True)
        if spans.numel() != torch.unique(spans).numel():
            raise AttentionBackendError("a span of the pack is not contiguous; cannot split its attention")
        parent = batch.span_parents().tolist()
        attach = batch.span_attach().tolist()
        span_start: dict[int, int] = {}
        start = 0
        bounds = []
        for span, n in zip(spans.tolist(), counts.tolist(), strict=True):
            span_start[span] = start
            bounds.append((span, start, start + n))
            start += n
        pieces = []
        for span, begin, end in bounds:
            segments = []
            child, ancestor = span, parent[span]
            while ancestor >= 0:
                if ancestor not in span_start:
                    raise AttentionBackendError(f"span {span} hangs off span {ancestor}, not in the pack")
                length = attach[child] - attach[ancestor]
                if length > 0:
                    segments.append((span_start[ancestor], length))
                child, ancestor = ancestor, parent[ancestor]
            pieces.append(AttentionPiece(begin, end, tuple(reversed(segments))))
        return cls(tuple(pieces), batch.num_tokens)

    def branch_mask(self, index: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Additive [n, prefix + n] mask of piece ``index``: the whole prefix, then the branch causally.

        Built once per pack and reused by every layer (the layout lives for one forward + backward).
        """
        key = (index, dtype, device)
        mask = self._masks.get(key)
        if mask is None:
            piece = self.pieces[index]
            n = piece.end - piece.start
            mask = torch.zeros(n, piece.prefix_len + n, dtype=dtype, device=device)
            blocked = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
            mask[:, piece.prefix_len :].masked_fill_(blocked, torch.finfo(dtype).min)
            self._masks[key] = mask
        return mask


def packed_layout_mask(layout: PackedLayout) -> torch.Tensor:
    """The ``attention_mask`` that carries ``layout`` through an unmodified transformers model.

    transformers hands a 4-D mask to the attention function untouched (it treats it as already
    prepared), so an empty [1, 1, 0, 0] tensor tagged with the layout travels from the model's
    forward to :func:`packed_sdpa_attention` in every layer. Any other attention implementation
    fails loudly on it (a shape error), never silently.
    """
    marker = torch.empty((1, 1, 0, 0), dtype=torch.bool)
    marker.unipost_layout = layout
    return marker


def packed_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function for :data:`PACKED_SDPA` (same signature as ``sdpa``).

    With a pack's marker mask: one SDPA call per :class:`AttentionPiece` (is_causal for spines, a
    small additive mask for branches), outputs concatenated in flat order. Otherwise (generation,
    ordinary batches): transformers' own ``sdpa_attention_forward``, unchanged.
    """
    layout = getattr(attention_mask, "unipost_layout", None)
    if layout is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("sliding_window") is not None:
        raise AttentionBackendError(
            f"{PACKED_SDPA} does not implement sliding-window layers; load the model with "
            "attn_implementation='eager' or 'sdpa' and pass attention='model'"
        )
    batch, _, length, _ = query.shape
    if batch != 1 or length != layout.num_tokens:
        raise AttentionBackendError(
            f"{PACKED_SDPA} expects one packed row of {layout.num_tokens} tokens, got query "
            f"{tuple(query.shape)}"
        )
    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # expand + reshape measured faster than enable_gqa on CPU (fwd+bwd, T=2048)
        key = _repeat_kv(key, groups)
        value = _repeat_kv(value, groups)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    # split, whose backward is one cat, rather than per-piece slicing, whose backward zero-fills a
    # full-length gradient per piece and tensor
    sizes = [piece.end - piece.start for piece in layout.pieces]
    pieces = zip(
        layout.pieces, query.split(sizes, 2), key.split(sizes, 2), value.split(sizes, 2), strict=True
    )
    outputs = []
    for index, (piece, q, k, v) in enumerate(pieces):
        if not piece.prefix:
            out = sdpa(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
        else:
            k = torch.cat([key[:, :, a : a + n] for a, n in piece.prefix] + [k], dim=2)
            v = torch.cat([value[:, :, a : a + n] for a, n in piece.prefix] + [v], dim=2)
            if piece.causal_over_prefix:
                q = torch.cat([query[:, :, a : a + n] for a, n in piece.prefix] + [q], dim=2)
                out = sdpa(q, k, v, dropout_p=dropout, scale=scaling, is_causal=True)
                out = out[:, :, piece.prefix_len :]
            else:
                mask = layout.branch_mask(index, query.dtype, query.device)
                out = sdpa(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling)
        outputs.append(out)
    out = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
    return out.transpose(1, 2).contiguous(), None


def _repeat_kv(states: torch.Tensor, groups: int) -> torch.Tensor:
    batch, heads, length, dim = states.shape
    expanded = states[:, :, None].expand(batch, heads, groups, length, dim)
    return expanded.reshape(batch, heads * groups, length, dim)


def register_packed_sdpa() -> None:
    """Register :data:`PACKED_SDPA` with transformers (idempotent); masks for non-pack calls are SDPA's."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, sdpa_mask)

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

Automatic selection (``hidden_states(..., attention="auto")``, the default): :func:`select_attention`
picks the implementation per batch and :func:`set_attention` switches the loaded model to it at run time
through transformers' ``PreTrainedModel.set_attn_implementation`` (no reload; the weights are shared by
all implementations). On CUDA: flash-attn varlen for branch-free packs when ``flash_attn`` imports,
FlexAttention for tree packs (and for branch-free packs without flash-attn). On CPU nothing is switched:
the model keeps what it was loaded with (SDPA by default; eager works; FlexAttention forward only).
"""

from __future__ import annotations

from typing import Any

import torch

from unipost.kernels.packing import PackedBatch

FLASH_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3")
CPU_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
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
    installed, else FlexAttention (sparse, unlike SDPA's dense [T, T] mask). CPU: the model's own
    implementation if it can run here (sdpa, eager, flex_attention), else ``sdpa``.
    """
    current = attention_implementation(model)
    device = torch.device(device) if device is not None else _model_device(model)
    if device.type != "cuda":
        return current if current in CPU_IMPLEMENTATIONS else "sdpa"
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
    model already uses it.
    """
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
    span, is_spine, doc = batch.span_T.to(device), batch.is_spine_T.to(device), batch.doc_T.to(device)
    pos, attach = batch.position_ids_T.to(device), batch.attach_T.to(device)

    def mask_mod(b, h, q, k):
        same_span = (span[q] == span[k]) & (k <= q)
        spine_prefix = is_spine[k] & (doc[k] == doc[q]) & (pos[k] < attach[q])
        return same_span | spine_prefix

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
    if impl not in ("sdpa", "eager"):
        raise AttentionBackendError(
            f"attention implementation {impl!r} is not supported for packed batches; use 'sdpa', "
            "'eager', 'flex_attention' or flash-attention"
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

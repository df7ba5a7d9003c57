"""Run an unmodified transformers causal LM over a packed batch and return label-token log-probs.

The model's own decoder produces the final hidden states; the LM head is applied only at label
positions, through :func:`token_logprobs`, which never materialises ``[tokens x vocab]`` logits.
Works for the Qwen3 / Llama families (and anything exposing ``get_decoder()`` +
``get_output_embeddings()`` without logit soft-capping), with or without PEFT adapters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from unipost.kernels.attention import ATTENTION_MODES, attention_kwargs, select_attention, set_attention
from unipost.kernels.packing import PackedBatch


@dataclass
class LabelLogprobs:
    logp_L: torch.Tensor  # float32, differentiable (detached when ``loss`` is set)
    entropy_L: torch.Tensor | None = None  # float32, differentiable, when requested (detached likewise)
    loss: torch.Tensor | None = None  # the fused loss, when packed_logprobs got a loss_fn (three GEMMs)


def split_causal_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(decoder backbone, LM head) of a transformers causal LM, unwrapping PEFT if present."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1.0):
            raise NotImplementedError(
                f"{type(base).__name__} post-processes logits ({attr}={getattr(config, attr)}); the fused "
                "head only supports a plain linear LM head"
            )
    try:
        backbone = base.get_decoder()
    except (AttributeError, NotImplementedError):
        backbone = getattr(base, "model", None)
    head = base.get_output_embeddings()
    if backbone is None or head is None:
        raise TypeError(f"{type(base).__name__} does not look like a causal LM (no decoder or LM head)")
    if not isinstance(head, torch.nn.Linear) and not hasattr(head, "weight"):
        raise TypeError(f"unsupported LM head {type(head).__name__}: expected a linear layer")
    return backbone, head


def head_params(head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight/bias of the LM head; a LoRA-wrapped head is refused (its weight alone is not the head)."""
    if hasattr(head, "lora_A") or hasattr(head, "base_layer"):
        raise NotImplementedError(
            "a PEFT adapter on lm_head is not supported by the fused head; leave lm_head out of "
            "target_modules (LoRA on the decoder layers is fine)"
        )
    return head.weight, getattr(head, "bias", None)


def _check_token_ids(model: torch.nn.Module, batch: PackedBatch) -> None:
    """A token id outside the model's embedding table is a tokenizer/model mismatch: say so, instead of
    the embedding's bare ``IndexError`` (or, on CUDA, a device-side assert)."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embeddings, "num_embeddings", None)
    ids = batch.input_ids_T
    if vocab is None or ids.numel() == 0:
        return
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = high if high >= vocab else low
        raise ValueError(
            f"the packed batch holds token id {bad} but the model's embedding has {vocab} ids "
            f"(0..{vocab - 1}); tokenize with the model's own tokenizer, or pack(..., vocab_size=<model "
            "vocabulary>) to catch this when packing"
        )


def hidden_states(model: torch.nn.Module, batch: PackedBatch, *, attention: str = "auto") -> torch.Tensor:
    """Final hidden states [T, H] of the packed tokens (one row, explicit positions and mask).

    ``attention="auto"`` first switches the model to the implementation
    :func:`~unipost.kernels.attention.select_attention` picks for this batch (on CPU it keeps the loaded
    one); ``"model"`` uses the loaded implementation as is.
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    backbone, _ = split_causal_lm(model)
    _check_token_ids(model, batch)
    device = next(model.parameters()).device
    batch = batch.to(device)
    if attention == "auto":
        set_attention(model, select_attention(model, batch, device=device))
    kwargs = attention_kwargs(model, batch)
    out = backbone(
        input_ids=batch.input_ids_T[None],
        position_ids=batch.position_ids_T[None],
        use_cache=False,
        **kwargs,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return hidden[0]


def packed_logprobs(
    model: torch.nn.Module,
    batch: PackedBatch,
    *,
    return_entropy: bool = False,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    impl: str = "fused",
    backend: str = "auto",
    attention: str = "auto",
    loss_fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor] | None = None,
) -> LabelLogprobs:
    """log pi_theta(y_j | x, y_<j) for every label token of ``batch`` (and optionally the entropy).

    ``impl="reference"`` uses the plain-PyTorch head (full logits) for checking. ``backend`` picks the
    fused head's kernel (``"auto"``: Triton on CUDA, torch otherwise; see ``token_logprobs``) and
    ``attention`` the attention implementation (see :func:`hidden_states`).

    ``loss_fn(logp_L, entropy_L) -> scalar`` (a sum of per-token terms) switches the head to the
    three-GEMM fused loss (:func:`~unipost.kernels.fused_loss.fused_token_loss`): the result's ``loss``
    carries the gradient and ``logp_L`` / ``entropy_L`` come back detached.
    """
    _, head = split_causal_lm(model)
    weight, bias = head_params(head)
    hidden_T = hidden_states(model, batch, attention=attention)
    hidden_L = hidden_T.index_select(0, batch.label_src_L.to(hidden_T.device))
    targets_L = batch.label_target_L.to(hidden_T.device)
    if loss_fn is not None:
        if impl != "fused":
            raise ValueError("loss_fn runs the fused three-GEMM head; impl='reference' has none")
        from unipost.kernels.fused_loss import fused_token_loss

        kw = {"chunk_size": chunk_size} if chunk_size is not None else {}
        out = fused_token_loss(
            hidden_L, weight, targets_L, loss_fn, bias=bias, temperature=temperature,
            return_entropy=return_entropy, **kw,
        )  # fmt: skip
        return LabelLogprobs(out.logp, out.entropy, out.loss)
    if impl == "fused":
        from unipost.kernels.logprobs import token_logprobs as fn
    elif impl == "reference":
        from unipost.kernels.reference import token_logprobs_reference as fn
    else:
        raise ValueError(f"unknown impl {impl!r}; use 'fused' or 'reference'")
    kwargs = {"bias": bias, "temperature": temperature, "return_entropy": return_entropy}
    if impl == "fused":
        kwargs["backend"] = backend
        if chunk_size is not None:
            kwargs["chunk_size"] = chunk_size
    out = fn(hidden_L, weight, targets_L, **kwargs)
    if return_entropy:
        logp_L, entropy_L = out
        return LabelLogprobs(logp_L, entropy_L)
    return LabelLogprobs(out)

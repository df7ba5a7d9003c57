"""Use the fused log-likelihood head inside other trainers (HF ``Trainer``, TRL ``SFTTrainer``, your own).

Two entry points:

* :func:`causal_lm_token_logprobs` / :func:`fused_causal_lm_loss`: functional; give them a
  transformers causal LM and the usual ``input_ids`` / ``labels`` (HF conventions: ``labels`` are
  *unshifted*, ``-100`` is ignored) and get per-token log-probs or HF's loss without the
  ``[batch x seq x vocab]`` logits tensor.
* :class:`FusedLossMixin`: put it first in the bases of any ``transformers.Trainer`` subclass
  (``class MyTrainer(FusedLossMixin, SFTTrainer)``) and its ``compute_loss`` becomes the fused one,
  honouring ``num_items_in_batch`` exactly as HF does (so gradient accumulation stays exact) and an
  optional per-token ``loss_weights`` column (the score w_t of Eq. 14) in the batch.
"""

from __future__ import annotations

from typing import Any

import torch

from unipost.kernels.model import head_params, split_causal_lm


def causal_lm_token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token log pi(labels[:, t+1] | input_ids[:, :t+1]) as [B, S-1] float32; 0 where ignored."""
    from unipost.kernels.logprobs import token_logprobs

    if input_ids.shape != labels.shape:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape"
        )
    backbone, head = split_causal_lm(model)
    weight, bias = head_params(head)
    kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": False}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    hidden_BSH = backbone(input_ids=input_ids, **kwargs).last_hidden_state
    batch, seq, width = hidden_BSH.shape
    hidden_NH = hidden_BSH[:, :-1].reshape(-1, width)  # (B*(S-1), H)
    targets_N = labels[:, 1:].reshape(-1)
    logp_N = token_logprobs(
        hidden_NH, weight, targets_N, bias=bias, ignore_index=ignore_index, temperature=temperature
    )
    return logp_N.view(batch, seq - 1)


def fused_causal_lm_loss(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    num_items_in_batch: int | torch.Tensor | None = None,
    loss_weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """HF's causal-LM loss (mean NLL over non-ignored tokens, or sum / ``num_items_in_batch``).

    ``loss_weights`` [B, S] (aligned with ``labels``) multiplies each token's NLL (detached).
    """
    logp_BS = causal_lm_token_logprobs(
        model, input_ids, labels, attention_mask, ignore_index=ignore_index, position_ids=position_ids
    )
    valid_BS = labels[:, 1:] != ignore_index
    nll_BS = -logp_BS
    if loss_weights is not None:
        nll_BS = nll_BS * loss_weights[:, 1:].detach().to(nll_BS.dtype)
    total = nll_BS[valid_BS].sum()
    if num_items_in_batch is None:
        return total / valid_BS.sum().clamp(min=1)
    if isinstance(num_items_in_batch, torch.Tensor):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


class FusedLossMixin:
    """Mixin for ``transformers.Trainer`` subclasses: the loss through unipost's fused head."""

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: int | torch.Tensor | None = None,
    ):
        if "labels" not in inputs:
            raise ValueError("FusedLossMixin needs `labels` in the batch (HF convention, -100 = ignored)")
        loss = fused_causal_lm_loss(
            model,
            inputs["input_ids"],
            inputs["labels"],
            inputs.get("attention_mask"),
            num_items_in_batch=num_items_in_batch,
            loss_weights=inputs.get("loss_weights"),
            position_ids=inputs.get("position_ids"),
        )
        args = getattr(self, "args", None)
        if (
            num_items_in_batch is not None
            and args is not None
            and getattr(args, "average_tokens_across_devices", False)
            and getattr(getattr(self, "accelerator", None), "num_processes", 1) > 1
        ):
            loss = loss * self.accelerator.num_processes  # HF Trainer's convention for token averaging
        if return_outputs:
            return loss, {"loss": loss}
        return loss

"""The weighted negative log-likelihood of Eq. 14 with the normalisations users expect.

    loss = sum_t sg(w_t) * (-logp_t) / Z

``Z`` is chosen by ``normalization``:

* ``"token_mean"``: Z = number of label tokens (HF / TRL SFT default; long labels weigh more).
* ``"sequence_mean"``: each sequence is first averaged over its tokens, then sequences are averaged
  (GRPO's original per-sequence mean, 1/G sum_i 1/|o_i| sum_t). ``seq_L`` says which sequence each
  token belongs to; the trainer passes the *trajectory* of each token (a multi-turn trajectory is one
  sampled sequence o_i), not its turn.
* ``"sum"``: Z = 1.
* ``"constant"``: Z = ``constant`` (Dr. GRPO; also what keeps gradient accumulation over
  micro-batches exact: use the global token count of the whole batch as the constant).

The weights are detached here whatever the caller passes: the score is a stop-gradient (paper Eq. 15).
"""

from __future__ import annotations

from typing import Literal

import torch

Normalization = Literal["token_mean", "sequence_mean", "sum", "constant"]


def weighted_nll(
    logp_L: torch.Tensor,
    weights_L: torch.Tensor | None = None,
    seq_L: torch.Tensor | None = None,
    *,
    normalization: Normalization = "token_mean",
    constant: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss and metrics from per-label-token log-probs and (detached) weights."""
    if logp_L.dim() != 1:
        raise ValueError(f"logp_L must be 1-D [L], got shape {tuple(logp_L.shape)}")
    if weights_L is None:
        weights_L = torch.ones_like(logp_L)
    if weights_L.shape != logp_L.shape:
        raise ValueError(f"weights_L shape {tuple(weights_L.shape)} != logp_L shape {tuple(logp_L.shape)}")
    weights_L = weights_L.detach().to(logp_L.dtype)
    per_token = -weights_L * logp_L
    n = logp_L.numel()
    if normalization == "token_mean":
        loss = per_token.sum() / max(n, 1)
    elif normalization == "sum":
        loss = per_token.sum()
    elif normalization == "constant":
        if constant is None or constant <= 0:
            raise ValueError("normalization='constant' needs a positive `constant`")
        loss = per_token.sum() / constant
    elif normalization == "sequence_mean":
        if seq_L is None:
            raise ValueError("normalization='sequence_mean' needs seq_L (the sequence of each token)")
        if n == 0:
            loss = per_token.sum()
        else:
            num_seqs = int(seq_L.max().item()) + 1
            sums_S = torch.zeros(num_seqs, dtype=per_token.dtype, device=per_token.device)
            sums_S = sums_S.index_add(0, seq_L, per_token)
            counts_S = torch.bincount(seq_L, minlength=num_seqs).to(per_token.dtype)
            present = counts_S > 0
            loss = (sums_S[present] / counts_S[present]).mean()
    else:
        raise ValueError(
            f"unknown normalization {normalization!r}; use token_mean, sequence_mean, sum or constant"
        )
    with torch.no_grad():
        metrics = {
            "loss": float(loss.detach()),
            "label_tokens": float(n),
            "mean_logp": float(logp_L.detach().mean()) if n else 0.0,
            "mean_weight": float(weights_L.mean()) if n else 0.0,
        }
    return loss, metrics

"""Plain-PyTorch ground truth for :func:`unipost.kernels.logprobs.token_logprobs`.

Why it exists: every fused path in unipost has a reference that a user can read in ten lines and that the
tests and benchmarks compare against. This one materialises the full ``[N, V]`` logits, so it is only for
checking and for small shapes; it is also the "naive" baseline in ``benchmarks/bench_logprobs.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def token_logprobs_reference(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    chunk_size: int | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    vocab_chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """``log_softmax((hidden @ weight.T + bias) / temperature)[target]`` through full logits.

    Same contract as the fused kernel: ``hidden`` [N, H], ``weight`` [V, H], ``targets`` [N] integer;
    returns ``logp`` [N] (and ``entropy`` [N] when ``return_entropy``), zero on rows whose target is
    ``ignore_index``. The matmul runs in the input dtype and the softmax in fp32 (fp64 for fp64
    inputs), exactly the dtype policy of the fused kernel. ``chunk_size`` and ``vocab_chunk_size`` are
    accepted and ignored so the two functions are interchangeable.
    """
    del chunk_size, vocab_chunk_size  # the reference never chunks
    compute_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits_NV = F.linear(hidden, weight, bias).to(compute_dtype)
    if temperature != 1.0:  # skip an extra [N, V] copy when it is a no-op (this is the benchmark baseline)
        logits_NV = logits_NV / temperature
    logp_all_NV = torch.log_softmax(logits_NV, dim=-1)
    valid_N = targets != ignore_index
    safe_targets_N = torch.where(valid_N, targets, torch.zeros_like(targets)).long()
    logp_N = logp_all_NV.gather(1, safe_targets_N[:, None]).squeeze(1)
    logp_N = torch.where(valid_N, logp_N, torch.zeros_like(logp_N))
    if not return_entropy:
        return logp_N
    entropy_N = -(logp_all_NV.exp() * logp_all_NV).sum(-1)
    entropy_N = torch.where(valid_N, entropy_N, torch.zeros_like(entropy_N))
    return logp_N, entropy_N

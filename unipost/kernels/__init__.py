"""The one fused packed-sequence log-likelihood path, importable on its own by other trainers.

    token_logprobs(hidden, weight, targets)  chunked LM head -> log pi(target), no [N x V] logits
    pack(sequences)                          (context, label) documents -> PackedBatch (varlen / tree)
    packed_logprobs(model, batch)            unmodified HF causal LM over a PackedBatch -> logp per label
    weighted_nll(logp, weights, ...)         sum_t sg(w_t) * (-logp_t) / Z with the usual normalisations
    FusedLossMixin / fused_causal_lm_loss    drop-in loss for HF Trainer / TRL SFTTrainer
"""

from unipost.kernels.attention import (
    AttentionBackendError,
    attention_kwargs,
    flex_block_mask,
    select_attention,
    set_attention,
)
from unipost.kernels.hf import FusedLossMixin, causal_lm_token_logprobs, fused_causal_lm_loss
from unipost.kernels.logprobs import select_logprobs_backend, token_logprobs
from unipost.kernels.loss import weighted_nll
from unipost.kernels.model import LabelLogprobs, hidden_states, packed_logprobs, split_causal_lm
from unipost.kernels.packing import (
    Label,
    PackedBatch,
    PackingError,
    PackSequence,
    pack,
    packed_size,
    per_transition,
    split_sequences,
)
from unipost.kernels.reference import token_logprobs_reference

__all__ = [
    "AttentionBackendError",
    "FusedLossMixin",
    "Label",
    "LabelLogprobs",
    "PackSequence",
    "PackedBatch",
    "PackingError",
    "attention_kwargs",
    "causal_lm_token_logprobs",
    "flex_block_mask",
    "fused_causal_lm_loss",
    "hidden_states",
    "pack",
    "packed_logprobs",
    "packed_size",
    "per_transition",
    "select_attention",
    "select_logprobs_backend",
    "set_attention",
    "split_causal_lm",
    "split_sequences",
    "token_logprobs",
    "token_logprobs_reference",
    "weighted_nll",
]

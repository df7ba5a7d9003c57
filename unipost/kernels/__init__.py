"""The one fused packed-sequence log-likelihood path, importable on its own by other trainers.

    token_logprobs(hidden, weight, targets)  chunked LM head -> log pi(target), no [N x V] logits
    pack(sequences)                          (context, label) documents -> PackedBatch (varlen / tree)
    packed_logprobs(model, batch)            unmodified HF causal LM over a PackedBatch -> logp per label
    weighted_nll(logp, weights, ...)         sum_t sg(w_t) * (-logp_t) / Z with the usual normalisations
    fused_weighted_nll(hidden, weight, targets, w)  the same loss with its gradients formed in the head's
                                             forward (three GEMMs; fused_token_loss: any per-token loss)
    FusedLossMixin / fused_causal_lm_loss    drop-in loss for HF Trainer / TRL SFTTrainer

These are the entry points DESIGN.md names, plus the types ``pack`` takes and returns (PackSequence,
Label, PackedBatch). Everything else (attention selection, backends, the reference implementation,
packing helpers) is imported from its own module: ``unipost.kernels.attention``, ``.logprobs``,
``.reference``, ``.packing``, ``.model``, ``.hf``.
"""

from unipost.kernels.fused_loss import fused_token_loss, fused_weighted_nll
from unipost.kernels.hf import FusedLossMixin, fused_causal_lm_loss
from unipost.kernels.logprobs import token_logprobs
from unipost.kernels.loss import weighted_nll
from unipost.kernels.model import packed_logprobs
from unipost.kernels.packing import Label, PackedBatch, PackSequence, pack

__all__ = [
    "FusedLossMixin",
    "Label",
    "PackSequence",
    "PackedBatch",
    "fused_causal_lm_loss",
    "fused_token_loss",
    "fused_weighted_nll",
    "pack",
    "packed_logprobs",
    "token_logprobs",
    "weighted_nll",
]

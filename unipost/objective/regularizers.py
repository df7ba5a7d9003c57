"""Regularisers: the optional R(theta) of paper Eq. 14, as pure functions of per-label-token tensors.

Unlike scores, these are differentiable: ``logp_L`` and ``entropy_L`` must carry the graph. Every term
is averaged over the (masked) label tokens, so its scale does not depend on batch size or label length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from unipost.objective.needs import Need, logp_scope_of


@dataclass(frozen=True)
class RegularizerInputs:
    """Per-label-token tensors a regulariser may read (L = label tokens of the batch).

    * ``logp_L`` float [L]: log pi_theta at the label tokens, differentiable.
    * ``ref_logp_L`` float [L] or None: log pi_ref at the same tokens (frozen reference), detached.
    * ``entropy_L`` float [L] or None: entropy of pi_theta(. | x, y_<j) at each label position,
      differentiable (the kernel computes it without materialising [L x V] probabilities).
    * ``mask_L`` bool [L] or None: which tokens count (default: all).
    """

    logp_L: Tensor
    ref_logp_L: Tensor | None = None
    entropy_L: Tensor | None = None
    mask_L: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.logp_L, Tensor) or self.logp_L.dim() != 1:
            raise ValueError(f"RegularizerInputs.logp_L must be a 1-D tensor [L], got {self.logp_L!r}")
        L = self.logp_L.shape[0]
        for name in ("ref_logp_L", "entropy_L", "mask_L"):
            x = getattr(self, name)
            if x is not None and (not isinstance(x, Tensor) or tuple(x.shape) != (L,)):
                shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
                raise ValueError(f"RegularizerInputs.{name} must have shape ({L},) like logp_L, got {shape}")
        if self.mask_L is not None and self.mask_L.dtype != torch.bool:
            raise ValueError(f"RegularizerInputs.mask_L must be bool, got {self.mask_L.dtype}")

    def mean(self, values_L: Tensor) -> Tensor:
        """Mean over the masked tokens (0 when none)."""
        if self.mask_L is not None:
            values_L = values_L[self.mask_L]
        return values_L.sum() / max(values_L.numel(), 1)


@runtime_checkable
class Regularizer(Protocol):
    """R(theta): RegularizerInputs -> scalar loss term, added to the weighted NLL."""

    needs: frozenset[Need]

    def __call__(self, inputs: RegularizerInputs) -> Tensor: ...


class _RegBase:
    """``logp_scope``: as a score's (``unipost.objective.scores``); undeclared counts as "batch"."""

    needs: ClassVar[frozenset[Need]] = frozenset()
    logp_scope: ClassVar[str] = "batch"

    def __add__(self, other: object) -> RegularizerSum:
        if not isinstance(other, Regularizer):
            return NotImplemented
        return RegularizerSum(self, other)  # type: ignore[arg-type]


def _check_coef(owner: str, coef: float) -> None:
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
        raise ValueError(f"{owner}.coef must be a non-negative number, got {coef!r}")


@dataclass(frozen=True)
class KLToReference(_RegBase):
    """coef * mean_j k3_j, with k3 = r - log r - 1 and log r = log pi_ref(y_j|.) - log pi_theta(y_j|.).

    k3 (Schulman's "approximating KL" estimator) is what GRPO (DeepSeekMath Eq. 4) and TRL use: for
    y ~ pi_theta its *value* is a non-negative, unbiased estimate of KL(pi_theta || pi_ref). Its
    *gradient* is (1 - r) grad log pi_theta, whose expectation under pi_theta is grad KL(pi_ref ||
    pi_theta), the forward KL: so as a loss term it pulls pi_theta to cover pi_ref rather than
    penalising reverse KL. We keep GRPO's choice for comparability; tests/test_scores.py checks that
    identity by exact enumeration.
    """

    coef: float = 0.04

    needs: ClassVar[frozenset[Need]] = frozenset({Need.REFERENCE_LOGPROBS})
    logp_scope: ClassVar[str] = "token"  # a mean of per-token k3 terms

    def __post_init__(self) -> None:
        _check_coef("KLToReference", self.coef)

    def per_token(self, inputs: RegularizerInputs) -> Tensor:
        """k3_j [L], differentiable through logp_L."""
        if inputs.ref_logp_L is None:
            raise ValueError(
                "KLToReference needs RegularizerInputs.ref_logp_L (reference-model log-probs at the label "
                "tokens, Need.REFERENCE_LOGPROBS)"
            )
        log_r = inputs.ref_logp_L.detach().to(inputs.logp_L.dtype) - inputs.logp_L
        return torch.exp(log_r) - log_r - 1.0

    def __call__(self, inputs: RegularizerInputs) -> Tensor:
        return self.coef * inputs.mean(self.per_token(inputs))


@dataclass(frozen=True)
class EntropyBonus(_RegBase):
    """-coef * mean_j H(pi_theta(. | x, y_<j)): rewards keeping the policy stochastic (exploration)."""

    coef: float = 0.01

    needs: ClassVar[frozenset[Need]] = frozenset({Need.ENTROPY})
    logp_scope: ClassVar[str] = "token"  # a mean of per-token entropies

    def __post_init__(self) -> None:
        _check_coef("EntropyBonus", self.coef)

    def __call__(self, inputs: RegularizerInputs) -> Tensor:
        if inputs.entropy_L is None:
            raise ValueError(
                "EntropyBonus needs RegularizerInputs.entropy_L (per-token entropy, Need.ENTROPY)"
            )
        return -self.coef * inputs.mean(inputs.entropy_L)


@dataclass(frozen=True, repr=False)
class RegularizerSum(_RegBase):
    """R = R_a + R_b (``a + b``)."""

    a: Regularizer
    b: Regularizer

    def __post_init__(self) -> None:
        for name, part in (("a", self.a), ("b", self.b)):
            if not isinstance(part, Regularizer) or isinstance(part, type):
                raise ValueError(
                    f"RegularizerSum.{name} must be a regularizer instance (e.g. KLToReference(0.04)), "
                    f"got {part!r}"
                )

    @property
    def needs(self) -> frozenset[Need]:  # type: ignore[override]
        """Union of both terms' needs."""
        return frozenset(self.a.needs) | frozenset(self.b.needs)

    @property
    def logp_scope(self) -> str:  # type: ignore[override]
        """The wider of the terms' scopes."""
        return logp_scope_of(self.a, self.b)

    def __call__(self, inputs: RegularizerInputs) -> Tensor:
        return self.a(inputs) + self.b(inputs)

    def __repr__(self) -> str:
        return f"{self.a!r} + {self.b!r}"

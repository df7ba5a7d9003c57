"""Scores: the stop-gradient weight w(x, y) of paper Eq. 14, as pure functions of tensors.

    grad L = E_x E_y [ sg(w(x, y)) * grad(-log pi_theta(y | x)) ] + grad R

A score maps a :class:`ScoreInputs` (flat per-label-token tensors of a packed batch plus per-trajectory
outcomes) to ``weights_L``, one detached weight per label token. Trajectory-level scores (success,
advantage) are broadcast to the tokens of that trajectory's labels; token-level ones (OPD's log-ratio)
are per token. Scores compose by product: ``SuccessFilter() * GroupAdvantage()``.

Shape letters: L = label tokens of the batch, S = labels (transitions), B = trajectories, G = groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import Tensor

from unipost.data import Trajectory
from unipost.objective.needs import Need, logp_scope_of


@dataclass(frozen=True)
class ScoreInputs:
    """Everything a score may read, for one packed batch. Pure data; every tensor on one device.

    Fields (shape suffixes: L label tokens, S labels/transitions, B trajectories):

    * ``logp_L`` float [L]: the student's log pi_theta(y_j | x, y_<j) at each label token. Detached on
      entry (scores are stop-gradient data).
    * ``label_seq_L`` int64 [L]: which label (transition, 0..S-1) each token belongs to; the same
      tensor as ``PackedBatch.label_seq_L``.
    * ``traj_of_seq_S`` int64 [S]: which trajectory (0..B-1) each label came from.
    * ``reward_B`` float [B]: the verifier's scalar reward per trajectory.
    * ``resolved_B`` bool [B]: the task was solved (hidden tests pass).
    * ``submitted_B`` bool [B]: the agent produced a valid final submission (App. F.2 filter).
    * ``teacher_logp_L`` float [L] or None: log pi_T at the label tokens (OPD; white-box teacher).
    * ``group_of_traj_B`` int64 [B] or None: group id per trajectory; trajectories sharing an id are
      samples of the same task (GRPO). Ids need not be contiguous.
    * ``old_logp_L`` float [L] or None: log pi_old at the label tokens, the student before this
      batch's first update (``Recipe.ratio_clip``'s importance ratio). Detached.
    """

    logp_L: Tensor
    label_seq_L: Tensor
    traj_of_seq_S: Tensor
    reward_B: Tensor
    resolved_B: Tensor
    submitted_B: Tensor
    teacher_logp_L: Tensor | None = None
    group_of_traj_B: Tensor | None = None
    old_logp_L: Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "logp_L", _vector("logp_L", self.logp_L).detach())
        L = self.logp_L.shape[0]
        seq = _vector("label_seq_L", self.label_seq_L, length=L, integer=True)
        traj = _vector("traj_of_seq_S", self.traj_of_seq_S, integer=True)
        S = traj.shape[0]
        reward = _vector("reward_B", self.reward_B)
        B = reward.shape[0]
        _vector("resolved_B", self.resolved_B, length=B)
        _vector("submitted_B", self.submitted_B, length=B)
        if L and (int(seq.min()) < 0 or int(seq.max()) >= S):
            raise ValueError(f"label_seq_L must index labels in [0, {S}) (S = len(traj_of_seq_S))")
        if S and (int(traj.min()) < 0 or int(traj.max()) >= B):
            raise ValueError(f"traj_of_seq_S must index trajectories in [0, {B}) (B = len(reward_B))")
        if self.teacher_logp_L is not None:
            t = _vector("teacher_logp_L", self.teacher_logp_L, length=L)
            object.__setattr__(self, "teacher_logp_L", t.detach())
        if self.group_of_traj_B is not None:
            _vector("group_of_traj_B", self.group_of_traj_B, length=B, integer=True)
        if self.old_logp_L is not None:
            old = _vector("old_logp_L", self.old_logp_L, length=L)
            object.__setattr__(self, "old_logp_L", old.detach())

    @property
    def traj_of_token_L(self) -> Tensor:
        """int64 [L]: the trajectory each label token came from."""
        return self.traj_of_seq_S[self.label_seq_L]

    def per_token(self, values_B: Tensor) -> Tensor:
        """Broadcast a per-trajectory tensor [B] to label tokens [L]."""
        return values_B[self.traj_of_token_L]

    @property
    def weight_dtype(self) -> torch.dtype:
        """float32, or float64 when the log-probs are float64 (so references can be exact)."""
        return torch.float64 if self.logp_L.dtype == torch.float64 else torch.float32


def _vector(name: str, x: Tensor, *, length: int | None = None, integer: bool = False) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"ScoreInputs.{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 1:
        raise ValueError(f"ScoreInputs.{name} must be 1-D, got shape {tuple(x.shape)}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"ScoreInputs.{name} has length {x.shape[0]}, expected {length}")
    if integer and x.dtype != torch.int64:
        raise ValueError(f"ScoreInputs.{name} must be int64 (an index), got {x.dtype}")
    return x


# ---------------------------------------------------------------------------------------------------


@runtime_checkable
class Score(Protocol):
    """w(x, y): ScoreInputs -> detached weights_L [L] (float32; float64 for float64 inputs)."""

    needs: frozenset[Need]
    requires_own_samples: bool  # a score-function (REINFORCE-style) weight: valid only for y ~ pi_theta

    def __call__(self, ctx: ScoreInputs) -> Tensor: ...


@runtime_checkable
class TrajectoryFilter(Protocol):
    """A score factor that is a 0/1 property of the whole trajectory, i.e. a filter on the data.

    ``Recipe.keep`` drops the trajectories it rejects *before* packing, so they are not in any
    normaliser or effective-sample count (weighting them 0 would leave their tokens in the
    token-mean denominator and shrink the gradient by the acceptance rate).
    """

    def keep(self, trajectory: Trajectory) -> bool: ...


class _ScoreBase:
    """Shared call path: compute, detach, cast, check the shape. Subclasses implement ``_weights``.

    ``logp_scope`` says which log-probs a token's weight reads (``unipost.objective.needs.LOGP_SCOPES``):
    "none" (known before the step), "token" (that token's own), "batch" (others' too). The Trainer's
    three-GEMM head needs at most "token"; a subclass that does not say is taken as "batch".
    """

    needs: ClassVar[frozenset[Need]] = frozenset()
    requires_own_samples: ClassVar[bool] = False
    logp_scope: ClassVar[str] = "batch"

    def _weights(self, ctx: ScoreInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, ctx: ScoreInputs) -> Tensor:
        if not isinstance(ctx, ScoreInputs):
            raise ValueError(f"{self!r} expects a ScoreInputs, got {type(ctx).__name__}")
        with torch.no_grad():
            w = self._weights(ctx).to(ctx.weight_dtype)
        if w.shape != ctx.logp_L.shape:
            raise RuntimeError(
                f"{self!r} returned shape {tuple(w.shape)}, expected {tuple(ctx.logp_L.shape)}"
            )
        return w.detach()

    def __mul__(self, other: object) -> Product:
        if not isinstance(other, Score):
            return NotImplemented
        return Product(self, other)  # type: ignore[arg-type]


@dataclass(frozen=True, repr=False)
class Uniform(_ScoreBase):
    """w = 1: plain cross-entropy on the labels (SFT, DAgger, AggreVaTe)."""

    logp_scope: ClassVar[str] = "none"

    def _weights(self, ctx: ScoreInputs) -> Tensor:
        return torch.ones_like(ctx.logp_L)

    def __repr__(self) -> str:
        return "Uniform()"


@dataclass(frozen=True, repr=False)
class SuccessFilter(_ScoreBase):
    """Rejection sampling (paper App. A, SFT): keep only resolved trajectories.

    A :class:`TrajectoryFilter`: ``Recipe.keep`` drops unresolved trajectories before packing, so SFT
    with rejection sampling is exactly SFT on the retained subset (App. A: "changing the empirical
    expert dataset to the retained subset"). As a weight it is 1[resolved], i.e. 1 on kept data.
    """

    needs: ClassVar[frozenset[Need]] = frozenset({Need.REWARDS})
    logp_scope: ClassVar[str] = "none"

    def keep(self, trajectory: Trajectory) -> bool:
        """Only resolved trajectories enter the data."""
        return bool(trajectory.outcome.resolved)

    def _weights(self, ctx: ScoreInputs) -> Tensor:
        return ctx.per_token(ctx.resolved_B.to(torch.bool).to(ctx.weight_dtype))

    def __repr__(self) -> str:
        return "SuccessFilter()"


@dataclass(frozen=True)
class GroupAdvantage(_ScoreBase):
    """GRPO's advantage: A_b = (r_b - mean_g r) / (std_g r + eps) over the trajectory's group g.

    ``std`` is the sample standard deviation (Bessel-corrected), as TRL's GRPOTrainer computes it;
    ``normalize_std=False`` gives Dr. GRPO's unscaled A_b = r_b - mean_g r. A degenerate group (one
    member, or all rewards equal) carries no learning signal and gets exactly 0, not eps-amplified
    rounding noise. The weight is a score-function estimator: valid only on the student's own samples.
    """

    eps: float = 1e-6
    normalize_std: bool = True

    needs: ClassVar[frozenset[Need]] = frozenset({Need.REWARDS, Need.GROUPS})
    requires_own_samples: ClassVar[bool] = True
    logp_scope: ClassVar[str] = "none"  # rewards only

    def __post_init__(self) -> None:
        if not isinstance(self.eps, (int, float)) or self.eps < 0:
            raise ValueError(f"GroupAdvantage.eps must be a non-negative number, got {self.eps!r}")

    def advantages_B(self, reward_B: Tensor, group_of_traj_B: Tensor) -> Tensor:
        """Per-trajectory advantages [B] (float64), the quantity the docstring defines."""
        r = reward_B.to(torch.float64)
        _, g = torch.unique(group_of_traj_B, return_inverse=True)
        G = int(g.max()) + 1 if g.numel() else 0
        count_G = torch.bincount(g, minlength=G).to(torch.float64)
        mean_G = torch.zeros(G, dtype=torch.float64, device=r.device).index_add(0, g, r) / count_G
        centred_B = r - mean_G[g]
        hi_G = torch.full((G,), -torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
            0, g, r, reduce="amax"
        )
        lo_G = torch.full((G,), torch.inf, dtype=torch.float64, device=r.device).scatter_reduce(
            0, g, r, reduce="amin"
        )
        degenerate_G = (count_G < 2) | (hi_G == lo_G)
        if self.normalize_std:
            var_G = torch.zeros(G, dtype=torch.float64, device=r.device).index_add(0, g, centred_B**2)
            std_G = (var_G / (count_G - 1).clamp(min=1)).sqrt()
            adv_B = centred_B / (std_G[g] + self.eps)
        else:
            adv_B = centred_B
        return torch.where(degenerate_G[g], torch.zeros_like(adv_B), adv_B)

    def _weights(self, ctx: ScoreInputs) -> Tensor:
        if ctx.group_of_traj_B is None:
            raise ValueError(
                "GroupAdvantage needs ScoreInputs.group_of_traj_B (which trajectories are samples of the "
                "same task); the batch builder must pass it (Need.GROUPS)"
            )
        return ctx.per_token(self.advantages_B(ctx.reward_B, ctx.group_of_traj_B))


@dataclass(frozen=True)
class TeacherLogRatio(_ScoreBase):
    """OPD's per-token weight w_j = log pi_T(y_j | x, y_<j) - log pi_theta(y_j | x, y_<j), detached.

    With y ~ pi_theta, E_y[sum_j sg(w_j) grad(-log pi_theta(y_j|.))] = sum_j E_{y<j}[grad KL(pi_theta(.|x,
    y<j) || pi_T(.|x, y<j))]: the per-token reverse-KL gradient with the prefix distribution held fixed
    (paper App. A Eq. 21-22; tinker-cookbook's OPD advantage). It is not the gradient of the
    sequence-level KL, which would weight each token by the sum of the *future* log-ratios as well; OPD
    deliberately drops that term (lower variance). ``clip`` bounds |w_j| (biased, but tames rare tokens
    the teacher finds implausible).
    """

    clip: float | None = None

    needs: ClassVar[frozenset[Need]] = frozenset({Need.TEACHER_LOGPROBS})
    requires_own_samples: ClassVar[bool] = True
    logp_scope: ClassVar[str] = "token"  # the token's own log pi_theta

    def __post_init__(self) -> None:
        if self.clip is not None and (not isinstance(self.clip, (int, float)) or self.clip <= 0):
            raise ValueError(f"TeacherLogRatio.clip must be None or a positive number, got {self.clip!r}")

    def _weights(self, ctx: ScoreInputs) -> Tensor:
        if ctx.teacher_logp_L is None:
            raise ValueError(
                "TeacherLogRatio needs ScoreInputs.teacher_logp_L (teacher log-probs at the label "
                "tokens, Need.TEACHER_LOGPROBS); the batch builder did not provide them"
            )
        w = ctx.teacher_logp_L.to(ctx.weight_dtype) - ctx.logp_L.to(ctx.weight_dtype)
        if self.clip is not None:
            w = w.clamp(-self.clip, self.clip)
        return w


@dataclass(frozen=True, repr=False)
class Product(_ScoreBase):
    """w = w_a * w_b (``a * b``): e.g. ``SuccessFilter() * TeacherLogRatio()`` distils only successes."""

    a: Score
    b: Score

    def __post_init__(self) -> None:
        for name, part in (("a", self.a), ("b", self.b)):
            if not isinstance(part, Score) or isinstance(part, type):
                raise ValueError(f"Product.{name} must be a score instance (e.g. Uniform()), got {part!r}")

    @property
    def needs(self) -> frozenset[Need]:  # type: ignore[override]
        """Union of both factors' needs."""
        return frozenset(self.a.needs) | frozenset(self.b.needs)

    @property
    def requires_own_samples(self) -> bool:  # type: ignore[override]
        """True when either factor is a score-function weight."""
        return bool(self.a.requires_own_samples or self.b.requires_own_samples)

    @property
    def logp_scope(self) -> str:  # type: ignore[override]
        """The wider of the factors' scopes."""
        return logp_scope_of(self.a, self.b)

    def factors(self) -> list[Score]:
        """The non-product scores this product multiplies, flattened."""
        out: list[Score] = []
        for part in (self.a, self.b):
            out.extend(part.factors() if isinstance(part, Product) else [part])
        return out

    def _weights(self, ctx: ScoreInputs) -> Tensor:
        return self.a(ctx) * self.b(ctx)

    def __repr__(self) -> str:
        return f"{self.a!r} * {self.b!r}"


def score_factors(score: Score) -> list[Score]:
    """A score's non-product factors (itself when it is not a :class:`Product`)."""
    return score.factors() if isinstance(score, Product) else [score]

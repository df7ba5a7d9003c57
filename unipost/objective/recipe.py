"""A Recipe is a post-training method: (rollout protocol, label source, score, regulariser) (Eq. 14).

    grad L = E_{x ~ d_C} E_{y ~ d_L(.|x)} [ sg(w(x, y)) * grad(-log pi_theta(y | x)) ] + grad R

| method    | rollout (d_C)                | labels (d_L)    | score (w)                 |
|-----------|------------------------------|-----------------|---------------------------|
| SFT       | TeacherRollout / OfflineData | TeacherLabels   | SuccessFilter or Uniform  |
| GRPO      | StudentRollout(group_size=G) | OwnSamples      | GroupAdvantage            |
| OPD       | StudentRollout               | OwnSamples      | TeacherLogRatio           |
| DAgger    | TurnMixture(beta_i)          | TeacherLabels   | Uniform                   |
| AggreVaTe | PrefixSwitch(k ~ rho_i)      | TeacherLabels   | Uniform                   |

A new method is a new composition, e.g. ``Recipe(TurnMixture(0.5), OwnSamples(), TeacherLogRatio())``
(OPD on mixture rollouts). Compositions that cannot work fail at construction with a message naming
the piece at fault, not after an hour of rollouts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor

from unipost.data import Trajectory
from unipost.objective.labels import LabelSource, OwnSamples, TeacherLabels
from unipost.objective.needs import Need, logp_scope_of, needs_of
from unipost.objective.regularizers import KLToReference, Regularizer, RegularizerInputs
from unipost.objective.rollouts import (
    OfflineData,
    PrefixSwitch,
    RolloutProtocol,
    StudentRollout,
    TeacherRollout,
    TurnMixture,
)
from unipost.objective.schedules import (
    LinearDecay,
    PrefixSchedule,
    Schedule,
    ShiftingPrefix,
)
from unipost.objective.scores import (
    GroupAdvantage,
    Score,
    ScoreInputs,
    SuccessFilter,
    TeacherLogRatio,
    TrajectoryFilter,
    Uniform,
    score_factors,
)

# The normalisations unipost.kernels.loss.weighted_nll implements (a test keeps the two in sync). Not
# imported from there: unipost.objective stays importable without the kernels (and transformers).
Normalization = Literal["token_mean", "sequence_mean", "sum", "constant"]
NORMALIZATIONS: tuple[str, ...] = get_args(Normalization)


class RecipeError(ValueError):
    """The parts of a recipe do not compose, or the recipe cannot run with the given teacher."""


def _instance_of(owner: str, value: object, proto: type, examples: str) -> None:
    if isinstance(value, type):
        raise RecipeError(
            f"Recipe.{owner} got the class {value.__name__}; pass an instance: {value.__name__}()"
        )
    if not isinstance(value, proto):
        raise RecipeError(
            f"Recipe.{owner} must be one of {examples} (or implement the protocol); got {value!r}"
        )


@dataclass(frozen=True)
class Recipe:
    """A post-training method as a composition of the four parts of Eq. 14. Immutable and hashable.

    Args:
        rollout: who executes each turn (context distribution d_C).
        labels: what is imitated at each visited state (label distribution d_L).
        score: the stop-gradient weight w per label token.
        regularizer: the optional R(theta) added to the loss.
        name: a display name (``describe()`` and logs); defaults to the parts' summary.
        filter_unsubmitted: drop trajectories without a valid final submission (paper App. F.2 does
            this for DAgger, AggreVaTe and OPD). Like every filter (see ``keep``) it removes the
            trajectory from the data before packing: its tokens never enter a normaliser and its labels
            never count as effective samples.
        normalization: how the trainer normalises sum_t w_t * (-log p_t); one of
            ``unipost.kernels.loss.Normalization`` (token_mean, sequence_mean, sum, constant).
            ``sequence_mean`` averages each *trajectory*'s label tokens, then trajectories (GRPO's
            per-sequence mean, a multi-turn trajectory being one sampled sequence).
        ratio_clip: PPO-style clipped importance ratio for epochs > 1 over one batch (as SkyRL / verl
            run GRPO). None (default): off, the plain Eq. 14 surrogate. With eps set, each label token's
            weight becomes sg(w * r * 1[not clipped]) with r = pi_theta / pi_old, pi_old the student
            before this batch's first update (``ScoreInputs.old_logp_L``): the gradient of PPO's
            min(r w, clip(r, 1 - eps, 1 + eps) w). At r = 1 (the first epoch) the loss and its
            gradient are exactly those without it. Only for labels sampled from the student.
    """

    rollout: RolloutProtocol
    labels: LabelSource
    score: Score = Uniform()  # noqa: RUF009 - frozen and immutable, safe as a default
    regularizer: Regularizer | None = None
    _: KW_ONLY
    name: str | None = None
    filter_unsubmitted: bool = False
    normalization: Normalization = "token_mean"
    ratio_clip: float | None = None

    def __post_init__(self) -> None:
        self._validate()

    # -- validation ---------------------------------------------------------------------------------

    def _validate(self) -> None:
        _instance_of(
            "rollout",
            self.rollout,
            RolloutProtocol,
            "TeacherRollout(), StudentRollout(), TurnMixture(beta), PrefixSwitch(k), OfflineData(path)",
        )
        _instance_of("labels", self.labels, LabelSource, "TeacherLabels(), OwnSamples()")
        _instance_of(
            "score", self.score, Score, "Uniform(), SuccessFilter(), GroupAdvantage(), TeacherLogRatio()"
        )
        if self.regularizer is not None:
            _instance_of(
                "regularizer", self.regularizer, Regularizer, "KLToReference(coef), EntropyBonus(coef)"
            )
        if self.normalization not in NORMALIZATIONS:
            raise RecipeError(
                f"Recipe.normalization must be one of {', '.join(NORMALIZATIONS)}; got {self.normalization!r}"
            )
        if not isinstance(self.filter_unsubmitted, bool):
            raise RecipeError(f"Recipe.filter_unsubmitted must be a bool, got {self.filter_unsubmitted!r}")
        if self.ratio_clip is not None:
            clip = self.ratio_clip
            if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip < 1:
                raise RecipeError(f"Recipe.ratio_clip must be None or a number in (0, 1), got {clip!r}")
            if not self.labels.samples_from_student:
                raise RecipeError(
                    f"Recipe.ratio_clip corrects for updates since the student sampled its labels, but "
                    f"{self.labels!r} does not imitate the student's own samples; use OwnSamples()"
                )

        rollout, labels = self.rollout, self.labels
        offline = not rollout.collects

        # Who acts must match what is labelled.
        if isinstance(labels, OwnSamples) and not offline:
            if labels.executor == "student" and not rollout.uses_student:
                raise RecipeError(
                    f"OwnSamples() imitates the student's own executed actions, but {rollout!r} never lets "
                    "the student act: nothing to label. For SFT on teacher rollouts use TeacherLabels()"
                )
            if labels.executor == "teacher" and not rollout.uses_teacher:
                raise RecipeError(
                    f"OwnSamples(executor='teacher') imitates teacher-executed turns, but {rollout!r} never "
                    "lets the teacher act: nothing to label"
                )
        if (
            isinstance(labels, TeacherLabels)
            and isinstance(rollout, OfflineData)
            and not rollout.teacher_actions
        ):
            raise RecipeError(
                f"TeacherLabels needs the teacher's action at every stored state, but {rollout!r} has no "
                "teacher actions (teacher_actions=False); use OwnSamples() or a dataset with teacher labels"
            )

        # Score-function weights are only unbiased for labels sampled from the current student.
        for factor in score_factors(self.score):
            if not factor.requires_own_samples:
                continue
            what = _score_name(factor)
            if not labels.samples_from_student:
                raise RecipeError(
                    f"{what} is a score-function (policy-gradient) weight: it needs labels sampled from the "
                    f"student itself (y ~ pi_theta), i.e. OwnSamples(); got {labels!r}"
                )
            if offline:
                raise RecipeError(
                    f"{what} is a score-function weight: it needs fresh samples from the current student, "
                    f"but {rollout!r} replays stored actions; use StudentRollout() or TurnMixture(beta)"
                )

        # Group baselines need groups.
        if Need.GROUPS in needs_of(self.score) and rollout.group_size < 2:
            raise RecipeError(
                f"{_score_name(self.score)} normalises rewards within groups of samples of the same task, "
                f"but {rollout!r} has group_size={rollout.group_size}; every group would be degenerate "
                "(zero advantage). Use e.g. StudentRollout(group_size=8)"
            )

    # -- what the engine / trainer read -------------------------------------------------------------

    @property
    def needs(self) -> frozenset[Need]:
        """Everything the rollout engine and batch builder must collect for this recipe."""
        return needs_of(self.rollout, self.labels, self.score, self.regularizer)

    @property
    def logp_scope(self) -> str:
        """Which log-probs a token's loss term reads: "none", "token" or "batch" (``needs.LOGP_SCOPES``).

        The widest of the score's, the regulariser's and, with ``ratio_clip``, "token" (PPO's ratio
        and its clip are per token: r_t = exp(logp_t - old_logp_t)). Up to "token" the loss is a sum
        of per-token terms and the Trainer's three-GEMM head applies (``unipost.batch.select_head``).
        """
        ratio = _RatioClipScope() if self.ratio_clip is not None else None
        return logp_scope_of(self.score, self.regularizer, ratio)

    @property
    def group_size(self) -> int:
        """Samples per task per iteration (GRPO groups; 1 otherwise)."""
        return int(self.rollout.group_size)

    @property
    def needs_teacher(self) -> bool:
        """A live teacher must be reachable during rollouts (to act, or to score label tokens)."""
        if not self.rollout.collects:
            return Need.TEACHER_LOGPROBS in self.needs
        return bool(self.rollout.uses_teacher or {Need.TEACHER_ACTIONS, Need.TEACHER_LOGPROBS} & self.needs)

    def check_teacher(self, white_box: bool | None) -> None:
        """Fail early when the configured teacher cannot serve this recipe.

        ``white_box``: True for a teacher that returns log-probs of given tokens (a local / vLLM model),
        False for an API-only (OpenAI-compatible) teacher that returns actions, None for no teacher.
        """
        needs = self.needs
        if white_box is None and self.needs_teacher:
            raise RecipeError(
                f"{self.display_name} needs a teacher "
                f"({_fmt_needs(needs & _TEACHER_NEEDS) or 'it executes turns'}) but none is configured"
            )
        if white_box is False and Need.TEACHER_LOGPROBS in needs:
            culprit = self._part_needing(Need.TEACHER_LOGPROBS)
            who = "OPD's TeacherLogRatio" if isinstance(culprit, TeacherLogRatio) else repr(culprit)
            raise RecipeError(
                f"{who} needs teacher log-probs; an OpenAI-compatible teacher only returns actions "
                "— use DAgger/AggreVaTe/SFT or a white-box teacher"
            )

    def _part_needing(self, need: Need) -> object:
        parts: list[object] = [self.rollout, self.labels, *score_factors(self.score)]
        if self.regularizer is not None:
            parts.append(self.regularizer)
        return next(p for p in parts if need in needs_of(p))

    def keep(self, trajectory: Trajectory) -> bool:
        """Whether a finished trajectory enters the data at all (before packing and counting).

        Two filters: App. F.2's valid-submission filter (``filter_unsubmitted``) and any score factor
        that is a trajectory filter (``SuccessFilter``: rejection sampling, which App. A describes as
        "changing the empirical expert dataset to the retained subset"). A dropped trajectory is
        absent, not zero-weighted: rejection-sampled SFT on a batch is SFT on its retained subset.
        """
        if self.filter_unsubmitted and not trajectory.outcome.submitted:
            return False
        return all(f.keep(trajectory) for f in score_factors(self.score) if isinstance(f, TrajectoryFilter))

    def select_labels(self, trajectory: Trajectory):
        """The label source's transitions for a kept trajectory; [] for a filtered one."""
        return self.labels.select(trajectory) if self.keep(trajectory) else []

    def loss_weights(self, inputs: ScoreInputs) -> Tensor:
        """weights_L: the score (times 1[submitted] with ``filter_unsubmitted``, times the clipped
        importance ratio with ``ratio_clip``), detached.

        The filter factors are 1 on data ``keep`` let through; they stay here so a batch somebody
        built without ``keep`` still gets no gradient from filtered trajectories.
        """
        w = self.score(inputs)
        if self.filter_unsubmitted:
            w = w * inputs.per_token(inputs.submitted_B.to(torch.bool).to(w.dtype))
        if self.ratio_clip is not None:
            w = w * clipped_ratio(inputs.logp_L, inputs.old_logp_L, w, self.ratio_clip).to(w.dtype)
        return w

    def regularization(self, inputs: RegularizerInputs) -> Tensor:
        """R(theta) as a scalar (0 without a regulariser), differentiable through ``inputs.logp_L``."""
        if self.regularizer is None:
            return inputs.logp_L.new_zeros(())
        return self.regularizer(inputs)

    # -- display -------------------------------------------------------------------------------------

    @property
    def display_name(self) -> str:
        """``name`` or "Recipe"."""
        return self.name or "Recipe"

    def describe(self) -> str:
        """One line: name: context / labels / score / reg (+ filter, normalisation)."""
        extras = [f"norm {self.normalization}"]
        if self.ratio_clip is not None:
            extras.append(f"ratio clip {self.ratio_clip}")
        if self.filter_unsubmitted:
            extras.insert(0, "drop unsubmitted")
        reg = repr(self.regularizer) if self.regularizer is not None else "none"
        return (
            f"{self.display_name}: context {self.rollout!r} / labels {self.labels!r} / score {self.score!r} "
            f"/ reg {reg} ({', '.join(extras)})"
        )

    def to_spec(self) -> dict[str, Any]:
        """The composition as JSON-able data (:func:`unipost.objective.spec.recipe_to_spec`)."""
        from unipost.objective.spec import recipe_to_spec

        return recipe_to_spec(self)

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> Recipe:
        """The recipe ``to_spec`` recorded (:func:`unipost.objective.spec.recipe_from_spec`)."""
        from unipost.objective.spec import recipe_from_spec

        return recipe_from_spec(spec)

    def __repr__(self) -> str:
        return (
            f"Recipe({self.rollout!r}, {self.labels!r}, {self.score!r}, {self.regularizer!r}, "
            f"name={self.name!r}, filter_unsubmitted={self.filter_unsubmitted}, "
            f"normalization={self.normalization!r}, ratio_clip={self.ratio_clip!r})"
        )


_TEACHER_NEEDS = frozenset({Need.TEACHER_ACTIONS, Need.TEACHER_LOGPROBS})


class _RatioClipScope:
    """``ratio_clip``'s part in ``Recipe.logp_scope``: the clipped ratio of a token reads its own logp."""

    logp_scope = "token"


def clipped_ratio(logp_L: Tensor, old_logp_L: Tensor | None, weights_L: Tensor, clip: float) -> Tensor:
    """r * 1[PPO's unclipped branch is active], detached: the factor ``ratio_clip`` puts on a weight.

    PPO minimises -min(r w, clip(r, 1-eps, 1+eps) w) per token; its gradient is -w r grad log pi where
    the unclipped branch is the minimum and 0 where the clipped one is, i.e. the gradient of
    sg(w * r * active) * (-log pi). ``old_logp_L`` None means pi_old = pi_theta (r = 1, nothing clipped).
    """
    if old_logp_L is None:
        return torch.ones_like(logp_L)
    with torch.no_grad():
        ratio = torch.exp(logp_L.detach().double() - old_logp_L.detach().double())
        clipped = ((weights_L > 0) & (ratio > 1 + clip)) | ((weights_L < 0) & (ratio < 1 - clip))
        return torch.where(clipped, torch.zeros_like(ratio), ratio).to(logp_L.dtype)


def _fmt_needs(needs: frozenset[Need]) -> str:
    return ", ".join(sorted(n.value for n in needs))


def _score_name(score: object) -> str:
    return type(score).__name__ if not isinstance(score, type) else score.__name__


# ---------------------------------------------------------------------------------------------------
# Named recipes: the paper's methods (Table 2, App. F) as one-line compositions.


def SFT(rejection_sampling: bool = True, *, data: str | None = None) -> Recipe:
    """Behaviour cloning on teacher trajectories; with rejection sampling only resolved ones (App. F.2).

    Rejection sampling drops the unresolved trajectories from the data (``Recipe.keep``), so the loss
    and the effective-sample count are those of SFT on the retained subset.

    ``data``: a stored JSONL of teacher trajectories (OfflineData, e.g. a run's trajectories.jsonl) as
    the paper's SFT does it: one dataset from all training tasks, trained on for several epochs
    (``unipost train`` with ``recipe_kwargs={"data": path}``; each iteration is one epoch over it).
    """
    rollout = OfflineData(data) if data is not None else TeacherRollout()
    score = SuccessFilter() if rejection_sampling else Uniform()
    return Recipe(rollout, TeacherLabels(), score, name="SFT")


def GRPO(
    group_size: int = 8,
    *,
    kl_coef: float = 0.0,
    normalize_std: bool = True,
    ratio_clip: float | None = None,
) -> Recipe:
    """Group-relative policy gradient on the student's own rollouts, ``group_size`` samples per task.

    ``kl_coef > 0`` adds GRPO's k3 KL to a frozen reference (the Trainer builds it: a frozen copy of
    the initial student, or ``TrainConfig.reference``); 0 (no reference model) is the common modern
    default. ``ratio_clip`` (e.g. 0.2) turns on PPO's clipped importance ratio for several epochs
    over one batch. The paper's GRPO baseline follows SkyRL-v0 (App. F.2).
    """
    reg = KLToReference(kl_coef) if kl_coef > 0 else None
    return Recipe(
        StudentRollout(group_size=group_size),
        OwnSamples(),
        GroupAdvantage(normalize_std=normalize_std),
        reg,
        name="GRPO",
        ratio_clip=ratio_clip,
    )


def OPD(*, clip: float | None = None, filter_unsubmitted: bool = True) -> Recipe:
    """On-policy distillation: the student's own samples weighted by the teacher log-ratio per token.

    Needs a white-box teacher. Unsubmitted trajectories are dropped as in the paper (App. F.2).
    """
    return Recipe(
        StudentRollout(),
        OwnSamples(),
        TeacherLogRatio(clip=clip),
        name="OPD",
        filter_unsubmitted=filter_unsubmitted,
    )


def DAgger(beta: Schedule | float = LinearDecay(1.0, 0.1, 0.2), *, filter_unsubmitted: bool = True) -> Recipe:  # noqa: B008
    """Turn-level mixture rollouts, teacher labels at every visited state, plain cross-entropy.

    From the paper (App. F): beta starts high and decays linearly per iteration to a floor, and
    trajectories without a valid submission are dropped; it trains on each iteration's fresh batch
    (no aggregation). The numbers of the default beta_i = max(0.2, 1.0 - 0.1 i) are ours: the
    extracted text lost the paper's start, step and floor (experiments/README.md, provenance).
    """
    return Recipe(
        TurnMixture(beta), TeacherLabels(), Uniform(), name="DAgger", filter_unsubmitted=filter_unsubmitted
    )


def AggreVaTe(
    k: PrefixSchedule | int = ShiftingPrefix(1, 16, 0.5),  # noqa: B008
    *,
    filter_unsubmitted: bool = True,
) -> Recipe:
    """Student prefix of k turns, teacher completion, teacher labels at every visited state.

    The default law over k (1..16, tilt +0.5 per iteration, uniform at iteration 0) is ours: the paper's
    support and shift did not survive text extraction; it states only that mass shifts toward longer
    student prefixes (App. F.1).
    """
    return Recipe(
        PrefixSwitch(k), TeacherLabels(), Uniform(), name="AggreVaTe", filter_unsubmitted=filter_unsubmitted
    )


RECIPES: dict[str, Callable[..., Recipe]] = {
    "sft": SFT,
    "grpo": GRPO,
    "opd": OPD,
    "dagger": DAgger,
    "aggrevate": AggreVaTe,
}


def get_recipe(name: str, **kwargs: Any) -> Recipe:
    """A named recipe by case-insensitive name (for configs and the CLI)."""
    try:
        factory = RECIPES[name.lower()]
    except KeyError:
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None
    return factory(**kwargs)

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
from unipost.objective.needs import Need, needs_of
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
            this for DAgger, AggreVaTe and OPD): ``keep()`` says which to drop before packing, and
            ``loss_weights`` zeroes them as well, so the gradient is right even if nobody dropped them.
        normalization: how the trainer normalises sum_t w_t * (-log p_t); one of
            ``unipost.kernels.loss.Normalization`` (token_mean, sequence_mean, sum, constant).
    """

    rollout: RolloutProtocol
    labels: LabelSource
    score: Score = Uniform()  # noqa: RUF009 - frozen and immutable, safe as a default
    regularizer: Regularizer | None = None
    _: KW_ONLY
    name: str | None = None
    filter_unsubmitted: bool = False
    normalization: Normalization = "token_mean"

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
        """Whether a finished trajectory enters the batch (App. F.2's valid-submission filter)."""
        return not self.filter_unsubmitted or bool(trajectory.outcome.submitted)

    def select_labels(self, trajectory: Trajectory):
        """The label source's transitions for a kept trajectory; [] for a filtered one."""
        return self.labels.select(trajectory) if self.keep(trajectory) else []

    def loss_weights(self, inputs: ScoreInputs) -> Tensor:
        """weights_L: the score, times 1[submitted] when ``filter_unsubmitted`` (detached)."""
        w = self.score(inputs)
        if self.filter_unsubmitted:
            w = w * inputs.per_token(inputs.submitted_B.to(torch.bool).to(w.dtype))
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
        if self.filter_unsubmitted:
            extras.insert(0, "drop unsubmitted")
        reg = repr(self.regularizer) if self.regularizer is not None else "none"
        return (
            f"{self.display_name}: context {self.rollout!r} / labels {self.labels!r} / score {self.score!r} "
            f"/ reg {reg} ({', '.join(extras)})"
        )

    def __repr__(self) -> str:
        return (
            f"Recipe({self.rollout!r}, {self.labels!r}, {self.score!r}, {self.regularizer!r}, "
            f"name={self.name!r}, filter_unsubmitted={self.filter_unsubmitted}, "
            f"normalization={self.normalization!r})"
        )


_TEACHER_NEEDS = frozenset({Need.TEACHER_ACTIONS, Need.TEACHER_LOGPROBS})


def _fmt_needs(needs: frozenset[Need]) -> str:
    return ", ".join(sorted(n.value for n in needs))


def _score_name(score: object) -> str:
    return type(score).__name__ if not isinstance(score, type) else score.__name__


# ---------------------------------------------------------------------------------------------------
# Named recipes: the paper's methods (Table 2, App. F) as one-line compositions.


def SFT(rejection_sampling: bool = True, *, data: str | None = None) -> Recipe:
    """Behaviour cloning on teacher trajectories; with rejection sampling only resolved ones (App. F.2).

    ``data``: a stored JSONL of teacher trajectories (OfflineData) instead of fresh teacher rollouts.
    """
    rollout = OfflineData(data) if data is not None else TeacherRollout()
    score = SuccessFilter() if rejection_sampling else Uniform()
    return Recipe(rollout, TeacherLabels(), score, name="SFT")


def GRPO(group_size: int = 8, *, kl_coef: float = 0.0, normalize_std: bool = True) -> Recipe:
    """Group-relative policy gradient on the student's own rollouts, ``group_size`` samples per task.

    ``kl_coef > 0`` adds GRPO's k3 KL to a frozen reference; 0 (no reference model) is the common
    modern default. The paper's GRPO baseline follows SkyRL-v0 (App. F.2).
    """
    reg = KLToReference(kl_coef) if kl_coef > 0 else None
    return Recipe(
        StudentRollout(group_size=group_size),
        OwnSamples(),
        GroupAdvantage(normalize_std=normalize_std),
        reg,
        name="GRPO",
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

    Paper defaults: beta_i = max(0.2, 1.0 - 0.1 i) and trajectories without a valid submission dropped
    (App. F). The paper trains on each iteration's fresh batch (no aggregation across iterations).
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

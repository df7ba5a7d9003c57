"""Held-out evaluation: greedy student rollouts -> resolve rate, submission rate, Table-4 failure modes.

The paper evaluates every method the same way (§4, Table 4): the student alone, greedy decoding, on
held-out instances, and reports the resolve rate, whether a patch was submitted, and why the episode
failed. Failure modes come in two blocks, and (as in the paper) each block's fractions are *of that
block*: "submitted but unresolved" (wrong solution / wrong file / syntax or runtime error) sums to 1
over the submitted-and-unresolved episodes, "no submission" (tool-use error / repetitive loop /
context overflow / budget exhaustion / no edit) over the unsubmitted ones. Reading a block as a share
of all episodes would hide that, e.g., SFT's 2.4% unsubmitted episodes are mostly context overflows.

Tool-use errors are broken down by kind (``unipost.data.TOOL_ERROR_KINDS``: unparseable call, unknown
tool, invalid arguments, truncated at max_new_tokens, tool-reported failure, other), each a fraction of
all turns, so "80% tool errors" says whether the student cannot write the format, runs out of tokens,
or writes good calls against a world it misreads, without anyone reading its trajectories. The kind is
the one recorded on each turn where the error was detected (parser, engine, environment).

Held-out sets are small (tens to hundreds of tasks), so the resolve rate comes with a Wilson 95%
interval: two methods whose intervals overlap widely have not been told apart.

Evaluation runs through the same :class:`~unipost.rollout.engine.RolloutEngine` as training, with the
protocol overridden to :class:`~unipost.objective.StudentRollout` and no teacher, so the budgets,
tool-error handling and verification are exactly those the student trains under.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from unipost.data import FAILURE_MODES, TOOL_ERROR_KINDS, Trajectory
from unipost.envs.base import Environment
from unipost.objective import OwnSamples, Recipe, StudentRollout
from unipost.rollout.engine import CountTokens, RolloutBatch, RolloutEngine
from unipost.rollout.policy import Policy
from unipost.rollout.stats import RolloutStats

SUBMITTED_UNRESOLVED_MODES: tuple[str, ...] = FAILURE_MODES[:3]
"""Paper Table 4, left block: a patch was submitted but the hidden tests fail."""
NO_SUBMISSION_MODES: tuple[str, ...] = FAILURE_MODES[3:]
"""Paper Table 4, right block: the episode ended without a submission."""
OTHER = "other"  # an unresolved episode whose failure mode is missing or belongs to the other block

Z95 = 1.959963984540054  # two-sided 95% standard normal quantile


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (default 95%).

    Chosen over the normal (Wald) interval because it stays inside [0, 1] and keeps its coverage at
    0/n and n/n, which is exactly where small held-out sets of weak or strong students land.
    ``n == 0`` gives the uninformative (0, 1).
    """
    for name, value in (("successes", successes), ("n", n)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if successes > n:
        raise ValueError(f"successes ({successes}) cannot exceed n ({n})")
    if not z > 0:
        raise ValueError(f"z must be positive, got {z!r}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _tool_error_fractions(trajectories: Sequence[Trajectory], turns: int) -> dict[str, float]:
    """Per kind in ``TOOL_ERROR_KINDS``: tool-error turns of that kind / all turns (sums to the tool-error
    rate). A tool-error turn without a recorded kind (stored before kinds were) counts as "other"."""
    counts = dict.fromkeys(TOOL_ERROR_KINDS, 0)
    for t in trajectories:
        for turn in t.turns:
            if turn.tool_error:
                kind = turn.tool_error_kind
                counts[kind if kind in counts else "other"] += 1
    return {k: (v / turns if turns else 0.0) for k, v in counts.items()}


def _block_fractions(modes: Sequence[str | None], allowed: tuple[str, ...]) -> tuple[dict[str, float], int]:
    """Fractions of ``allowed`` modes among ``modes`` (0.0 each for an empty block), and the 'other' count."""
    counts = dict.fromkeys(allowed, 0)
    other = 0
    for mode in modes:
        if mode in counts:
            counts[mode] += 1
        else:
            other += 1
    n = len(modes)
    return {k: (v / n if n else 0.0) for k, v in counts.items()}, other


@dataclass
class EvalResult:
    """Held-out metrics of one student, in the layout of paper Table 4.

    ``submitted_unresolved_modes`` are fractions of the ``submitted_unresolved`` episodes,
    ``no_submission_modes`` fractions of the ``no_submission`` episodes (0.0 everywhere when that block
    is empty; check its count). Unresolved episodes whose failure mode is missing or belongs to the other
    block (an environment that does not classify, a crashed environment) are counted in
    ``*_other`` so that each block's fractions plus its other-share sum to 1.
    """

    n: int
    resolved: int
    submitted: int
    resolve_rate: float
    resolve_ci: tuple[float, float]  # Wilson 95%
    submission_rate: float
    submitted_unresolved: int  # size of the left block
    no_submission: int  # size of the right block
    submitted_unresolved_modes: dict[str, float]
    no_submission_modes: dict[str, float]
    submitted_unresolved_other: int = 0
    no_submission_other: int = 0
    mean_turns: float = 0.0
    tool_error_rate: float = 0.0  # per executed turn
    # per TOOL_ERROR_KINDS kind: fraction of all executed turns (the values sum to tool_error_rate)
    tool_errors: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TOOL_ERROR_KINDS, 0.0))
    env_errors: int = 0
    expert_agreement: float | None = None  # student turns whose tool call equals the expert's label
    expert_prefix: float | None = None  # mean turns the student follows the expert before a first deviation
    iteration: int = 0
    stats: RolloutStats | None = None
    trajectories: list[Trajectory] = field(default_factory=list, repr=False)

    @classmethod
    def from_trajectories(
        cls,
        trajectories: Sequence[Trajectory],
        *,
        stats: RolloutStats | None = None,
        iteration: int = 0,
    ) -> EvalResult:
        """Metrics of finished (greedy, student-only) trajectories; usable on any stored eval run."""
        trajectories = list(trajectories)
        n = len(trajectories)
        outcomes = [t.outcome for t in trajectories]
        resolved = sum(o.resolved for o in outcomes)
        submitted = sum(o.submitted for o in outcomes)
        left = [o.failure_mode for o in outcomes if o.submitted and not o.resolved]
        right = [o.failure_mode for o in outcomes if not o.submitted]
        left_frac, left_other = _block_fractions(left, SUBMITTED_UNRESOLVED_MODES)
        right_frac, right_other = _block_fractions(right, NO_SUBMISSION_MODES)
        turns = sum(len(t.turns) for t in trajectories)
        tool_errors = sum(turn.tool_error for t in trajectories for turn in t.turns)
        return cls(
            n=n,
            resolved=resolved,
            submitted=submitted,
            resolve_rate=resolved / n if n else 0.0,
            resolve_ci=wilson_interval(resolved, n),
            submission_rate=submitted / n if n else 0.0,
            submitted_unresolved=len(left),
            no_submission=len(right),
            submitted_unresolved_modes=left_frac,
            no_submission_modes=right_frac,
            submitted_unresolved_other=left_other,
            no_submission_other=right_other,
            mean_turns=turns / n if n else 0.0,
            tool_error_rate=tool_errors / turns if turns else 0.0,
            tool_errors=_tool_error_fractions(trajectories, turns),
            env_errors=sum(bool(t.meta.get("env_error")) for t in trajectories),
            **_expert_agreement(trajectories),
            iteration=iteration,
            stats=stats,
            trajectories=trajectories,
        )

    @property
    def failure_modes(self) -> dict[str, float]:
        """All eight Table-4 fractions (each relative to its own block), in ``FAILURE_MODES`` order."""
        return {**self.submitted_unresolved_modes, **self.no_submission_modes}

    def to_dict(self, prefix: str = "eval/") -> dict[str, float]:
        """Flat ``name -> float`` for metric loggers (JSONL, TensorBoard): no nesting, no trajectories."""
        out = {
            "n": float(self.n),
            "resolve_rate": self.resolve_rate,
            "resolve_ci_low": self.resolve_ci[0],
            "resolve_ci_high": self.resolve_ci[1],
            "submission_rate": self.submission_rate,
            "no_submission_rate": 1.0 - self.submission_rate if self.n else 0.0,
            "submitted_unresolved": float(self.submitted_unresolved),
            "no_submission": float(self.no_submission),
            "mean_turns": self.mean_turns,
            "tool_error_rate": self.tool_error_rate,
            "env_errors": float(self.env_errors),
        }
        out.update({f"failure/{mode}": frac for mode, frac in self.failure_modes.items()})
        out.update({f"tool_errors/{kind}": frac for kind, frac in self.tool_errors.items()})
        if self.expert_agreement is not None:
            out["expert_agreement"] = self.expert_agreement
            out["expert_prefix"] = float(self.expert_prefix or 0.0)
        return {f"{prefix}{k}": float(v) for k, v in out.items()}

    def top_tool_errors(self, k: int = 3) -> list[tuple[str, float]]:
        """The ``k`` most frequent tool-error kinds (fraction of turns), most frequent first (ties in
        ``TOOL_ERROR_KINDS`` order); kinds that never occurred are left out."""
        ranked = sorted(self.tool_errors.items(), key=lambda kv: -kv[1])  # stable: ties keep kind order
        return [(kind, frac) for kind, frac in ranked[:k] if frac > 0]

    def summary(self, name: str | None = None) -> str:
        """One line for logs: resolve rate with its interval, submission rate, turns, tool errors with
        their top kinds, top failure mode."""
        lo, hi = self.resolve_ci
        counts = {m: f * self.submitted_unresolved for m, f in self.submitted_unresolved_modes.items()}
        counts.update({m: f * self.no_submission for m, f in self.no_submission_modes.items()})
        worst = max(counts.items(), key=lambda kv: kv[1], default=(None, 0.0))  # by episodes, not share
        top = f", top failure {worst[0]} ({round(worst[1])}/{self.n})" if worst[1] > 0 else ""
        head = f"{name}: " if name else ""
        kinds = ", ".join(f"{kind} {frac:.1%}" for kind, frac in self.top_tool_errors())
        return (
            f"{head}resolve {self.resolve_rate:.1%} [{lo:.1%}, {hi:.1%}] (n={self.n}), "
            f"submit {self.submission_rate:.1%}, {self.mean_turns:.1f} turns, "
            f"tool errors {self.tool_error_rate:.1%}/turn{f' ({kinds})' if kinds else ''}{top}"
        )


def _same_call(action: dict, label: dict) -> bool:
    """The executed action makes the expert's tool call (name and JSON arguments); prose is ignored."""
    from unipost.data import canonical_call

    calls = [canonical_call(c) for c in action.get("tool_calls") or []]
    wanted = [canonical_call(c) for c in label.get("tool_calls") or []]
    return bool(wanted) and calls == wanted


def _expert_agreement(trajectories: Sequence[Trajectory]) -> dict[str, float | None]:
    """Secondary, continuous metrics on student-visited states labelled by an expert (None without labels).

    Resolve rates of tiny students sit at 0 for a long time; agreement with the expert's next tool call on
    the states the student itself reaches moves long before, and the prefix (turns followed before the
    first deviation) measures how far into a long episode the student gets before covariate shift starts.
    """
    labelled = [[turn for turn in t.turns if turn.label is not None] for t in trajectories]
    turns = [turn for ts in labelled for turn in ts]
    if not turns:
        return {"expert_agreement": None, "expert_prefix": None}
    agree = [_same_call(turn.action, turn.label) for turn in turns]
    prefixes = []
    for ts in labelled:
        k = 0
        while k < len(ts) and _same_call(ts[k].action, ts[k].label):
            k += 1
        prefixes.append(k)
    return {"expert_agreement": sum(agree) / len(agree), "expert_prefix": sum(prefixes) / len(prefixes)}


def student_rollouts(
    env_factory: Callable[[Any], Environment],
    student: Policy,
    tasks: Sequence[Any],
    *,
    caller: str,
    purpose: str,
    greedy: bool,
    max_turns: int,
    context_budget: int | None = None,
    count_tokens: CountTokens | None = None,
    concurrency: int = 8,
    seed: int = 0,
    progress: bool = False,
    iteration: int = 0,
    expert: Policy | None = None,
) -> RolloutBatch:
    """One episode per task of ``student`` acting alone: the engine set-up every evaluation shares.

    Held-out evaluation (greedy) and the KL diagnostic's state collection (sampled) differ only in
    ``greedy`` and in an optional ``expert`` queried (never executed) at each student state, so both
    build their engine here: an eval-only recipe (no teacher executes, nothing trains), the
    ``StudentRollout`` protocol with one episode per task, the training run's budgets. ``caller``
    names the public function in error messages; ``purpose`` is the eval-only recipe's name, recorded
    in each trajectory's ``meta["recipe"]``.
    """
    if student is None:
        raise ValueError(f"{caller} needs a student policy, got None")
    if isinstance(tasks, (str, bytes)) or not hasattr(tasks, "__iter__"):
        raise TypeError(
            f"tasks must be a sequence of env_factory arguments (one per episode), got {tasks!r:.80}"
        )
    tasks = list(tasks)
    if not tasks:
        raise ValueError(f"{caller} needs at least one (held-out) task; got an empty task list")
    engine = RolloutEngine(
        env_factory,
        student=student,
        teacher=expert,
        recipe=Recipe(StudentRollout(), OwnSamples(), name=purpose),
        max_turns=max_turns,
        context_budget=context_budget,
        count_tokens=count_tokens,
        concurrency=concurrency,
        seed=seed,
        progress=progress,
    )
    protocol = StudentRollout(group_size=1)
    return engine.collect(
        tasks, iteration, greedy=greedy, protocol_override=protocol, teacher_labels=expert is not None
    )


def evaluate_policy(
    env_factory: Callable[[Any], Environment],
    student: Policy,
    tasks: Sequence[Any],
    *,
    max_turns: int,
    context_budget: int | None = None,
    count_tokens: CountTokens | None = None,
    concurrency: int = 8,
    seed: int = 0,
    progress: bool = False,
    iteration: int = 0,
    expert: Policy | None = None,
) -> EvalResult:
    """Run ``student`` alone with greedy decoding on held-out ``tasks`` and summarise (paper Table 4).

    Args:
        env_factory: ``task -> Environment`` (e.g. ``lambda t: EmbeddedEnv.from_split(*t)``).
        student: the policy to evaluate; ``act(..., greedy=True)`` is called.
        tasks: held-out tasks, one episode each.
        max_turns, context_budget, count_tokens: the same budgets as training (budget endings become
            the ``budget_exhaustion`` / ``context_overflow`` failure modes).
        concurrency: episodes in flight (the student's generation batch size).
        seed: engine seed (greedy rollouts of deterministic policies do not depend on it).
        progress: show a rich progress bar.
        iteration: the training iteration being evaluated, recorded in the result and trajectories.
        expert: optional labeller queried (never executed) at every student state, for the secondary
            ``expert_agreement`` / ``expert_prefix`` metrics; the student's rollouts do not change.
    """
    batch = student_rollouts(
        env_factory,
        student,
        tasks,
        caller="evaluate_policy",
        purpose="eval",
        greedy=True,
        max_turns=max_turns,
        context_budget=context_budget,
        count_tokens=count_tokens,
        concurrency=concurrency,
        seed=seed,
        progress=progress,
        iteration=iteration,
        expert=expert,
    )
    return EvalResult.from_trajectories(batch.trajectories, stats=batch.stats, iteration=iteration)

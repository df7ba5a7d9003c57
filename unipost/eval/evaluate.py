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
interval. That interval describes one student; two students evaluated on the same tasks are compared
*paired* (:func:`unipost.eval.paired.paired_comparison`: paired difference, bootstrap interval over
tasks, exact McNemar), for which every evaluation keeps its per-task outcomes
(:meth:`EvalResult.episode_records`, saved by :func:`save_eval_outcomes`).

Mechanism metrics say *how* an episode fails, beyond the Table-4 verdict: when the first tool error
comes (``first_tool_error_turn``, 1 = the first turn), how many episodes have one
(``episodes_with_tool_error``), how many of those still resolve (``recovery_rate``), and whether errors
cascade (``tool_error_rate_after_first``: tool errors per turn after an episode's first one;
``tool_error_after_error``: the chance that the turn right after a tool error is one too). A student that
trains on its own mistakes (DAgger) should recover more and cascade less than one that only saw the
expert's clean states (SFT), even before its resolve rate moves.

Evaluation runs through the same :class:`~unipost.rollout.engine.RolloutEngine` as training, with the
protocol overridden to :class:`~unipost.objective.StudentRollout` and no teacher, so the budgets,
tool-error handling and verification are exactly those the student trains under.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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


def mechanism_metrics(episodes: Sequence[tuple[Sequence[bool], bool]]) -> dict[str, float | None]:
    """Tool-error mechanism metrics from ``(tool error per turn, resolved)`` per episode.

    Returns (None where the denominator is empty, so "no episode erred" never reads as "0% recover"):

    * ``first_tool_error_turn``: mean 1-based turn of the first tool error, over episodes with one;
    * ``episodes_with_tool_error``: share of episodes with at least one tool error (0.0 for none);
    * ``recovery_rate``: share of the episodes with a tool error that still resolve (a verdict comes
      at the end, so every such resolution comes after the first error);
    * ``tool_error_rate_after_first``: tool-error turns / turns, over the turns *after* each episode's
      first tool error (pooled over episodes);
    * ``tool_error_after_error``: over consecutive turn pairs whose first turn is a tool error, the
      share whose second is one too (pooled).

    A pure function of stored per-turn flags, so stored evaluations (``episode_records``) give the same
    numbers as the live ones.
    """
    first: list[int] = []
    recovered = after_turns = after_errors = pairs = repeats = 0
    for flags, resolved in episodes:
        flags = [bool(f) for f in flags]
        if True not in flags:
            continue
        k = flags.index(True)
        first.append(k + 1)
        recovered += bool(resolved)
        after_turns += len(flags) - k - 1
        after_errors += sum(flags[k + 1 :])
        for now, nxt in itertools.pairwise(flags):
            if now:
                pairs += 1
                repeats += nxt
    n = len(episodes)
    return {
        "first_tool_error_turn": sum(first) / len(first) if first else None,
        "episodes_with_tool_error": len(first) / n if n else 0.0,
        "recovery_rate": recovered / len(first) if first else None,
        "tool_error_rate_after_first": after_errors / after_turns if after_turns else None,
        "tool_error_after_error": repeats / pairs if pairs else None,
    }


MECHANISM_KEYS: tuple[str, ...] = (
    "first_tool_error_turn",
    "episodes_with_tool_error",
    "recovery_rate",
    "tool_error_rate_after_first",
    "tool_error_after_error",
)
"""The mechanism metrics' names (``eval/<name>`` in the metrics history), see :func:`mechanism_metrics`."""


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
    # mechanism metrics (see mechanism_metrics): None where no episode had a tool error
    first_tool_error_turn: float | None = None  # 1-based, mean over episodes with a tool error
    episodes_with_tool_error: float = 0.0  # share of all episodes
    recovery_rate: float | None = None  # resolved share of the episodes with a tool error
    tool_error_rate_after_first: float | None = None  # per turn, after each episode's first tool error
    tool_error_after_error: float | None = None  # P(next turn is a tool error | this turn is one)
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
            **mechanism_metrics(
                [([turn.tool_error for turn in t.turns], t.outcome.resolved) for t in trajectories]
            ),
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
        for key in MECHANISM_KEYS:  # undefined ones (no tool error at all) are left out, not logged as 0
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return {f"{prefix}{k}": float(v) for k, v in out.items()}

    def episode_records(self) -> list[dict[str, Any]]:
        """Per episode, what a later paired comparison or mechanism analysis needs (no messages):
        task id, resolved, submitted, failure mode, turns, and the 0-based turns with a tool error."""
        return [
            {
                "task_id": t.task_id,
                "resolved": bool(t.outcome.resolved),
                "submitted": bool(t.outcome.submitted),
                "failure_mode": t.outcome.failure_mode,
                "turns": len(t.turns),
                "tool_error_turns": [i for i, u in enumerate(t.turns) if u.tool_error],
            }
            for t in self.trajectories
        ]

    def task_outcomes(self) -> dict[str, bool | tuple[bool, ...]]:
        """``task id -> resolved`` (a tuple when a task was evaluated more than once), the input of
        :func:`unipost.eval.paired.paired_comparison`."""
        return outcomes_by_task(self.episode_records())

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


# -- per-task outcomes on disk -------------------------------------------------------------------------

EVAL_OUTCOMES_DIR = "eval"
"""The folder of a run directory holding one ``step_<step>.json`` per held-out evaluation."""
_STEP_FILE = re.compile(r"^step_(\d+)\.json$")
_FORMAT = 1


def outcomes_by_task(records: Sequence[Mapping[str, Any]]) -> dict[str, bool | tuple[bool, ...]]:
    """``task id -> resolved`` from episode records; a task evaluated several times maps to a tuple (in
    record order), which :func:`~unipost.eval.paired.paired_comparison` pairs position by position."""
    seen: dict[str, list[bool]] = {}
    for r in records:
        seen.setdefault(str(r["task_id"]), []).append(bool(r["resolved"]))
    return {k: v[0] if len(v) == 1 else tuple(v) for k, v in seen.items()}


def save_eval_outcomes(
    directory: str | os.PathLike[str],
    step: int,
    result: EvalResult,
    metrics: Mapping[str, float] | None = None,
) -> Path:
    """Write one evaluation's per-episode records (and its logged metrics) to
    ``directory/step_<step>.json``, atomically (tmp + rename), so that runs can be compared task by task
    afterwards (``unipost compare``). ``metrics`` defaults to ``result.to_dict()``; pass the full logged
    dict to keep extra diagnostics (reverse KL) beside the outcomes.
    """
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    blob = {
        "format": _FORMAT,
        "step": int(step),
        "iteration": result.iteration,
        "n": result.n,
        "metrics": dict(metrics if metrics is not None else result.to_dict()),
        "episodes": result.episode_records(),
    }
    path = folder / f"step_{int(step):06d}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(blob))
    tmp.replace(path)
    return path


def eval_outcome_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps with a saved evaluation in ``directory``, ascending ([] for a missing folder)."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _STEP_FILE.match(p.name)))


def prune_eval_outcomes(directory: str | os.PathLike[str], after_step: int = -1) -> None:
    """Delete the saved evaluations with ``step > after_step`` (all by default): a fresh run must not
    inherit a previous run's files, and a resumed one drops those of the iteration it repeats, exactly
    as the metrics file is truncated."""
    for step in eval_outcome_steps(directory):
        if step > after_step:
            (Path(directory) / f"step_{step:06d}.json").unlink(missing_ok=True)


@dataclass(frozen=True)
class SavedEval:
    """One saved held-out evaluation: its step, the logged metrics and the per-episode records."""

    path: Path
    step: int
    metrics: dict[str, float]
    episodes: list[dict[str, Any]]

    def task_outcomes(self) -> dict[str, bool | tuple[bool, ...]]:
        """``task id -> resolved`` (see :func:`outcomes_by_task`)."""
        return outcomes_by_task(self.episodes)

    def mechanism(self) -> dict[str, float | None]:
        """:func:`mechanism_metrics` recomputed from the stored per-turn error flags."""
        episodes = []
        for r in self.episodes:
            flags = [False] * int(r["turns"])
            for i in r["tool_error_turns"]:
                flags[i] = True
            episodes.append((flags, bool(r["resolved"])))
        return mechanism_metrics(episodes)


def load_eval_outcomes(directory: str | os.PathLike[str], step: int | None = None) -> SavedEval:
    """The saved evaluation of ``step`` (default: the latest) in ``directory`` (a run's ``eval/``).

    Raises FileNotFoundError naming what exists when there is none, so a caller (the CLI) can say it
    in one line.
    """
    folder = Path(directory)
    steps = eval_outcome_steps(folder)
    if not steps:
        raise FileNotFoundError(
            f"{folder} holds no saved held-out evaluation (step_<n>.json): the run was evaluated before "
            "per-task outcomes were saved, or never; evaluate it again (unipost eval RUN)"
        )
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"{folder} has no evaluation at step {step}; it has steps {steps}")
    path = folder / f"step_{step:06d}.json"
    blob = json.loads(path.read_text())
    if blob.get("format") != _FORMAT:
        raise ValueError(f"{path}: unknown outcomes format {blob.get('format')!r} (expected {_FORMAT})")
    return SavedEval(path=path, step=int(blob["step"]), metrics=blob["metrics"], episodes=blob["episodes"])

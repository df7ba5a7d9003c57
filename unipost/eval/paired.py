"""Paired comparison of two students evaluated on the SAME held-out tasks.

Why paired: two students greedy-evaluated on one task set are not two independent samples. Most tasks
are solved by both or by neither; only the *discordant* tasks (one resolves, the other does not) carry
information about which is better. Comparing two Wilson intervals, or Newcombe's unpaired interval of
the difference, throws that pairing away and is far too wide: DAgger 31/100 vs its warm start 43/100
look compatible unpaired ([-0.25, +0.01]), yet DAgger gained 3 tasks and lost 15, a paired difference of
-0.12 [-0.20, -0.04] with exact McNemar p = 0.008, a real regression.

What :func:`paired_comparison` reports, for ``A - B`` (B is the reference, e.g. the warm start):

* ``diff``: resolve rate of A minus that of B over all pairs;
* ``ci_low, ci_high``: a 95% percentile bootstrap interval that resamples *tasks* (a cluster bootstrap);
* ``p_mcnemar``: the exact two-sided McNemar test, a binomial(gained + lost, 1/2) test on the
  discordant pairs (no chi-square approximation: held-out sets give tens of discordant pairs at most);
* ``gained`` / ``lost``: pairs A resolves and B does not / B resolves and A does not.

Seeds: a task may carry one outcome per seed (``{task: [seed0, seed1, ...]}``, the k-th outcome of A
paired with the k-th of B: same seed, same warm start, same draws). The bootstrap resamples tasks and
keeps each task's per-seed outcomes together, rather than resampling (task, seed) pairs as if they were
independent: a task that is hard for one seed's student is hard for the others', so treating
3 seeds x 50 tasks as 150 independent pairs would shrink the interval by up to sqrt(3) exactly when the
outcomes are task-determined. Resampling seeds instead is meaningless with the 2-3 seeds we can afford.
What the interval does not cover: the training randomness of each seed's student is held fixed (each
seed's trained model is one draw); the interval is over the task population. McNemar's exact p treats
every pair as independent, which is exact with one outcome per task and anti-conservative when tasks
carry several correlated seeds (read the interval first then).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

Outcomes = Mapping[Hashable, "bool | Sequence[bool]"]
"""``task id -> resolved`` (one evaluation) or ``task id -> [resolved per seed]`` (pooled over seeds)."""

DEFAULT_RESAMPLES = 10_000


class TaskSetMismatchError(ValueError):
    """The two students were not evaluated on the same tasks (or seeds), so they cannot be paired."""


def mcnemar_exact(gained: int, lost: int) -> float:
    """Exact two-sided McNemar p-value: ``P(|X - m/2| >= |gained - m/2|)`` for ``X ~ Binomial(m, 1/2)``,
    ``m = gained + lost`` discordant pairs.

    Computed as ``min(1, 2 * P(X <= min(gained, lost)))`` in exact integer arithmetic (the binomial is
    symmetric, so doubling one tail is the two-sided test); no scipy needed. No discordant pair: 1.0.
    """
    for name, value in (("gained", gained), ("lost", lost)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    m = int(gained) + int(lost)
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(int(gained), int(lost)) + 1))
    return min(1.0, tail / 2 ** (m - 1))  # 2 * tail / 2**m; int / int is correctly rounded


@dataclass(frozen=True)
class PairedComparison:
    """A minus B on the same tasks: the paired difference in resolve rate, its interval, McNemar, counts.

    ``n`` counts pairs (tasks x seeds), ``tasks`` the resampled clusters. ``task_diffs`` holds each task's
    own difference (mean over its seeds of A - B: +1 gained, -1 lost, 0 concordant with one seed), for
    per-task plots.
    """

    diff: float
    ci_low: float
    ci_high: float
    p_mcnemar: float
    gained: int
    lost: int
    n: int
    tasks: int
    rate_a: float
    rate_b: float
    confidence: float = 0.95
    resamples: int = DEFAULT_RESAMPLES
    task_diffs: dict[Hashable, float] = field(default_factory=dict, repr=False, compare=False)

    @property
    def significant(self) -> bool:
        """The interval excludes 0 (A and B told apart at the interval's confidence)."""
        return self.ci_low > 0 or self.ci_high < 0

    def verdict(self) -> str:
        """``"A better"`` / ``"A worse"`` when the interval excludes 0, else ``"inconclusive"``."""
        return "A better" if self.ci_low > 0 else "A worse" if self.ci_high < 0 else "inconclusive"

    def summary(self, name_a: str = "A", name_b: str = "B") -> str:
        """One line: ``DAgger - warm start: -0.120 [-0.200, -0.040], McNemar p=0.0075, +3/-15 of 100``."""
        return (
            f"{name_a} - {name_b}: {self.diff:+.3f} [{self.ci_low:+.3f}, {self.ci_high:+.3f}] "
            f"(paired, {self.confidence:.0%}), McNemar p={self.p_mcnemar:.2g}, "
            f"gained {self.gained} / lost {self.lost} of {self.n}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready numbers (no per-task detail)."""
        return {
            "diff": self.diff,
            "ci": [self.ci_low, self.ci_high],
            "p_mcnemar": self.p_mcnemar,
            "gained": self.gained,
            "lost": self.lost,
            "n": self.n,
            "tasks": self.tasks,
            "rate_a": self.rate_a,
            "rate_b": self.rate_b,
            "confidence": self.confidence,
        }


def _as_outcomes(value: Any, task: Hashable, side: str) -> list[bool]:
    """One task's outcomes as a list of bools (a bare bool is one seed)."""

    def one(x: Any) -> bool:
        if isinstance(x, (bool, np.bool_)):
            return bool(x)
        if isinstance(x, (int, np.integer)) and x in (0, 1):
            return bool(x)
        raise TypeError(f"outcomes_{side}[{task!r}]: expected a bool (resolved) or a list of them, got {x!r}")

    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray)):
        return [one(value)]
    out = [one(x) for x in value]
    if not out:
        raise ValueError(f"outcomes_{side}[{task!r}] is empty: give at least one outcome per task")
    return out


def _describe(keys: set, limit: int = 5) -> str:
    shown = sorted(map(repr, keys))[:limit]
    return ", ".join(shown) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def paired_comparison(
    outcomes_a: Outcomes,
    outcomes_b: Outcomes,
    *,
    confidence: float = 0.95,
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> PairedComparison:
    """Compare student A with student B on the same tasks (A - B; B is the reference).

    Args:
        outcomes_a, outcomes_b: ``task id -> resolved`` or ``task id -> [resolved per seed]``; both must
            hold the same task ids and, per task, the same number of seeds (seed k of A is paired with
            seed k of B). Raises :class:`TaskSetMismatchError` naming the difference otherwise.
        confidence: of the bootstrap interval (percentile method).
        resamples: bootstrap resamples of the task set.
        seed: the bootstrap's generator seed: the same outcomes always give the same interval.

    The point estimate is the pooled difference ``(gained - lost) / n``; each bootstrap replicate draws
    ``tasks`` tasks with replacement and recomputes it from their pairs (a ratio of sums, so tasks with
    more seeds weigh more, as they do in the point estimate). See the module docstring for why tasks,
    not (task, seed) pairs, are resampled.
    """
    if not isinstance(outcomes_a, Mapping) or not isinstance(outcomes_b, Mapping):
        raise TypeError("paired_comparison takes two {task id: resolved} mappings")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if isinstance(resamples, bool) or not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be a positive integer, got {resamples!r}")
    keys_a, keys_b = set(outcomes_a), set(outcomes_b)
    if keys_a != keys_b:
        only_a, only_b = keys_a - keys_b, keys_b - keys_a
        parts = [f"{len(only_a)} only in A ({_describe(only_a)})"] if only_a else []
        parts += [f"{len(only_b)} only in B ({_describe(only_b)})"] if only_b else []
        raise TaskSetMismatchError(
            f"the two evaluations are on different task sets ({len(keys_a)} vs {len(keys_b)} tasks; "
            f"{'; '.join(parts)}): a paired comparison needs both students on the same tasks"
        )
    if not keys_a:
        raise ValueError("paired_comparison needs at least one task; both mappings are empty")
    tasks = list(outcomes_a)  # A's order: reproducible for a given input
    diff_sum_K = np.empty(len(tasks))  # per task: sum over its seeds of a - b, in {-s..s}
    size_K = np.empty(len(tasks))
    gained = lost = resolved_a = resolved_b = 0
    task_diffs: dict[Hashable, float] = {}
    for k, task in enumerate(tasks):
        a = _as_outcomes(outcomes_a[task], task, "a")
        b = _as_outcomes(outcomes_b[task], task, "b")
        if len(a) != len(b):
            raise TaskSetMismatchError(
                f"task {task!r}: A has {len(a)} outcome(s) (seeds), B has {len(b)}; seed k of A is "
                "paired with seed k of B, so both need the same seeds"
            )
        g = sum(x and not y for x, y in zip(a, b, strict=True))
        lo = sum(y and not x for x, y in zip(a, b, strict=True))
        gained, lost = gained + g, lost + lo
        resolved_a, resolved_b = resolved_a + sum(a), resolved_b + sum(b)
        diff_sum_K[k], size_K[k] = g - lo, len(a)
        task_diffs[task] = (g - lo) / len(a)
    n = int(size_K.sum())
    low, high = _bootstrap_interval(diff_sum_K, size_K, confidence, resamples, seed)
    diff = (gained - lost) / n
    return PairedComparison(
        diff=diff,
        ci_low=low,
        ci_high=high,
        p_mcnemar=mcnemar_exact(gained, lost),
        gained=gained,
        lost=lost,
        n=n,
        tasks=len(tasks),
        rate_a=resolved_a / n,
        rate_b=resolved_b / n,
        confidence=confidence,
        resamples=resamples,
        task_diffs=task_diffs,
    )


def _bootstrap_interval(
    diff_sum_K: np.ndarray, size_K: np.ndarray, confidence: float, resamples: int, seed: int
) -> tuple[float, float]:
    """Percentile interval of sum(diff) / sum(size) over tasks drawn with replacement (chunked so that a
    large task set never holds more than ~4M indices at once)."""
    rng = np.random.default_rng(seed)
    n_tasks = len(diff_sum_K)
    chunk = max(1, 4_000_000 // n_tasks)
    stats: list[np.ndarray] = []
    done = 0
    while done < resamples:
        rows = min(chunk, resamples - done)
        pick_RK = rng.integers(0, n_tasks, size=(rows, n_tasks))
        stats.append(diff_sum_K[pick_RK].sum(axis=1) / size_K[pick_RK].sum(axis=1))
        done += rows
    replicates = np.concatenate(stats)
    alpha = (1 - confidence) / 2
    low, high = np.quantile(replicates, [alpha, 1 - alpha])
    return float(low), float(high)

"""Paired comparison of two students on the same tasks (unipost.eval.paired).

What must hold: the exact McNemar p equals hand-computed binomial tails; the issue's DAgger vs warm start
example (3 gained, 15 lost of 100) gives -0.12 [-0.20, -0.04], p = 0.0075; identical students give 0 with
a [0, 0] interval; on a large sample the task bootstrap agrees with the normal approximation of the
paired difference; seeds are pooled with each task's outcomes kept together (a task-determined outcome
repeated over 3 seeds gives the 1-seed interval, not one sqrt(3) narrower); mismatched task sets are
refused with the mismatch named.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from rich.console import Console

from unipost.eval import (
    PairedComparison,
    TaskSetMismatchError,
    mcnemar_exact,
    paired_comparison,
    paired_table,
    plot_paired,
)


def students(both: int, only_a: int, only_b: int, neither: int) -> tuple[dict, dict]:
    """Two students' task -> resolved with the given concordant / discordant counts."""
    a, b = {}, {}
    pattern = [(True, True)] * both + [(True, False)] * only_a + [(False, True)] * only_b
    pattern += [(False, False)] * neither
    for i, (x, y) in enumerate(pattern):
        a[f"task-{i}"], b[f"task-{i}"] = x, y
    return a, b


@pytest.mark.parametrize(
    "gained, lost, p",
    [
        (3, 15, 2 * (1 + 18 + 153 + 816) / 2**18),  # 0.0075378..., the issue's DAgger vs warm start
        (15, 3, 2 * (1 + 18 + 153 + 816) / 2**18),  # two-sided: symmetric
        (0, 6, 2 / 2**6),
        (1, 9, 2 * (1 + 10) / 2**10),
        (5, 5, 1.0),  # 2 * P(X <= 5) > 1 for Bin(10, 1/2): capped
        (4, 6, 2 * (1 + 10 + 45 + 120 + 210) / 2**10),
        (0, 0, 1.0),  # no discordant pair: no evidence
    ],
)
def test_mcnemar_exact_matches_hand_computed_binomial_tails(gained, lost, p):
    assert mcnemar_exact(gained, lost) == pytest.approx(p, rel=1e-12)


def test_mcnemar_exact_stays_exact_for_many_pairs():
    """A normal approximation check at m = 400: z = (170 - 200) / 10 = -3 -> p ~ 0.0027 (exact ~0.0032)."""
    p = mcnemar_exact(170, 230)
    assert 0.0025 < p < 0.0040
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            mcnemar_exact(bad, 3)


def test_the_issues_regression_is_significant_when_paired():
    """DAgger 31/100 vs warm start 43/100: unpaired (Newcombe) [-0.25, +0.01] hid it; paired it is clear."""
    a, b = students(both=28, only_a=3, only_b=15, neither=54)
    c = paired_comparison(a, b)
    assert (c.gained, c.lost, c.n, c.tasks) == (3, 15, 100, 100)
    assert (c.rate_a, c.rate_b) == (0.31, 0.43) and c.diff == pytest.approx(-0.12)
    assert c.ci_low == pytest.approx(-0.20, abs=0.011) and c.ci_high == pytest.approx(-0.04, abs=0.011)
    assert c.p_mcnemar == pytest.approx(0.0075378, abs=1e-6)
    assert c.significant and c.verdict() == "A worse"
    assert "gained 3 / lost 15 of 100" in c.summary("DAgger", "warm start")


def test_identical_students_differ_by_exactly_zero():
    rng = np.random.default_rng(1)
    a = {f"t{i}": bool(x) for i, x in enumerate(rng.random(60) < 0.4)}
    c = paired_comparison(a, dict(a))
    assert (c.diff, c.ci_low, c.ci_high, c.p_mcnemar) == (0.0, 0.0, 0.0, 1.0)
    assert (c.gained, c.lost) == (0, 0) and not c.significant and c.verdict() == "inconclusive"


def test_bootstrap_interval_agrees_with_the_normal_approximation_on_a_large_sample():
    """4000 tasks: the per-task difference D in {-1, 0, 1} has variance (g + l)/n - d^2, so the interval
    is about d +- 1.96 sqrt(var / n); the percentile bootstrap must agree to ~5% of the half-width."""
    rng = np.random.default_rng(7)
    n = 4000
    skill = rng.random(n)  # task difficulty shared by both students: they are correlated, as real ones are
    a = {i: bool(skill[i] + 0.25 * rng.standard_normal() > 0.45) for i in range(n)}
    b = {i: bool(skill[i] + 0.25 * rng.standard_normal() > 0.50) for i in range(n)}
    c = paired_comparison(a, b, resamples=4000)
    d = (c.gained - c.lost) / n
    half = 1.959964 * math.sqrt(((c.gained + c.lost) / n - d * d) / n)
    assert c.diff == pytest.approx(d)
    assert c.ci_low == pytest.approx(d - half, abs=0.05 * half)
    assert c.ci_high == pytest.approx(d + half, abs=0.05 * half)
    # pairing matters: the unpaired (independent samples) half-width is much wider here
    pa, pb = c.rate_a, c.rate_b
    assert half < 0.8 * 1.959964 * math.sqrt(pa * (1 - pa) / n + pb * (1 - pb) / n)


def test_seeds_are_pooled_with_each_tasks_outcomes_kept_together():
    """Resampling tasks (not task x seed pairs): when every seed repeats its task's outcome, pooling 3
    seeds adds no information, and the interval is the 1-seed interval (same generator, same draws),
    where resampling 300 independent pairs would be ~sqrt(3) narrower."""
    a1, b1 = students(both=20, only_a=12, only_b=4, neither=64)
    a3 = {t: [x] * 3 for t, x in a1.items()}
    b3 = {t: [x] * 3 for t, x in b1.items()}
    one, three = paired_comparison(a1, b1), paired_comparison(a3, b3)
    assert (three.n, three.tasks, three.gained, three.lost) == (300, 100, 36, 12)
    assert three.diff == pytest.approx(one.diff)
    assert (three.ci_low, three.ci_high) == pytest.approx((one.ci_low, one.ci_high))
    flat_a = {(t, s): x for t, xs in a3.items() for s, x in enumerate(xs)}
    flat_b = {(t, s): x for t, xs in b3.items() for s, x in enumerate(xs)}
    naive = paired_comparison(flat_a, flat_b)
    assert naive.ci_high - naive.ci_low < 0.75 * (three.ci_high - three.ci_low)


def test_seed_k_of_a_is_paired_with_seed_k_of_b():
    c = paired_comparison({"t": [True, False], "u": [True, True]}, {"t": [False, True], "u": [True, False]})
    assert (c.gained, c.lost, c.n, c.tasks) == (2, 1, 4, 2)
    assert c.diff == pytest.approx(0.25) and c.task_diffs == {"t": 0.0, "u": 0.5}


def test_a_better_than_b_is_positive_and_the_interval_is_reproducible():
    a, b = students(both=10, only_a=25, only_b=2, neither=63)
    c = paired_comparison(a, b)
    assert c.diff > 0 and c.ci_low > 0 and c.verdict() == "A better"
    assert paired_comparison(a, b) == c  # fixed generator seed: same inputs, same interval
    other = paired_comparison(a, b, seed=1)
    assert other.diff == c.diff and other.ci_low == pytest.approx(c.ci_low, abs=0.03)


def test_mismatched_tasks_or_seeds_are_refused_naming_the_difference():
    a, b = students(both=2, only_a=1, only_b=1, neither=1)
    b_other = {**b, "extra-task": True}
    del b_other["task-0"]
    with pytest.raises(TaskSetMismatchError, match=r"different task sets.*only in A \('task-0'\).*only in B"):
        paired_comparison(a, b_other)
    with pytest.raises(TaskSetMismatchError, match="A has 2 outcome"):
        paired_comparison({"t": [True, False]}, {"t": [True]})
    with pytest.raises(ValueError, match="at least one task"):
        paired_comparison({}, {})
    with pytest.raises(TypeError, match="bool"):
        paired_comparison({"t": "yes"}, {"t": True})
    with pytest.raises(ValueError, match="empty"):
        paired_comparison({"t": []}, {"t": []})
    assert issubclass(TaskSetMismatchError, ValueError)


def test_paired_table_and_plot(tmp_path):
    a, b = students(both=28, only_a=3, only_b=15, neither=54)
    comps = {"DAgger - warm start": paired_comparison(a, b), "same - same": paired_comparison(a, a)}
    console = Console(record=True, width=200)
    console.print(paired_table(comps))
    text = console.export_text()
    assert "DAgger - warm start" in text and "-0.120 [-0.200, -0.040]" in text and "+3 / -15" in text
    path = plot_paired(comps, tmp_path / "cmp.png")
    assert path.stat().st_size > 5_000
    with pytest.raises(TypeError, match="PairedComparison"):
        paired_table({"x": 0.1})
    assert isinstance(comps["same - same"], PairedComparison)

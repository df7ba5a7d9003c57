"""Held-out evaluation and the Table-4 report.

What must hold: the scripted expert, evaluated as a student, resolves every easy held-out task; a random
tool-calling policy resolves none and its failure modes are counted per block (each block's fractions
sum to 1); the Wilson interval matches published values and its defining equation; the table renders
the methods and the paper's columns; the tool-error mechanism metrics match hand counts on built
trajectories; per-task outcomes survive a save / load and reproduce the mechanism metrics.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
from rich.console import Console

from unipost.data import Outcome, Trajectory, Turn
from unipost.envs.embedded import EmbeddedEnv, ScriptedExpert, bwrap_available
from unipost.eval import (
    COLUMNS,
    MECHANISM_KEYS,
    MODE_TITLES,
    NO_SUBMISSION_MODES,
    SUBMITTED_UNRESOLVED_MODES,
    EvalResult,
    eval_outcome_steps,
    evaluate_policy,
    failure_table,
    load_eval_outcomes,
    mechanism_metrics,
    prune_eval_outcomes,
    save_eval_outcomes,
    summary,
    to_markdown,
    wilson_interval,
)
from unipost.eval.evaluate import Z95
from unipost.rollout.scripted import RandomToolPolicy

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="the embedded env needs bubblewrap")


def heldout(n: int, difficulty: str = "easy") -> list[tuple]:
    return [("heldout", i, difficulty) for i in range(n)]


def make_env(task) -> EmbeddedEnv:
    return EmbeddedEnv.from_split(*task)


def fake(resolved: bool, submitted: bool, mode: str | None, turns: int = 2, errors: int = 0) -> Trajectory:
    """A finished trajectory with a given verdict (no environment needed)."""
    action = {"role": "assistant", "content": "x"}
    return Trajectory(
        task_id="t",
        prompt=[{"role": "user", "content": "fix it"}],
        turns=[Turn(index=i, executor="student", action=action, tool_error=i < errors) for i in range(turns)],
        outcome=Outcome(resolved=resolved, submitted=submitted, reward=float(resolved), failure_mode=mode),
    )


# -- Wilson interval ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k, n, low, high",
    [  # 95% Wilson score intervals to 4 decimals (standard textbook values)
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (10, 10, 0.7225, 1.0),
        (4, 4, 0.5101, 1.0),
        (81, 263, 0.2553, 0.3662),
    ],
)
def test_wilson_interval_known_values(k, n, low, high):
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


@pytest.mark.parametrize("k, n", [(1, 7), (3, 50), (17, 20), (123, 400)])
def test_wilson_bounds_solve_the_score_equation(k, n):
    """Each bound p0 satisfies (k/n - p0)^2 = z^2 p0 (1 - p0) / n (the score test at level 95%)."""
    p = k / n
    for p0 in wilson_interval(k, n):
        assert (p - p0) ** 2 == pytest.approx(Z95**2 * p0 * (1 - p0) / n, rel=1e-9, abs=1e-12)


def test_wilson_interval_rejects_bad_counts():
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k, n in [(3, 2), (-1, 5), (1.5, 4)]:
        with pytest.raises(ValueError):
            wilson_interval(k, n)


# -- EvalResult from known outcomes -----------------------------------------------------------------


def test_block_fractions_from_known_outcomes():
    trajs = (
        [fake(True, True, None)] * 2
        + [fake(False, True, "wrong_solution")] * 3
        + [fake(False, True, "syntax_or_runtime_error")]
        + [fake(False, False, "tool_use_error", turns=4, errors=3)] * 2
        + [fake(False, False, "budget_exhaustion")] * 1
        + [fake(False, False, None)]  # e.g. a crashed environment: unclassified
    )
    r = EvalResult.from_trajectories(trajs, iteration=3)
    assert (r.n, r.resolved, r.submitted) == (10, 2, 6)
    assert r.resolve_rate == 0.2 and r.submission_rate == 0.6
    assert r.resolve_ci == wilson_interval(2, 10)
    assert (r.submitted_unresolved, r.no_submission) == (4, 4)
    assert r.submitted_unresolved_modes == {
        "wrong_solution": 0.75,
        "wrong_file": 0.0,
        "syntax_or_runtime_error": 0.25,
    }
    assert r.no_submission_modes == {
        "tool_use_error": 0.5,
        "repetitive_loop": 0.0,
        "context_overflow": 0.0,
        "budget_exhaustion": 0.25,
        "no_edit": 0.0,
    }
    assert (r.submitted_unresolved_other, r.no_submission_other) == (0, 1)
    assert r.mean_turns == pytest.approx((8 * 2 + 2 * 4) / 10)
    assert r.tool_error_rate == pytest.approx(6 / 24)
    assert "top failure wrong_solution (3/10)" in r.summary()
    flat = r.to_dict()
    assert all(isinstance(v, float) for v in flat.values())
    assert flat["eval/failure/wrong_solution"] == 0.75 and flat["eval/resolve_rate"] == 0.2
    assert set(f"eval/failure/{m}" for m in MODE_TITLES) <= set(flat)


# -- evaluate_policy on the real embedded environment ------------------------------------------------


@needs_bwrap
def test_scripted_expert_as_student_resolves_every_easy_heldout_task():
    tasks = heldout(4)
    r = evaluate_policy(make_env, ScriptedExpert(), tasks, max_turns=30, concurrency=4)
    assert r.n == 4 and r.resolve_rate == 1.0 and r.submission_rate == 1.0
    assert r.resolve_ci == pytest.approx(wilson_interval(4, 4))
    assert r.submitted_unresolved == r.no_submission == 0
    assert r.tool_error_rate == 0.0 and r.mean_turns >= 2
    assert all(t.meta["greedy"] and t.teacher_fraction == 0.0 for t in r.trajectories)
    assert [t.task_id for t in r.trajectories] == [make_env(t).task.task_id for t in tasks]
    assert r.stats is not None and r.stats.resolve_rate == 1.0


@needs_bwrap
def test_random_tool_policy_fails_and_failure_blocks_sum_to_one():
    tools = make_env(heldout(1)[0]).tools
    policy = RandomToolPolicy(tools, seed=0, malformed_rate=0.5)
    r = evaluate_policy(make_env, policy, heldout(16), max_turns=4, concurrency=8)
    assert r.n == 16 and r.resolve_rate == 0.0
    assert r.submitted_unresolved > 0 and r.no_submission > 0, "seeded run populates both blocks"
    assert r.submitted_unresolved + r.no_submission == r.n
    assert r.tool_error_rate > 0.2
    # each block sums to 1 and matches an independent count of the verifier's verdicts
    outcomes = [t.outcome for t in r.trajectories]
    for block, fractions, submitted in [
        (SUBMITTED_UNRESOLVED_MODES, r.submitted_unresolved_modes, True),
        (NO_SUBMISSION_MODES, r.no_submission_modes, False),
    ]:
        modes = Counter(o.failure_mode for o in outcomes if o.submitted == submitted)
        assert set(modes) <= set(block)
        assert sum(fractions.values()) == pytest.approx(1.0)
        for mode in block:
            assert fractions[mode] == pytest.approx(modes[mode] / sum(modes.values()))
    assert sum(v > 0 for v in r.failure_modes.values()) >= 2


def test_evaluate_policy_rejects_bad_input():
    with pytest.raises(ValueError, match=r"at least one \(held-out\) task"):
        evaluate_policy(make_env, ScriptedExpert(), [], max_turns=5)
    with pytest.raises(ValueError, match="max_turns"):
        evaluate_policy(make_env, ScriptedExpert(), heldout(1), max_turns=0)
    with pytest.raises(ValueError, match="student"):
        evaluate_policy(make_env, None, heldout(1), max_turns=5)


# -- report ------------------------------------------------------------------------------------------


def results_for_report() -> dict[str, EvalResult]:
    good = EvalResult.from_trajectories([fake(True, True, None)] * 3 + [fake(False, False, "no_edit")])
    bad = EvalResult.from_trajectories(
        [fake(False, True, "wrong_file"), fake(False, False, "repetitive_loop")] * 2
    )
    return {"DAgger-style": good, "SFT": bad}


def test_failure_table_renders_methods_and_columns():
    results = results_for_report()
    console = Console(record=True, width=400)
    console.print(failure_table(results))
    text = console.export_text()
    for name in results:
        assert name in text
    for title in [*MODE_TITLES.values(), "Resolve", "Submission Yes", "Submission No"]:
        assert title in text
    assert "75.0%" in text and "100.0%" in text  # DAgger resolve 3/4, no_edit 1/1


def test_markdown_and_summary():
    results = results_for_report()
    md = to_markdown(results)
    lines = md.splitlines()
    assert lines[0] == "| " + " | ".join(COLUMNS) + " |"
    dagger = lines[2].split(" | ")
    assert dagger[0] == "| DAgger-style" and dagger[1] == "75.0%"
    # empty block (DAgger has no submitted-but-unresolved episodes): undefined, not 0%
    assert dagger[4:7] == ["–", "–", "–"]
    sft = lines[3].strip("| ").split(" | ")
    assert sft[COLUMNS.index("Wrong File")] == "100.0%"
    assert sft[COLUMNS.index("Repetitive Loop")] == "100.0%"
    line = summary(results)
    assert "\n" not in line and "DAgger-style resolve 75.0%" in line and "SFT resolve 0.0%" in line
    assert not math.isnan(results["SFT"].resolve_ci[1])
    with pytest.raises(TypeError, match="EvalResult"):
        failure_table({"x": 0.5})
    with pytest.raises(ValueError, match="non-empty"):
        to_markdown({})


# -- mechanism metrics and per-task outcomes ------------------------------------------------------------


def erring(flags: str, resolved: bool, task_id: str = "t") -> Trajectory:
    """A trajectory whose turns are tool errors where ``flags`` has an 'x' ('.' a clean turn)."""
    action = {"role": "assistant", "content": "x"}
    return Trajectory(
        task_id=task_id,
        prompt=[{"role": "user", "content": "fix it"}],
        turns=[
            Turn(index=i, executor="student", action=action, tool_error=f == "x") for i, f in enumerate(flags)
        ],
        outcome=Outcome(resolved=resolved, submitted=resolved, reward=float(resolved)),
    )


def mechanism_episodes() -> list[Trajectory]:
    return [
        erring(".x.x", True, "a"),  # first error at turn 2; after it 1 error in 2 turns; x->. once
        erring("xx..", False, "b"),  # first error at turn 1; after it 1 error in 3 turns; x->x, x->.
        erring("....", True, "c"),  # no tool error
        erring("", False, "d"),  # no turn at all
    ]


def test_mechanism_metrics_on_hand_built_trajectories():
    r = EvalResult.from_trajectories(mechanism_episodes())
    assert r.first_tool_error_turn == pytest.approx((2 + 1) / 2)  # 1-based, over the 2 erring episodes
    assert r.episodes_with_tool_error == pytest.approx(2 / 4)
    assert r.recovery_rate == pytest.approx(1 / 2)  # "a" resolved after its first error, "b" did not
    assert r.tool_error_rate_after_first == pytest.approx(2 / 5)  # turns after the first error: 2 + 3
    assert r.tool_error_after_error == pytest.approx(1 / 3)  # error turns with a next turn: a1, b0, b1
    flat = r.to_dict()
    assert flat["eval/first_tool_error_turn"] == 1.5 and flat["eval/recovery_rate"] == 0.5
    assert flat["eval/tool_error_after_error"] == pytest.approx(1 / 3)
    assert r.tool_error_rate == pytest.approx(4 / 12)  # the existing per-turn rate is unchanged


def test_mechanism_metrics_are_undefined_not_zero_without_tool_errors():
    clean = EvalResult.from_trajectories([erring("...", True), erring("..", False)])
    assert clean.episodes_with_tool_error == 0.0
    assert clean.first_tool_error_turn is clean.recovery_rate is clean.tool_error_after_error is None
    flat = clean.to_dict()
    assert flat["eval/episodes_with_tool_error"] == 0.0
    assert "eval/recovery_rate" not in flat and "eval/first_tool_error_turn" not in flat
    # an episode whose only error is its last turn: no turn after it, so no after-error rates
    last = mechanism_metrics([([False, False, True], True)])
    assert last["first_tool_error_turn"] == 3 and last["recovery_rate"] == 1.0
    assert last["tool_error_rate_after_first"] is None and last["tool_error_after_error"] is None


def test_eval_outcomes_round_trip_and_latest_step(tmp_path):
    r = EvalResult.from_trajectories(mechanism_episodes())
    assert r.task_outcomes() == {"a": True, "b": False, "c": True, "d": False}
    folder = tmp_path / "eval"
    save_eval_outcomes(folder, 0, EvalResult.from_trajectories([erring(".", False, t) for t in "abcd"]))
    save_eval_outcomes(folder, 12, r, {**r.to_dict(), "eval/reverse_kl": 0.3})
    assert eval_outcome_steps(folder) == [0, 12]
    latest = load_eval_outcomes(folder)
    assert latest.step == 12 and latest.task_outcomes() == r.task_outcomes()
    assert latest.metrics["eval/reverse_kl"] == 0.3
    mech = latest.mechanism()  # recomputed from the stored per-turn flags: the live numbers
    assert mech == {k: getattr(r, k) for k in MECHANISM_KEYS}
    assert load_eval_outcomes(folder, step=0).task_outcomes() == dict.fromkeys("abcd", False)
    with pytest.raises(FileNotFoundError, match=r"no evaluation at step 5; it has steps \[0, 12\]"):
        load_eval_outcomes(folder, step=5)
    prune_eval_outcomes(folder, after_step=0)
    assert eval_outcome_steps(folder) == [0]
    prune_eval_outcomes(folder)
    with pytest.raises(FileNotFoundError, match="no saved held-out evaluation"):
        load_eval_outcomes(folder)


def test_repeated_tasks_keep_every_outcome_in_order():
    trajs = [erring(".", True, "a"), erring(".", False, "a"), erring(".", True, "b")]
    r = EvalResult.from_trajectories(trajs)
    assert r.task_outcomes() == {"a": (True, False), "b": True}

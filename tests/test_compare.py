"""`unipost compare RUN_A RUN_B ...`: paired comparison of saved held-out evaluations.

Runs are built here from saved per-task outcomes (what the Trainer writes after every evaluation), so
the command is checked without training: the paired numbers printed are paired_comparison's, RUN@STEP
picks an older evaluation, and runs on different task sets, or without saved outcomes, are refused in
one or two lines naming the problem. One test trains a tiny run to check that the Trainer writes those
files and prunes them on resume / a fresh start as it truncates its metrics.
"""

from __future__ import annotations

import subprocess

import pytest

from unipost.data import Outcome, Trajectory, Turn
from unipost.eval import EVAL_OUTCOMES_DIR, EvalResult, save_eval_outcomes


def _result(resolved: dict[str, bool], errors: int = 0) -> EvalResult:
    action = {"role": "assistant", "content": "x"}
    trajs = [
        Trajectory(
            task_id=task,
            prompt=[{"role": "user", "content": "fix it"}],
            turns=[Turn(index=i, executor="student", action=action, tool_error=i < errors) for i in range(3)],
            outcome=Outcome(resolved=ok, submitted=ok, reward=float(ok)),
        )
        for task, ok in resolved.items()
    ]
    return EvalResult.from_trajectories(trajs)


def _run(tmp_path, name: str, by_step: dict[int, dict[str, bool]]):
    run = tmp_path / name
    for step, resolved in by_step.items():
        save_eval_outcomes(run / EVAL_OUTCOMES_DIR, step, _result(resolved, errors=1))
    return run


def _cli(capsys, *args: str) -> subprocess.CompletedProcess:
    from unipost.cli import app

    try:
        app(list(args), prog_name="unipost")
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)


def _tasks(pattern: str) -> dict[str, bool]:
    return {f"heldout-easy-{i}": c == "1" for i, c in enumerate(pattern)}


def test_compare_prints_the_paired_table_and_saves_the_plot(tmp_path, capsys):
    # warm start (step 0) resolves tasks 0-5; after training (step 3) it lost 3-5 and gained 6
    base = _run(tmp_path, "dagger", {0: _tasks("1111110000"), 3: _tasks("1110001000")})
    sft = _run(tmp_path, "sft", {3: _tasks("1111110000")})
    plot = tmp_path / "cmp.png"
    out = _cli(
        capsys, "compare", f"{base}@0", str(base), str(sft), "--plot", str(plot), "--resamples", "2000"
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "dagger - dagger@0: -0.200" in text and "gained 1 / lost 3 of 10" in text
    assert "sft - dagger@0: +0.000" in text and "gained 0 / lost 0 of 10" in text
    assert "McNemar p=0.62" in text  # 2 * P(Bin(4, 1/2) <= 1) = 2 * 5/16
    assert "recover" in text and "first error turn" in text  # the mechanism table
    assert plot.stat().st_size > 5_000


def test_compare_refuses_different_task_sets_naming_the_mismatch(tmp_path, capsys):
    a = _run(tmp_path, "a", {1: _tasks("1100")})
    b = _run(tmp_path, "b", {1: {**_tasks("110"), "heldout-easy-9": True}})
    out = _cli(capsys, "compare", str(a), str(b), "--plot", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) <= 2, lines
    assert (
        "different task sets" in lines[0]
        and "'heldout-easy-3'" in lines[0]
        and "'heldout-easy-9'" in lines[0]
    )
    assert not (tmp_path / "x.png").exists()


def test_compare_pools_seeds_keeping_tasks_paired(tmp_path, capsys):
    """RUN_S0,RUN_S1 is one arm over two seeds: seed k pairs with the reference's seed k, the counts are
    over tasks x seeds, and the numbers are paired_comparison's on the per-seed tuples."""
    from unipost.eval import paired_comparison

    s0 = _run(tmp_path, "s0", {0: _tasks("110000"), 2: _tasks("111000")})  # seed 0 gains task 2
    s1 = _run(tmp_path, "s1", {0: _tasks("110000"), 2: _tasks("010011")})  # seed 1: -task 0, +4, +5
    plot = tmp_path / "pooled.png"
    out = _cli(
        capsys, "compare", f"{s0}@0,{s1}@0", f"{s0},{s1}", "--plot", str(plot), "--resamples", "2000"
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    expected = paired_comparison(
        {t: (a, b) for (t, a), b in zip(_tasks("111000").items(), _tasks("010011").values(), strict=True)},
        {t: (a, a) for t, a in _tasks("110000").items()},
        resamples=2000,
    )
    assert expected.gained == 3 and expected.lost == 1 and expected.n == 12
    assert f"{expected.diff:+.3f}" == "+0.167"
    assert "gained 3 / lost 1 of 12" in text and "+0.167" in text, text
    assert "6/12" in text and "4/12" in text  # pooled resolved counts: arm, reference
    # a reference with one seed against an arm with two is refused, naming why
    out = _cli(capsys, "compare", f"{s0}@0", f"{s0},{s1}", "--plot", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "seeds" in out.stderr and len(out.stderr.strip().splitlines()) <= 2
    out = _cli(capsys, "compare", f"{s0}@0", f"{s0},,{s1}", "--plot", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "empty entry" in out.stderr
    # one evaluation twice would count its tasks twice (a McNemar p too small): refused
    out = _cli(capsys, "compare", f"{s0}@0,{s0}@0", f"{s0},{s1}", "--plot", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "used twice" in out.stderr
    # seeds listed in another order than the reference's would pair seed 0 with seed 1: refused
    for run, seed in ((s0, 0), (s1, 1)):
        (run / "config.json").write_text(f'{{"seed": {seed}}}')
    out = _cli(capsys, "compare", f"{s0}@0,{s1}@0", f"{s1},{s0}", "--plot", str(tmp_path / "x.png"))
    assert out.returncode == 2 and "same seed order" in out.stderr, out.stderr


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: [str(tmp / "old"), str(tmp / "a")], "no saved held-out evaluation"),
        (lambda tmp: [f"{tmp / 'a'}@7", str(tmp / "a")], "no evaluation at step 7"),
        (lambda tmp: [str(tmp / "missing"), str(tmp / "a")], "is not a directory"),
        (lambda tmp: [str(tmp / "a")], "at least two runs"),
    ],
)
def test_compare_mistakes_are_one_or_two_lines(tmp_path, capsys, make, expected):
    _run(tmp_path, "a", {1: _tasks("10")})
    (tmp_path / "old").mkdir()  # a run from before per-task outcomes were saved
    out = _cli(capsys, "compare", *make(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert expected in out.stderr and len(out.stderr.strip().splitlines()) <= 2


def test_the_trainer_saves_outcomes_per_evaluation_and_prunes_them_like_its_metrics(tmp_path):
    """Each held-out evaluation leaves eval/step_<n>.json (task ids, verdicts, the logged metrics); a
    resumed run drops the files past its checkpoint, a fresh run in the same folder drops them all, so
    `unipost compare` never reads a previous run's evaluation."""
    from factories import session_cache, tiny_train_config

    from unipost.envs.embedded import bwrap_available
    from unipost.eval import eval_outcome_steps, load_eval_outcomes
    from unipost.train.config import EvalConfig
    from unipost.train.trainer import Trainer

    if not bwrap_available():
        pytest.skip("the embedded env needs bubblewrap")
    cfg = tiny_train_config(
        tmp_path, session_cache(), "sft", iterations=1, eval=EvalConfig(every=1, kl_tasks=0)
    )
    trainer = Trainer(cfg)
    history = trainer.fit()
    folder = trainer.run_dir / EVAL_OUTCOMES_DIR
    assert eval_outcome_steps(folder) == [0, 1]
    last = load_eval_outcomes(folder)
    assert last.metrics["eval/resolve_rate"] == history[-1]["eval/resolve_rate"]
    assert len(last.task_outcomes()) == cfg.env.heldout_tasks
    stale = folder / "step_000005.json"  # e.g. left by a longer run killed later
    stale.write_text((folder / "step_000001.json").read_text())
    Trainer(cfg, resume=True)  # resumes after iteration 0 (step 1): step 5 is not this run's
    assert eval_outcome_steps(folder) == [0, 1]
    Trainer(cfg)  # a fresh run in the same folder
    assert eval_outcome_steps(folder) == []

"""benchmarks/bench_methods.py --quick: the six-method comparison runs end to end on the real pipeline.

The quick budget is far too small for the methods to separate, so the test asserts what must hold at
any budget: every method ran from the same warm start, the matched effective-sample budgets were met
within one trajectory's labels, every reported number is finite and consistent with its counts, each
arm's final per-task outcomes were recorded and agree with its resolve rate, the paper's ordering
claims were judged from the paired interval by the stated rule (recomputed here), an old
histories.json without outcomes is still reported (unpaired, saying so), and all tables and figures
were written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_methods.py"
VERDICTS = {"holds", "does not hold", "inconclusive"}


def _bench():
    spec = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_methods"] = module
    spec.loader.exec_module(module)
    return module


def test_newcombe_interval_matches_reference_values():
    """Newcombe (1998) method 10, his example: 56/70 vs 48/80 -> 0.2 [0.0524, 0.3339] (to 1e-3)."""
    d, lo, hi = _bench().newcombe_diff(56, 70, 48, 80)
    assert d == pytest.approx(0.2)
    assert lo == pytest.approx(0.0524, abs=1e-3) and hi == pytest.approx(0.3339, abs=1e-3)


def test_full_size_meets_the_issue_minimums(lab_assets):
    """>= 3 seeds x >= 50 held-out tasks (disjoint per seed) and >= 4 evaluation points per learning curve:
    the budget exceeds what two iterations can label (episodes x max_turns each), so every arm runs
    >= 3 iterations, each followed by an evaluation (plus the one before training)."""
    bench = _bench()
    full = bench.FULL
    assert full.seeds >= 3 and full.heldout >= 50 and full.eval_every == 1
    for method in bench.METHODS[1:]:
        cfg = bench.arm_config(full, "runs", 0, method, assets=lab_assets)
        group = full.grpo_group if method == "grpo" else 1
        episodes = cfg.rollout.episodes_per_iteration * group
        assert episodes == full.episodes, method  # every arm rolls out the same episodes per iteration
        assert full.budget > 2 * episodes * cfg.rollout.max_turns, method
        assert cfg.iterations * episodes * cfg.rollout.max_turns >= full.budget  # reachable in the cap
    tasks = [set(bench.heldout_for(s, full)) for s in range(full.seeds)]
    assert all(len(t) == full.heldout for t in tasks) and len(set.union(*tasks)) == full.seeds * full.heldout


def test_full_uses_the_papers_unsubmitted_filter_and_the_lab_schedule(lab_assets):
    bench = _bench()
    from unipost.train.lab import LAB_BETA, tiny_config

    for method in ("opd", "dagger", "aggrevate"):
        recipe = bench.recipe_for(method, bench.FULL, max_turns=12)
        assert recipe.filter_unsubmitted, method
        assert bench.recipe_for(method, bench.QUICK, max_turns=8).filter_unsubmitted is False
    cfg = bench.arm_config(bench.FULL, "runs", 1, "dagger", assets=lab_assets)
    assert cfg.recipe_kwargs == {"beta": LAB_BETA, "filter_unsubmitted": True}  # in the saved config
    assert cfg.model.path.startswith(lab_assets) and cfg.seed == 1  # the lab's warm start, this seed
    # a section given as a dict changes only the fields it names: the rest stays the lab's
    lab = tiny_config("runs", assets=lab_assets)
    for section, changed in (("rollout", "episodes_per_iteration"), ("env", "heldout_tasks")):
        ours, theirs = getattr(cfg, section), getattr(lab, section)
        assert ours.model_dump(exclude={changed}) == theirs.model_dump(exclude={changed}), section
    beta = bench.recipe_for("dagger", bench.FULL, 12).rollout.beta
    assert [beta(i) for i in range(3)] == pytest.approx([0.6, 0.4, 0.2])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, lab_assets):
    tmp = tmp_path_factory.mktemp("bench_methods")
    env = {**os.environ, "UNIPOST_CACHE": str(tmp / "cache")}
    out = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--quick",
            "--assets",
            lab_assets,
            "--no-progress",
            "--workers",  # QUICK has 2 seeds: one child process each (the parallel path and its merge)
            "2",
            "--out",
            str(tmp / "out"),
            "--runs-dir",
            str(tmp / "runs"),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return tmp / "out", out.stdout


def test_quick_writes_every_table_and_figure(quick_run):
    out, stdout = quick_run
    for name in (
        "results.json",
        "results.csv",
        "results.md",
        "failure_modes.csv",
        "claims.json",
        "histories.json",
        "paired.json",
        "paired.md",
    ):
        assert (out / name).stat().st_size > 0, name
    for name in ("learning_curves.png", "reverse_kl.png"):
        assert (out / name).stat().st_size > 5_000, name
    assert "Held-out resolve rate" in stdout and "Failure modes" in stdout and "ordering" in stdout
    assert "Paired on the same held-out tasks" in stdout and "Tool errors" in stdout


def test_quick_numbers_are_finite_and_budgets_matched(quick_run):
    out, _ = quick_run
    bench = _bench()
    results = json.loads((out / "results.json").read_text())
    size, settings = results["meta"]["size"], results["meta"]["settings"]
    rows = results["methods"]
    assert set(rows) == set(bench.METHODS)
    for method, row in rows.items():
        assert row["seeds"] == size["seeds"] and row["episodes"] == size["seeds"] * size["heldout"]
        assert row["resolve_rate"] == pytest.approx(row["resolved"] / row["episodes"])
        assert 0.0 <= row["resolve_ci_low"] <= row["resolve_rate"] <= row["resolve_ci_high"] <= 1.0
        assert 0.0 <= row["expert_agreement_mean"] <= 1.0, method
        assert math.isfinite(row["expert_nll_mean"]) and row["expert_nll_mean"] > 0, method
        assert math.isfinite(row["reverse_kl_mean"]) and row["reverse_kl_mean"] >= -1e-6, method
        for eff in row["effective_samples_per_seed"]:
            if method == "base":
                assert eff == 0
            else:  # the budget is reached and overshot by less than one trajectory's (GRPO: group's) labels
                group = size["grpo_group"] if method == "grpo" else 1
                assert size["budget"] <= eff < size["budget"] + group * settings["max_turns"], (method, eff)
    assert settings["warm_start"]["student_sha256"] and set(settings["recipes"]) == set(bench.METHODS[1:])


def test_quick_records_each_arms_per_task_outcomes(quick_run):
    """histories.json holds every arm's final per-task outcomes (base: the warm start's step 0), one per
    held-out task of that seed, agreeing with the logged resolve rate of that evaluation."""
    out, _ = quick_run
    bench = _bench()
    blob = json.loads((out / "histories.json").read_text())
    size = blob["settings"]["size"]
    for method in bench.METHODS:
        for seed in ("0", "1"):
            rec = blob["outcomes"][method][seed]
            final = bench.final_eval(blob["histories"][method][seed])
            assert rec["step"] == final["step"], (method, seed)
            resolved = rec["resolved"]
            assert len(resolved) == size["heldout"] == final["eval/n"]
            assert sum(resolved.values()) / len(resolved) == pytest.approx(final["eval/resolve_rate"])
    # every arm of a seed was evaluated on the same tasks as the warm start
    for seed in ("0", "1"):
        tasks = {m: set(blob["outcomes"][m][seed]["resolved"]) for m in bench.METHODS}
        assert all(t == tasks["base"] for t in tasks.values()), seed


def test_quick_claims_follow_the_stated_rule(quick_run):
    """Primary verdicts come from the paired interval pooled over seeds, recomputed here from the recorded
    outcomes with unipost.eval.paired_comparison (not from Newcombe's unpaired interval)."""
    from unipost.eval import paired_comparison

    out, _ = quick_run
    bench = _bench()
    blob = json.loads((out / "histories.json").read_text())
    claims = json.loads((out / "claims.json").read_text())
    paired = json.loads((out / "paired.json").read_text())
    assert len(claims["ordering"]) == len(bench.PAPER_ORDER)

    def pooled(method: str) -> dict:
        return {t: [ok] for s in ("0", "1") for t, ok in blob["outcomes"][method][s]["resolved"].items()}

    for claim, (a, b) in zip(claims["ordering"], bench.PAPER_ORDER, strict=True):
        c = paired_comparison(pooled(a), pooled(b))
        expected = "holds" if c.ci_low > 0 else "does not hold" if c.ci_high < 0 else "inconclusive"
        assert claim["basis"] == "paired" and claim["resolve_verdict"] == expected
        assert claim["resolve_diff"] == pytest.approx(c.diff)
        assert claim["resolve_diff_ci"] == pytest.approx([c.ci_low, c.ci_high])
        assert (claim["gained"], claim["lost"], claim["p_mcnemar"]) == (c.gained, c.lost, c.p_mcnemar)
        assert claim["nll_verdict"] in VERDICTS
    assert claims["kl_rebound_claim"]["verdict"] in VERDICTS
    for method in bench.METHODS[1:]:  # every arm against base, paired
        row = paired[f"{bench.TITLES[method]} - base"]
        assert row["a"] == method and row["b"] == "base" and row["n"] == 2
        assert row["diff"] == pytest.approx(paired_comparison(pooled(method), pooled("base")).diff)


def test_report_only_of_a_histories_file_without_outcomes_says_so_and_stays_unpaired(
    quick_run, tmp_path, capsys
):
    """A histories.json from before per-task outcomes were recorded is still reported: the claims fall
    back to Newcombe's unpaired interval, are marked as such, and a note says to rerun."""
    out, _ = quick_run
    blob = json.loads((out / "histories.json").read_text())
    del blob["outcomes"]
    (tmp_path / "histories.json").write_text(json.dumps(blob))
    bench = _bench()
    report = bench.main(["--report-only", "--no-progress", "--out", str(tmp_path)])
    text = " ".join(capsys.readouterr().out.split())
    assert "holds no per-task outcomes" in text and "rerun the benchmark to pair them" in text
    assert report["paired"] == {}
    rows = report["rows"]
    for claim, (a, b) in zip(report["claims"]["ordering"], bench.PAPER_ORDER, strict=True):
        assert claim["basis"].startswith("unpaired (Newcombe)")
        _, lo, hi = bench.newcombe_diff(
            rows[a]["resolved"], rows[a]["episodes"], rows[b]["resolved"], rows[b]["episodes"]
        )
        assert claim["resolve_diff_ci"] == pytest.approx([lo, hi])
        assert claim["resolve_verdict"] == (
            "holds" if lo > 0 else "does not hold" if hi < 0 else "inconclusive"
        )


def test_report_only_needs_no_warm_start_and_keeps_the_run_size(quick_run, tmp_path):
    """--report-only re-summarises histories.json with the size it was run with, even when the command
    line omits --quick, and never loads a warm start (--assets points nowhere here)."""
    import shutil

    out, _ = quick_run
    shutil.copy(out / "histories.json", tmp_path / "histories.json")
    report = _bench().main(
        ["--report-only", "--no-progress", "--out", str(tmp_path), "--assets", str(tmp_path / "none")]
    )
    meta = json.loads((tmp_path / "results.json").read_text())["meta"]
    quick = json.loads((out / "results.json").read_text())
    assert meta["size"] == quick["meta"]["size"] and meta["size"]["quick"] is True
    assert json.dumps(report["rows"], sort_keys=True) == json.dumps(quick["methods"], sort_keys=True)
    assert (tmp_path / "learning_curves.png").stat().st_size > 5_000


def test_report_only_of_some_methods_keeps_the_seeds_those_methods_finished(quick_run, tmp_path):
    """A partial run (one arm of seed 1 missing) still compares the arms every seed finished: with
    --methods naming them, both seeds are kept; with every method, only the complete seed."""
    out, _ = quick_run
    blob = json.loads((out / "histories.json").read_text())
    del blob["histories"]["aggrevate"]["1"]
    (tmp_path / "histories.json").write_text(json.dumps(blob))
    bench = _bench()
    some = bench.load_histories(tmp_path, ["base", "sft", "dagger"])
    assert some["seeds"] == [0, 1] and sorted(some["histories"]) == ["base", "dagger", "sft"]
    everything = bench.load_histories(tmp_path)
    assert everything["seeds"] == [0] and "aggrevate" in everything["histories"]


def test_parallel_seeds_are_merged_and_a_rerun_resumes_without_training(quick_run, tmp_path, lab_assets):
    """--workers 2: each seed's child wrote its own file; the parent merged both; rerunning the same
    command trains nothing (every arm is read back) and reports the same numbers."""
    out, _ = quick_run
    merged = json.loads((out / "histories.json").read_text())
    for method, by_seed in merged["histories"].items():
        assert sorted(by_seed) == ["0", "1"], method
    for seed in (0, 1):
        child = json.loads((out / "seeds" / f"seed{seed}" / "histories.json").read_text())
        for method, by_seed in child["histories"].items():
            assert list(by_seed) == [str(seed)], method
            assert by_seed[str(seed)] == merged["histories"][method][str(seed)]
    bench = _bench()
    resumed = bench.run_benchmark(
        bench.QUICK, out=out, runs_dir=tmp_path / "never-used", assets=lab_assets, progress=False
    )
    assert not (tmp_path / "never-used").exists()  # nothing was trained
    for method, by_seed in merged["histories"].items():
        assert {str(s): h for s, h in resumed["histories"][method].items()} == by_seed, method

"""kill -9 a real training run mid-iteration, resume it, and get the uninterrupted run's metrics.

The killed run is a real ``unipost train <config.json>`` subprocess. After SIGKILL lands (somewhere in
iteration 1 or later), ``unipost train --resume`` continues from the newest valid checkpoint, cuts the
trajectory store back to the checkpoint's position (the in-flight iteration is re-collected), and must
end with exactly the same metrics as an uninterrupted run with the same seed, every finished
trajectory of completed iterations kept.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from factories import session_cache, tiny_train_config

from unipost.rollout.store import load
from unipost.train.config import (
    EnvConfig,
    EvalConfig,
    OptimConfig,
    RolloutConfig,
    TrainConfig,
)
from unipost.train.metrics import depends_on_timing, read_metrics


def timing(key: str) -> bool:
    """Keys that differ between any two runs doing the same work (wall-clock keys and thread-race counters,
    :func:`depends_on_timing`). Nothing else is left out: counters a resume must restore
    (``train/effective_samples``, ``train/optimizer_steps``, ``rollout/env_steps``,
    ``eval/no_submission``) are compared."""
    return depends_on_timing(key)


def test_only_timing_keys_are_left_out_of_the_comparison():
    """The filter drops what the clock or a thread race decides and keeps every counter a resume restores
    (``rollout/ticks_blocked_on_teacher`` once failed this comparison in a loaded suite run: the scripted
    teacher's turn finished before or after the student's on a busy machine)."""
    dropped = ["time", "time/iteration", "rollout/wall_time_s", "rollout/episodes_per_s"]
    dropped += ["rollout/ticks_blocked_on_teacher"]
    kept = ["train/effective_samples", "train/optimizer_steps", "rollout/env_steps", "rollout/ticks"]
    kept += ["eval/no_submission", "eval/failure/wrong_solution", "rollout/teacher_requests", "train/lr"]
    assert [k for k in dropped if not timing(k)] == []
    assert [k for k in kept if timing(k)] == []


# a budget the run reaches in its third iteration, mid-batch (16 labels an iteration: 2 episodes x 8
# labelled turns), before its upper bound of 5 iterations; a cosine schedule with warmup, whose horizon
# comes from the first batch and is kept in the checkpoint. No evaluation (the test above compares it)
BUDGET = 40
SCHEDULED = {
    "iterations": 5,
    "max_effective_samples": BUDGET,
    "eval": EvalConfig(every=0, kl_tasks=0),
    "optim": OptimConfig(
        lr=1e-2, micro_batch_tokens=4096, epochs_per_batch=2, schedule="cosine", warmup_ratio=0.2
    ),
}


def config(out: Path, cache: Path, name: str, **updates) -> TrainConfig:
    return tiny_train_config(
        out,
        cache,
        "dagger",
        name=name,
        # a random-init student never submits: keep its trajectories, or nothing is ever trained on
        recipe_kwargs={"beta": 0.5, "filter_unsubmitted": False},
        iterations=3,
        seed=3,
        env=EnvConfig(difficulty="easy", train_tasks=8, heldout_tasks=1, max_observation_chars=600),
        rollout=RolloutConfig(episodes_per_iteration=2, max_turns=8, context_budget=4096, max_new_tokens=12),
        optim=OptimConfig(lr=1e-2, micro_batch_tokens=4096, epochs_per_batch=2),
        eval=EvalConfig(every=1, kl_tasks=0),
    ).replace(**updates)


def run_cli(args: list[str], cwd: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "unipost.cli", "train", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def stable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not timing(k)} for r in records]


def kill9_and_resume(tmp_path: Path, **updates) -> tuple[list[dict], list[dict]]:
    """An uninterrupted run, and the same run killed after its first checkpoint and resumed; checks the
    stores and returns both runs' metrics."""
    cache = Path(session_cache())  # the process's warm cache: the runs share its tokenizer build
    env = {**os.environ, "UNIPOST_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    straight, killed = (
        config(tmp_path, cache, "straight", **updates),
        config(tmp_path, cache, "killed", **updates),
    )
    for cfg in (straight, killed):
        (tmp_path / f"{cfg.name}.json").write_text(cfg.to_json())

    proc = run_cli([str(tmp_path / "straight.json")], tmp_path, env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out

    proc = run_cli([str(tmp_path / "killed.json")], tmp_path, env)
    first_ckpt = tmp_path / "killed" / "checkpoints" / "iter-000000"
    deadline = time.time() + 600
    while not first_ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first_ckpt.exists(), "the run never wrote its first checkpoint"
    time.sleep(1.5)  # well into iteration 1's rollouts
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; make the configuration longer")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kept_before = load(tmp_path / "killed" / "trajectories.jsonl")
    assert len(kept_before.trajectories) >= 2  # iteration 0's finished episodes survived the kill

    proc = run_cli([str(tmp_path / "killed.json"), "--resume"], tmp_path, env)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out

    trajs_a = load(tmp_path / "straight" / "trajectories.jsonl").trajectories
    trajs_b = load(tmp_path / "killed" / "trajectories.jsonl").trajectories
    strip = lambda t: json.dumps(t.model_dump(mode="json")["turns"], sort_keys=True)
    assert [strip(t) for t in trajs_a] == [strip(t) for t in trajs_b]
    assert [strip(t) for t in kept_before.trajectories] == [strip(t) for t in trajs_b[: len(kept_before)]]
    return read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "killed")


def trained(records: list[dict]) -> list[dict]:
    return [r for r in records if r["step"] > 0]


def test_kill9_mid_iteration_then_resume_matches_uninterrupted(tmp_path):
    a, b = kill9_and_resume(tmp_path)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    assert all(r["train/batch_labels"] > 0 for r in trained(a))  # every iteration trained
    assert stable(a) == stable(b)


def test_resume_under_a_budget_and_an_lr_schedule_matches_uninterrupted(tmp_path):
    """The budget counter (train/effective_samples) and the schedule (optimiser steps, its horizon) must
    survive the kill: a resume that resets either trains a different number of iterations or at
    different learning rates."""
    a, b = kill9_and_resume(tmp_path, **SCHEDULED)
    steps = [r["step"] for r in a]
    assert steps == [r["step"] for r in b]
    assert len(steps) - 1 < SCHEDULED["iterations"], f"the budget never stopped the run early: {steps}"
    assert a[-1]["train/effective_samples"] >= BUDGET > a[-2]["train/effective_samples"]
    assert len({round(r["train/lr"], 12) for r in trained(a)}) == len(trained(a)), "the LR never moved"
    assert stable(a) == stable(b)

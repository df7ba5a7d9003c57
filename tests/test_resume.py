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
from unipost.train.metrics import read_metrics

VOLATILE = ("time", "_s", "per_s", "wall")


def config(out: Path, cache: Path, name: str) -> TrainConfig:
    return tiny_train_config(
        out,
        cache,
        "dagger",
        name=name,
        recipe_kwargs={"beta": 0.5},
        iterations=3,
        seed=3,
        env=EnvConfig(difficulty="easy", train_tasks=8, heldout_tasks=1, max_observation_chars=600),
        rollout=RolloutConfig(episodes_per_iteration=2, max_turns=8, context_budget=4096, max_new_tokens=12),
        optim=OptimConfig(lr=1e-2, micro_batch_tokens=4096, epochs_per_batch=2),
        eval=EvalConfig(every=1, kl_tasks=0),
    )


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
    return [{k: v for k, v in r.items() if not any(t in k for t in VOLATILE)} for r in records]


def test_kill9_mid_iteration_then_resume_matches_uninterrupted(tmp_path):
    cache = Path(session_cache())  # the process's warm cache: the runs share its tokenizer build
    env = {**os.environ, "UNIPOST_CACHE": str(cache), "TOKENIZERS_PARALLELISM": "false"}
    straight, killed = config(tmp_path, cache, "straight"), config(tmp_path, cache, "killed")
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

    a = read_metrics(tmp_path / "straight")
    b = read_metrics(tmp_path / "killed")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [0, 1, 2, 3]
    assert stable(a) == stable(b)
    trajs_a = load(tmp_path / "straight" / "trajectories.jsonl").trajectories
    trajs_b = load(tmp_path / "killed" / "trajectories.jsonl").trajectories
    strip = lambda t: json.dumps(t.model_dump(mode="json")["turns"], sort_keys=True)
    assert [strip(t) for t in trajs_a] == [strip(t) for t in trajs_b]
    assert [strip(t) for t in kept_before.trajectories] == [strip(t) for t in trajs_b[: len(kept_before)]]

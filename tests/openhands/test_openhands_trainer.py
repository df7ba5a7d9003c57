"""The Trainer, unchanged, on env.name='openhands': one DAgger iteration through the real OpenHands tools."""

from __future__ import annotations

import json

import pytest
from factories import tiny_train_config  # tests/ is on sys.path (its conftest.py), as for tests/*.py

from unipost.envs.openhands import OpenHandsEnv
from unipost.train.config import EnvConfig
from unipost.train.trainer import Trainer

pytestmark = pytest.mark.slow


def test_one_dagger_iteration_on_the_openhands_env(tmp_path):
    env = EnvConfig(
        name="openhands", difficulty="easy", train_tasks=8, heldout_tasks=2, max_observation_chars=600
    )
    cfg = tiny_train_config(tmp_path, tmp_path / "cache", "dagger", iterations=1, env=env)
    trainer = Trainer(cfg)
    assert isinstance(trainer.make_env(("train", 0)), OpenHandsEnv)
    history = trainer.fit()
    rows = [json.loads(line) for line in (cfg.run_dir / "trajectories.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.rollout.episodes_per_iteration
    # DAgger queried the expert at every visited state, including the student's
    assert all(turn["label"] is not None for row in rows for turn in row["turns"])
    assert any(turn["executor"] == "teacher" for row in rows for turn in row["turns"])
    assert history and history[-1]["train/batch_labels"] > 0

"""GRPO, the SkyRL-v0 setup (paper §4.1 (2), App. F.2): student groups per task, group-normalised test
reward, constant LR, trained on the 293-instance SkyRL-v0 subset ($UNIPOST_SKYRL_V0, SWE-bench JSONL).

Paper setup (§4.1, App. F): the student ($UNIPOST_STUDENT: qwen3-4b = Qwen3-4B-Instruct-2507, default;
qwen3-8b = Qwen3-8B), Qwen3-Coder-30B-A3B-Instruct teacher behind a vLLM OpenAI-compatible server,
OpenHands tools on SWE-Gym in one Docker container per instance, greedy evaluation on SWE-Gym Holdout.
Every value and its source: unipost/train/paper.py. Hardware and launch: experiments/README.md.

    accelerate launch --config_file configs/accelerate/ddp.yaml \
        -m unipost.cli train experiments/paper_grpo.py
"""

import os

from unipost.train.config import TrainConfig
from unipost.train.paper import paper_swe_config


def config() -> TrainConfig:
    cfg = paper_swe_config("grpo", os.environ.get("UNIPOST_STUDENT", "qwen3-4b"), group_size=8)  # ours: 8
    env = cfg.env.model_copy(update={"tasks_path": os.environ.get("UNIPOST_SKYRL_V0", "data/skyrl-v0.jsonl")})
    return cfg.replace(env=env, rollout=cfg.rollout.model_copy(update={"episodes_per_iteration": 8}))

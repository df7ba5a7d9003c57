"""GRPO: 4 student samples per task, group-normalised verifier reward as the score.

CPU-sized: the tiny lab's shipped warm start
(unipost.train.lab.tiny_config), the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_grpo.py`.
"""

from unipost.train.config import TrainConfig
from unipost.train.lab import tiny_config


def config() -> TrainConfig:
    return tiny_config("runs", recipe="grpo", name="cpu_grpo", recipe_kwargs={"group_size": 4}, iterations=6)

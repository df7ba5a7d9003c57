"""GRPO: 4 student samples per task, group-normalised verifier reward as the score.

CPU-sized: a tiny Qwen3 student warm-started by brief behaviour cloning, the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_grpo.py`.
"""

from unipost.train.config import TrainConfig
from unipost.train.main_job import main_config


def config() -> TrainConfig:
    base = main_config("runs")
    return base.replace(name="cpu_grpo", recipe="grpo", recipe_kwargs={"group_size": 4}, iterations=6)

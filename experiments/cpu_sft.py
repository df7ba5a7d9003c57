"""SFT with rejection sampling (paper App. F.2): expert rollouts, only resolved trajectories, uniform weights.

CPU-sized: a tiny Qwen3 student warm-started by brief behaviour cloning, the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_sft.py`.
"""

from unipost.train.config import TrainConfig
from unipost.train.main_job import main_config


def config() -> TrainConfig:
    base = main_config("runs")
    return base.replace(name="cpu_sft", recipe="sft", iterations=6)

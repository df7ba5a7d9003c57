"""SFT with rejection sampling (paper App. F.2): expert rollouts, only resolved trajectories, uniform weights.

CPU-sized: the tiny lab's shipped warm start
(unipost.train.lab.tiny_config), the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_sft.py`.
"""

from unipost.train.config import TrainConfig
from unipost.train.lab import tiny_config


def config() -> TrainConfig:
    return tiny_config("runs", recipe="sft", name="cpu_sft", iterations=6)

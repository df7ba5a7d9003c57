"""On-policy distillation: student rollouts scored per token by log pi_T - log pi_theta
(the white-box teacher is a tiny model distilled from the expert by unipost and cached).

CPU-sized: the tiny lab's shipped warm start
(unipost.train.lab.tiny_config), the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_opd.py`.
"""

from unipost.train.config import TrainConfig
from unipost.train.lab import tiny_config


def config() -> TrainConfig:
    return tiny_config("runs", recipe="opd", name="cpu_opd", iterations=6)

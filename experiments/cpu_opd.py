"""On-policy distillation: student rollouts scored per token by log pi_T - log pi_theta
(the white-box teacher is a tiny model distilled from the expert by unipost and cached).

CPU-sized: a tiny Qwen3 student warm-started by brief behaviour cloning, the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_opd.py`.
"""

from unipost.train.config import TrainConfig
from unipost.train.main_job import main_config


def config() -> TrainConfig:
    base = main_config("runs")
    return base.replace(name="cpu_opd", recipe="opd", iterations=6)

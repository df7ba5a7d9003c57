"""DAgger (paper §3.2): turn-level teacher/student mixture with beta decayed linearly to a floor
(our numbers: beta_i = max(0.2, 1 - 0.1 i); the paper's were lost), expert labels at every visited state.

CPU-sized: a tiny Qwen3 student warm-started by brief behaviour cloning, the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_dagger.py`.
"""

from unipost.train.config import TrainConfig
from unipost.train.main_job import main_config


def config() -> TrainConfig:
    base = main_config("runs")
    return base.replace(name="cpu_dagger", recipe="dagger", iterations=6)

"""DAgger (paper §3.2): turn-level teacher/student mixture with beta decayed linearly to a floor
(our numbers: beta_i = max(0.2, 1 - 0.1 i); the paper's were lost), expert labels at every visited state.

CPU-sized: the tiny lab's shipped warm start
(unipost.train.lab.tiny_config), the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_dagger.py`.
"""

from unipost.train.config import TrainConfig
from unipost.train.lab import tiny_config


def config() -> TrainConfig:
    return tiny_config("runs", recipe="dagger", name="cpu_dagger", iterations=6)

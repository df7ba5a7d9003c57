"""AggreVaTe: student prefix of k turns, expert completes; k's law shifts to longer prefixes each iteration.

CPU-sized: a tiny Qwen3 student warm-started by brief behaviour cloning, the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_aggrevate.py`.
"""

from unipost.objective import ShiftingPrefix
from unipost.train.config import TrainConfig
from unipost.train.main_job import main_config


def config() -> TrainConfig:
    base = main_config("runs")
    k = ShiftingPrefix(1, 8, 0.5)  # student prefix of 1..8 turns, mass moving to longer prefixes
    return base.replace(name="cpu_aggrevate", recipe="aggrevate", recipe_kwargs={"k": k}, iterations=6)

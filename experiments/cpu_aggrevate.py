"""AggreVaTe: student prefix of k turns, expert completes; k's law shifts to longer prefixes each iteration.

CPU-sized: the tiny lab's shipped warm start
(unipost.train.lab.tiny_config), the embedded mini-SWE
environment (easy), the scripted expert as teacher. Run: `unipost train experiments/cpu_aggrevate.py`.
"""

from unipost.objective import ShiftingPrefix
from unipost.train.config import TrainConfig
from unipost.train.lab import tiny_config


def config() -> TrainConfig:
    k = ShiftingPrefix(1, 8, 0.5)  # student prefix of 1..8 turns, mass moving to longer prefixes
    return tiny_config("runs", recipe="aggrevate", name="cpu_aggrevate", recipe_kwargs={"k": k}, iterations=6)

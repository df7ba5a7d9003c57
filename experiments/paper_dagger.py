"""DAgger-style training (paper §3.2, Table 3): turn-level teacher/student mixture with beta decayed
linearly per iteration to a floor (paper; the numbers max(0.2, 1 - 0.1 i) are ours, the paper's were
lost), teacher labels at every visited state, unsubmitted trajectories filtered.

Paper setup (§4.1, App. F): the student ($UNIPOST_STUDENT: qwen3-4b = Qwen3-4B-Instruct-2507, default;
qwen3-8b = Qwen3-8B), Qwen3-Coder-30B-A3B-Instruct teacher behind a vLLM OpenAI-compatible server,
OpenHands tools on SWE-Gym in one Docker container per instance, greedy evaluation on SWE-Gym Holdout.
Every value and its source, hardware and launch: experiments/README.md.

    accelerate launch --config_file configs/accelerate/ddp.yaml \
        -m unipost.cli train experiments/paper_dagger.py
"""

import os

from unipost.train.config import TrainConfig
from unipost.train.paper import paper_swe_config


def config() -> TrainConfig:
    return paper_swe_config("dagger", os.environ.get("UNIPOST_STUDENT", "qwen3-4b"))

"""SFT with rejection sampling, the SWE-Gym recipe (paper §4.1 (1), App. F.2): the teacher generates one
trajectory for every SWE-Gym training task, only those whose patch passes the tests are kept, and the
student trains several epochs on that one dataset with uniform weights and a cosine LR with warmup.

Paper setup (§4.1, App. F): the student ($UNIPOST_STUDENT: qwen3-4b = Qwen3-4B-Instruct-2507, default;
qwen3-8b = Qwen3-8B), Qwen3-Coder-30B-A3B-Instruct teacher behind a vLLM OpenAI-compatible server,
OpenHands tools on SWE-Gym in one Docker container per instance, greedy evaluation on SWE-Gym Holdout.
Every value and its source: experiments/README.md (unipost/train/paper.py PROVENANCE).

    python experiments/paper_sft.py collect          # 1. teacher rollouts -> $UNIPOST_SFT_DATA
    accelerate launch --config_file configs/accelerate/ddp.yaml \
        -m unipost.cli train experiments/paper_sft.py  # 2. epochs over the rejection-sampled dataset
"""

import os
import sys

from unipost.train.config import TrainConfig
from unipost.train.paper import collect_sft_dataset, paper_swe_config


def config() -> TrainConfig:
    return paper_swe_config("sft", os.environ.get("UNIPOST_STUDENT", "qwen3-4b"))


if __name__ == "__main__" and sys.argv[1:] == ["collect"]:
    print(collect_sft_dataset(config()))

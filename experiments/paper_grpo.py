"""GRPO, the SkyRL-v0 setup (paper §4.1 (2), App. F.2): student groups per task, group-normalised test
reward, constant LR, trained on the 293-instance SkyRL-v0 subset ($UNIPOST_SKYRL_V0, SWE-bench JSONL)
for a number of full passes, evaluated on SWE-Gym Holdout ($UNIPOST_SWE_GYM) like every other method.

Paper setup (§4.1, App. F): the student ($UNIPOST_STUDENT: qwen3-4b = Qwen3-4B-Instruct-2507, default;
qwen3-8b = Qwen3-8B), OpenHands tools on SWE-Gym in one Docker container per instance, greedy
evaluation on SWE-Gym Holdout. Group size, tasks per iteration and passes: ours (the paper's numbers
were lost); every value and its source: experiments/README.md (unipost/train/paper.py PROVENANCE).

    accelerate launch --config_file configs/accelerate/ddp.yaml \
        -m unipost.cli train experiments/paper_grpo.py
"""

import os

from unipost.train.config import TrainConfig
from unipost.train.paper import paper_swe_config


def config() -> TrainConfig:
    return paper_swe_config("grpo", os.environ.get("UNIPOST_STUDENT", "qwen3-4b"))

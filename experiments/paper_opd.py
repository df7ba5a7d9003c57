"""On-policy distillation (paper §4.1 (3)): student rollouts, per-token reverse-KL score from the
teacher's log-probs on student states. Needs the teacher's WEIGHTS locally ($UNIPOST_MODELS_DIR/
Qwen3-Coder-30B-A3B-Instruct, same Qwen3 vocabulary) besides its endpoint.

Paper setup (§4.1, App. F): the student ($UNIPOST_STUDENT: qwen3-4b = Qwen3-4B-Instruct-2507, default;
qwen3-8b = Qwen3-8B), Qwen3-Coder-30B-A3B-Instruct teacher behind a vLLM OpenAI-compatible server,
OpenHands tools on SWE-Gym in one Docker container per instance, greedy evaluation on SWE-Gym Holdout.
Every value and its source, hardware and launch: experiments/README.md.

    accelerate launch --config_file configs/accelerate/ddp.yaml \
        -m unipost.cli train experiments/paper_opd.py
"""

import os

from unipost.train.config import TrainConfig
from unipost.train.paper import paper_swe_config


def config() -> TrainConfig:
    return paper_swe_config("opd", os.environ.get("UNIPOST_STUDENT", "qwen3-4b"))

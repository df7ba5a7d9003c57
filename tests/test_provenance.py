"""The paper's settings and their sources: one table (experiments/README.md), one dict in code
(unipost.train.paper.PROVENANCE), and the configs that read it never disagree; a value is labelled
"paper" only with a quote the seed text contains. Also: the paper configs build a Trainer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from unipost.objective import DAgger, LinearDecay
from unipost.train import paper
from unipost.train.paper import PROVENANCE, paper_swe_config, provenance_markdown, value

ROOT = Path(__file__).resolve().parents[1]
PAPER_DIR = ROOT.parent / "shared" / "paper"


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def test_readme_table_is_the_code_table():
    readme = (ROOT / "experiments" / "README.md").read_text()
    section = readme.split("<!-- provenance:begin -->\n", 1)[1].split("<!-- provenance:end -->", 1)[0]
    assert section == provenance_markdown(), "paste unipost.train.paper.provenance_markdown() there"


@pytest.mark.skipif(not PAPER_DIR.is_dir(), reason="the seed paper text (../shared/paper) is not here")
def test_every_paper_label_quotes_the_paper():
    text = _squash(" ".join(p.read_text() for p in PAPER_DIR.glob("*.txt")))
    for key, item in PROVENANCE.items():
        assert item.source in ("paper", "ours"), key
        if item.source == "paper":
            assert _squash(item.note) in text, f"{key}: the quote is not in the paper text"
        else:
            assert item.note.strip(), f"{key}: 'ours' needs a reason"


def test_no_unsourced_paper_claims_in_code():
    """The DAgger schedule's numbers were called "paper defaults" though the text lost them."""
    offenders = []
    for folder in ("unipost", "experiments", "benchmarks", "notebooks"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for phrase in ("paper default", "a few epochs"):
                if phrase in text.lower():
                    offenders.append(f"{path.relative_to(ROOT)}: {phrase!r}")
    assert not offenders, offenders


def test_configs_use_the_table():
    beta = DAgger().rollout.beta
    assert isinstance(beta, LinearDecay)
    assert value("dagger beta schedule") == f"max({beta.floor}, {beta.start} - {beta.step} i)"
    for recipe in ("sft", "grpo", "opd", "dagger", "aggrevate"):
        cfg = paper_swe_config(recipe)
        assert cfg.rollout.temperature == value("rollout temperature")
        assert cfg.rollout.top_p == value("rollout top_p")
        assert cfg.rollout.context_budget == value("context tokens")
        assert cfg.rollout.max_turns == value("max turns")
        assert cfg.rollout.max_new_tokens == value("max new tokens per turn")
        assert cfg.env.heldout_tasks == value("heldout tasks")
    sft = paper_swe_config("sft")
    assert (sft.optim.schedule, sft.optim.lr, sft.optim.warmup_ratio, sft.optim.min_lr_ratio) == (
        value("sft lr schedule"),
        value("sft max lr"),
        value("sft warmup ratio"),
        value("sft min lr ratio"),
    )
    assert sft.iterations == value("sft epochs") and sft.recipe_kwargs["data"] == paper.sft_data_path()
    grpo = paper_swe_config("grpo")
    assert grpo.optim.lr == value("grpo lr") and grpo.optim.schedule == value("grpo lr schedule")
    assert grpo.recipe_kwargs["group_size"] == value("grpo group size")
    episodes = grpo.rollout.episodes_per_iteration * grpo.iterations
    assert episodes >= value("grpo passes") * value("grpo instances")  # full passes, not 10 x 8 tasks
    dagger = paper_swe_config("dagger")
    assert dagger.optim.schedule == value("online lr schedule") and dagger.optim.lr == value("online lr")
    assert dagger.optim.epochs_per_batch == value("online epochs per batch")


def _instances(path: Path, n: int, prefix: str) -> None:
    record = json.loads((ROOT / "tests" / "fixtures" / "swe" / "instances.jsonl").read_text().splitlines()[0])
    lines = [json.dumps({**record, "instance_id": f"{prefix}__repo-{i}"}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")


class _FakeSWEEnv:
    """Stands in for DockerSWEEnv (no Docker here): the same task keys, the same IndexError."""

    def __init__(self, env_config, task):
        from unipost.envs.registry import swe_instances

        self.tools: list = []
        split, index = task
        self.instance = swe_instances(env_config, split)[index]  # IndexError past the split

    def reset(self):
        return [{"role": "user", "content": self.instance.problem_statement}]

    def close(self):
        pass


def test_paper_grpo_builds_its_trainer_on_the_293_instance_file(tmp_path, monkeypatch, tokenizer):
    """It raised IndexError: train_tasks=2000 over 293 instances; heldout came from the same file."""
    import importlib.util

    from unipost.models import build_tiny_qwen3
    from unipost.train.trainer import Trainer

    _instances(tmp_path / "skyrl.jsonl", 293, "skyrl")
    _instances(tmp_path / "swe-gym.jsonl", 400, "gym")
    monkeypatch.setenv("UNIPOST_SKYRL_V0", str(tmp_path / "skyrl.jsonl"))
    monkeypatch.setenv("UNIPOST_SWE_GYM", str(tmp_path / "swe-gym.jsonl"))
    monkeypatch.delenv("UNIPOST_SWE_SPLIT", raising=False)
    spec = importlib.util.spec_from_file_location("paper_grpo", ROOT / "experiments" / "paper_grpo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.config()
    # the vLLM engine is the GPU path; everything else is the paper config as is
    cfg = cfg.replace(
        output_dir=str(tmp_path / "runs"),
        progress=False,
        rollout=cfg.rollout.model_copy(update={"backend": "transformers"}),
    )
    trainer = Trainer(
        cfg,
        tokenizer=tokenizer,
        student=build_tiny_qwen3(len(tokenizer), seed=0),
        env_factory=lambda task: _FakeSWEEnv(cfg.env, task),
    )
    pool = trainer.train_tasks()
    assert 250 < len(pool) <= 293  # the SkyRL-v0 file's train split, all of it
    for i in range(cfg.iterations):
        for split, index in trainer.tasks_for(i):
            assert split == "train" and index < len(pool)
    heldout = trainer.heldout_tasks()
    assert 0 < len(heldout) <= value("heldout tasks")
    names = {_FakeSWEEnv(cfg.env, t).instance.instance_id for t in heldout}
    assert all(n.startswith("gym__") for n in names)  # SWE-Gym Holdout, not SkyRL-v0

"""The README's snippets and commands are the ones that work (STYLE habit 9)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_recipe_snippet_runs():
    block = next(b for b in python_blocks() if "mixture_opd" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["mixture_opd"].describe().startswith("mixture-OPD")
    assert namespace["dagger"].filter_unsubmitted


def test_the_readme_compositions_are_the_named_recipes():
    """The README says DAgger() and AggreVaTe() are its `dagger` and `aggrevate` (its aggrevate used to
    keep unsubmitted trajectories, which AggreVaTe() drops)."""
    import dataclasses

    from unipost.objective import AggreVaTe, DAgger

    namespace: dict = {}
    exec(compile(next(b for b in python_blocks() if "mixture_opd" in b), "README.md", "exec"), namespace)
    assert "`DAgger()` and `AggreVaTe()` equal `dagger` and `aggrevate`" in " ".join(README.split())
    assert dataclasses.replace(namespace["dagger"], name="DAgger") == DAgger()
    assert dataclasses.replace(namespace["aggrevate"], name="AggreVaTe") == AggreVaTe()


def test_trainer_snippet_runs_as_written_and_its_saved_config_rebuilds_the_recipe(tmp_path, monkeypatch):
    """The README's Trainer snippet trains mixture-OPD; its runs/<name>/config.json used to say
    "recipe": "dagger" (the config's default), so `unipost train config.json` ran another method."""
    from unipost.envs.embedded import bwrap_available
    from unipost.train.config import TrainConfig

    if not bwrap_available():
        pytest.skip("the embedded environment needs bubblewrap (apt-get install bubblewrap)")
    monkeypatch.chdir(tmp_path)  # the snippet writes to runs/ under the working directory
    blocks = [b for b in python_blocks() if "mixture_opd" in b]
    assert len(blocks) == 2 and "Trainer(" in blocks[1]
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    run = tmp_path / "runs" / "mixture-opd"
    saved = TrainConfig.from_file(run / "config.json")
    assert saved.recipe == "custom" and saved.recipe_kwargs == {}
    assert saved.build_recipe() == namespace["mixture_opd"]
    assert "runs/mixture-opd/config.json" in README  # the paragraph after the snippet names this file
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/batch_labels"] > 0  # it trained on the student's own labelled samples


def test_first_screen_has_exactly_the_two_setup_commands():
    first_block = re.search(r"```bash\n(.*?)```", README, flags=re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["bash scripts/run-main-job.sh", "bash scripts/run-tests.sh"]
    ci = (Path(__file__).resolve().parents[1] / ".ci" / "run").read_text()
    assert "scripts/run-tests.sh" in ci
    main_job = (Path(__file__).resolve().parents[1] / "scripts" / "run-main-job.sh").read_text()
    assert "unipost main" in main_job


def test_kernel_snippet_runs_as_written():
    """Every name the kernel snippet uses is defined in it (it used to be pseudo-code: hidden_NH, model)."""
    block = next(b for b in python_blocks() if "token_logprobs(" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["logp_N"].shape == (6,) and namespace["logp_L"].shape == (5,)
    assert namespace["hidden_NH"].grad is None  # only the packed loss was back-propagated
    assert namespace["model"].lm_head.weight.grad is not None
    assert namespace["metrics"]["label_tokens"] == 5


def test_kernel_snippet_with_a_token_id_outside_the_vocabulary_names_the_mismatch():
    from unipost.kernels import Label, PackSequence, pack, packed_logprobs
    from unipost.models import build_tiny_qwen3

    model = build_tiny_qwen3(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    batch = pack([PackSequence([1, 2, 3, 70, 5], [Label(3, (4,))])])  # 70 >= 64, not checked when packing
    with pytest.raises(ValueError, match=r"token id 70 but the model's embedding has 64 ids.*own tokenizer"):
        packed_logprobs(model, batch)
    # a label token (a target of the head) outside the vocabulary is caught by the head itself
    with pytest.raises(ValueError, match=r"targets must be in \[0, 64\)"):
        packed_logprobs(model, pack([PackSequence([1, 2, 3], [Label(2, (99,))])]))

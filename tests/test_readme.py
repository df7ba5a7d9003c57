"""The README's snippets and commands are the ones that work (STYLE habit 9)."""

from __future__ import annotations

import re
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_recipe_snippet_runs():
    block = next(b for b in python_blocks() if "mixture_opd" in b)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["mixture_opd"].describe().startswith("mixture-OPD")
    assert namespace["dagger"].filter_unsubmitted


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
    import pytest

    from unipost.kernels import Label, PackSequence, pack, packed_logprobs
    from unipost.models import build_tiny_qwen3

    model = build_tiny_qwen3(vocab_size=64, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1)
    batch = pack([PackSequence([1, 2, 3, 70, 5], [Label(3, (4,))])])  # 70 >= 64, not checked when packing
    with pytest.raises(ValueError, match=r"token id 70 but the model's embedding has 64 ids.*own tokenizer"):
        packed_logprobs(model, batch)
    # a label token (a target of the head) outside the vocabulary is caught by the head itself
    with pytest.raises(ValueError, match=r"targets must be in \[0, 64\)"):
        packed_logprobs(model, pack([PackSequence([1, 2, 3], [Label(2, (99,))])]))

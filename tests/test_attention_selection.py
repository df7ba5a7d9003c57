"""Automatic attention selection for packed batches, checked on CPU (no GPU, no flash-attn here).

``select_attention`` is pure, so the CUDA rows of its table are checked by naming the device; switching
(``set_attention``) runs on a real tiny Qwen3 through transformers' ``set_attn_implementation`` and is
compared against the loaded implementation's hidden states. On CPU, ``auto`` switches an SDPA model to
the split per-document / per-branch path (``unipost_packed_sdpa``), checked against the dense mask.
"""

from __future__ import annotations

import pytest
import torch

from unipost._optional import available
from unipost.kernels.attention import (
    PACKED_SDPA,
    AttentionBackendError,
    attention_implementation,
    select_attention,
    set_attention,
)
from unipost.kernels.model import hidden_states
from unipost.kernels.packing import Label, PackSequence, pack

# Same math, different kernels (SDPA vs eager softmax order): hidden states agree to float32 rounding.
ATTN_TOL = {"atol": 1e-5, "rtol": 1e-4}


def _packs(vocab: int):
    g = torch.Generator().manual_seed(0)
    root_a = torch.randint(0, vocab, (24,), generator=g).tolist()
    root_b = torch.randint(0, vocab, (15,), generator=g).tolist()
    on_spine_a, on_spine_b = Label(10, tuple(root_a[10:14])), Label(5, tuple(root_b[5:7]))
    branch = Label(8, tuple(torch.randint(0, vocab, (3,), generator=g).tolist()))
    flat = pack([PackSequence(root_a, [on_spine_a]), PackSequence(root_b, [on_spine_b])])
    tree = pack([PackSequence(root_a, [on_spine_a, branch]), PackSequence(root_b, [on_spine_b])])
    assert not flat.has_branches and tree.has_branches
    return flat, tree


@pytest.mark.parametrize(
    ("device", "branches", "loaded", "flash", "expected"),
    [
        # CPU: SDPA (the default) becomes the split per-document / per-branch SDPA path; the eager and
        # FlexAttention reference paths are kept; flash cannot run on CPU -> the split path.
        ("cpu", False, "sdpa", True, PACKED_SDPA),
        ("cpu", True, "sdpa", True, PACKED_SDPA),
        ("cpu", True, PACKED_SDPA, False, PACKED_SDPA),
        ("cpu", True, "eager", False, "eager"),
        ("cpu", True, "flex_attention", False, "flex_attention"),
        ("cpu", False, "flash_attention_2", True, PACKED_SDPA),
        ("cuda", True, PACKED_SDPA, False, "flex_attention"),
        # CUDA: trees need FlexAttention's block mask; branch-free packs take flash-attn varlen if present.
        ("cuda", True, "sdpa", True, "flex_attention"),
        ("cuda", True, "flash_attention_2", True, "flex_attention"),
        ("cuda", False, "sdpa", True, "flash_attention_2"),
        ("cuda", False, "flash_attention_3", True, "flash_attention_3"),
        ("cuda", False, "sdpa", False, "flex_attention"),
        ("cuda", False, "eager", False, "flex_attention"),
    ],
)
def test_select_attention_table(tiny_model, device, branches, loaded, flash, expected):
    flat, tree = _packs(tiny_model.config.vocab_size)
    tiny_model.config._attn_implementation = loaded  # only read by select_attention; nothing runs
    got = select_attention(tiny_model, tree if branches else flat, device=device, flash_available=flash)
    assert got == expected


def test_auto_on_cpu_switches_sdpa_to_the_split_path(tiny_model):
    """``attention="model"`` keeps the loaded SDPA (dense mask); ``auto`` switches to the split path."""
    _, tree = _packs(tiny_model.config.vocab_size)
    with torch.no_grad():
        as_loaded = hidden_states(tiny_model, tree, attention="model")
        assert attention_implementation(tiny_model) == "sdpa"
        auto = hidden_states(tiny_model, tree)
    assert attention_implementation(tiny_model) == PACKED_SDPA
    torch.testing.assert_close(auto, as_loaded, **ATTN_TOL)
    with pytest.raises(ValueError, match="attention must be one of"):
        hidden_states(tiny_model, tree, attention="flash")


def test_set_attention_switches_a_loaded_model(tiny_model):
    _, tree = _packs(tiny_model.config.vocab_size)
    with torch.no_grad():
        sdpa = hidden_states(tiny_model, tree)
        set_attention(tiny_model, "eager")
        assert attention_implementation(tiny_model) == "eager"
        assert tiny_model.model.layers[0].self_attn.config._attn_implementation == "eager"
        eager = hidden_states(tiny_model, tree)  # auto on CPU keeps eager
    assert attention_implementation(tiny_model) == "eager"
    torch.testing.assert_close(eager, sdpa, **ATTN_TOL)
    set_attention(tiny_model, "sdpa")
    assert attention_implementation(tiny_model) == "sdpa"


def test_set_attention_through_peft(tiny_model):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    set_attention(model, "eager")
    assert attention_implementation(model.get_base_model()) == "eager"


@pytest.mark.skipif(available("flash_attn"), reason="flash-attn is installed here")
def test_flash_without_the_package_names_the_fix(tiny_model):
    with pytest.raises(AttentionBackendError, match=r"flash_attention_2.*pip install flash-attn"):
        set_attention(tiny_model, "flash_attention_2")
    assert attention_implementation(tiny_model) == "sdpa"

"""The split CPU attention path (``unipost_packed_sdpa``): per-document and per-branch SDPA calls.

Equalities are float32 on real tiny Qwen3 models: log-probs atol 1e-5, parameter gradients atol 1e-5
/ rtol 1e-4 against separate forward passes (``check_equal_to_separate``) and against the dense
additive [T, T] mask (``attention="model"`` on an SDPA-loaded model). Different kernels sum in a
different order, so bit-equality is not expected; 1e-5 is ~100x the differences seen here.
"""

from __future__ import annotations

import random

import pytest
import torch
from test_packing import check_equal_to_separate, grads, random_tree

from unipost.kernels.attention import (
    PACKED_SDPA,
    AttentionBackendError,
    AttentionPiece,
    PackedLayout,
    attention_implementation,
    set_attention,
)
from unipost.kernels.model import hidden_states, packed_logprobs
from unipost.kernels.packing import Label, PackedBatch, PackSequence, pack
from unipost.models import build_tiny_qwen3

GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}


def test_layout_cuts_spines_and_branches():
    """Spines become causal pieces; a branch sees its document's spine up to its attach point."""
    a = PackSequence(list(range(10, 20)), [Label(4, (1, 2, 3)), Label(2, (12, 13))])  # branch, then on spine
    b = PackSequence(list(range(30, 36)), [Label(6, (7, 8)), Label(3, (9,))])  # attach at the end; 1-token
    batch = pack([a, b])
    layout = PackedLayout.from_batch(batch)
    assert layout.pieces == (
        AttentionPiece(0, 10),  # doc a's spine
        AttentionPiece(10, 12, prefix=((0, 4),)),  # (1, 2, 3): inputs 1, 2 after root[:4]
        AttentionPiece(12, 18),  # doc b's spine
        AttentionPiece(18, 19, prefix=((12, 6),)),  # (7, 8): input 7 after all of b's root
    )  # the 1-token branch (9,) has no input tokens: no piece
    assert layout.num_tokens == batch.num_tokens == 19
    mask = layout.branch_mask(1, torch.float32, torch.device("cpu"))
    allowed = mask == 0
    assert allowed.tolist() == [[True] * 5 + [False], [True] * 6]


def test_split_path_never_builds_the_dense_mask(tiny_model, monkeypatch):
    """The whole point: no [T, T] mask on the CPU training path (the dense rule is the reference only)."""

    def refuse(self):
        raise AssertionError("the split path built a dense [T, T] mask")

    rng = random.Random(5)
    batch = pack([random_tree(rng, tiny_model.config.vocab_size, 40, 6)])
    monkeypatch.setattr(PackedBatch, "dense_mask", refuse)
    out = packed_logprobs(tiny_model, batch)
    out.logp_L.sum().backward()
    assert attention_implementation(tiny_model) == PACKED_SDPA


@pytest.mark.parametrize("kv_heads", [1, 4])  # GQA 4:1 and plain multi-head (the fixture is 2:1)
def test_edge_cases_equal_separate(tokenizer, kv_heads):
    """One-token roots, branches attached at the very end, empty branches, shared branch points."""
    model = build_tiny_qwen3(len(tokenizer), num_heads=4, num_kv_heads=kv_heads, seed=7)
    rng = random.Random(6)
    vocab = model.config.vocab_size
    root = [rng.randrange(vocab) for _ in range(25)]
    sequences = [
        PackSequence([5], [Label(1, (6, 7, 8))]),  # a one-token document with a 2-input branch
        random_tree(rng, vocab, 30, 5),
        PackSequence(root, [Label(25, (1, 2, 3, 4)), Label(25, (9,)), Label(12, tuple(root[12:20]))]),
        PackSequence([rng.randrange(vocab) for _ in range(9)], [Label(3, (4, 5))]),
    ]
    check_equal_to_separate(model, sequences)
    assert attention_implementation(model) == PACKED_SDPA


def _loss_and_grads(model, batch, attention):
    model.zero_grad()
    weights_L = torch.linspace(-1.0, 2.0, batch.num_label_tokens)
    logp = packed_logprobs(model, batch, attention=attention).logp_L
    (weights_L * logp).sum().backward()
    return logp.detach(), grads(model)


def _assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=0)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **GRAD_TOL, msg=name)


def _tree_batch(vocab: int, seed: int = 8) -> PackedBatch:
    rng = random.Random(seed)
    return pack([random_tree(rng, vocab, 50, 7), random_tree(rng, vocab, 30, 4)])


def test_split_path_equals_dense_under_gradient_checkpointing(tiny_model):
    """Checkpointed layers replay the split calls in backward: gradients still equal the dense path."""
    batch = _tree_batch(tiny_model.config.vocab_size)
    dense = _loss_and_grads(tiny_model, batch, "model")
    if hasattr(tiny_model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        tiny_model.activation_checkpointing_enable({"use_reentrant": False})
    else:
        tiny_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny_model.train()
    split = _loss_and_grads(tiny_model, batch, "auto")
    assert attention_implementation(tiny_model) == PACKED_SDPA
    _assert_same(split, dense)


def test_split_path_through_peft(tiny_model):
    peft = pytest.importorskip("peft")
    batch = _tree_batch(tiny_model.config.vocab_size, seed=9)
    model = peft.get_peft_model(tiny_model, peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    for name, param in model.named_parameters():  # LoRA B starts at zero: give it a gradient path
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    dense = _loss_and_grads(model, batch, "model")
    split = _loss_and_grads(model, batch, "auto")
    assert attention_implementation(model.get_base_model()) == PACKED_SDPA
    assert any("lora" in name for name in split[1])
    _assert_same(split, dense)


def test_a_switched_model_generates_like_sdpa(tiny_model):
    """Outside packs the registered function is transformers' SDPA: padded greedy generation is unchanged."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[2, :1] = 0
    kwargs = {"attention_mask": mask, "max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        expected = tiny_model.generate(input_ids=ids, **kwargs)
        set_attention(tiny_model, PACKED_SDPA)
        got = tiny_model.generate(input_ids=ids, **kwargs)
        logits_sdpa_path = tiny_model(input_ids=ids, attention_mask=mask).logits
        set_attention(tiny_model, "sdpa")
        logits_sdpa = tiny_model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, expected)
    assert torch.equal(logits_sdpa_path, logits_sdpa)


def test_sliding_window_layers_are_refused(tokenizer):
    model = build_tiny_qwen3(len(tokenizer), seed=1)
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    model.config.sliding_window = 8
    for layer in model.model.layers:  # what a model configured with sliding windows would hold
        layer.self_attn.sliding_window = 8
    model.model.has_sliding_layers = True
    batch = pack([PackSequence(list(range(1, 30)), [Label(10, (3, 4))])])
    with torch.no_grad(), pytest.raises(AttentionBackendError, match="sliding-window"):
        hidden_states(model, batch)

"""Prefixes shared across trajectories (``pack_shared``): one prefix tree per micro-batch, exact.

Every check compares, on real tiny Qwen3 models in float32, the cross-trajectory tree (``pack_shared``)
with one tree per trajectory (``pack``) and with separate forward passes of each (context, label):
per-token log-probs atol 1e-5, parameter gradients atol 1e-5 / rtol 1e-4 (different kernels sum in a
different order; the differences seen are ~1e-7 / ~1e-6). Both CPU attention paths run: the split
per-span SDPA calls (``attention="auto"``) and the dense additive mask (``attention="model"``).
"""

from __future__ import annotations

import random

import pytest
import torch
from test_packing import grads, separate_logprobs

from unipost.kernels.attention import AttentionPiece, PackedLayout
from unipost.kernels.model import packed_logprobs
from unipost.kernels.packing import (
    Label,
    PackingError,
    PackSequence,
    pack,
    pack_shared,
    packed_size,
    shared_size,
    split_sequences,
)

ATOL = 1e-5
GRAD_TOL = {"atol": 1e-5, "rtol": 1e-4}


def run(model, batch, attention="auto"):
    """Log-probs and gradients of sum_t w_t logp_t with fixed arbitrary weights."""
    model.zero_grad()
    logp = packed_logprobs(model, batch, attention=attention).logp_L
    weights = torch.linspace(-1.0, 2.0, logp.numel())
    (weights * logp).sum().backward()
    return logp.detach(), grads(model)


def separate(model, sequences):
    """The reference: one plain forward per (context, label), same weights as :func:`run`."""
    model.zero_grad()
    n = sum(len(label.token_ids) for seq in sequences for label in seq.labels)
    weights = torch.linspace(-1.0, 2.0, n)
    out, offset = [], 0
    for seq in sequences:
        for label in seq.labels:
            logp = separate_logprobs(model, seq.root[: label.context_len], list(label.token_ids))
            k = len(label.token_ids)
            (weights[offset : offset + k] * logp).sum().backward()
            out.append(logp.detach())
            offset += k
    return torch.cat(out), grads(model)


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], atol=ATOL, rtol=0)
    assert a[1].keys() == b[1].keys()
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], **GRAD_TOL, msg=name)


def check_all_equal(model, sequences, attention="auto"):
    """Shared tree == per-trajectory trees == separate passes; returns the two packs."""
    shared = pack_shared(sequences, vocab_size=model.config.vocab_size)
    per_doc = pack(sequences)
    for field in ("label_target_L", "label_weight_L", "label_seq_L", "seq_doc_S"):
        assert torch.equal(getattr(shared, field), getattr(per_doc, field)), field
    got = run(model, shared, attention)
    assert_same(got, run(model, per_doc, attention))
    assert_same(got, separate(model, sequences))
    return shared, per_doc


def grpo_group(rng, vocab, prompt_len=40, samples=4):
    """G samples of one prompt; labels are the samples' own actions (on their spines)."""
    prompt = [rng.randrange(vocab) for _ in range(prompt_len)]
    docs = []
    for _ in range(samples):
        root, labels = list(prompt), []
        for _turn in range(2):
            action = [rng.randrange(vocab) for _ in range(rng.randrange(3, 9))]
            labels.append(Label(len(root), tuple(action), rng.uniform(-1.0, 1.0)))
            root += action + [rng.randrange(vocab) for _ in range(rng.randrange(4, 12))]
        docs.append(PackSequence(root, labels))
    return prompt, docs


def dagger_iteration(rng, vocab, system_len=30, trajectories=3):
    """Trajectories sharing a system prompt, different tasks; student turns carry teacher branches."""
    system = [rng.randrange(vocab) for _ in range(system_len)]
    docs = []
    for t in range(trajectories):
        root = system + [rng.randrange(vocab) for _ in range(rng.randrange(5, 15))]  # the task
        labels = []
        for turn in range(3):
            executed = [rng.randrange(vocab) for _ in range(rng.randrange(3, 8))]
            if (t + turn) % 2 == 0:  # teacher executed: label on the spine
                labels.append(Label(len(root), tuple(executed)))
            else:  # student executed: the teacher's label, its first token equal to the executed one
                teacher = [executed[0]] + [rng.randrange(vocab) for _ in range(rng.randrange(1, 6))]
                labels.append(Label(len(root), tuple(teacher), 0.5))
            root += executed + [rng.randrange(vocab) for _ in range(rng.randrange(4, 10))]
        docs.append(PackSequence(root, labels))
    docs[0].labels.append(Label(system_len, (3, 4, 5)))  # a branch off the system prompt itself
    docs[1].labels.append(Label(system_len, (3, 4, 5)))  # the same label in another trajectory: shared
    return system, docs


@pytest.mark.parametrize("attention", ["auto", "model"])
def test_grpo_group_is_one_tree(tiny_model, attention):
    rng = random.Random(0)
    prompt, docs = grpo_group(rng, tiny_model.config.vocab_size)
    shared, per_doc = check_all_equal(tiny_model, docs, attention)
    assert per_doc.num_tokens == sum(len(d.root) for d in docs)
    assert shared.num_tokens == per_doc.num_tokens - (len(docs) - 1) * len(prompt)  # prompt once
    assert shared.num_tokens == shared_size(docs)
    assert shared.num_docs == 1 and shared.num_branches == len(docs) - 1


@pytest.mark.parametrize("attention", ["auto", "model"])
def test_dagger_iteration_with_branches(tiny_model, attention):
    """Three levels: system prompt -> trajectory spines -> teacher branches (two segments of prefix)."""
    rng = random.Random(1)
    system, docs = dagger_iteration(rng, tiny_model.config.vocab_size)
    shared, per_doc = check_all_equal(tiny_model, docs, attention)
    assert per_doc.has_branches
    # the system prompt once; each teacher branch's first token shared with the executed action; the
    # duplicated (3, 4, 5) branch once
    saved_prompt = (len(docs) - 1) * len(system)
    assert shared.num_tokens <= per_doc.num_tokens - saved_prompt - 2
    assert int(shared.span_parents().max()) > 0  # some span hangs off a span that is itself a branch
    layout = PackedLayout.from_batch(shared)
    assert max(len(piece.prefix) for piece in layout.pieces) >= 2


def test_no_common_prefix_changes_nothing(tiny_model):
    rng = random.Random(2)
    vocab = tiny_model.config.vocab_size
    docs = []
    for first in (5, 6, 7):  # distinct first tokens: nothing to share
        root = [first] + [rng.randrange(vocab) for _ in range(20)]
        docs.append(PackSequence(root, [Label(8, tuple(root[8:12])), Label(15, (1, 2, 3))]))
    shared, per_doc = check_all_equal(tiny_model, docs)
    assert shared.num_tokens == per_doc.num_tokens == sum(packed_size(d) for d in docs)
    assert shared.num_docs == 3 and shared.num_branches == per_doc.num_branches == 3
    assert torch.equal(shared.input_ids_T, per_doc.input_ids_T)
    assert torch.equal(shared.position_ids_T, per_doc.position_ids_T)


def test_prefix_equal_to_a_whole_document(tiny_model):
    """A document that is a prefix of another (and an exact duplicate) adds no token at all."""
    rng = random.Random(3)
    vocab = tiny_model.config.vocab_size
    long = [rng.randrange(vocab) for _ in range(30)]
    docs = [
        PackSequence(long[:12], [Label(6, tuple(long[6:12])), Label(12, (9, 8))]),  # a prefix of `long`
        PackSequence(long, [Label(20, tuple(long[20:25])), Label(12, (9, 8, 7))]),
        PackSequence(list(long), [Label(3, (1,))]),  # the same root again
    ]
    shared, per_doc = check_all_equal(tiny_model, docs)
    assert shared.num_tokens == len(long) + 2  # `long`, then the branch (9, 8, 7)'s inputs 9, 8
    assert per_doc.num_tokens == 12 + 1 + 30 + 2 + 30


def test_flex_mask_encodes_the_nested_rule(tiny_model):
    """FlexAttention's mask_mod (the GPU tree path) reads the same nested rule as the dense mask.

    The rule is checked on every (query, key) pair by calling the BlockMask's mask_mod directly: a CPU
    forward through flex_attention compiles with inductor, whose C++ codegen failed on this mask in a
    fresh environment (``cur_kvSplitSize8`` undeclared, torch 2.13 CPU), which is torch's bug, not the
    rule's. The forward through FlexAttention is run on CUDA by scripts/gpu-check.sh.
    """
    pytest.importorskip("torch.nn.attention.flex_attention")
    from unipost.kernels.attention import flex_block_mask

    rng = random.Random(4)
    _, docs = dagger_iteration(rng, tiny_model.config.vocab_size)
    batch = pack_shared(docs)
    block_mask = flex_block_mask(batch, device="cpu")
    t = batch.num_tokens
    q = torch.arange(t).view(t, 1).expand(t, t)
    k = torch.arange(t).view(1, t).expand(t, t)
    zero = torch.zeros((), dtype=torch.long)
    rule = block_mask.mask_mod(zero, zero, q, k)
    assert torch.equal(rule.bool(), batch.dense_mask().bool().reshape(t, t))
    assert batch.has_branches and 0 < int(rule.sum()) < t * (t + 1) // 2  # a tree, not one causal doc


def test_layout_of_a_nested_tree():
    """Pieces: the trunk+first trajectory causal; the second trajectory over the prompt; a branch of it
    over the prompt and its own spine prefix (two segments); a long piece over a short prefix is one
    causal call, a short branch over a long prefix a masked one."""
    prompt = [50, 51, 52]
    a = PackSequence([*prompt, 60, 61, 62, 63], [Label(4, (61, 62))])
    b = PackSequence([*prompt, 70, 71, 72, 73, 74], [Label(5, (1, 2, 3))])
    batch = pack_shared([a, b])
    assert batch.input_ids_T.tolist() == [50, 51, 52, 60, 61, 62, 63, 70, 71, 72, 73, 74, 1, 2]
    assert batch.position_ids_T.tolist() == [0, 1, 2, 3, 4, 5, 6, 3, 4, 5, 6, 7, 5, 6]
    assert batch.span_parents().tolist() == [-1, 0, 1]
    layout = PackedLayout.from_batch(batch)
    assert layout.pieces == (
        AttentionPiece(0, 7),
        AttentionPiece(7, 12, prefix=((0, 3),)),
        AttentionPiece(12, 14, prefix=((0, 3), (7, 2))),
    )
    assert layout.pieces[1].causal_over_prefix and not layout.pieces[2].causal_over_prefix
    # the label (1, 2, 3) of b is predicted by b's token 71 (flat 8), then by the branch's 1 and 2
    assert batch.label_src_L.tolist()[-3:] == [8, 12, 13]


def test_micro_batch_budget_counts_shared_tokens(tiny_model):
    """first-fit under share_prefixes: every micro-batch's shared pack fits the budget, fewer of them."""
    rng = random.Random(5)
    vocab = tiny_model.config.vocab_size
    docs = []
    for _ in range(3):  # three GRPO groups with different prompts
        docs += grpo_group(rng, vocab, prompt_len=60, samples=4)[1]
    budget = 200
    shared_bins = split_sequences(docs, budget, share_prefixes=True)
    plain_bins = split_sequences(docs, budget)
    assert [d for b in shared_bins for d in b] != [] and sum(map(len, shared_bins)) == len(docs)
    for b in shared_bins:
        assert pack_shared(b).num_tokens <= budget or len(b) == 1
    for b in plain_bins:
        assert pack(b).num_tokens <= budget or len(b) == 1
    assert len(shared_bins) < len(plain_bins)
    # the shared micro-batches give the same log-probs and gradients as packing each document alone
    model = tiny_model
    model.zero_grad()
    logps = []
    for b in shared_bins:
        logps.append(packed_logprobs(model, pack_shared(b)).logp_L)
    total = torch.cat(logps)
    order = [d for b in shared_bins for d in b]
    torch.testing.assert_close(
        total.detach(), packed_logprobs(model, pack(order)).logp_L.detach(), atol=ATOL, rtol=0
    )
    with pytest.raises(PackingError, match="positive"):
        split_sequences(docs, 0, share_prefixes=True)


def test_a_document_larger_than_the_budget_gets_its_own_micro_batch():
    big = PackSequence(list(range(1, 50)), [Label(10, (3, 4))])
    small = PackSequence(list(range(1, 8)), [Label(3, (4,))])
    assert split_sequences([big, small], 20, share_prefixes=True) == [[big], [small]]
    assert split_sequences([small, big], 20, share_prefixes=True) == [[small], [big]]
    # `small` is a prefix of `big`: with `big` (49 + 1 branch input = 50 tokens) in a micro-batch it is free
    assert split_sequences([big, small], 50, share_prefixes=True) == [[big, small]]
    assert split_sequences([big, small], 50) == [[big], [small]]


def test_bad_input_is_refused_like_pack():
    with pytest.raises(PackingError, match="empty batch"):
        pack_shared([])
    with pytest.raises(PackingError, match="outside"):
        pack_shared([PackSequence([1, 2, 3], [Label(1, (99,))])], vocab_size=50)
    with pytest.raises(PackingError, match="context_len"):
        pack_shared([PackSequence([1, 2, 3], [Label(4, (2,))])])
    with pytest.raises(PackingError, match="no tokens"):
        pack_shared([PackSequence([1, 2, 3], [Label(1, ())])])
    with pytest.raises(PackingError, match="per-token weights"):
        pack_shared([PackSequence([1, 2, 3], [Label(1, (2, 3), (1.0,))])])
    with pytest.raises(PackingError, match="empty root"):
        pack_shared([PackSequence([], [])])


def test_the_trainers_micro_batches_share_a_grpo_groups_prompt(tiny_model, tokenizer):
    """``make_microbatches`` (what the Trainer and warm start call) packs a GRPO group as one tree:
    the group's prompt once, the same loss and gradients as one tree per trajectory."""
    from factories import TOOLS, make_trajectory

    from unipost.batch import objective_loss
    from unipost.objective import GRPO
    from unipost.rendering.chat import ChatRenderer
    from unipost.train.optimise import make_microbatches

    prompt = [
        {"role": "system", "content": "You are a careful software engineer. " * 12},
        {"role": "user", "content": "The function add(2, 3) returns the wrong value in pkg/mod.py."},
    ]
    group = [make_trajectory("sss", seed=i, reward=float(i % 3), meta={"group": "g"}) for i in range(8)]
    for trajectory in group:
        trajectory.prompt = prompt
    recipe = GRPO(group_size=8)
    renderer = ChatRenderer(tokenizer, TOOLS)
    shared = make_microbatches(group, recipe, renderer, max_tokens=1 << 20)
    per_trajectory = make_microbatches(group, recipe, renderer, max_tokens=1 << 20, share_prefixes=False)
    assert len(shared) == len(per_trajectory) == 1
    prompt_tokens = len(renderer.context_ids(prompt))
    assert prompt_tokens > 100
    a, b = shared[0].packed, per_trajectory[0].packed
    assert a.num_tokens <= b.num_tokens - 7 * prompt_tokens
    assert b.num_tokens / a.num_tokens > 2.0

    def loss_and_grads(batch):
        tiny_model.zero_grad()
        loss, metrics = objective_loss(tiny_model, batch, recipe)
        loss.backward()
        return loss.detach(), grads(tiny_model), metrics

    loss_a, grads_a, metrics_a = loss_and_grads(shared[0])
    loss_b, grads_b, metrics_b = loss_and_grads(per_trajectory[0])
    torch.testing.assert_close(loss_a, loss_b, atol=ATOL, rtol=0)
    for name in grads_b:
        torch.testing.assert_close(grads_a[name], grads_b[name], **GRAD_TOL, msg=name)
    assert metrics_a["packed_tokens"] == a.num_tokens < metrics_b["packed_tokens"]

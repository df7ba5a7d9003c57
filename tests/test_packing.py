"""Packed (varlen and tree) log-probs and gradients equal separate forward passes, fp32 atol 1e-5.

Both CPU attention paths are checked: ``attention="auto"`` (the split per-document / per-branch SDPA
calls, ``unipost_packed_sdpa``) and ``attention="model"`` on an SDPA-loaded model (one dense additive
[T, T] mask, the reference).
"""

from __future__ import annotations

import random

import pytest
import torch

from unipost.kernels.attention import PACKED_SDPA, attention_implementation
from unipost.kernels.loss import weighted_nll
from unipost.kernels.model import packed_logprobs
from unipost.kernels.packing import Label, PackingError, PackSequence, pack, packed_size, per_transition

ATOL = 1e-5


def separate_logprobs(model, context: list[int], label: list[int]) -> torch.Tensor:
    """The reference: one plain forward of context + label, full logits, log_softmax, gather."""
    device = next(model.parameters()).device
    ids = torch.tensor([context + label], device=device)
    logits = model(input_ids=ids).logits[0].float()
    c, n = len(context), len(label)
    logp = torch.log_softmax(logits[c - 1 : c + n - 1], dim=-1)
    return logp.gather(1, torch.tensor(label, device=device)[:, None])[:, 0]


def random_tree(rng: random.Random, vocab: int, spine_len: int, n_labels: int) -> PackSequence:
    """A spine with labels on it (executed) and off it (branches), including shared branch points."""
    root = [rng.randrange(vocab) for _ in range(spine_len)]
    labels = []
    for i in range(n_labels):
        c = rng.randrange(1, spine_len - 4)
        n = rng.randrange(1, 6)
        if i % 3 == 0:  # on the spine: the label is what was executed
            labels.append(Label(c, tuple(root[c : c + n]), rng.uniform(0.2, 2.0)))
        else:  # a branch (a teacher label differing from the executed student action)
            labels.append(Label(c, tuple(rng.randrange(vocab) for _ in range(n)), rng.uniform(0.2, 2.0)))
    # two labels at the same branch point, and a length-1 branch
    labels.append(Label(5, (1, 2, 3), 1.0))
    labels.append(Label(5, (7,), 0.5))
    return PackSequence(root, labels)


def random_varlen(rng: random.Random, vocab: int, count: int, max_context: int) -> list[PackSequence]:
    """``count`` documents, each a random context and one label (1-11 tokens) at its end: no branches."""
    sequences = []
    for _ in range(count):
        context = [rng.randrange(vocab) for _ in range(rng.randrange(3, max_context))]
        label = [rng.randrange(vocab) for _ in range(rng.randrange(1, 12))]
        sequences.append(PackSequence(context + label, [Label(len(context), tuple(label))]))
    return sequences


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def check_equal_to_separate(
    model,
    sequences: list[PackSequence],
    impl: str = "fused",
    attention: str = "auto",
    separate_attention: str | None = None,
) -> None:
    """``separate_attention``: switch the model to it for the separate passes (else they use the pack's)."""
    batch = pack(sequences, vocab_size=model.config.vocab_size)
    torch.manual_seed(1)
    model.zero_grad()
    out = packed_logprobs(model, batch, impl=impl, attention=attention)
    weights_L = torch.randn(batch.num_label_tokens).to(out.logp_L)  # arbitrary per-token weights w_t
    (weights_L * out.logp_L).sum().backward()
    packed_grads = grads(model)

    if separate_attention is not None:
        from unipost.kernels.attention import set_attention

        set_attention(model, separate_attention)
    model.zero_grad()
    expected = []
    offset = 0
    for seq in sequences:
        for label in seq.labels:
            logp = separate_logprobs(model, seq.root[: label.context_len], list(label.token_ids))
            n = len(label.token_ids)
            (weights_L[offset : offset + n] * logp).sum().backward()
            expected.append(logp.detach())
            offset += n
    torch.testing.assert_close(out.logp_L.detach(), torch.cat(expected), atol=ATOL, rtol=0)
    separate_grads = grads(model)
    assert packed_grads.keys() == separate_grads.keys()
    for name, g in separate_grads.items():
        torch.testing.assert_close(packed_grads[name], g, atol=ATOL, rtol=1e-4, msg=name)


@pytest.mark.parametrize("attention", ["auto", "model"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_varlen_pack_equals_separate(tiny_model, impl, attention):
    sequences = random_varlen(random.Random(0), tiny_model.config.vocab_size, 5, 40)
    batch = pack(sequences)
    assert not batch.has_branches and batch.num_docs == 5
    check_equal_to_separate(tiny_model, sequences, impl, attention)
    assert attention_implementation(tiny_model) == ("sdpa" if attention == "model" else PACKED_SDPA)


@pytest.mark.parametrize("attention", ["auto", "model"])
def test_tree_pack_equals_separate(tiny_model, attention):
    rng = random.Random(1)
    vocab = tiny_model.config.vocab_size
    sequences = [random_tree(rng, vocab, 60, 8), random_tree(rng, vocab, 35, 5)]
    batch = pack(sequences)
    assert batch.has_branches
    assert batch.num_tokens == sum(packed_size(s) for s in sequences)
    assert batch.num_tokens < sum(len(s.root) for s in per_transition(sequences))
    check_equal_to_separate(tiny_model, sequences, attention=attention)
    assert attention_implementation(tiny_model) == ("sdpa" if attention == "model" else PACKED_SDPA)


def test_tied_embeddings_tree(tokenizer):
    from unipost.models import build_tiny_qwen3

    model = build_tiny_qwen3(len(tokenizer), tie_word_embeddings=True, seed=3)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    rng = random.Random(2)
    check_equal_to_separate(model, [random_tree(rng, model.config.vocab_size, 40, 6)])


def _label_tokens(seq: PackSequence) -> int:
    return sum(len(label.token_ids) for label in seq.labels)


def _edited(rng: random.Random, vocab: int, seq: PackSequence) -> PackSequence:
    """``seq`` with every root token redrawn (different from the old one) and its labels kept."""
    return PackSequence([(t + rng.randrange(1, vocab)) % vocab for t in seq.root], seq.labels)


@pytest.mark.parametrize("attention", ["auto", "model"])
def test_no_cross_contamination(tiny_model, attention):
    """Changing one document's tokens leaves every other document's log-probs bit-identical, whichever
    document changes: the one packed first, the one packed last, or one in the middle. (Editing only a
    later document is not enough: plain causal attention already hides it from earlier ones.)"""
    rng = random.Random(3)
    vocab = tiny_model.config.vocab_size
    docs = [random_tree(rng, vocab, 30, 4) for _ in range(3)]
    bounds = [0]
    for doc in docs:
        bounds.append(bounds[-1] + _label_tokens(doc))
    with torch.no_grad():
        before = packed_logprobs(tiny_model, pack(docs), attention=attention).logp_L
        for edited in range(len(docs)):
            changed = [_edited(rng, vocab, d) if i == edited else d for i, d in enumerate(docs)]
            after = packed_logprobs(tiny_model, pack(changed), attention=attention).logp_L
            for i in range(len(docs)):
                old, new = before[bounds[i] : bounds[i + 1]], after[bounds[i] : bounds[i + 1]]
                if i == edited:  # the edit reached the model: the edited document's log-probs moved
                    assert not torch.allclose(old, new), f"editing document {edited} changed nothing"
                else:
                    torch.testing.assert_close(
                        new, old, atol=1e-6, rtol=0, msg=f"editing document {edited} moved document {i}"
                    )


@pytest.mark.parametrize("attention", ["auto", "model"])
def test_branches_do_not_see_each_other(tiny_model, attention):
    """Branches at the same point (and one at another point): editing any one branch leaves the spine's
    and every other branch's log-probs unchanged, in both directions (a branch packed before the
    edited one, and one packed after it)."""
    root = list(range(10, 30))
    on_spine = Label(4, tuple(root[4:7]))  # scored on the spine: a branch must not reach it either
    branches = [(8, (3, 4, 5)), (8, (6, 7, 8, 9)), (12, (40, 41, 42))]
    variants = [(8, (50, 51, 5)), (8, (60, 70, 80, 9)), (12, (90, 91, 42))]  # same targets' last token

    def logp(labels: list[tuple[int, tuple[int, ...]]]) -> list[torch.Tensor]:
        seq = PackSequence(root, [on_spine] + [Label(c, ids) for c, ids in labels])
        batch = pack([seq])
        assert batch.num_branches == len(labels)
        with torch.no_grad():
            out = packed_logprobs(tiny_model, batch, attention=attention).logp_L
        return list(out.split([len(label.token_ids) for label in seq.labels]))

    before = logp(branches)
    for edited in range(len(branches)):
        after = logp([variants[i] if i == edited else b for i, b in enumerate(branches)])
        assert not torch.allclose(before[1 + edited], after[1 + edited]), "the edit changed nothing"
        for i in range(len(before)):
            if i != 1 + edited:
                torch.testing.assert_close(
                    after[i], before[i], atol=1e-6, rtol=0, msg=f"editing branch {edited} moved label {i}"
                )


def test_weighted_nll_normalisations():
    logp = torch.tensor([-1.0, -2.0, -3.0, -4.0], requires_grad=True)
    w = torch.tensor([1.0, 0.5, 2.0, 1.0])
    seq = torch.tensor([0, 0, 0, 1])
    loss, _ = weighted_nll(logp, w, normalization="token_mean")
    assert loss.item() == pytest.approx((1 + 1 + 6 + 4) / 4)
    loss, _ = weighted_nll(logp, w, seq, normalization="sequence_mean")
    assert loss.item() == pytest.approx(((1 + 1 + 6) / 3 + 4) / 2)
    loss, _ = weighted_nll(logp, w, normalization="constant", constant=10.0)
    assert loss.item() == pytest.approx(1.2)
    loss.backward()
    torch.testing.assert_close(logp.grad, -w / 10.0)
    with pytest.raises(ValueError, match="constant"):
        weighted_nll(logp, w, normalization="constant")
    with pytest.raises(ValueError, match="unknown normalization"):
        weighted_nll(logp, w, normalization="mean")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="shape"):
        weighted_nll(logp, w[:2])


def test_bad_packing_input():
    with pytest.raises(PackingError, match="empty batch"):
        pack([])
    with pytest.raises(PackingError, match="outside"):
        pack([PackSequence([1, 2, 3], [Label(1, (99,))])], vocab_size=50)
    with pytest.raises(PackingError, match="context_len"):
        pack([PackSequence([1, 2, 3], [Label(0, (2,))])])
    with pytest.raises(PackingError, match="no tokens"):
        pack([PackSequence([1, 2, 3], [Label(1, ())])])
    with pytest.raises(PackingError, match="per-token weights"):
        pack([PackSequence([1, 2, 3], [Label(1, (2, 3), (1.0,))])])
    with pytest.raises(PackingError, match="empty root"):
        pack([PackSequence([], [])])


def test_flex_attention_mask_matches_dense(tiny_model):
    """The FlexAttention BlockMask (GPU tree path) encodes the same rule as the dense SDPA mask.

    FlexAttention has no backward on CPU (MACHINE-NOTES), so only the forward is checked here.
    """
    pytest.importorskip("torch.nn.attention.flex_attention")
    from unipost.kernels.model import hidden_states

    rng = random.Random(4)
    seqs = [
        random_tree(rng, tiny_model.config.vocab_size, 40, 6),
        random_tree(rng, tiny_model.config.vocab_size, 20, 3),
    ]
    batch = pack(seqs)
    with torch.no_grad():
        dense = hidden_states(tiny_model, batch)
        tiny_model.config._attn_implementation = "flex_attention"
        try:
            flex = hidden_states(tiny_model, batch)
        finally:
            tiny_model.config._attn_implementation = "sdpa"
    torch.testing.assert_close(flex, dense, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ on CUDA (scripts/gpu-check.sh runs these)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA (runs on a GPU: scripts/gpu-check.sh)")
@pytest.mark.parametrize("kind", ["tree", "varlen"])
def test_pack_equals_separate_cuda_flex(tokenizer, kind):
    """On CUDA, ``attention="auto"`` runs a pack through FlexAttention's BlockMask (fwd + bwd): log-probs
    and every gradient equal separate SDPA forward passes (fp32, same tolerances as on CPU)."""
    pytest.importorskip("torch.nn.attention.flex_attention")
    from unipost.kernels.attention import select_attention, set_attention
    from unipost.models import build_tiny_qwen3

    model = build_tiny_qwen3(len(tokenizer), seed=11).cuda()
    rng = random.Random(12)
    vocab = model.config.vocab_size
    if kind == "tree":
        sequences = [
            random_tree(rng, vocab, 60, 8),
            random_tree(rng, vocab, 35, 5),
            random_tree(rng, vocab, 9, 2),
        ]
    else:
        sequences = random_varlen(rng, vocab, 6, 70)
    batch = pack(sequences)
    assert batch.has_branches == (kind == "tree")
    if kind == "varlen":  # flash-attn, when installed, takes branch-free packs; this test is about flex
        assert select_attention(model, batch, flash_available=False) == "flex_attention"
        set_attention(model, "flex_attention")
        check_equal_to_separate(model, sequences, attention="model", separate_attention="sdpa")
    else:
        assert select_attention(model, batch) == "flex_attention"
        check_equal_to_separate(model, sequences, separate_attention="sdpa")
    assert attention_implementation(model) == "sdpa"

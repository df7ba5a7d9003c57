"""The fused token log-prob kernel against its plain-PyTorch reference.

Ground truth is ``token_logprobs_reference`` run in float64 on the same (for bf16: the bf16-rounded)
inputs, so the tolerances below measure the fused kernel's own error, not the reference's.
Every gradient check uses random per-token upstream gradients on ``logp`` AND on ``entropy``: a kernel
that drops either (as Liger PR #1298 and TRL's chunked head did) fails here.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from unipost.kernels.logprobs import token_logprobs
from unipost.kernels.reference import token_logprobs_reference

IGNORE = -100
# fp32: max |fused - fp64 truth| <= atol + rtol * |truth| (measured errors are ~1e-6 relative).
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}
# bf16: logits are rounded to bf16 after the GEMM (as in the naive bf16 path), so errors are relative
# to the largest magnitude: max |fused - truth| <= 1.5e-2 * max |truth| (measured ~5e-3, like naive bf16).
BF16_REL = 1.5e-2


def _inputs(n, h, v, *, dtype=torch.float32, bias=True, mask_every=5, seed=0):
    """Random hidden/head/targets with logits of realistic size (std ~ 1.7) and some masked rows."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 0.3).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    if mask_every:
        targets[::mask_every] = IGNORE
    w_logp = torch.randn(n, generator=g)  # per-token weights (advantages), any sign
    w_ent = torch.randn(n, generator=g)  # upstream gradient on the entropy
    return hidden, weight, b, targets, w_logp, w_ent


def _run(fn, hidden, weight, bias, targets, w_logp, w_ent, *, upcast=False, entropy=True, **kw):
    """Values and input gradients of  sum_t w_logp_t * logp_t + w_ent_t * H_t  (w_* None = unused)."""
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = bias.double() if bias is not None else None
    tensors = (hidden, weight) if bias is None else (hidden, weight, bias)
    leaves = [x.detach().clone().requires_grad_() for x in tensors]
    h, w = leaves[0], leaves[1]
    b = leaves[2] if bias is not None else None
    out = fn(h, w, targets, bias=b, ignore_index=IGNORE, return_entropy=entropy, **kw)
    logp, ent = out if entropy else (out, None)
    loss = logp.new_zeros(())
    if w_logp is not None:
        loss = loss + (logp * w_logp.to(logp.dtype)).sum()
    if w_ent is not None:
        loss = loss + (ent * w_ent.to(ent.dtype)).sum()
    loss.backward()
    grads = [x.grad for x in leaves]
    return logp.detach(), (ent.detach() if entropy else None), grads


def _close_fp32(actual, expected, what):
    torch.testing.assert_close(actual.double(), expected, **FP32_TOL, msg=lambda m: f"{what}: {m}")


def _close_grads(got, want, close):
    assert len(got) == len(want)
    for name, g_got, g_want in zip(("hidden", "weight", "bias"), got, want, strict=False):
        close(g_got, g_want, f"grad {name}")


def _close_bf16(actual, expected, what):
    err = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert err <= BF16_REL * scale + 1e-6, f"{what}: max err {err:.3e} > {BF16_REL} * {scale:.3e}"


@pytest.mark.parametrize(
    ("n", "h", "v", "chunk_size", "vocab_chunk_size"),
    [
        (47, 31, 123, None, None),  # default plan: one tile
        (47, 31, 123, 1, None),  # one row per chunk, whole vocabulary per tile
        (47, 31, 123, 16, None),  # N not a multiple of the chunk
        (47, 31, 123, 47, 7),  # chunk == N, vocabulary tiles of 7 (V not a multiple)
        (47, 31, 123, 16, 1),  # one vocabulary column per tile: the online log-sum-exp at its limit
        (300, 17, 50, 64, 16),  # N > V: the backward loops rows outermost
    ],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fp32_values_and_gradients_match_reference(n, h, v, chunk_size, vocab_chunk_size, bias, temperature):
    hidden, weight, b, targets, w_logp, w_ent = _inputs(n, h, v, bias=bias)
    kw = {"temperature": temperature}
    got = _run(
        token_logprobs, hidden, weight, b, targets, w_logp, w_ent,
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, **kw,
    )  # fmt: skip
    want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, w_ent, upcast=True, **kw)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    _close_fp32(got[0], want[0], "logp")
    _close_fp32(got[1], want[1], "entropy")
    _close_grads(got[2], want[2], _close_fp32)


@pytest.mark.parametrize(("w_logp_used", "w_ent_used"), [(True, False), (False, True)])
def test_gradient_from_only_one_output(w_logp_used, w_ent_used):
    """Entropy returned but unused, or only the entropy used: backward gets a None grad for the other."""
    hidden, weight, b, targets, w_logp, w_ent = _inputs(47, 31, 123)
    w_logp, w_ent = (w_logp if w_logp_used else None), (w_ent if w_ent_used else None)
    got = _run(token_logprobs, hidden, weight, b, targets, w_logp, w_ent, chunk_size=16, vocab_chunk_size=40)
    want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, w_ent, upcast=True)
    _close_grads(got[2], want[2], _close_fp32)


def test_without_entropy_returns_logp_only_and_matches():
    hidden, weight, b, targets, w_logp, _ = _inputs(47, 31, 123)
    got = _run(token_logprobs, hidden, weight, b, targets, w_logp, None, entropy=False, chunk_size=8)
    want = _run(
        token_logprobs_reference, hidden, weight, b, targets, w_logp, None, entropy=False, upcast=True
    )
    assert isinstance(token_logprobs(hidden, weight, targets), torch.Tensor)
    _close_fp32(got[0], want[0], "logp")
    _close_grads(got[2], want[2], _close_fp32)


@pytest.mark.parametrize(("chunk_size", "vocab_chunk_size"), [(None, None), (16, 7), (300, 16)])
def test_bf16_against_fp32_truth_of_rounded_inputs(chunk_size, vocab_chunk_size):
    hidden, weight, b, targets, w_logp, w_ent = _inputs(300, 64, 123, dtype=torch.bfloat16)
    got = _run(
        token_logprobs, hidden, weight, b, targets, w_logp, w_ent,
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size, temperature=0.9,
    )  # fmt: skip
    want = _run(
        token_logprobs_reference, hidden, weight, b, targets, w_logp, w_ent, upcast=True, temperature=0.9
    )
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in got[2]), "gradients come back in the input dtype"
    _close_bf16(got[0], want[0], "logp")
    _close_bf16(got[1], want[1], "entropy")
    _close_grads(got[2], want[2], _close_bf16)


def test_masked_rows_are_zero_and_get_exactly_zero_gradient():
    hidden, weight, b, targets, w_logp, w_ent = _inputs(47, 31, 123, mask_every=3)
    logp, ent, (g_h, _, _) = _run(
        token_logprobs, hidden, weight, b, targets, w_logp, w_ent, chunk_size=16, vocab_chunk_size=7
    )
    masked = targets == IGNORE
    assert masked.sum() == 16
    assert torch.equal(logp[masked], torch.zeros(16)) and torch.equal(ent[masked], torch.zeros(16))
    assert torch.equal(g_h[masked], torch.zeros_like(g_h[masked]))
    assert g_h[~masked].abs().min(dim=1).values.gt(0).all(), "unmasked rows must get gradient"

    # All rows masked: every gradient is exactly zero, including the weight and bias.
    all_masked = torch.full_like(targets, IGNORE)
    _, _, grads = _run(token_logprobs, hidden, weight, b, all_masked, w_logp, w_ent, chunk_size=16)
    assert all(torch.count_nonzero(g) == 0 for g in grads)


def test_custom_ignore_index():
    hidden, weight, b, targets, _, _ = _inputs(20, 8, 30, mask_every=0)
    targets[3] = 7
    logp = token_logprobs(hidden, weight, targets, bias=b, ignore_index=7)
    ref = token_logprobs_reference(hidden.double(), weight.double(), targets, bias=b.double(), ignore_index=7)
    assert logp[3] == 0 and (targets == 7).sum() >= 1
    _close_fp32(logp, ref, "logp")


def test_tied_embedding_weight_gets_both_gradients():
    """One Parameter as input embedding and LM head: its gradient sums both uses, as in the reference."""
    v, h, n = 97, 24, 53
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, v, (n,), generator=g)
    targets = torch.roll(ids, -1)
    targets[-1] = IGNORE
    w_logp, w_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    emb0 = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    mix0 = torch.randn(h, h, generator=g, dtype=torch.float64) / h**0.5

    def grads(fn, dtype):
        emb = torch.nn.Parameter(emb0.to(dtype))
        mix = torch.nn.Parameter(mix0.to(dtype))
        hidden = torch.tanh(torch.nn.functional.embedding(ids, emb) @ mix)  # a stand-in for the trunk
        logp, ent = fn(hidden, emb, targets, return_entropy=True, chunk_size=10, vocab_chunk_size=30)
        ((logp * w_logp.to(logp.dtype)).sum() + (ent * w_ent.to(ent.dtype)).sum()).backward()
        return emb.grad, mix.grad

    got, want = grads(token_logprobs, torch.float32), grads(token_logprobs_reference, torch.float64)
    _close_fp32(got[0], want[0], "tied embedding grad")
    _close_fp32(got[1], want[1], "trunk grad")
    # The head part alone would differ: the embedding's own gradient is really included.
    assert (got[0].double() - want[0]).abs().max() < 1e-4 < (want[0]).abs().max()


def test_frozen_head_gives_hidden_gradient_only():
    hidden, weight, _, targets, w_logp, _ = _inputs(47, 31, 123, bias=False)
    h = hidden.clone().requires_grad_()
    (token_logprobs(h, weight, targets, chunk_size=16) * w_logp).sum().backward()
    h64 = hidden.double().requires_grad_()
    (token_logprobs_reference(h64, weight.double(), targets) * w_logp.double()).sum().backward()
    assert weight.grad is None
    _close_fp32(h.grad, h64.grad, "grad hidden")


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(9, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 8, IGNORE, 3, 4, 4])

    def fn(h, w, b):
        return token_logprobs(
            h, w, targets, bias=b, temperature=0.8, return_entropy=True, chunk_size=4, vocab_chunk_size=4
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias), eps=1e-6, atol=1e-7)


def test_empty_input_returns_empty_and_backpropagates():
    hidden = torch.zeros(0, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    logp, ent = token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), return_entropy=True)
    assert logp.shape == (0,) and ent.shape == (0,) and logp.dtype == torch.float32
    (logp.sum() + ent.sum()).backward()
    assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0


@pytest.mark.parametrize(
    ("hidden_shape", "weight_shape", "targets", "kwargs", "match"),
    [
        ((2, 3, 4), (5, 4), [0, 1], {}, "hidden must be a 2-D"),
        ((3, 4), (5, 6), [0, 1, 2], {}, "hidden size mismatch"),
        ((3, 4), (5,), [0, 1, 2], {}, "weight must be a 2-D"),
        ((3, 4), (5, 4), [0, 1], {}, "targets has 2 entries but hidden has 3"),
        ((3, 4), (5, 4), [[0, 1, 2]], {}, "targets must be a 1-D"),
        ((3, 4), (5, 4), [0.0, 1.0, 2.0], {}, "integer token ids"),
        ((3, 4), (5, 4), [0, 5, 2], {}, r"targets must be in \[0, 5\).*found 5"),
        ((3, 4), (5, 4), [0, -1, 2], {}, "found -1"),
        ((3, 4), (5, 4), [0, 1, 2], {"temperature": 0.0}, "temperature must be"),
        ((3, 4), (5, 4), [0, 1, 2], {"chunk_size": 0}, "chunk_size must be a positive int"),
        ((3, 4), (5, 4), [0, 1, 2], {"vocab_chunk_size": 2.5}, "vocab_chunk_size must be"),
        ((3, 4), (5, 4), [0, 1, 2], {"bias": torch.zeros(4)}, r"bias must be \[V\]"),
    ],
)
def test_bad_input_raises_clear_error(hidden_shape, weight_shape, targets, kwargs, match):
    with pytest.raises(ValueError, match=match):
        token_logprobs(torch.randn(hidden_shape), torch.randn(weight_shape), torch.tensor(targets), **kwargs)


def test_non_tensor_targets_raise():
    with pytest.raises(ValueError, match="targets must be a 1-D"):
        token_logprobs(torch.randn(3, 4), torch.randn(5, 4), [0, 1, 2])


def test_mixed_dtypes_raise():
    with pytest.raises(ValueError, match="same dtype"):
        token_logprobs(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.bfloat16), torch.tensor([0, 1, 2]))


class _LargestTensor(TorchDispatchMode):
    """Records the element count of the largest tensor any aten op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_tensor(fn, n, h, v, **kw):
    hidden, weight, b, targets, w_logp, w_ent = _inputs(n, h, v)
    hidden.requires_grad_(), weight.requires_grad_(), b.requires_grad_()
    with _LargestTensor() as mode:
        logp, ent = fn(hidden, weight, targets, bias=b, return_entropy=True, **kw)
        ((logp * w_logp).sum() + (ent * w_ent).sum()).backward()
    return mode.largest


def test_no_full_logits_tensor_is_ever_created():
    n, h, v = 256, 16, 512
    # The probe must be able to fail: the reference materialises [N, V] (forward and backward).
    assert _largest_tensor(token_logprobs_reference, n, h, v) >= n * v
    largest = _largest_tensor(token_logprobs, n, h, v, chunk_size=32, vocab_chunk_size=64)
    assert largest <= max(32 * 64, v * h, n * h) < n * v, largest


def test_default_tile_plan_stays_within_budget():
    """Default chunking on a problem 4x over the 2M-element tile budget never makes a bigger tensor."""
    n, h, v = 2048, 4, 4096
    largest = _largest_tensor(token_logprobs, n, h, v)
    assert largest <= 2 * 1024 * 1024 < n * v, largest


# ----------------------------------------------------------------------------- compiled tile bodies
@pytest.mark.parametrize(("rows", "cols"), [(7, 13), (30, 101), (1, 1), (4, 50)])
@pytest.mark.parametrize("temperature", [1.0, 0.8])
def test_logp_only_forward_reads_every_tiles_edge_targets(rows, cols, temperature):
    """Without the entropy the fp32 / fp64 forward reads the targets' logits by one gather per tile at
    precomputed flat offsets (each tile's own width as row stride) and merges the tiles' maxima and sums
    with one logsumexp per chunk: targets on every tile's first and last column, a ragged last tile and
    chunk, masked rows, bias and temperature, fp64 to 1e-10 (a wrong offset or stride is off by O(1))."""
    n, v = 30, 101
    hidden, weight, b, targets, w_logp, _ = _inputs(n, 5, v, dtype=torch.float64, mask_every=0)
    edges = torch.tensor([x for v0 in range(0, v, cols) for x in (v0, min(v, v0 + cols) - 1)])
    targets = edges[torch.arange(n) % edges.numel()]
    targets[::7] = IGNORE
    kw = {"temperature": temperature, "entropy": False}
    want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, None, **kw)
    got = _run(
        token_logprobs, hidden, weight, b, targets, w_logp, None, chunk_size=rows, vocab_chunk_size=cols,
        **kw,
    )  # fmt: skip
    torch.testing.assert_close(got[0], want[0], atol=1e-10, rtol=1e-10)
    assert bool((got[0][targets == IGNORE] == 0).all())
    for g_got, g_want in zip(got[2], want[2], strict=True):
        torch.testing.assert_close(g_got, g_want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize(
    ("dtype", "gap", "redone_rows"),
    [(torch.float32, 150.0, [2, 3]), (torch.float64, 900.0, [2, 3]), (torch.float32, 30.0, [])],
)
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_tiles_shifted_by_the_first_tiles_max_are_redone_where_they_overflow(
    monkeypatch, dtype, gap, redone_rows, temperature
):
    """The forward shifts every tile of a chunk but the first by the first tile's row max plus a margin
    (no max pass); where a later tile's logits lie so far above that that its exponential sum passes the
    limit (here a bias of ``gap`` on a few columns, past exp's overflow: 88 in fp32, 709 in fp64), that
    tile is computed again with its own max; a smaller gap (30 / T) is absorbed by the margin. Values and
    gradients match the fp64 reference either way, and the redo happened where it had to."""
    from unipost.kernels import logprobs

    redone = []
    orig = logprobs.overflowed_tiles
    monkeypatch.setattr(logprobs, "overflowed_tiles", lambda s: redone.append(orig(s)) or redone[-1])
    hidden, weight, b, targets, w_logp, _ = _inputs(40, 6, 90, dtype=dtype)
    b = b.clone()
    b[[47, 48, 71]] += gap  # tiles 3 and 4 of 15 columns; the first tile stays near 0
    # targets near the top (logp ~ -1.1) or far below it
    targets[:] = torch.tensor([47, 48, 71, 5])[torch.arange(40) % 4]
    targets[::9] = IGNORE
    kw = {"temperature": temperature, "entropy": False}
    want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, None, upcast=True, **kw)
    got = _run(
        token_logprobs, hidden, weight, b, targets, w_logp, None, chunk_size=16, vocab_chunk_size=15, **kw
    )  # fmt: skip
    # tiles 3 and 4 are rows 2 and 3 of the tables past the first. 2 of 5 shifted tiles redone is more
    # than speculating is worth: the other two chunks of 16 rows take a max per tile (no redo to check).
    assert redone == ([redone_rows] if redone_rows else [[]] * 3), redone
    # Logits of ~gap / T carry fp32 rounding of ~1e-7 of themselves (1e-5 absolute at 150), which the
    # softmax passes on: tolerances relative to each output's largest magnitude. A tile not redone
    # gives inf / NaN; a wrong max for a redone tile is off by O(1).
    for g, w in ((got[0], want[0]), *zip(got[2], want[2], strict=True)):
        scale = float(w.abs().max())
        torch.testing.assert_close(g.double(), w, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("shift", [True, False])
def test_a_tile_of_minus_inf_logits_contributes_nothing(monkeypatch, shift):
    """A vocabulary tile whose logits are all -inf (padded vocabulary masked by the bias) adds nothing to
    the log-sum-exp, whether it is shifted by the first tile's max or takes its own (a max of -inf used to
    give exp(-inf + inf) = NaN for every row: with one chunk's redo turning the shift off, NaN came and
    went with the data). Both heads match the fp64 reference; no NaN anywhere."""
    from unipost.kernels import fused_loss, logprobs

    if not shift:
        monkeypatch.setattr(logprobs, "speculative_shift", lambda *a: None)
    hidden, weight, b, targets, w_logp, _ = _inputs(40, 6, 90)
    b = b.clone()
    b[75:] = -float("inf")  # the last tile of 15 columns
    targets = targets % 75
    targets[::7] = IGNORE
    kw = {"entropy": False, "temperature": 0.8}
    want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, None, upcast=True, **kw)
    got = _run(
        token_logprobs, hidden, weight, b, targets, w_logp, None, chunk_size=16, vocab_chunk_size=15, **kw
    )
    _close_fp32(got[0], want[0], "logp")
    _close_grads(got[2], want[2], _close_fp32)
    leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, b)]
    loss, logp = fused_loss.fused_weighted_nll(
        leaves[0], leaves[1], targets, -w_logp, bias=leaves[2], ignore_index=IGNORE, temperature=0.8,
        chunk_size=16, vocab_chunk_size=15,
    )  # fmt: skip
    loss.backward()
    _close_fp32(logp, want[0], "fused logp")
    _close_grads([x.grad for x in leaves], want[2], _close_fp32)


def test_fp32_ordinary_logits_are_as_precise_as_with_a_max_per_tile():
    """Shifting a chunk's tiles by its first tile's max keeps the exponents of ordinary O(1) logits near 0,
    so logp and the gradients (four-GEMM head, and the three-GEMM loss, which keeps the shifted
    exponentials) are as precise as with a max per tile. Bounds here: logp within 2e-6 of the fp64 truth,
    gradients within 1e-6 of their largest entry (measured 1.2e-6 and 4.0e-7; a shift of max + 40 put the
    exponents near -40, where fp32 resolves them to ~4e-6: 2.3e-6 and 1.6e-6)."""
    from unipost.kernels.fused_loss import fused_weighted_nll

    worst_logp = worst_grad = 0.0
    for seed in range(6):
        for temperature in (1.0, 0.7):
            hidden, weight, b, targets, w_logp, _ = _inputs(40, 8, 90, seed=seed)
            weight = weight * (0.5 / 0.3)
            kw = {"temperature": temperature, "entropy": False}
            want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, None, upcast=True, **kw)
            got = _run(
                token_logprobs, hidden, weight, b, targets, w_logp, None, chunk_size=16, vocab_chunk_size=15,
                **kw,
            )  # fmt: skip
            leaves = [x.detach().clone().requires_grad_() for x in (hidden, weight, b)]
            loss, logp3 = fused_weighted_nll(
                leaves[0], leaves[1], targets, -w_logp, bias=leaves[2], ignore_index=IGNORE,
                temperature=temperature, chunk_size=16, vocab_chunk_size=15,
            )  # fmt: skip
            loss.backward()
            for logp, grads in ((got[0], got[2]), (logp3, [x.grad for x in leaves])):
                worst_logp = max(worst_logp, float((logp.double() - want[0]).abs().max()))
                for g, w in zip(grads, want[2], strict=True):
                    worst_grad = max(worst_grad, float((g.double() - w).abs().max() / w.abs().max()))
    assert worst_logp <= 2e-6 and worst_grad <= 1e-6, (worst_logp, worst_grad)


def test_auto_mode_runs_the_eager_backward_tile_for_fp32_logp_only(monkeypatch):
    """Auto mode's bwd_into runs the eager body for an fp32 tile without an entropy gradient (measured
    faster) and the compiled one otherwise; both modes match the fp64 reference."""
    from unipost.kernels import logprob_tiles

    monkeypatch.setenv("UNIPOST_LOGPROBS_COMPILE", "1")
    auto = logprob_tiles.tile_ops(torch.device("cpu"), torch.float32, 10, None)
    if not logprob_tiles.compiled_available():
        pytest.skip("torch.compile is unavailable here: auto mode is eager")
    calls = []
    eager = logprob_tiles._bwd_tile_into_eager
    monkeypatch.setattr(
        logprob_tiles, "_bwd_tile_into_eager", lambda *a: calls.append(a[3] is None) or eager(*a)
    )
    hidden, weight, b, targets, w_logp, w_ent = _inputs(70, 31, 250)
    for entropy in (False, True):
        calls.clear()
        kw = {"temperature": 0.7, "entropy": entropy}
        ent_w = w_ent if entropy else None
        got = _run(
            token_logprobs, hidden, weight, b, targets, w_logp, ent_w,
            chunk_size=32, vocab_chunk_size=64, **kw,
        )  # fmt: skip
        want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, ent_w, upcast=True, **kw)
        assert calls == ([] if entropy else [True] * 12), calls  # 3 row chunks x 4 vocabulary tiles
        _close_fp32(got[0], want[0], "logp")
        _close_grads(got[2], want[2], _close_fp32)
    assert (
        auto.bwd_into.compiled
        is logprob_tiles.tile_ops(torch.device("cpu"), torch.float32, 10, True).bwd_into
    )


# The same kernel with its per-tile elementwise work compiled by torch.compile (the CPU fast path that
# auto mode picks above 16M logits), forced on small shapes here. Same tolerances as the eager kernel:
# fp32 within FP32_TOL of the fp64 truth, bf16 within BF16_REL of the largest magnitude.


def _compiled_ok():
    from unipost.kernels.logprob_tiles import compiled_available

    return compiled_available()


@pytest.mark.parametrize(
    ("n", "h", "v", "rows", "cols", "bias", "temperature", "entropy"),
    [
        (70, 31, 250, 32, 64, True, 0.7, True),  # N < V (vocabulary outer), edge tiles on both axes
        (300, 17, 50, 64, 16, False, 1.0, False),  # N > V (rows outer), logp only
    ],
)
def test_compiled_tiles_match_reference_fp32(n, h, v, rows, cols, bias, temperature, entropy):
    hidden, weight, b, targets, w_logp, w_ent = _inputs(n, h, v, bias=bias)
    w_ent = w_ent if entropy else None
    kw = {"temperature": temperature, "entropy": entropy}
    got = _run(
        token_logprobs, hidden, weight, b, targets, w_logp, w_ent,
        chunk_size=rows, vocab_chunk_size=cols, compile=True, **kw,
    )  # fmt: skip
    assert _compiled_ok(), "the compiled path fell back to eager: this test would not test it"
    want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, w_ent, upcast=True, **kw)
    _close_fp32(got[0], want[0], "logp")
    if entropy:
        _close_fp32(got[1], want[1], "entropy")
    _close_grads(got[2], want[2], _close_fp32)


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize(("n", "v", "rows", "cols"), [(64, 700, 16, 50), (300, 123, 64, 16)])
def test_bf16_accumulation_both_loop_orders(compile, n, v, rows, cols):
    """bf16 in, bf16 gradients out, accumulated in fp32 across 14 vocabulary tiles (N < V: the hidden
    gradient's full fp32 buffer) or 5 row tiles (N > V: the weight gradient's); within BF16_REL."""
    hidden, weight, b, targets, w_logp, w_ent = _inputs(n, 64, v, dtype=torch.bfloat16)
    got = _run(
        token_logprobs, hidden, weight, b, targets, w_logp, w_ent, temperature=0.9,
        chunk_size=rows, vocab_chunk_size=cols, compile=compile,
    )  # fmt: skip
    want = _run(
        token_logprobs_reference, hidden, weight, b, targets, w_logp, w_ent, upcast=True, temperature=0.9
    )
    assert all(g.dtype == torch.bfloat16 for g in got[2])
    _close_bf16(got[0], want[0], "logp")
    _close_bf16(got[1], want[1], "entropy")
    _close_grads(got[2], want[2], _close_bf16)
    assert (got[0] <= 0).all(), "logp is read from the same rounded tile as its log-sum-exp: never > 0"


def test_compiled_once_per_shape_class_not_per_micro_batch():
    """New N (so new edge tiles) and new V reuse the compiled graphs: sizes are dynamic."""
    from torch._dynamo.utils import counters

    from unipost.kernels.logprob_tiles import compile_stats

    def call(n, v):
        hidden, weight, _, targets, w_logp, _ = _inputs(n, 16, v, bias=False, mask_every=0)
        _run(token_logprobs, hidden, weight, None, targets, w_logp, None, entropy=False,
             chunk_size=32, vocab_chunk_size=48, compile=True)  # fmt: skip

    call(100, 200)
    call(70, 150)  # a second size lets dynamo settle on symbolic sizes where it had specialised
    graphs, ours = counters["stats"]["unique_graphs"], compile_stats()["graphs"]
    for n, v in ((90, 170), (123, 260), (40, 100)):  # edge tiles of 26, 27, 8 rows; 26, 20, 4 columns
        call(n, v)
    assert compile_stats()["graphs"] == ours
    assert counters["stats"]["unique_graphs"] == graphs, "a new micro-batch size recompiled the tiles"


def test_failed_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    import unipost.kernels.logprob_tiles as tiles

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setattr(tiles, "_broken", None)
    monkeypatch.setattr(tiles, "_compiled", None)
    monkeypatch.setattr(tiles.torch, "compile", lambda fn, **kw: broken)
    hidden, weight, b, targets, w_logp, w_ent = _inputs(47, 31, 123)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler here"):
        got = _run(token_logprobs, hidden, weight, b, targets, w_logp, w_ent, chunk_size=16, compile=True)
    assert not tiles.compiled_available()
    want = _run(token_logprobs_reference, hidden, weight, b, targets, w_logp, w_ent, upcast=True)
    _close_fp32(got[0], want[0], "logp")
    _close_grads(got[2], want[2], _close_fp32)


def test_auto_mode_compiles_only_large_cpu_problems(monkeypatch):
    from unipost.kernels.logprob_tiles import AUTO_COMPILE_MIN_LOGITS, EAGER, tile_ops

    monkeypatch.delenv("UNIPOST_LOGPROBS_COMPILE", raising=False)
    cpu, big = torch.device("cpu"), AUTO_COMPILE_MIN_LOGITS
    assert tile_ops(cpu, torch.float32, big - 1, None) is EAGER
    assert tile_ops(cpu, torch.float32, big, None).name == "compiled"
    assert tile_ops(cpu, torch.bfloat16, big, None).name == "compiled"
    assert tile_ops(cpu, torch.float64, big, None) is EAGER  # gradcheck stays eager
    assert tile_ops(torch.device("meta"), torch.float32, big, None) is EAGER  # CPU only in auto mode
    assert tile_ops(cpu, torch.float32, 10, True).name == "compiled"
    assert tile_ops(cpu, torch.float32, big, False) is EAGER
    monkeypatch.setenv("UNIPOST_LOGPROBS_COMPILE", "0")
    assert tile_ops(cpu, torch.float32, big, None) is EAGER
    monkeypatch.setenv("UNIPOST_LOGPROBS_COMPILE", "1")
    assert tile_ops(cpu, torch.float32, 10, None).name == "compiled"


def test_small_problems_get_proportionally_smaller_tiles():
    """Tiles scale down with N x V (to 1/128, at least 256K elements), so the kernel's extra memory stays a
    small share of the naive path's (~12 bytes per logit) for small micro-batches too; large problems
    keep 2M-element tiles."""
    from unipost.kernels.logprobs import _plan_tiles

    rows, cols = _plan_tiles(2048, 32768, None, None)
    assert rows * cols <= 2048 * 32768 // 128
    rows, cols = _plan_tiles(16384, 152064, None, None)
    assert rows * cols == 2 * 1024 * 1024
    assert _plan_tiles(2048, 32768, 64, None) == (64, 32768)  # a given size keeps the 2M budget
    largest = _largest_tensor(token_logprobs, 1024, 4, 4096)
    assert largest <= 256 * 1024 < 1024 * 4096 // 8, largest

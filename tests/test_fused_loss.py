"""The three-GEMM fused loss against the fp64 reference: loss, log-probs and every gradient.

Ground truth: ``token_logprobs_reference`` in float64 on the same inputs, with the same loss applied by
autograd. The fused kernel forms its gradients inside the forward sweep from per-row derivatives of the
loss, so every test puts a *different* derivative on each row (random weights, a nonlinear per-token
term, an entropy term): a kernel that drops or misplaces one (wrong chunk, wrong tile, wrong row) fails.
"""

from __future__ import annotations

import pytest
import torch
from test_token_logprobs import _inputs as _token_inputs

from unipost.kernels.fused_loss import fused_token_loss, fused_weighted_nll, plan_fused_tiles
from unipost.kernels.reference import token_logprobs_reference

IGNORE = -100
FP32_TOL = {"atol": 1e-5, "rtol": 1e-5}  # as tests/test_token_logprobs.py (measured ~1e-6 relative)
BF16_REL = 1.5e-2


def _inputs(n, h, v, *, dtype=torch.float32, bias=True, mask_every=5, seed=0):
    """test_token_logprobs' inputs, plus a per-token "reference" log-prob r_t for the k3 term."""
    hidden, weight, b, targets, a, c = _token_inputs(
        n, h, v, dtype=dtype, bias=bias, mask_every=mask_every, seed=seed
    )
    r = -torch.rand(n, generator=torch.Generator().manual_seed(seed + 1)) * 3
    return hidden, weight, b, targets, (a, c, r)


def _loss_fn(consts, entropy: bool):
    """sum_t a_t logp_t + k3(r_t - logp_t) [+ c_t H_t]: per-token, nonlinear in logp, any dtype."""
    a, c, r = consts

    def fn(logp, ent):
        a_, r_ = a.to(logp.dtype), r.to(logp.dtype)
        log_ratio = r_ - logp
        out = (a_ * logp).sum() + 0.3 * (torch.exp(log_ratio) - log_ratio - 1).sum()
        if entropy:
            out = out + (c.to(ent.dtype) * ent).sum()
        return out

    return fn


def _leaves(hidden, weight, bias, dtype=None):
    tensors = [hidden, weight] + ([bias] if bias is not None else [])
    return [(x if dtype is None else x.to(dtype)).detach().clone().requires_grad_() for x in tensors]


def _reference(hidden, weight, bias, targets, loss_fn, entropy, temperature=1.0, ignore_index=IGNORE):
    leaves = _leaves(hidden, weight, bias, torch.float64)
    b = leaves[2] if bias is not None else None
    out = token_logprobs_reference(
        leaves[0], leaves[1], targets, bias=b, ignore_index=ignore_index, temperature=temperature,
        return_entropy=entropy,
    )  # fmt: skip
    logp, ent = out if entropy else (out, None)
    loss = loss_fn(logp, ent)
    loss.backward()
    return loss.detach(), logp.detach(), ent.detach() if entropy else None, [x.grad for x in leaves]


def _fused(hidden, weight, bias, targets, loss_fn, entropy, **kw):
    leaves = _leaves(hidden, weight, bias)
    b = leaves[2] if bias is not None else None
    kw.setdefault("ignore_index", IGNORE)
    out = fused_token_loss(leaves[0], leaves[1], targets, loss_fn, bias=b, return_entropy=entropy, **kw)
    out.loss.backward()
    return out, [x.grad for x in leaves]


def _close(got, want, **tol):
    """fp32 tolerance, relative to the largest |value| (the k3 term's derivatives reach ~1e2)."""
    if not tol:
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        tol = {"atol": FP32_TOL["atol"] * scale, "rtol": FP32_TOL["rtol"]}
    torch.testing.assert_close(got.double(), want, **tol)


@pytest.mark.parametrize(
    ("n", "h", "v", "chunk_size", "vocab_chunk_size"),
    [
        (37, 16, 101, None, None),  # one chunk, one tile
        (37, 16, 101, 8, 13),  # chunks and tiles with ragged ends
        (64, 8, 300, 16, 100),  # chunks and tiles dividing exactly
        (50, 12, 97, 1, 97),  # one row per chunk
        (29, 16, 64, 50, 1),  # one column per tile
    ],
)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("entropy", [True, False])
def test_fp32_loss_logp_and_gradients_match_fp64_reference(
    n, h, v, chunk_size, vocab_chunk_size, bias, temperature, entropy
):
    hidden, weight, b, targets, consts = _inputs(n, h, v, bias=bias)
    loss_fn = _loss_fn(consts, entropy)
    ref_loss, ref_logp, ref_ent, ref_grads = _reference(
        hidden, weight, b, targets, loss_fn, entropy, temperature
    )
    out, grads = _fused(
        hidden, weight, b, targets, loss_fn, entropy, temperature=temperature, chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )  # fmt: skip
    _close(out.loss, ref_loss, atol=1e-4, rtol=1e-5)
    _close(out.logp, ref_logp)
    if entropy:
        _close(out.entropy, ref_ent)
    assert not out.logp.requires_grad
    for got, want in zip(grads, ref_grads, strict=True):
        _close(got, want)


@pytest.mark.parametrize(("chunk_size", "vocab_chunk_size"), [(None, None), (7, 30)])
def test_weighted_nll_matches_reference_and_four_gemm_path(chunk_size, vocab_chunk_size):
    from unipost.kernels.logprobs import token_logprobs

    hidden, weight, b, targets, (a, _, _) = _inputs(45, 16, 211, bias=True)
    leaves = _leaves(hidden, weight, b)
    loss, logp = fused_weighted_nll(
        leaves[0], leaves[1], targets, a, bias=leaves[2], ignore_index=IGNORE, chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )  # fmt: skip
    loss.backward()
    ref_loss, ref_logp, _, ref_grads = _reference(
        hidden, weight, b, targets, lambda lp, e: -(a.double() * lp).sum(), False
    )
    _close(loss, ref_loss, atol=1e-4, rtol=1e-5)
    _close(logp, ref_logp)
    for x, want in zip(leaves, ref_grads, strict=True):
        _close(x.grad, want)
    four = _leaves(hidden, weight, b)
    lp4 = token_logprobs(four[0], four[1], targets, bias=four[2], ignore_index=IGNORE)
    (-(a * lp4).sum()).backward()
    for x, y in zip(leaves, four, strict=True):  # the two heads agree with each other as well
        torch.testing.assert_close(x.grad, y.grad, **FP32_TOL)


@pytest.mark.parametrize("entropy", [True, False])  # the general sweep and the one-pass sweep
def test_masked_rows_are_zero_and_get_exactly_zero_gradient(entropy):
    hidden, weight, b, targets, consts = _inputs(20, 8, 50, mask_every=0)
    targets[3:7] = IGNORE
    out, (g_h, *_) = _fused(hidden, weight, b, targets, _loss_fn(consts, entropy), entropy, chunk_size=4)
    assert (out.logp[3:7] == 0).all() and (not entropy or (out.entropy[3:7] == 0).all())
    assert (g_h[3:7] == 0).all(), "ignored rows must get exactly zero gradient"
    assert g_h[:3].abs().sum() > 0


def test_custom_ignore_index():
    hidden, weight, b, targets, consts = _inputs(25, 8, 40, mask_every=0)
    targets[::4] = 7  # a real token id used as the ignore index
    loss_fn = _loss_fn(consts, True)
    ref = _reference(hidden, weight, b, targets, loss_fn, True, ignore_index=7)
    out, grads = _fused(hidden, weight, b, targets, loss_fn, True, ignore_index=7, chunk_size=6)
    _close(out.loss, ref[0], atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, ref[3], strict=True):
        _close(got, want)


def test_upstream_gradient_scales_the_stored_gradients():
    """The backward only scales what the forward formed: (3.5 * loss).backward() is 3.5x the gradient."""
    hidden, weight, b, targets, consts = _inputs(30, 8, 60)
    loss_fn = _loss_fn(consts, True)
    _, ref_grads = _fused(hidden, weight, b, targets, loss_fn, True, chunk_size=8)
    leaves = _leaves(hidden, weight, b)
    out = fused_token_loss(
        leaves[0], leaves[1], targets, loss_fn, bias=leaves[2], ignore_index=IGNORE, return_entropy=True,
        chunk_size=8,
    )  # fmt: skip
    (3.5 * out.loss).backward()
    for x, want in zip(leaves, ref_grads, strict=True):
        torch.testing.assert_close(x.grad, 3.5 * want, **FP32_TOL)


def test_frozen_head_gives_hidden_gradient_only_and_no_grad_gives_the_value():
    hidden, weight, _, targets, consts = _inputs(30, 8, 60, bias=False)
    loss_fn = _loss_fn(consts, False)
    h = hidden.clone().requires_grad_()
    out = fused_token_loss(h, weight, targets, loss_fn, ignore_index=IGNORE, chunk_size=7)
    out.loss.backward()
    ref = _reference(hidden, weight, None, targets, loss_fn, False)
    _close(h.grad, ref[3][0])
    with torch.no_grad():
        value = fused_token_loss(hidden, weight, targets, loss_fn, ignore_index=IGNORE).loss
    _close(value, ref[0], atol=1e-4, rtol=1e-5)


def test_bf16_against_fp32_truth_of_rounded_inputs():
    hidden, weight, b, targets, consts = _inputs(70, 32, 300, dtype=torch.bfloat16)
    loss_fn = _loss_fn(consts, True)
    ref = _reference(hidden, weight, b, targets, loss_fn, True)
    out, grads = _fused(hidden, weight, b, targets, loss_fn, True, chunk_size=16, vocab_chunk_size=64)
    assert all(g.dtype == torch.bfloat16 for g in grads)
    for got, want in zip(grads, ref[3], strict=True):
        err = (got.double() - want).abs().max() / want.abs().max()
        assert err < BF16_REL, err
    assert (out.logp.double() - ref[1]).abs().max() < BF16_REL * ref[1].abs().max()


@pytest.mark.parametrize("entropy", [True, False])  # the general sweep and the one-pass sweep
def test_compiled_tiles_match_reference_fp32(entropy):
    from unipost.kernels.logprob_tiles import compiled_available

    hidden, weight, b, targets, consts = _inputs(40, 16, 130)
    loss_fn = _loss_fn(consts, entropy)
    ref = _reference(hidden, weight, b, targets, loss_fn, entropy, 0.8)
    out, grads = _fused(
        hidden, weight, b, targets, loss_fn, entropy, temperature=0.8, chunk_size=16, vocab_chunk_size=50,
        compile=True,
    )  # fmt: skip
    assert compiled_available(), "the compiled tiles fell back to eager: this test would not test them"
    _close(out.logp, ref[1])
    _close(out.loss, ref[0], atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, ref[3], strict=True):
        _close(got, want)


def test_float64_is_exact_and_a_second_backward_is_refused():
    """In fp64 the fused gradients equal the reference's to 1e-10 (what gradcheck would check, without its
    second backward: the stored gradients are handed over once, and a replay says so)."""
    hidden, weight, b, targets, consts = _inputs(9, 4, 11, dtype=torch.float64)
    loss_fn = _loss_fn(consts, True)
    ref = _reference(hidden, weight, b, targets, loss_fn, True)
    leaves = _leaves(hidden, weight, b)
    out = fused_token_loss(
        leaves[0], leaves[1], targets, loss_fn, bias=leaves[2], ignore_index=IGNORE, return_entropy=True,
        chunk_size=4, vocab_chunk_size=5,
    )  # fmt: skip
    out.loss.backward(retain_graph=True)
    torch.testing.assert_close(out.loss, ref[0], atol=1e-10, rtol=1e-10)
    for x, want in zip(leaves, ref[3], strict=True):
        torch.testing.assert_close(x.grad, want, atol=1e-10, rtol=1e-10)
    with pytest.raises(RuntimeError, match="backward once"):
        out.loss.backward()


@pytest.mark.parametrize(("n", "v"), [(4096, 32768), (4096, 152064), (16384, 32768), (16384, 32000)])
@pytest.mark.parametrize("hidden_size", [256, 4096, 8192])
def test_default_buffer_stays_under_two_percent_of_naive(n, v, hidden_size):
    """The chunk's logits buffer, the one-pass sweep's two per-group tables and one tile temporary,
    against naive's ~12 bytes per logit (fp32)."""
    from unipost.kernels.fused_loss import sweep_group

    rows, cols = plan_fused_tiles(n, v)
    group = sweep_group(-(-v // cols), v, hidden_size)
    temporaries = 2 * group * rows * hidden_size if group > 1 else rows * hidden_size  # or one [rows, H]
    held = 4 * (rows * v + rows * cols + temporaries)
    assert held <= 0.02 * 12 * n * v, (rows, cols, held / (12 * n * v))
    assert rows * cols <= 2 * 1024 * 1024 and rows >= n // 25


# ----------------------------------------------------------------------------- the one-pass sweep
# Without an entropy term, fp32 / fp64 losses take the sweep that keeps exp(z - m_t) per tile and folds
# the per-row scale exp(m_t - lse) * coef into the gradient GEMMs' small operands (no second pass).


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_one_pass_sweep_float64_is_exact(bias, temperature):
    hidden, weight, b, targets, consts = _inputs(23, 6, 41, dtype=torch.float64, bias=bias)
    loss_fn = _loss_fn(consts, False)
    ref = _reference(hidden, weight, b, targets, loss_fn, False, temperature)
    out, grads = _fused(
        hidden, weight, b, targets, loss_fn, False, temperature=temperature, chunk_size=5,
        vocab_chunk_size=7,
    )  # fmt: skip
    torch.testing.assert_close(out.loss, ref[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(out.logp, ref[1], atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, ref[3], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


def test_one_pass_sweep_survives_tiles_far_below_the_row_max():
    """Logit gaps of ~200 nats between tiles: exp(m_t - lse) underflows to 0 in fp32 for the far tiles,
    whose true probabilities are below 1e-80, and the target's log-prob still comes from its logit (not
    from log of an underflowed exponential)."""
    hidden, weight, b, targets, consts = _inputs(12, 4, 60, bias=True, mask_every=0)
    b = b.clone()
    b[:20] += 200.0  # the first tile holds all the mass
    targets[:] = 45  # every target in a far tile: logp ~ -200
    a = consts[0]

    def loss_fn(logp, ent):  # linear: the k3 term's exp(r - logp) would overflow at logp ~ -200
        return (a.to(logp.dtype) * logp).sum()

    ref = _reference(hidden, weight, b, targets, loss_fn, False)
    out, grads = _fused(hidden, weight, b, targets, loss_fn, False, chunk_size=4, vocab_chunk_size=20)
    assert torch.isfinite(out.logp).all() and (out.logp < -150).all()
    _close(out.logp, ref[1])
    for got, want in zip(grads, ref[3], strict=True):
        assert torch.isfinite(got).all()
        _close(got, want)


@pytest.mark.parametrize("compile", [False, True])
def test_no_entropy_fp32_never_sweeps_the_buffer_twice(monkeypatch, compile):
    """The general sweep's second pass (bwd_into: logits -> gradients) is not run without an entropy
    term; it is with one (the fold needs log p per logit there)."""
    from unipost.kernels import logprob_tiles

    calls = {"bwd_into": 0}
    hidden, weight, b, targets, consts = _inputs(30, 8, 90)
    ops = logprob_tiles.tile_ops(hidden.device, hidden.dtype, 10**9, compile)
    orig = ops.bwd_into

    def counting(*args):
        calls["bwd_into"] += 1
        return orig(*args)

    monkeypatch.setattr(ops, "bwd_into", counting)
    _fused(hidden, weight, b, targets, _loss_fn(consts, False), False, chunk_size=8, vocab_chunk_size=30,
           compile=compile)  # fmt: skip
    assert calls["bwd_into"] == 0
    _fused(hidden, weight, b, targets, _loss_fn(consts, True), True, chunk_size=8, vocab_chunk_size=30,
           compile=compile)  # fmt: skip
    assert calls["bwd_into"] > 0


@pytest.mark.parametrize(("chunk_size", "vocab_chunk_size"), [(8, 13), (7, 50), (30, 1)])
@pytest.mark.parametrize("hidden_size", [8, 2])  # one tile per gradient group; groups of 3 (13-col tiles)
def test_one_pass_sweep_reads_targets_at_tile_edges(chunk_size, vocab_chunk_size, hidden_size):
    """Every target on a tile's first or last column, the last tile and the last chunk ragged: the sweep
    reads the target logits from the flat chunk buffer at computed positions (row stride = that tile's
    width), so a wrong width or offset shows up as a wrong log-prob here; the gradient GEMMs run in
    groups of tiles, one group or several with a ragged last one."""
    from unipost.kernels.fused_loss import sweep_group

    n, v = 30, 101
    if hidden_size == 2 and vocab_chunk_size == 13:
        assert sweep_group(8, v, hidden_size) == 3  # 8 tiles in groups of 3, 3, 2
    hidden, weight, b, targets, consts = _inputs(n, hidden_size, v, dtype=torch.float64, mask_every=4)
    step = vocab_chunk_size
    edges = sorted({x for v0 in range(0, v, step) for x in (v0, min(v, v0 + step) - 1)})
    keep = targets == IGNORE
    targets = torch.tensor([edges[i % len(edges)] for i in range(n)])
    targets[keep] = IGNORE
    loss_fn = _loss_fn(consts, False)
    ref = _reference(hidden, weight, b, targets, loss_fn, False, 0.9)
    out, grads = _fused(
        hidden, weight, b, targets, loss_fn, False, temperature=0.9, chunk_size=chunk_size,
        vocab_chunk_size=vocab_chunk_size,
    )  # fmt: skip
    torch.testing.assert_close(out.logp, ref[1], atol=1e-10, rtol=1e-10)
    for got, want in zip(grads, ref[3], strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_one_pass_sweep_redoes_tiles_that_overflow_the_first_tiles_shift(monkeypatch, temperature):
    """The one-pass sweep shifts each tile's exponentials by the chunk's first-tile max (no max pass per
    tile) and keeps them for the gradients: a tile whose logits lie > 88 above that shift is computed
    again with its own max, and the gradients (exponential x per-tile scale) still match the reference."""
    from unipost.kernels import logprobs

    redone = []
    orig = logprobs.overflowed_tiles
    monkeypatch.setattr(logprobs, "overflowed_tiles", lambda s: redone.append(orig(s)) or redone[-1])
    hidden, weight, b, targets, consts = _inputs(40, 6, 90)
    b = b.clone()
    b[[47, 48, 71]] += 150.0  # tiles 3 and 4 of 15 columns overflow fp32's exp against the first tile's max
    targets[:] = torch.tensor([47, 48, 71])[torch.arange(40) % 3]  # logp ~ -1.1: the k3 term stays finite
    targets[::9] = IGNORE
    loss_fn = _loss_fn(consts, False)
    ref = _reference(hidden, weight, b, targets, loss_fn, False, temperature)
    out, grads = _fused(
        hidden, weight, b, targets, loss_fn, False, temperature=temperature, chunk_size=16,
        vocab_chunk_size=15,
    )  # fmt: skip
    assert redone == [[2, 3]], redone  # the first chunk; the other two take a max per tile
    _close(out.logp, ref[1])
    _close(out.loss, ref[0], atol=1e-4, rtol=1e-5)
    for got, want in zip(grads, ref[3], strict=True):
        _close(got, want)


def test_auto_mode_keeps_fwd_exp_eager_and_matches_reference(monkeypatch):
    """Auto mode (here forced on for a small problem by the environment) runs the compiled tile bodies
    except the one-pass sweep's fwd_exp, which measured faster eager; compile=True compiles that too.
    Both give the reference's numbers, with a temperature (the 0-d tensor form the compiled modes pass)."""
    from unipost.kernels import logprob_tiles

    monkeypatch.setenv("UNIPOST_LOGPROBS_COMPILE", "1")
    auto = logprob_tiles.tile_ops(torch.device("cpu"), torch.float32, 10, None)
    forced = logprob_tiles.tile_ops(torch.device("cpu"), torch.float32, 10, True)
    if not logprob_tiles.compiled_available():
        pytest.skip("torch.compile is unavailable here: both modes are eager")
    assert auto.fwd is forced.fwd and auto.bwd_into.compiled is forced.bwd_into  # compiled bodies
    assert auto.fwd_exp is not forced.fwd_exp and forced.fwd_exp is not logprob_tiles.EAGER.fwd_exp
    hidden, weight, b, targets, consts = _inputs(40, 16, 130)
    loss_fn = _loss_fn(consts, False)
    ref = _reference(hidden, weight, b, targets, loss_fn, False, 0.8)
    for compile_ in (None, True):
        out, grads = _fused(
            hidden, weight, b, targets, loss_fn, False, temperature=0.8, chunk_size=16,
            vocab_chunk_size=50, compile=compile_,
        )  # fmt: skip
        assert logprob_tiles.compiled_available()
        _close(out.logp, ref[1])
        _close(out.loss, ref[0], atol=1e-4, rtol=1e-5)
        for got, want in zip(grads, ref[3], strict=True):
            _close(got, want)


@pytest.mark.parametrize("needs", ["weight", "bias", "hidden"])
def test_one_pass_sweep_with_one_input_needing_grad(needs):
    """Only one of hidden / weight / bias wants a gradient (a frozen backbone, a frozen head): the sweep
    skips the other products, in several gradient groups of tiles and with one tile per group."""
    from unipost.kernels.fused_loss import sweep_group

    for hidden_size, vocab_chunk_size in ((2, 13), (8, 13)):  # groups of 3 tiles; one tile per group
        hidden, weight, b, targets, consts = _inputs(30, hidden_size, 101, dtype=torch.float64)
        assert sweep_group(8, 101, hidden_size) == (3 if hidden_size == 2 else 1)
        loss_fn = _loss_fn(consts, False)
        ref = _reference(hidden, weight, b, targets, loss_fn, False, 0.9)
        leaves = _leaves(hidden, weight, b)
        for x, name in zip(leaves, ("hidden", "weight", "bias"), strict=True):
            x.requires_grad_(name == needs)
        out = fused_token_loss(
            leaves[0], leaves[1], targets, loss_fn, bias=leaves[2], ignore_index=IGNORE, temperature=0.9,
            chunk_size=7, vocab_chunk_size=vocab_chunk_size,
        )  # fmt: skip
        out.loss.backward()
        for x, name, want in zip(leaves, ("hidden", "weight", "bias"), ref[3], strict=True):
            if name == needs:
                torch.testing.assert_close(x.grad, want, atol=1e-10, rtol=1e-10)
            else:
                assert x.grad is None


def test_auto_mode_follows_the_current_compiled_ops(monkeypatch):
    """Auto mode's ops are rebuilt from whatever compiled ops the module holds now (a test that swaps them,
    or a failed compile that resets them, must not leave auto mode on stale ones)."""
    from unipost.kernels import logprob_tiles

    monkeypatch.setattr(logprob_tiles, "_compiled", None)
    monkeypatch.setattr(logprob_tiles, "_compiled_auto", None)
    first = logprob_tiles.tile_ops(torch.device("cpu"), torch.float32, 1 << 30, True)
    if first is logprob_tiles.EAGER:
        pytest.skip("torch.compile is unavailable here")
    assert logprob_tiles.tile_ops(torch.device("cpu"), torch.float32, 1 << 30, None).fwd is first.fwd
    monkeypatch.setattr(logprob_tiles, "_compiled", logprob_tiles._make_compiled())
    fresh = logprob_tiles.tile_ops(torch.device("cpu"), torch.float32, 1 << 30, True)
    assert fresh is not first
    assert logprob_tiles.tile_ops(torch.device("cpu"), torch.float32, 1 << 30, None).fwd is fresh.fwd


def test_forced_compile_of_the_one_pass_body_does_not_recompile_per_shape():
    """The compiled fwd_exp sees only the tile and the temperature (the per-chunk tables are written outside
    the graph): chunk and tile shapes that change call to call reuse its dynamic-shape graph rather than
    specialising on the tables' sizes up to dynamo's recompile limit (after which it silently runs eager)."""
    from unipost.kernels.logprob_tiles import compile_stats, compiled_available

    torch.manual_seed(0)
    weight = torch.randn(3000, 16, requires_grad=True)
    before = compile_stats()["dynamo_unique_graphs"]
    for n in (700, 517, 1024, 77, 333, 1500, 2048, 901):  # 2-3 chunks, 1-6 tiles of varying widths
        chunk = max(1, n // 3)
        hidden = torch.randn(n, 16, requires_grad=True)
        targets = torch.randint(0, 3000, (n,))
        loss, _ = fused_weighted_nll(hidden, weight, targets, torch.ones(n), compile=True, chunk_size=chunk)
        loss.backward()
    if not compiled_available() or before is None:
        pytest.skip("torch.compile or dynamo's counters unavailable here")
    assert compile_stats()["dynamo_unique_graphs"] - before <= 1  # 2 when the tables went into the graph

"""The LM head's loss with its gradients formed in the forward sweep: three GEMMs instead of four.

Why: :func:`~unipost.kernels.logprobs.token_logprobs` takes *any* upstream gradient on ``logp``, so it
cannot form the logits' gradient before the backward pass and must recompute every logits tile there:
four tile GEMMs (forward logits; backward recompute, ``G W``, ``G^T h``). In the common case the
upstream gradient of a row is known as soon as that row's log-prob is: a loss that is a sum of per-token
terms ``f_t(logp_t, H_t)`` whose weights are either known before the step (SFT, DAgger, AggreVaTe:
``w = 1``; rejection sampling; GRPO's group advantage) or functions of the token's own log-prob (OPD's
teacher log-ratio, PPO's clipped ratio, the k3 KL, the entropy bonus). Then, per row chunk, the kernel

1. computes the chunk's logits over the whole vocabulary, tile by tile, into one ``[rows, V]`` buffer,
   taking each tile's log-sum-exp (and entropy) while it is still in cache;
2. finishes the rows' ``logp`` and ``H`` and asks the loss for ``dL/dlogp`` and ``dL/dH`` of those rows;
3. turns each stored tile into its gradient ``dL/dz`` in place and feeds it to ``G W`` and ``G^T h``
   (without an entropy term, in fp32 / fp64, step 1 already leaves ``exp(z - m)`` in the buffer
   and the gradient is that times a per-row scale, which goes into the GEMMs' small operands: no
   second pass over the buffer, one ``exp`` per logit; see :func:`_sweep_scaled_softmax`),

as fused losses do (Liger's fused linear cross-entropy, cut-cross-entropy). The backward pass only scales
the stored gradients by the upstream gradient of the scalar loss. The price is the buffer: ``rows x V``
logits of the input dtype. By default a chunk is ``N / 24`` rows (at least 1M logits), so the buffer
is ~0.17 bytes per logit of the ``N x V`` problem, ~1.4 % of what the naive head needs (~12 bytes per
logit: logits, log-softmax and their gradients); the one-pass sweep's per-group tables add at most
1/8 of the buffer (~1.6 % in all), or, where V < 32 H, one ``[rows, H]`` temporary.

Exactness: the same tile GEMMs, fp32 softmax arithmetic from the tile bodies of
:mod:`unipost.kernels.logprob_tiles` and the same dtype policy as ``token_logprobs`` (the one-pass sweep
merges tiles with one ``logsumexp`` and forms gradients as exponential x scale: ``logp`` may differ from
``token_logprobs`` by an ulp); the tests compare loss, ``logp`` and every gradient with the fp64 reference.

The loss must be *separable*: ``loss_fn(logp_N, entropy_N)`` a sum over rows of terms that read only
that row's ``logp`` and ``entropy`` (and constants). Each chunk's gradient is taken by autograd on
``loss_fn`` over a full-length vector holding the chunk's values (the other rows' entries are
placeholders, which separability makes irrelevant). A loss that reads other rows' log-probs (a batch-
normalised weight, a sequence-level ratio) does not fit: use ``token_logprobs`` (four GEMMs); the
Trainer picks between the two per recipe (:func:`unipost.batch.select_head`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from unipost.kernels.logprob_tiles import tile_ops
from unipost.kernels.logprobs import (
    check_logprobs_inputs,
    compute_dtype,
    exp_tiles_into_tables,
    raw_logits,
    target_positions,
    token_logprobs,
)

__all__ = ["FusedLoss", "fused_token_loss", "fused_weighted_nll", "plan_fused_tiles"]

# Rows per chunk: N / 24, so the [rows, V] buffer is 4 / 24 = 0.17 bytes per logit in fp32: ~1.4 % of the
# naive head's ~12 bytes per logit, leaving room under a 2 % cap for one tile's temporaries.
_BUFFER_FRACTION = 24
# ... but never fewer rows than fill this many logits (4 MiB fp32): tiny problems gain nothing from
# smaller chunks and pay per-chunk overhead.
_MIN_BUFFER_ELEMENTS = 1 << 20
# One [rows, cols] tile, the unit of the GEMMs and of the cache-resident passes: as token_logprobs.
_TILE_ELEMENTS = 512 * 1024
# The one-pass sweep's two per-group tables ([tiles in group, rows, H]) hold at most this fraction of the
# buffer each: +12.5 % over the buffer at worst, ~1.6 % of naive's memory in all.
_TABLE_FRACTION = 16

# (logp_N, entropy_N or None) -> scalar loss, a sum of per-row terms (see the module docstring)
LossFn = Callable[[Tensor, Tensor | None], Tensor]
# (r0, r1, logp_rows, entropy_rows or None) -> (dL/dlogp rows, dL/dH rows or None)
RowGrads = Callable[[int, int, Tensor, Tensor | None], tuple[Tensor | None, Tensor | None]]


class FusedLoss(NamedTuple):
    """The scalar ``loss`` (differentiable w.r.t. hidden, weight, bias) and the detached per-row values."""

    loss: Tensor
    logp: Tensor  # [N], detached (metrics, importance ratios)
    entropy: Tensor | None  # [N], detached, when return_entropy


def fused_weighted_nll(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_weights: Tensor,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """``(sum_t w_t * -logp_t, logp)``: the weighted NLL with per-token weights known before the step.

    ``token_weights`` [N] is detached (a stop-gradient weight, paper Eq. 15); normalise by scaling it
    (e.g. ``w / num_tokens`` for a token mean). ``logp`` [N] comes back detached. Keyword arguments
    are those of :func:`fused_token_loss`. Same loss and gradients as
    ``-(token_weights * token_logprobs(hidden, weight, targets)).sum()``, one GEMM fewer.
    """
    if not isinstance(token_weights, Tensor) or token_weights.shape != targets.shape:
        shape = tuple(token_weights.shape) if isinstance(token_weights, Tensor) else type(token_weights)
        raise ValueError(f"token_weights must be shaped like targets {tuple(targets.shape)}, got {shape}")
    out = fused_token_loss(hidden, weight, targets, _WeightedNLL(token_weights.detach()), **kwargs)
    return out.loss, out.logp


class _WeightedNLL:
    """``sum_t w_t * -logp_t`` whose per-row derivative needs no autograd: ``-w`` (the fast path)."""

    def __init__(self, w_N: Tensor) -> None:
        self.w_N = w_N

    def __call__(self, logp_N: Tensor, entropy_N: Tensor | None) -> Tensor:
        return -(self.w_N.to(logp_N.dtype) * logp_N).sum()

    def row_grads(self, r0: int, r1: int, logp_c: Tensor, entropy_c: Tensor | None):
        return -self.w_N[r0:r1].to(logp_c.dtype), None


def fused_token_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    compile: bool | None = None,
) -> FusedLoss:
    """``loss_fn(logp, entropy)`` of ``log_softmax((hidden @ weight.T + bias) / T)``, gradients in the sweep.

    Args:
        hidden, weight, targets, bias, ignore_index, temperature, compile: as
            :func:`~unipost.kernels.logprobs.token_logprobs` (rows whose target is ``ignore_index`` have
            ``logp = entropy = 0`` and get no gradient, whatever ``loss_fn`` does with them).
        loss_fn: ``(logp_N, entropy_N) -> scalar``, a sum of per-row terms, differentiable in both
            (``entropy_N`` is None unless ``return_entropy``). Called once per row chunk for the
            gradient (on full-length vectors) and once at the end for the value.
        return_entropy: compute each row's entropy (needed when ``loss_fn`` reads it).
        chunk_size: rows per chunk (the buffer holds ``chunk_size x V`` logits). ``None``: N / 24
            (at least 1M logits' worth; see the module docstring).
        vocab_chunk_size: vocabulary columns per tile; ``None``: a 2M-element tile.

    Returns :class:`FusedLoss`. Under ``torch.no_grad()``, or when nothing needs a gradient, it runs the
    forward-only ``token_logprobs`` and evaluates ``loss_fn`` on its output.

    Torch kernel only (CPU, or any device torch runs on); on CUDA the Triton ``token_logprobs`` is the
    fast path and the Trainer keeps it.
    """
    check_logprobs_inputs(
        hidden, weight, targets, bias, ignore_index, temperature, chunk_size, vocab_chunk_size
    )
    need = (hidden.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if not torch.is_grad_enabled() or not any(need):
        out = token_logprobs(
            hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
            return_entropy=return_entropy, backend="torch", compile=compile,
        )  # fmt: skip
        logp_N, entropy_N = out if return_entropy else (out, None)
        return FusedLoss(loss_fn(logp_N, entropy_N), logp_N.detach(), entropy_N)
    n, v = hidden.shape[0], weight.shape[0]
    rows, cols = plan_fused_tiles(n, v, chunk_size, vocab_chunk_size)
    ops = tile_ops(hidden.device, hidden.dtype, n * v, compile)
    plan = (int(ignore_index), rows, cols, 1.0 / float(temperature), bool(return_entropy), need, ops)
    row_grads = getattr(loss_fn, "row_grads", None) or _autograd_row_grads(loss_fn, n)
    loss, logp_N, entropy_N = _FusedLossFn.apply(hidden, weight, bias, targets, plan, row_grads, loss_fn)
    return FusedLoss(loss, logp_N, entropy_N if return_entropy else None)


def _autograd_row_grads(loss_fn: LossFn, n: int) -> RowGrads:
    """Per-chunk ``dL/dlogp``, ``dL/dH`` of a separable ``loss_fn`` by autograd on full-length vectors.

    The rows not yet computed hold placeholders (zeros, then earlier chunks' values): separability makes
    the chunk's derivatives independent of them.
    """
    state = {"logp": None, "entropy": None}

    def row_grads(r0: int, r1: int, logp_c: Tensor, entropy_c: Tensor | None):
        if state["logp"] is None:  # placeholders for the rows not yet computed (separability: unused)
            state["logp"] = logp_c.new_zeros(n)
            state["entropy"] = logp_c.new_zeros(n) if entropy_c is not None else None
        state["logp"][r0:r1] = logp_c
        if entropy_c is not None:
            state["entropy"][r0:r1] = entropy_c
        with torch.enable_grad():
            x = state["logp"].clone().requires_grad_()
            e = state["entropy"].clone().requires_grad_() if entropy_c is not None else None
            loss = loss_fn(x, e)
            wrt = [x] if e is None else [x, e]
            grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad else [None] * 2
        gl = grads[0][r0:r1] if grads[0] is not None else None
        ge = grads[1][r0:r1] if e is not None and grads[1] is not None else None
        return gl, ge

    return row_grads


def plan_fused_tiles(n: int, v: int, chunk_size: int | None = None, vocab_chunk_size: int | None = None):
    """``(rows, cols)``: rows per chunk (the buffer is ``rows x V``) and vocabulary columns per tile.

    Chunks and tiles are evened out (no sliver of a last chunk or tile) within the budgets above.
    """
    if chunk_size is None:
        rows = max(math.ceil(n / _BUFFER_FRACTION), math.ceil(_MIN_BUFFER_ELEMENTS / max(v, 1)))
    else:
        rows = chunk_size
    rows = max(1, min(rows, n))
    rows = math.ceil(n / math.ceil(n / rows)) if n else 1
    cols = vocab_chunk_size if vocab_chunk_size is not None else max(1, _TILE_ELEMENTS // rows)
    cols = max(1, min(cols, v))
    if vocab_chunk_size is None and v:
        cols = math.ceil(v / math.ceil(v / cols))
    return rows, cols


def sweep_group(n_tiles: int, v: int, width: int) -> int:
    """Tiles per group in the one-pass sweep: ``group * rows * H <= rows * V / _TABLE_FRACTION``.

    1: the sweep's two tables share one ``[rows, H]``, tile by tile."""
    return max(1, min(n_tiles, v // (_TABLE_FRACTION * width)))


class _Sweep(NamedTuple):
    """What one forward sweep reads and writes (the gradient buffers are None where not wanted)."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None
    valid_N: Tensor
    safe_N: Tensor
    logp_N: Tensor  # written
    grad_h: Tensor | None  # accumulated
    grad_w: Tensor | None  # accumulated
    grad_b: Tensor | None  # accumulated
    buf: Tensor  # one chunk's tiles
    rows: int
    cols: int
    inv_temp: float
    temp: Tensor | float  # inv_temp as the tile ops take it
    ops: object  # logprob_tiles.TileOps
    row_grads: RowGrads


def _sweep_scaled_softmax(sw: _Sweep) -> None:
    """The sweep for a loss with no entropy term in fp32 / fp64: ``dL/dz`` is a per-row multiple of ``p``.

    Then ``dL/dz = p * coef + gl * onehot`` with ``p = exp(z - lse)``. The forward pass over each tile
    (still in cache after its GEMM) leaves ``e = exp(z - m_t)`` in the buffer (``m_t`` the chunk's first
    tile's row max, or the tile's own: ``logprobs.exp_tiles_into_tables``), and
    ``p * coef = e * s_t`` with the per-row scale ``s_t = exp(m_t - lse) * coef``. That scale goes into
    the gradient GEMMs' small operands, ``(e W_t) * s_t`` and ``e^T (s_t * h)``, so the buffer is never
    swept a second time, and each logit's ``exp`` is taken once (the general sweep reads
    the buffer again after the forward to turn logits into gradients: a second pass over ``rows x V``
    that no longer sits in cache, and a second ``exp``). The one-hot part is added as in the general sweep.
    """
    (hidden, weight, bias, valid_N, safe_N, logp_N, grad_h, grad_w, grad_b, buf, rows, cols, inv_temp, temp,
     ops, row_grads) = sw  # fmt: skip
    n, v, width = hidden.shape[0], weight.shape[0], hidden.shape[1]
    need_h, need_w, need_b = grad_h is not None, grad_w is not None, grad_b is not None
    starts = [(v0, min(v, v0 + cols)) for v0 in range(0, v, cols)]
    n_tiles = len(starts)
    # Per chunk: each tile's row shift and exponential sum (rows of these tables, written by
    # exp_tiles_into_tables). For the gradients, a group of tiles at a time: each tile's e W_t and h
    # scaled by its per-row factor, so the scaling and the sum over tiles are one op per group, not two
    # per tile; a group's two tables hold at most 1 / _TABLE_FRACTION of the buffer each (all tiles at
    # once when H is small). Where a group is one tile the two share one [rows, H] (no more memory than
    # before the tables).
    max_kc = hidden.new_empty(n_tiles, rows)
    sum_kc = hidden.new_empty(n_tiles, rows)
    group = sweep_group(n_tiles, v, width)
    ew_gc = hidden.new_empty(group, rows, width) if need_h else None
    hs_gc = None
    if need_w:  # V < 32 H (one tile per group): hs shares ew's [rows, H], read before ew is written
        hs_gc = ew_gc if group == 1 and ew_gc is not None else hidden.new_empty(group, rows, width)
    speculate = True  # shift tiles by the chunk's first tile's max (see exp_tiles_into_tables)
    for r0 in range(0, n, rows):
        r1 = min(n, r0 + rows)
        m = r1 - r0
        h_c, valid_c, safe_c = hidden[r0:r1], valid_N[r0:r1], safe_N[r0:r1]
        # The targets' logits are read from the tiles (the same rounded values the log-sum-exp is taken
        # over, so logp <= 0) before fwd_exp overwrites them: rows sorted by tile, one gather per tile
        # from the flat buffer at precomputed positions.
        order, pos_sorted, ends = target_positions(safe_c, cols, v, rows)
        tgt_sorted = hidden.new_empty(m)

        def gemm_tile(k: int, h_c=h_c, pos_sorted=pos_sorted, ends=ends, tgt_sorted=tgt_sorted) -> Tensor:
            v0, v1 = starts[k]  # tile k's logits at buf[rows * v0:], kept for the gradient phase
            raw = raw_logits(h_c, weight[v0:v1], bias[v0:v1] if bias is not None else None, buf[rows * v0 :])
            lo, hi = ends[k - 1] if k else 0, ends[k]
            if hi > lo:
                torch.index_select(buf, 0, pos_sorted[lo:hi], out=tgt_sorted[lo:hi])
            return raw

        speculate = exp_tiles_into_tables(
            n_tiles, gemm_tile, ops, temp, inv_temp, max_kc[:, :m], sum_kc[:, :m], speculate
        )
        target_logit_c = torch.empty_like(tgt_sorted).index_copy_(0, order, tgt_sorted) * inv_temp
        max_c = max_kc[:, :m]
        lse_c = torch.logsumexp(max_c + torch.log(sum_kc[:, :m]), dim=0)
        zero_c = torch.zeros_like(lse_c)
        logp_c = torch.where(valid_c, target_logit_c - lse_c, zero_c)
        logp_N[r0:r1] = logp_c
        gl_c, _ = row_grads(r0, r1, logp_c, None)
        if not (need_h or need_w or need_b) or gl_c is None:
            continue
        gl_c = torch.where(valid_c, gl_c.to(lse_c.dtype) * inv_temp, zero_c)  # 1/T folded in
        scale = torch.exp(max_c - lse_c) * -gl_c  # [tiles, rows]: coef = -gl
        if need_w:
            sel = valid_c.nonzero().squeeze(1)
            grad_w.index_add_(0, safe_c[sel], h_c[sel] * gl_c[sel, None])
        if need_b:
            grad_b.index_add_(0, safe_c, gl_c)
        if need_h:
            local_h = grad_h[r0:r1]
            local_h.addcmul_(gl_c[:, None], weight[safe_c])  # the one-hot part: gl * W[y]
        for k0 in range(0, n_tiles, group):
            k1 = min(n_tiles, k0 + group)
            if need_w:
                hs = torch.mul(h_c, scale[k0:k1, :, None], out=hs_gc[: k1 - k0, :m])  # each tile's s_t * h
            for k in range(k0, k1):
                v0, v1 = starts[k]
                e = buf[rows * v0 : rows * v0 + m * (v1 - v0)].view(m, v1 - v0)
                if need_w:
                    grad_w[v0:v1].addmm_(e.T, hs[k - k0])
                if need_h:  # after the line above: with one tile per group ew and hs share memory
                    torch.mm(e, weight[v0:v1], out=ew_gc[k - k0, :m])
                if need_b:
                    grad_b[v0:v1].addmv_(e.T, scale[k].to(e.dtype))
            if need_h:  # sum_t (e_t W_t) * s_t over the group's tiles
                local_h.add_(torch.einsum("krh,kr->rh", ew_gc[: k1 - k0, :m], scale[k0:k1]))


class _FusedLossFn(torch.autograd.Function):
    """Forward: logits, statistics and both gradients per row chunk; backward: scale them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan, row_grads, value_fn):
        ignore_index, rows, cols, inv_temp, want_entropy, (need_h, need_w, need_b), ops = plan
        n, v, width = hidden.shape[0], weight.shape[0], hidden.shape[1]
        dtype, cdtype = hidden.dtype, compute_dtype(hidden.dtype)
        direct = dtype == cdtype  # fp32 / fp64: accumulate in place; bf16 / fp16: in fp32 buffers
        valid_N = targets != ignore_index
        safe_N = torch.where(valid_N, targets, torch.zeros_like(targets)).long()
        logp_N = hidden.new_zeros(n, dtype=cdtype)
        entropy_N = hidden.new_zeros(n, dtype=cdtype)
        temp = ops.inv_temp(inv_temp, hidden)

        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        acc_w = None
        if need_w and not direct:
            acc_w = torch.zeros(weight.shape, dtype=cdtype, device=weight.device)
        full_w = grad_w if direct else acc_w
        grad_b = torch.zeros(v, dtype=cdtype, device=weight.device) if need_b else None
        buf = hidden.new_empty(rows * v)  # one chunk's logits, stored tile after tile (each contiguous)
        col_starts = range(0, v, cols)
        if direct and not want_entropy:  # the common case: one pass per tile, the scale folded in
            sweep = _Sweep(
                hidden, weight, bias, valid_N, safe_N, logp_N, grad_h, grad_w, grad_b, buf, rows, cols,
                inv_temp, temp, ops, row_grads,
            )  # fmt: skip
            _sweep_scaled_softmax(sweep)
            r_end = 0  # the general sweep below has nothing left to do
        else:
            r_end = n

        for r0 in range(0, r_end, rows):
            r1 = min(n, r0 + rows)
            m = r1 - r0
            h_c, tgt_c, valid_c, safe_c = hidden[r0:r1], targets[r0:r1], valid_N[r0:r1], safe_N[r0:r1]
            tiles, lse_c, ent_c = [], None, None
            target_logit_c = hidden.new_zeros(m, dtype=cdtype)
            for v0 in col_starts:
                v1 = min(v, v0 + cols)
                raw = buf[rows * v0 : rows * v0 + m * (v1 - v0)].view(m, v1 - v0)  # (C, Cv)
                w_t = weight[v0:v1]
                if bias is not None:
                    torch.addmm(bias[v0:v1], h_c, w_t.T, out=raw)
                else:
                    torch.mm(h_c, w_t.T, out=raw)
                tiles.append((v0, v1, raw))
                in_tile = (tgt_c >= v0) & (tgt_c < v1)
                local = (tgt_c - v0).clamp(0, v1 - v0 - 1).long()
                z_tgt = raw.gather(1, local[:, None]).squeeze(1).to(cdtype) * inv_temp
                target_logit_c = torch.where(in_tile, z_tgt, target_logit_c)
                lse_t, ent_t = ops.fwd_keep(raw, temp, want_entropy)
                if lse_c is None:
                    lse_c, ent_c = lse_t, ent_t
                    continue
                lse_new = torch.logaddexp(lse_c, lse_t)
                if want_entropy:  # the same online merge as token_logprobs
                    a_old, a_t = torch.exp(lse_c - lse_new), torch.exp(lse_t - lse_new)
                    ent_c = a_old * (ent_c + lse_new - lse_c) + a_t * (ent_t + lse_new - lse_t)
                lse_c = lse_new
            if lse_c is None:  # V = 0 cannot pass validation; keep the types simple
                continue
            zero_c = torch.zeros_like(lse_c)
            logp_c = torch.where(valid_c, target_logit_c - lse_c, zero_c)
            logp_N[r0:r1] = logp_c
            if want_entropy:
                entropy_N[r0:r1] = torch.where(valid_c, ent_c, zero_c)
            gl_c, ge_c = row_grads(r0, r1, logp_c, entropy_N[r0:r1] if want_entropy else None)
            if not (need_h or need_w or need_b) or (gl_c is None and ge_c is None):
                continue
            # dL/dz_j = p_j * (c - ge * log p_j) + gl * onehot_j with c = -ge * H - gl, 1/T folded in
            # (token_logprobs' backward, line for line); masked rows get exactly zero.
            gl_c = zero_c if gl_c is None else torch.where(valid_c, gl_c.to(cdtype) * inv_temp, zero_c)
            if ge_c is not None and want_entropy:
                ge_c = torch.where(valid_c, ge_c.to(cdtype) * inv_temp, zero_c)
                coef_c = -ge_c * ent_c - gl_c
            else:
                ge_c, coef_c = None, -gl_c
            local_h = None
            if need_h:
                local_h = grad_h[r0:r1] if direct else hidden.new_zeros(m, width, dtype=cdtype)
                local_h.addcmul_(gl_c[:, None].to(local_h.dtype), weight[safe_c].to(local_h.dtype))
            if need_w:
                sel = valid_c.nonzero().squeeze(1)
                contrib = h_c[sel].to(full_w.dtype) * gl_c[sel, None].to(full_w.dtype)
                full_w.index_add_(0, safe_c[sel], contrib)
            if need_b:
                grad_b.index_add_(0, safe_c, gl_c)
            for v0, v1, g in tiles:
                colsum = ops.bwd_into(g, lse_c, coef_c, ge_c, temp, need_b)  # the stored logits -> dL/dz
                w_t = weight[v0:v1]
                if need_b:
                    grad_b[v0:v1] += colsum
                if need_h:
                    if direct:
                        local_h.addmm_(g, w_t)
                    else:
                        local_h.add_(g @ w_t)
                if need_w:
                    if direct:
                        grad_w[v0:v1].addmm_(g.T, h_c)
                    else:
                        acc_w[v0:v1].add_(g.T @ h_c)
            if need_h and not direct:
                grad_h[r0:r1] = local_h
        del buf
        if acc_w is not None:
            grad_w.copy_(acc_w)
        loss = value_fn(logp_N, entropy_N if want_entropy else None).detach()  # the caller's loss, all rows
        ctx.grads = [grad_h, grad_w, grad_b.to(bias.dtype) if need_b else None]
        ctx.mark_non_differentiable(logp_N, entropy_N)
        return loss, logp_N, entropy_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_logp, _grad_entropy):
        grads, ctx.grads = ctx.grads, None  # hand the buffers over: no copy stays behind
        if grads is None:
            raise RuntimeError(
                "the fused loss's gradients were handed over by an earlier backward; it runs backward once "
                "(retain_graph cannot replay it): compute the loss again"
            )
        if grad_loss is None:
            return (None,) * 7
        if not (grad_loss.numel() == 1 and float(grad_loss) == 1.0):
            for g in grads:
                if g is not None:
                    g.mul_(grad_loss.to(g.dtype))
        return grads[0], grads[1], grads[2], None, None, None, None

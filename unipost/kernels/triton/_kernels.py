"""The ``@triton.jit`` kernels behind :func:`unipost.kernels.triton.token_logprobs_triton`.

This module imports triton at import time; only :mod:`unipost.kernels.triton.function` imports it, and
only when a Triton launch is asked for. Whether the kernels run compiled (CUDA) or in Triton's CPU
interpreter is fixed when this module is imported: ``triton.jit`` reads ``TRITON_INTERPRET`` then.

Three kernels, all on ``[BLOCK_N, BLOCK_V]`` logits tiles built by a K-loop of ``tl.dot`` over the hidden
size with fp32 accumulation (``z = (hidden @ weight.T + bias) / T``; masked columns are ``-inf``):

* ``_forward``   grid = row blocks. Online log-sum-exp over vocabulary tiles (running max ``m``, sum
  ``s = sum exp(z - m)``), the target logit, and optionally the entropy through
  ``u = sum exp(z - m) * (z - m)`` rescaled with the max, so ``H = log s - u / s`` is formed from
  centred terms (no ``lse - E[z]`` cancellation).
* ``_grad_hidden`` grid = row blocks. Recomputes each tile, forms ``g = dL/dlogits`` from the saved
  ``lse`` / entropy and the per-row coefficients, and adds ``g @ W`` into the rows' fp32 gradient.
* ``_grad_weight`` grid = vocabulary blocks. The same recomputation with the loops swapped, adding
  ``g.T @ h`` into the block's fp32 weight gradient and ``sum_rows g`` into the bias gradient.

Why two backward kernels instead of one with atomics: each program owns the output rows it writes
(row blocks own ``grad_hidden`` rows, vocabulary blocks own ``grad_weight`` rows), so the result is
deterministic run to run and needs no fp32 atomics on ``[V, H]`` (which contend whenever many row blocks
hit the same vocabulary tile). The price is one extra recomputation of the logits (four GEMM-sized
passes in the backward instead of three).

The owned fp32 gradient rows are accumulated by read-modify-write through global memory (an [N, H] or
[V, H] accumulator does not fit in registers), and the same program reads them back on its next tile.
Triton orders neither a ``tl.store`` and a later ``tl.load`` of the same address made by *different*
threads of the program (their layouts may differ: triton-lang/triton#10924, #1615), so a
``tl.debug_barrier()`` (``__syncthreads``, which makes the CTA's global writes visible to the whole
CTA) ends every tile's accumulation. The interpreter runs a program as one thread and cannot show
this race; ``docs/kernels.md`` lists what only a GPU can verify.
"""

from __future__ import annotations

import triton
import triton.language as tl

# A finite stand-in for -inf as the initial running max: exp(_NEG_BIG - m) is exactly 0 and
# (_NEG_BIG - m) * 0 stays 0, where -inf would give inf * 0 = NaN in the entropy rescaling.
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation.

    ``UPCAST`` is set only under the interpreter for bf16: its ``tl.dot`` multiplies the raw uint16 bits
    of bf16 operands (triton 3.9). bf16 -> fp32 is exact and bf16 products are exact in fp32, so the
    upcast computes what the GPU's bf16 tensor-core dot with fp32 accumulation computes.
    """
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``z = (h[rows] @ w[cols].T + b[cols]) * inv_temp`` in fp32; columns past V are -inf."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < H
        h = tl.load(
            hidden_ptr + rows64[:, None] * stride_hn + ks[None, :] * stride_hk,
            mask=row_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + cols64[:, None] * stride_wv + ks[None, :] * stride_wk,
            mask=col_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        acc = _dot(h, tl.trans(w), acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    z = acc * inv_temp
    return tl.where(col_ok[None, :], z, float("-inf"))


@triton.jit
def _dlogits_tile(
    z,
    cols,
    row_ok,
    col_ok,
    lse,
    tgt,
    gl,
    ge,
    c,
    USE_ENTROPY: tl.constexpr,
):
    """``dL/dlogits`` of one tile (fp32), 1/T already folded into ``gl``, ``ge`` and ``c``.

    ``dL/dz_j = p_j * (-ge * (z_j - lse) + c) + gl * onehot_j`` with ``c = -ge * H - gl``; rows that
    are padding or ``ignore_index`` have ``gl = ge = c = 0`` and get exactly 0.
    """
    ok = row_ok[:, None] & col_ok[None, :]
    logp = tl.where(ok, z - lse[:, None], 0.0)
    p = tl.where(ok, tl.exp(logp), 0.0)
    g = p * (c[:, None] - ge[:, None] * logp) if USE_ENTROPY else p * c[:, None]
    onehot = cols[None, :] == tgt[:, None]
    return g + tl.where(onehot & ok, gl[:, None], 0.0)


@triton.jit
def _forward(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    logp_ptr,
    lse_ptr,
    entropy_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=ignore_index)
    m = tl.full((BLOCK_N,), _NEG_BIG, dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    u = tl.zeros((BLOCK_N,), dtype=tl.float32)
    z_tgt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H,
            stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        onehot = cols[None, :] == tgt[:, None]
        z_tgt += tl.sum(tl.where(onehot & col_ok[None, :], z, 0.0), axis=1)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        y = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)
        e = tl.where(col_ok[None, :], tl.exp(y), 0.0)
        if WANT_ENTROPY:
            # Rescale the running sums to the new max: z - m_new = (z - m) + (m - m_new).
            u = alpha * (u + (m - m_new) * s) + tl.sum(e * y, axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    log_s = tl.log(s)
    lse = m + log_s
    valid = row_ok & (tgt != ignore_index)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(logp_ptr + rows, tl.where(valid, z_tgt - lse, 0.0), mask=row_ok)
    if WANT_ENTROPY:
        # Stored unmasked: the backward pass needs H on valid rows only and zeroes the rest itself.
        tl.store(entropy_ptr + rows, log_s - u / s, mask=row_ok)


@triton.jit
def _grad_hidden(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    gl_ptr,
    ge_ptr,
    c_ptr,
    grad_hidden_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    USE_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``grad_hidden[rows] = sum_v dL/dlogits[rows, v] @ W[v]`` (fp32 [N, H] output, rows owned)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
    c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
    ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0) if USE_ENTROPY else gl
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H,
            stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        g = _dlogits_tile(z, cols, row_ok, col_ok, lse, tgt, gl, ge, c, USE_ENTROPY)
        g = g.to(weight_ptr.dtype.element_ty)  # the GEMM runs in the input dtype, as in the torch kernel
        cols64 = cols.to(tl.int64)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            k_ok = ks < H
            w = tl.load(
                weight_ptr + cols64[:, None] * stride_wv + ks[None, :] * stride_wk,
                mask=col_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            out = grad_hidden_ptr + rows64[:, None] * H + ks[None, :]
            out_ok = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(out, mask=out_ok, other=0.0)
            tl.store(out, _dot(g, w, acc, DOT_PRECISION, UPCAST), mask=out_ok)
        tl.debug_barrier()  # the next vocabulary tile reads these rows back (see the module docstring)


@triton.jit
def _grad_weight(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    gl_ptr,
    ge_ptr,
    c_ptr,
    grad_weight_ptr,
    grad_bias_ptr,
    N,
    V,
    H,
    stride_hn,
    stride_hk,
    stride_wv,
    stride_wk,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    NEED_WEIGHT: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    USE_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """``grad_weight[cols] = sum_n dL/dlogits[n, cols].T @ h[n]`` and ``grad_bias[cols]`` (fp32, owned)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    cols64 = cols.to(tl.int64)
    gb = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for r0 in range(0, N, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        tgt = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        gl = tl.load(gl_ptr + rows, mask=row_ok, other=0.0)
        c = tl.load(c_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0) if USE_ENTROPY else gl
        z = _logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, rows, cols, row_ok, col_ok, H,
            stride_hn, stride_hk, stride_wv, stride_wk, inv_temp,
            HAS_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION, UPCAST,
        )  # fmt: skip
        g = _dlogits_tile(z, cols, row_ok, col_ok, lse, tgt, gl, ge, c, USE_ENTROPY)
        if NEED_BIAS:
            gb += tl.sum(g, axis=0)
        if NEED_WEIGHT:
            g_t = tl.trans(g.to(hidden_ptr.dtype.element_ty))  # (BLOCK_V, BLOCK_N)
            rows64 = rows.to(tl.int64)
            for k0 in range(0, H, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                k_ok = ks < H
                h = tl.load(
                    hidden_ptr + rows64[:, None] * stride_hn + ks[None, :] * stride_hk,
                    mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0,
                )
                out = grad_weight_ptr + cols64[:, None] * H + ks[None, :]
                out_ok = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(out, mask=out_ok, other=0.0)
                tl.store(out, _dot(g_t, h, acc, DOT_PRECISION, UPCAST), mask=out_ok)
            tl.debug_barrier()  # the next row tile reads these rows back (see the module docstring)
    if NEED_BIAS:
        tl.store(grad_bias_ptr + cols, gb, mask=col_ok)

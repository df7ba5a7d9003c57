"""Autograd wrapper and launcher for the Triton ``token_logprobs`` kernels.

Same contract as :func:`unipost.kernels.logprobs.token_logprobs` (which dispatches here for
``backend="triton"``, and for ``"auto"`` on CUDA): per-token ``logp`` (and entropy) of
``softmax((hidden @ weight.T + bias) / T)``, ``ignore_index`` rows exactly 0 with exactly zero gradient,
arbitrary upstream gradients on ``logp`` and on the entropy. Per-token weights (advantages, DAgger
weights) are not an argument, exactly as in the torch kernel: they arrive as the upstream gradient of
``logp`` (``(w_T * logp_T).sum().backward()``) and the backward pass applies them per row.

Dtypes: fp32, bf16 and fp16 inputs. The logits GEMM accumulates in fp32 and stays fp32 (the torch kernel
rounds each logits tile to the input dtype first, so for bf16 this one is slightly *more* accurate);
fp32 inputs use IEEE fp32 dot products unless torch's fp32 matmul precision allows TF32 (the same rule as
torch's own GEMMs). The backward
pass casts ``dL/dlogits`` to the input dtype for its two GEMMs (as the torch kernel does) and
accumulates the hidden, weight and bias gradients in fp32 buffers, cast to the input dtype once at the
end. fp64 is refused (use ``backend="torch"``, e.g. for ``gradcheck``).

Block sizes are compile-time tile shapes: powers of two >= 16 (``tl.dot``'s minimum). They replace the
torch kernel's ``chunk_size`` / ``vocab_chunk_size``, which do not apply here.
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

from unipost._optional import OptionalDependencyError, available, require

__all__ = [
    "DEFAULT_BLOCKS",
    "TritonBackendError",
    "interpreter_requested",
    "token_logprobs_triton",
    "triton_runnable",
]

# (rows, vocab columns, hidden columns) per tile. GPU defaults follow common fused-CE kernels (64 x 128
# logits tile, 64-wide K steps); they are NOT tuned on a GPU here (none was available, docs/kernels.md).
DEFAULT_BLOCKS = (64, 128, 64)
# 8 warps: compiled ahead of time for sm_90 (bf16, no GPU needed, docs/kernels.md), 4 warps spill the
# 64 x 128 fp32 logits tile to the stack in all three kernels; 8 warps leave the forward spill-free.
NUM_WARPS = 8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class TritonBackendError(RuntimeError):
    """The Triton kernel cannot run for these inputs or on this machine; the message names the fix."""


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET=1`` is set in this process's environment (Triton's CPU interpreter)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_runnable(device: torch.device) -> bool:
    """Whether the Triton kernel can run on ``device``: CUDA with triton installed, or the interpreter."""
    if not available("triton"):
        return False
    return device.type == "cuda" or interpreter_requested()


def _kernels():
    """Import the jit module (this is where triton itself gets imported)."""
    require("triton")
    from unipost.kernels.triton import _kernels as module

    return module


def _is_interpreted(module) -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module._forward, InterpretedFunction)


def _check_launchable(hidden: Tensor, blocks: tuple[int, int, int]) -> None:
    """Refuse what the kernels cannot do, with the fix in the message."""
    if hidden.dtype not in SUPPORTED_DTYPES:
        raise TritonBackendError(
            f"the Triton token_logprobs kernel supports float32, bfloat16 and float16, got {hidden.dtype}; "
            "use backend='torch' (e.g. float64 for gradcheck)"
        )
    for name, b in zip(("block_rows", "block_vocab", "block_hidden"), blocks, strict=True):
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise TritonBackendError(f"{name} must be a power of two >= 16 (tl.dot's minimum), got {b!r}")
    if not available("triton"):
        try:
            require("triton")
        except OptionalDependencyError as exc:
            raise TritonBackendError(f"backend='triton' needs triton: {exc}") from exc
    if hidden.device.type != "cuda" and not interpreter_requested():
        raise TritonBackendError(
            f"backend='triton' got tensors on {hidden.device}, and Triton kernels run on CUDA only; on CPU "
            "set TRITON_INTERPRET=1 in the environment before Python starts (Triton's interpreter: correct "
            "but ~1000x slower, for testing), or use backend='torch' / 'auto'"
        )
    module = _kernels()
    if hidden.device.type != "cuda" and not _is_interpreted(module):
        raise TritonBackendError(
            "TRITON_INTERPRET=1 was set after unipost.kernels.triton._kernels was imported, so its kernels "
            "were compiled for the GPU; set TRITON_INTERPRET=1 in the environment before Python starts"
        )


def token_logprobs_triton(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    return_entropy: bool = False,
    block_rows: int | None = None,
    block_vocab: int | None = None,
    block_hidden: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Triton ``token_logprobs``: see :func:`unipost.kernels.logprobs.token_logprobs` for the contract.

    ``block_*`` override :data:`DEFAULT_BLOCKS` (powers of two >= 16). Inputs are validated by the
    dispatcher in ``unipost.kernels.logprobs``; call that (``backend="triton"``) rather than this directly.
    """
    given = (block_rows, block_vocab, block_hidden)
    blocks = tuple(d if b is None else b for b, d in zip(given, DEFAULT_BLOCKS, strict=True))
    _check_launchable(hidden, blocks)
    if bias is not None:
        bias = bias.contiguous()  # the kernels index it with stride 1 (hidden and weight take any strides)
    logp_N, entropy_N = _TritonTokenLogprobs.apply(
        hidden, weight, bias, targets, int(ignore_index), 1.0 / float(temperature), return_entropy, blocks
    )
    return (logp_N, entropy_N) if return_entropy else logp_N


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs follow torch's fp32 matmul setting: IEEE products by default ("highest"), TF32 only
    where the user allowed it (``torch.set_float32_matmul_precision("high")``), as torch's own GEMMs do."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # Triton's default; it only changes fp32 operands


def _upcast_dot(hidden: Tensor) -> bool:
    """bf16 dot operands go through fp32 under the interpreter only (see ``_kernels._dot``)."""
    return hidden.dtype == torch.bfloat16 and _is_interpreted(_kernels())


def _strides(hidden: Tensor, weight: Tensor) -> tuple[int, int, int, int]:
    return hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1)


class _TritonTokenLogprobs(torch.autograd.Function):
    """Forward: online log-sum-exp per row block. Backward: two recomputing kernels (see ``_kernels``)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, inv_temp, want_entropy, blocks):
        k = _kernels()
        n, h = hidden.shape
        v = weight.shape[0]
        block_n, block_v, block_k = blocks
        targets = targets.contiguous()
        logp_N = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse_N = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy_N = torch.empty(n if want_entropy else 0, dtype=torch.float32, device=hidden.device)
        if n:
            k._forward[(triton_cdiv(n, block_n),)](
                hidden, weight, _or_dummy(bias, hidden), targets, logp_N, lse_N, _or_dummy(entropy_N, lse_N),
                n, v, h, *_strides(hidden, weight), inv_temp, ignore_index,
                HAS_BIAS=bias is not None, WANT_ENTROPY=want_entropy, BLOCK_N=block_n, BLOCK_V=block_v,
                BLOCK_K=block_k, DOT_PRECISION=_dot_precision(hidden.dtype), UPCAST=_upcast_dot(hidden),
                num_warps=NUM_WARPS,
            )  # fmt: skip
        valid_N = targets != ignore_index
        if want_entropy:
            entropy_out_N = torch.where(valid_N, entropy_N, torch.zeros_like(entropy_N))
        else:
            entropy_out_N = entropy_N
            ctx.mark_non_differentiable(entropy_out_N)
        ctx.save_for_backward(hidden, weight, bias, targets, lse_N, entropy_N)
        ctx.meta = (ignore_index, inv_temp, want_entropy, blocks)
        ctx.set_materialize_grads(False)
        return logp_N, entropy_out_N

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp_N, grad_entropy_N):
        hidden, weight, bias, targets, lse_N, entropy_N = ctx.saved_tensors
        ignore_index, inv_temp, want_entropy, blocks = ctx.meta
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        use_entropy = want_entropy and grad_entropy_N is not None
        if (grad_logp_N is None and not use_entropy) or not (need_h or need_w or need_b):
            return None, None, None, None, None, None, None, None

        n, h = hidden.shape
        v = weight.shape[0]
        block_n, block_v, block_k = blocks
        valid_N = targets != ignore_index
        zero_N = torch.zeros_like(lse_N)
        # Per-row coefficients of dL/dlogits with 1/T folded in and masked rows zeroed (derivation in
        # unipost/kernels/logprobs.py): dL/dz_j = p_j * (-ge * (z_j - lse) + c) + gl * onehot_j.
        gl_N = zero_N
        if grad_logp_N is not None:
            gl_N = torch.where(valid_N, grad_logp_N.float() * inv_temp, zero_N).contiguous()
        ge_N = zero_N
        if use_entropy:
            ge_N = torch.where(valid_N, grad_entropy_N.float() * inv_temp, zero_N).contiguous()
            c_N = (-ge_N * torch.where(valid_N, entropy_N, zero_N) - gl_N).contiguous()
        else:
            c_N = (-gl_N).contiguous()

        device = hidden.device
        common = dict(
            HAS_BIAS=bias is not None,
            USE_ENTROPY=use_entropy,
            BLOCK_N=block_n,
            BLOCK_V=block_v,
            BLOCK_K=block_k,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            UPCAST=_upcast_dot(hidden),
            num_warps=NUM_WARPS,
        )
        args = (hidden, weight, _or_dummy(bias, hidden), targets, lse_N, gl_N, ge_N, c_N)
        dims = (n, v, h, *_strides(hidden, weight), inv_temp)
        k = _kernels()
        grad_h = grad_w = grad_b = None
        if need_h:
            acc_h = torch.zeros(n, h, dtype=torch.float32, device=device)
            if n:
                k._grad_hidden[(triton_cdiv(n, block_n),)](*args, acc_h, *dims, **common)
            grad_h = acc_h.to(hidden.dtype)
        if need_w or need_b:
            acc_w = torch.zeros(v, h, dtype=torch.float32, device=device) if need_w else None
            acc_b = torch.zeros(v, dtype=torch.float32, device=device) if need_b else None
            if n:
                outs = (_or_dummy(acc_w, lse_N), _or_dummy(acc_b, lse_N))
                k._grad_weight[(triton_cdiv(v, block_v),)](
                    *args, *outs, *dims, NEED_WEIGHT=need_w, NEED_BIAS=need_b, **common
                )
            grad_w = acc_w.to(weight.dtype) if need_w else None
            grad_b = acc_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _or_dummy(tensor: Tensor | None, like: Tensor) -> Tensor:
    """``tensor``, or a 1-element stand-in for a pointer argument the kernel will not touch.

    Never an alias of another argument: the interpreter copies every tensor argument back after the
    launch, so an aliased, untouched stand-in would overwrite the real output written through the other.
    """
    if tensor is not None and tensor.numel():
        return tensor
    return torch.empty(1, dtype=like.dtype, device=like.device)

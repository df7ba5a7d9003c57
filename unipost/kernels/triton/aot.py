"""Compile the Triton ``token_logprobs`` kernels for an NVIDIA GPU ahead of time, on a machine without one.

    python -m unipost.kernels.triton.aot                      # bf16, sm_90 (H100), the default blocks
    python -m unipost.kernels.triton.aot --dtype fp32 --arch 80

Why: the CPU interpreter checks the kernels' arithmetic but not what only the GPU compiler sees (e.g. a
non-constexpr global, a ``tl.dot`` operand the backend rejects, register spills). This runs the real
compiler pipeline (Triton frontend -> TTIR -> TTGIR -> LLVM -> PTX -> ``ptxas``, all shipped in the
triton wheel) for a chosen GPU target and prints each kernel's registers, stack (spill) bytes and shared
memory from ``cuobjdump -res-usage``. It does not run anything: speed and the absence of races still need
a GPU (docs/kernels.md).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

from unipost.kernels.triton.function import DEFAULT_BLOCKS, NUM_WARPS

_TRITON_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_SCALARS = ("N", "V", "H", "stride_hn", "stride_hk", "stride_wv", "stride_wk", "ignore_index")
_F32_PTRS = {
    "_forward": ("logp_ptr", "lse_ptr", "entropy_ptr"),
    "_grad_hidden": ("lse_ptr", "gl_ptr", "ge_ptr", "c_ptr", "grad_hidden_ptr"),
    "_grad_weight": ("lse_ptr", "gl_ptr", "ge_ptr", "c_ptr", "grad_weight_ptr", "grad_bias_ptr"),
}
_FLAGS = {
    "_forward": {"WANT_ENTROPY": True},
    "_grad_hidden": {"USE_ENTROPY": True},
    "_grad_weight": {"USE_ENTROPY": True, "NEED_WEIGHT": True, "NEED_BIAS": True},
}


@dataclass
class CompiledKernel:
    name: str
    registers: int
    stack_bytes: int
    shared_bytes: int
    barriers: int  # CTA barriers in the TTIR (the explicit tl.debug_barrier calls among them)


def compile_kernels(
    dtype: str = "bf16",
    arch: int = 90,
    blocks: tuple[int, int, int] = DEFAULT_BLOCKS,
    num_warps: int = NUM_WARPS,
) -> list[CompiledKernel]:
    """Compile all three kernels (bias and entropy on) for ``sm_<arch>``; raise on any compiler error."""
    if "TRITON_INTERPRET" in os.environ and os.environ["TRITON_INTERPRET"] not in ("", "0"):
        raise RuntimeError("unset TRITON_INTERPRET: ahead-of-time compilation needs the real compiler")
    import triton
    from triton.backends.compiler import GPUTarget

    from unipost.kernels.triton import _kernels

    element = _TRITON_DTYPES[dtype]
    target = GPUTarget("cuda", arch, 32)
    backend = triton.compiler.make_backend(target)
    options = backend.parse_options({"num_warps": num_warps, "num_stages": 3})
    block_n, block_v, block_k = blocks
    common = {
        "HAS_BIAS": True, "BLOCK_N": block_n, "BLOCK_V": block_v, "BLOCK_K": block_k,
        "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32", "UPCAST": False,
    }  # fmt: skip
    results = []
    for name, f32_ptrs in _F32_PTRS.items():
        kernel = getattr(_kernels, name)
        constexprs = {**common, **_FLAGS[name]}
        types = {"hidden_ptr": f"*{element}", "weight_ptr": f"*{element}", "bias_ptr": f"*{element}"}
        types |= {"targets_ptr": "*i64", "inv_temp": "fp32"} | dict.fromkeys(_SCALARS, "i32")
        types |= dict.fromkeys(f32_ptrs, "*fp32")
        signature = {a: ("constexpr" if a in constexprs else types[a]) for a in kernel.arg_names}
        source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
        compiled = triton.compile(source, target=target, options=options.__dict__)
        usage = _resource_usage(compiled.asm["cubin"])
        barriers = len(re.findall(r"\bttg\.barrier\b|\bgpu\.barrier\b", compiled.asm["ttir"]))
        results.append(CompiledKernel(name, usage["REG"], usage["STACK"], compiled.metadata.shared, barriers))
    return results


def _resource_usage(cubin: bytes) -> dict[str, int]:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK):(\d+)", out)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", choices=tuple(_TRITON_DTYPES), default="bf16")
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 80 (A100), 90 (H100)")
    parser.add_argument(
        "--blocks", type=int, nargs=3, default=list(DEFAULT_BLOCKS), metavar=("ROWS", "VOCAB", "K")
    )
    parser.add_argument("--num-warps", type=int, default=NUM_WARPS)
    args = parser.parse_args()
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    print(f"sm_{args.arch} {args.dtype} blocks={tuple(args.blocks)} num_warps={args.num_warps}")
    for k in compile_kernels(args.dtype, args.arch, tuple(args.blocks), args.num_warps):
        usage = f"registers={k.registers:3d} stack={k.stack_bytes:5d} B shared={k.shared_bytes:6d} B"
        print(f"{k.name:13s} {usage} barriers={k.barriers}")


if __name__ == "__main__":
    main()

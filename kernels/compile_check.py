"""Compile every Triton kernel in kernels/ for NVIDIA GPUs without a GPU (``python -m kiln.kernels.compile_check``).

Triton lowers each kernel to PTX and runs the ptxas bundled with the triton wheel, for the shapes/configs the
host code launches on CUDA (bf16 and fp32, head dims 64 and 128). This catches type errors, unsupported ops and
register/shared-memory problems that the CPU interpreter (TRITON_INTERPRET=1) cannot see. It must run with
TRITON_INTERPRET unset (the interpreter replaces the jit functions). Exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# max dynamic shared memory per block (bytes) by compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}


def _targets(archs):
    from triton.backends.compiler import GPUTarget

    return [GPUTarget("cuda", a, 32) for a in archs]


def _compile(fn, types: dict, constexprs: dict, target, options: dict):
    import triton
    from triton.compiler import ASTSource

    sig = {name: ("constexpr" if name in constexprs else types[name]) for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs)
    return triton.compile(src, target=target, options=options)


def cases():
    """(label, fn, types, constexprs, options) for each kernel configuration the CUDA host code launches."""
    import torch

    from . import _triton_attention as A
    from . import _triton_ce as C
    from . import _triton_norm as N
    from . import _triton_rope as R
    from . import _triton_swiglu as S

    out = []
    for dt, prec in (("bf16", "tf32"), ("fp32", "ieee")):
        p = f"*{dt}"
        for d in (64, 128):
            for backward in (False, True):
                bm, bn, warps, stages = A._config(
                    d, _Cuda(), backward, torch.float32 if dt == "fp32" else torch.bfloat16
                )
                common = dict(
                    H=16,
                    HKV=4,
                    D=d,
                    BLOCK_M=bm,
                    BLOCK_N=bn,
                    BLOCK_D=d,
                    CAUSAL=True,
                    HAS_SEG=True,
                    PREC=prec,
                    UPCAST=False,
                )
                opts = dict(num_warps=warps, num_stages=stages)
                if not backward:
                    types = dict(Q=p, K=p, V=p, Out=p, LSE="*fp32", SEG="*i32", LO="*i32", HI="*i32", qk_scale="fp32",
                                 SQ="i32", SK="i32", causal_off="i32", n_qblocks="i32")  # fmt: skip
                    out.append((f"attn_fwd {dt} d{d}", A._attn_fwd_kernel, types, common, opts))
                else:
                    base = dict(Q=p, K=p, V=p, DO=p, LSE="*fp32", DELTA="*fp32", SEG="*i32", LO="*i32", HI="*i32",
                                qk_scale="fp32", sm_scale="fp32", SQ="i32", SK="i32", causal_off="i32")  # fmt: skip
                    out.append((f"attn_bwd_dq {dt} d{d}", A._attn_bwd_dq_kernel, dict(base, DQ=p, n_qblocks="i32"),
                                common, opts))  # fmt: skip
                    out.append((f"attn_bwd_dkdv {dt} d{d}", A._attn_bwd_dkdv_kernel,
                                dict(base, DK=p, DV=p, n_kblocks="i32"), common, opts))  # fmt: skip
        n = 4096
        out.append((f"rms_fwd {dt}", N._rms_fwd_kernel,
                    dict(X=p, R=p, H=p, Y=p, W=p, RSTD="*fp32", stride_x="i32", stride_r="i32", N="i32", eps="fp32"),
                    dict(HAS_RES=True, BLOCK_N=n), dict(num_warps=16)))  # fmt: skip
        out.append((f"rms_bwd {dt}", N._rms_bwd_kernel,
                    dict(H=p, W=p, RSTD="*fp32", DY=p, DH=p, DX=p, DW_PART="*fp32", M="i32", N="i32", stride_h="i32"),
                    dict(HAS_DH=True, BLOCK_N=n), dict(num_warps=16)))  # fmt: skip
        for backward in (False, True):
            out.append((f"rope {'bwd' if backward else 'fwd'} {dt}", R._rope_kernel,
                        dict(X=p, OUT=p, COS=p, SIN=p, S="i32", cos_rows="i32", stride_b="i32", stride_s="i32",
                             stride_h="i32", n_heads="i32"),
                        dict(HALF=64, BLOCK_H=32, BLOCK_D=64, BACKWARD=backward), dict(num_warps=4)))  # fmt: skip
        out.append((f"swiglu_fwd {dt}", S._swiglu_fwd_kernel, dict(G=p, U=p, OUT=p, n="i32"), dict(BLOCK=1024), {}))
        out.append((f"swiglu_bwd {dt}", S._swiglu_bwd_kernel, dict(G=p, U=p, DO=p, DG=p, DU=p, n="i32"),
                    dict(BLOCK=1024), {}))  # fmt: skip
        out.append((f"ce_fwd {dt}", C._ce_fwd_kernel,
                    dict(X=p, Y="*i64", LOSS="*fp32", LSE="*fp32", stride_x="i32", V="i32", ignore_index="i32"),
                    dict(BLOCK_V=4096), dict(num_warps=8)))  # fmt: skip
        out.append((f"ce_bwd {dt}", C._ce_bwd_kernel,
                    dict(X=p, Y="*i64", LSE="*fp32", G="*fp32", DX=p, stride_x="i32", V="i32", ignore_index="i32"),
                    dict(BLOCK_V=4096), dict(num_warps=8)))  # fmt: skip
    return out


class _Cuda:
    type = "cuda"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 80 90")
    ap.add_argument("-k", default="", help="only cases whose label contains this")
    ap.add_argument("--dtype", choices=["bf16", "fp32", "all"], default="all")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the interpreter replaces the jit functions", file=sys.stderr)
        return 2
    failures = 0
    for target in _targets(args.arch):
        for label, fn, types, constexprs, options in cases():
            if args.k not in label or (args.dtype != "all" and f" {args.dtype}" not in label):
                continue
            t0 = time.perf_counter()
            try:
                k = _compile(fn, types, constexprs, target, options)
                shared = k.metadata.shared
                limit = SHARED_LIMIT.get(target.arch)
                if limit is not None and shared > limit:
                    raise RuntimeError(f"needs {shared} B shared memory, sm_{target.arch} has {limit} B")
                print(f"ok   sm_{target.arch} {label:<24} shared={shared}B ({time.perf_counter() - t0:.1f}s)")
            except Exception as e:  # noqa: BLE001 - report every failing kernel, then fail
                failures += 1
                print(f"FAIL sm_{target.arch} {label}: {type(e).__name__}: {str(e)[:2000]}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compiles every Triton kernel ahead of time for an H100 (sm_90) with the launch configuration
the wrappers use on CUDA, without a GPU (triton ships ptxas); prints JSON of shared memory per kernel.

Not a test module: `test_triton_compile.py` runs it in a subprocess with a fresh TRITON_CACHE_DIR
(and without TRITON_INTERPRET, under which the kernels are not compilable JIT functions).
By hand: `.venv/bin/python tests/kernels/triton_compile_cases.py`.
"""

from __future__ import annotations

import json
import os
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import athanor.kernels._linear_triton as lt
import athanor.kernels._sparse_triton as st

TARGET = GPUTarget("cuda", 90, 32)
SPARSE_CONFIGS = [("fp16", 64, True, True), ("bf16", 128, True, False), ("fp32", 64, False, True)]
LINEAR_CONFIGS = [("fp16", 64, 64), ("bf16", 128, 64), ("fp32", 128, 128)]  # input (V) dtype, F, D
# fp32 ("ieee" dots, no tensor cores) compiles slowly (70 of the 104 s all variants took here): one kernel per
# family lowers the ieee path — the sparse forward, and the linear causal dK/dV, which uses the most shared memory
# of all (218 of 227 KiB). The sparse dQ (38 s alone; 112 KiB) and the linear dQ share their family's ieee code.
FP32_ONLY = {"_fwd_kernel", "_causal_bwd_kv_kernel"}


def _compile(fn, types: dict[str, str], consts: dict, num_warps: int) -> dict | None:
    if consts["PREC"] == "ieee" and fn.__name__ not in FP32_ONLY:
        return None
    names = fn.arg_names
    missing = set(names) - set(types) - set(consts)
    assert not missing, f"{fn.__name__}: no type for {missing}"
    signature = {n: ("constexpr" if n in consts else types[n]) for n in names}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in consts.items()})
    kernel = triton.compile(src, target=TARGET, options={"num_warps": num_warps})
    return {"shared": kernel.metadata.shared, "cubin_bytes": len(kernel.asm["cubin"])}


def main() -> None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    report = {}
    bm, bn = st.launch_config(is_cuda=True)
    for dtype, d, causal, keep in SPARSE_CONFIGS:
        p, f32 = f"*{dtype}", "*fp32"
        scalars = dict(N="i32", H="i32", HK="i32", G="i32", HALF="i32", S="i32", scale="fp32")
        consts = dict(D=d, BM=bm, BN=bn, CAUSAL=causal, HAS_KEEP=keep, PREC="ieee" if dtype == "fp32" else "tf32")
        io = dict(Q=p, K=p, V=p, KEEP="*i8", O=f32, DO=f32, LSE=f32, DELTA=f32, DQ=f32, DK=f32, DV=f32)
        for fn in (st._fwd_kernel, st._bwd_dq_kernel, st._bwd_dkv_kernel):
            report[f"{fn.__name__}[{dtype},D={d}]"] = _compile(fn, io | scalars, consts, 4)
    for dtype, f, d in LINEAR_CONFIGS:
        block, warps = lt.launch_config(True, f, d)
        p, f32 = f"*{dtype}", "*fp32"
        # Features (Q, K) are always fp32; V stays in the input dtype.
        io = dict(Q=f32, K=f32, V=p, S=f32, Z=f32, O=f32, DEN=f32, DO=f32, DQ=f32, DS=f32, DZ=f32, DK=f32, DV=f32,
                  N="i32", eps="fp32")
        prec = "ieee" if dtype == "fp32" else "tf32"
        for fn in (lt._nc_state_kernel, lt._nc_out_kernel, lt._nc_bwd_q_kernel, lt._nc_bwd_kv_kernel):
            consts = dict(F=f, D=d, BLOCK=block, PREC=prec)
            report[f"{fn.__name__}[{dtype},F={f},D={d}]"] = _compile(fn, io, consts, warps)
        for fn in (lt._causal_fwd_kernel, lt._causal_bwd_q_kernel, lt._causal_bwd_kv_kernel):
            report[f"{fn.__name__}[{dtype},F={f},D={d}]"] = _compile(fn, io, dict(F=f, D=d, C=block, PREC=prec), warps)
    print(json.dumps({name: info for name, info in report.items() if info is not None}))


if __name__ == "__main__":
    main()

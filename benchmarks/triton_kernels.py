"""Every CUDA attention path against the PyTorch reference: errors (forward and every gradient) and times.

    .venv/bin/python benchmarks/triton_kernels.py                  # needs CUDA; exits 1 on an error over tolerance
    .venv/bin/python benchmarks/triton_kernels.py --json out.json  # also writes the rows as JSON

Paths per case: S2/SF-Attn through FlexAttention (`backend="flex"`, compiled) and the Triton kernel;
causal linear attention through fla's chunk kernels (`backend="fla"`, where fla is installed) and the
Triton kernel; non-causal linear attention through the Triton kernel. Each runs the same inputs and the
same upstream gradient as `backend="torch"` (the reference of `kernels.linear_attention` /
`kernels.sparse_attention`) on the GPU. The reference itself runs on CUDA as the causal linear path
without fla (the PyTorch chunked form), so for causal linear cases it is also checked against the same
reference run on the CPU ("torch@cpu"; inputs are drawn on the CPU and copied, so both see the same
numbers). Error = max |path - reference| over an output or gradient, divided by max(1, max |reference|).
The CPU test suite checks the Triton kernels under TRITON_INTERPRET=1 and FlexAttention's forward at tiny
sizes; here they run compiled, at the sizes the methods use (LinVideo's Wan-1.3B tokens, SinkLoRA's long
contexts), with causal/non-causal, GQA, padding masks, fp32/fp16/bf16.
Times: median ms of forward+backward over interleaved rounds (path, reference, path, ...).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from athanor.kernels._common import fla_available  # noqa: E402
from athanor.kernels.compare import random_qkv, run_errors  # noqa: E402
from athanor.kernels.linear_attention import HedgehogFeatureMap, linear_attention  # noqa: E402
from athanor.kernels.sparse_attention import s2_attention, sf_attention  # noqa: E402

# name: (kind, b, h, hk, n, d, causal, padded, dtype, extra); extra = feature map (linear) or (group, sinks)
CASES = {
    "linear_noncausal_hedgehog_wan4k_bf16": ("linear", 1, 12, 12, 4096, 128, False, False, torch.bfloat16, "hedgehog"),
    "linear_noncausal_elu_wan32k_bf16": ("linear", 1, 12, 12, 32760, 128, False, False, torch.bfloat16, "elu+1"),
    "linear_causal_elu_8k_fp16": ("linear", 1, 8, 8, 8192, 64, True, False, torch.float16, "elu+1"),
    "linear_causal_elu_32k_fp32": ("linear", 1, 4, 4, 32768, 64, True, False, torch.float32, "elu+1"),
    "linear_causal_hedgehog_gqa3_4k_bf16": ("linear", 2, 9, 3, 4096, 64, True, False, torch.bfloat16, "hedgehog"),
    "linear_noncausal_elu_padded_fp32": ("linear", 2, 4, 4, 1000, 64, False, True, torch.float32, "elu+1"),
    "linear_causal_relu_padded_fp32": ("linear", 2, 4, 2, 1000, 64, True, True, torch.float32, "relu"),
    "sf_causal_gqa3_8k_bf16": ("sf", 1, 9, 3, 8192, 64, True, False, torch.bfloat16, (2048, 4)),
    "sf_causal_gqa3_32k_bf16": ("sf", 1, 9, 3, 32768, 64, True, False, torch.bfloat16, (8192, 4)),
    "sf_causal_32k_fp32": ("sf", 1, 4, 4, 32768, 64, True, False, torch.float32, (8192, 4)),
    "sf_causal_padded_fp16": ("sf", 2, 8, 2, 3000, 64, True, True, torch.float16, (750, 4)),
    "sf_noncausal_many_sinks_fp32": ("sf", 2, 4, 4, 2048, 64, False, True, torch.float32, (256, 300)),
    "s2_causal_gqa2_8k_bf16": ("s2", 1, 8, 4, 8192, 128, True, False, torch.bfloat16, (2048, 0)),
    "s2_rolled_causal_gqa2_8k_bf16": ("s2_rolled", 1, 8, 4, 8192, 128, True, False, torch.bfloat16, (2048, 0)),
    "s2_rolled_padded_fp32": ("s2_rolled", 2, 4, 4, 3000, 64, True, True, torch.float32, (1000, 0)),
}
TOLERANCE = {torch.float32: 1e-2, torch.float16: 3e-2, torch.bfloat16: 6e-2}  # TF32 dots, half-precision outputs


def paths(kind: str, causal: bool, device: str) -> list[str]:
    """The paths checked against the reference for a case ('torch@cpu': the reference on the CPU)."""
    if kind == "s2_rolled":
        return ["flex"]  # the Triton kernel has no wrap-around variant
    if kind in ("sf", "s2"):
        return ["flex", "triton"]
    if not causal:
        return ["triton"]
    return (["fla"] if fla_available() and device == "cuda" else []) + ["triton", "torch@cpu"]


def _padding(b: int, n: int, device) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool, device=device)
    keep[0, :37], keep[-1, n - 101:] = False, False  # left padding, right padding
    return keep


def build(kind, b, h, hk, n, d, causal, padded, dtype, extra, device):
    """The case's parameters (drawn on the CPU, then moved: the same numbers on every device) and a
    function backend -> output."""
    q, k, v = (t.detach().to(device).requires_grad_() for t in random_qkv(b, h, hk, n, d, dtype))
    mask = _padding(b, n, device) if padded else None
    params = [q, k, v]
    if kind == "linear":
        fmap = extra
        if extra == "relu":  # keep φ(q)·Σφ(k) away from 0, where results legitimately differ
            q, k = (t.detach().add(1.0).requires_grad_() for t in (q, k))
            params = [q, k, v]
        if extra == "hedgehog":
            torch.manual_seed(1)
            fmap = HedgehogFeatureMap(h, d, feature_dim=64).to(device)
            params.append(fmap.weight)
        return params, lambda be: linear_attention(q, k, v, causal=causal, feature_map=fmap, attention_mask=mask,
                                                   backend=be)
    group, sinks = extra
    if kind == "sf":
        return params, lambda be: sf_attention(q, k, v, group_size=group, num_sink=sinks, causal=causal,
                                               attention_mask=mask, backend=be)
    return params, lambda be: s2_attention(q, k, v, group_size=group, causal=causal, attention_mask=mask,
                                           wrap=kind == "s2_rolled", backend=be)


def times(params, run, backends: list[str], rounds: int) -> dict[str, float]:
    """Median ms of forward+backward per backend, the backends interleaved in rotating order."""
    def step(backend: str) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = run(backend)
        torch.autograd.grad(out.float().sum(), params)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000
    for backend in backends:  # warm-up (compiles the kernels)
        step(backend)
    spent: dict[str, list[float]] = {backend: [] for backend in backends}
    for i in range(rounds):
        for backend in backends[i % len(backends):] + backends[:i % len(backends)]:
            spent[backend].append(step(backend))
    return {backend: statistics.median(ms) for backend, ms in spent.items()}


def check_case(name: str, case: tuple, rounds: int) -> dict[str, dict]:
    """Errors and times of every path of one case against the reference."""
    kind, causal, dtype = case[0], case[6], case[8]
    params, run = build(*case, device="cuda")
    names = ["dq", "dk", "dv", "dW"][: len(params)]
    rows = {}
    for path in paths(kind, causal, "cuda"):
        if path == "torch@cpu":
            cpu_params, cpu_run = build(*case, device="cpu")
            err = run_errors(lambda: run("torch"), params, lambda f=cpu_run: f("torch"), cpu_params, names)
            ms = {}
        else:
            err = run_errors(lambda p=path: run(p), params, lambda: run("torch"), params, names)
            ms = times(params, run, [path, "torch"], rounds)
        mismatch = err.pop("out_mismatch")  # fraction of output elements differing at all: informative
        ok = max(err.values()) <= TOLERANCE[dtype]
        rows[path] = {"errors": err, "out_mismatch": mismatch, "ms": ms, "ok": ok}
        shown = " ".join(f"{k}={v:.1e}" for k, v in err.items())
        timing = (f"{ms[path]:10.2f} {ms['torch']:10.2f} {ms['torch'] / ms[path]:7.2f}x" if ms
                  else f"{'-':>10} {'-':>10} {'-':>8}")
        print(f"{name:38s} {path:9s} {shown:46s} {timing} {'' if ok else 'ERROR ABOVE TOLERANCE'}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cases", nargs="*", default=None, help="case names (default: all)")
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (the CPU tests run these paths under TRITON_INTERPRET=1 / FlexAttention eager)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  fla installed: {fla_available()}")
    rows, bad = {}, []
    print(f"{'case':38s} {'path':9s} {'max rel error (out, grads)':46s} {'path ms':>10s} {'torch ms':>10s} "
          f"{'speedup':>8s}")
    for name in opts.cases or CASES:
        try:
            rows[name] = check_case(name, CASES[name], opts.rounds)
        except Exception as exc:  # one failing path must not hide the others' figures
            print(f"{name:38s} FAILED: {type(exc).__name__}: {exc}"[:400], flush=True)
            rows[name] = {"failed": f"{type(exc).__name__}: {exc}"}
        bad += [f"{name}/{p}" for p, r in rows[name].items() if not (isinstance(r, dict) and r.get("ok"))]
        torch.cuda.empty_cache()
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    print("all within tolerance" if not bad else f"above tolerance or failed: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

"""Triton kernels against their PyTorch references on CUDA: errors (forward and every gradient) and times.

    .venv/bin/python benchmarks/triton_kernels.py                  # needs CUDA; exits 1 on an error over tolerance
    .venv/bin/python benchmarks/triton_kernels.py --json out.json  # also writes the rows as JSON

Each case runs the same inputs and the same upstream gradient through `backend="triton"` and `backend="torch"`
(the reference of `kernels.linear_attention` / `kernels.sparse_attention`). Error = max |triton - reference|
over an output or gradient, divided by max(1, max |reference|). The CPU test suite checks the same kernels
under TRITON_INTERPRET=1 at tiny sizes; here they run compiled, at the sizes the methods use (LinVideo's
Wan-1.3B tokens, SinkLoRA's long contexts), with causal/non-causal, GQA, padding masks, fp32/fp16/bf16.
Times: median ms of forward+backward over interleaved rounds (triton, reference, triton, ...).
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
from athanor.kernels.compare import backend_errors, random_qkv  # noqa: E402
from athanor.kernels.linear_attention import HedgehogFeatureMap, linear_attention  # noqa: E402
from athanor.kernels.sparse_attention import s2_attention, sf_attention  # noqa: E402

# name: (kind, b, h, hk, n, d, causal, padded, dtype, extra); extra = feature map (linear) or (group, sinks)
CASES = {
    "linear_noncausal_hedgehog_wan4k_bf16": ("linear", 1, 12, 12, 4096, 128, False, False, torch.bfloat16, "hedgehog"),
    "linear_noncausal_elu_wan32k_bf16": ("linear", 1, 12, 12, 32760, 128, False, False, torch.bfloat16, "elu+1"),
    "linear_causal_elu_8k_fp16": ("linear", 1, 8, 8, 8192, 64, True, False, torch.float16, "elu+1"),
    "linear_causal_hedgehog_gqa3_4k_bf16": ("linear", 2, 9, 3, 4096, 64, True, False, torch.bfloat16, "hedgehog"),
    "linear_noncausal_elu_padded_fp32": ("linear", 2, 4, 4, 1000, 64, False, True, torch.float32, "elu+1"),
    "linear_causal_relu_padded_fp32": ("linear", 2, 4, 2, 1000, 64, True, True, torch.float32, "relu"),
    "sf_causal_gqa3_8k_bf16": ("sf", 1, 9, 3, 8192, 64, True, False, torch.bfloat16, (2048, 4)),
    "sf_causal_gqa3_32k_bf16": ("sf", 1, 9, 3, 32768, 64, True, False, torch.bfloat16, (8192, 4)),
    "sf_causal_padded_fp16": ("sf", 2, 8, 2, 3000, 64, True, True, torch.float16, (750, 4)),
    "sf_noncausal_many_sinks_fp32": ("sf", 2, 4, 4, 2048, 64, False, True, torch.float32, (256, 300)),
    "s2_causal_gqa2_8k_bf16": ("s2", 1, 8, 4, 8192, 128, True, False, torch.bfloat16, (2048, 0)),
}
TOLERANCE = {torch.float32: 1e-2, torch.float16: 3e-2, torch.bfloat16: 6e-2}  # TF32 dots, half-precision outputs


def _padding(b: int, n: int, device) -> torch.Tensor:
    keep = torch.ones(b, n, dtype=torch.bool, device=device)
    keep[0, :37], keep[-1, n - 101:] = False, False  # left padding, right padding
    return keep


def build(kind, b, h, hk, n, d, causal, padded, dtype, extra, device):
    """The case's parameters and a function backend -> output."""
    q, k, v = random_qkv(b, h, hk, n, d, dtype, device)
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
    return params, lambda be: s2_attention(q, k, v, group_size=group, causal=causal, attention_mask=mask, backend=be)


def times(params, run, rounds: int) -> dict[str, float]:
    def step(backend: str) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = run(backend)
        torch.autograd.grad(out.float().sum(), params)
        torch.cuda.synchronize()
        return (time.perf_counter() - start) * 1000
    for backend in ("triton", "torch"):  # warm-up (compiles the kernels)
        step(backend)
    spent: dict[str, list[float]] = {"triton": [], "torch": []}
    for i in range(rounds):
        for backend in (("triton", "torch") if i % 2 == 0 else ("torch", "triton")):
            spent[backend].append(step(backend))
    return {backend: statistics.median(ms) for backend, ms in spent.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--json", type=Path, default=None)
    opts = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU (the CPU tests run these kernels under TRITON_INTERPRET=1)")
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    rows, bad = {}, []
    print(f"{'case':40s} {'max rel error (out, grads)':46s} {'triton ms':>10s} {'torch ms':>10s} {'speedup':>8s}")
    for name, case in CASES.items():
        params, run = build(*case, device="cuda")
        err = backend_errors(run, params, ["dq", "dk", "dv", "dW"][: len(params)])
        mismatch = err.pop("out_mismatch")  # fraction of output elements differing at all: informative, not a bound
        ms = times(params, run, opts.rounds)
        worst = max(err.values())
        ok = worst <= TOLERANCE[case[8]]
        bad += [] if ok else [name]
        rows[name] = {"errors": err, "out_mismatch": mismatch, "ms": ms, "ok": ok}
        shown = " ".join(f"{k}={v:.1e}" for k, v in err.items())
        print(f"{name:40s} {shown:46s} {ms['triton']:10.2f} {ms['torch']:10.2f} "
              f"{ms['torch'] / ms['triton']:7.2f}x {'' if ok else 'ERROR ABOVE TOLERANCE'}", flush=True)
        del params, run
        torch.cuda.empty_cache()
    if opts.json:
        opts.json.write_text(json.dumps(rows, indent=1))
    print("all within tolerance" if not bad else f"above tolerance: {bad}")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

"""A path against the PyTorch reference on the same inputs: shared by the interpreter tests
(`tests/kernels/triton_interp_cases.py`, CPU, TRITON_INTERPRET=1) and the CUDA checks
(`benchmarks/triton_kernels.py`: Triton, FlexAttention, fla and the reference on CUDA vs on CPU).
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def random_qkv(b: int, h: int, hk: int, n: int, d: int, dtype: torch.dtype, device: str = "cpu",
               seed: int = 0) -> list[torch.Tensor]:
    """q [b, h, n, d] and k, v [b, hk, n, d] (hk < h: grouped-query), standard normal, requiring grad."""
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = ((b, h, n, d), (b, hk, n, d), (b, hk, n, d))
    return [torch.randn(*s, generator=g, device=device).to(dtype).requires_grad_() for s in shapes]


def run_errors(test: Callable[[], torch.Tensor], test_params: list[torch.Tensor],
               ref: Callable[[], torch.Tensor], ref_params: list[torch.Tensor], grad_names: list[str],
               backward: bool = True) -> dict[str, float]:
    """Max |test - ref| of the output and (with `backward`) of each gradient under the same upstream
    gradient, relative to the reference's largest magnitude (compared on the CPU, so the two may run on
    different devices); and `out_mismatch`, the fraction of output elements whose values (in the output
    dtype) differ at all. With fp16/bf16 inputs that fraction tells fp32 features (both paths round the
    same fp32 numbers: under 0.1 %) from features cast to the input dtype (over 20 %), which the max
    error, dominated by one-ulp rounding flips, cannot."""
    results = []
    for run, params in ((test, test_params), (ref, ref_params)):
        if not backward:
            with torch.no_grad():
                results.append([run().detach().cpu()])
            continue
        out = run()
        weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
        grads = torch.autograd.grad((out.float() * weight).sum(), params)
        results.append([out.detach().cpu()] + [g.float().cpu() for g in grads])
    names = ["out", *grad_names] if backward else ["out"]
    errors = {
        name: (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())
        for name, a, b in zip(names, *results)
    }
    errors["out_mismatch"] = (results[0][0] != results[1][0]).float().mean().item()
    return errors


def backend_errors(run: Callable[[str], torch.Tensor], params: list[torch.Tensor],
                   grad_names: list[str], backend: str = "triton", backward: bool = True) -> dict[str, float]:
    """`run_errors` of `run(backend)` against `run("torch")` on the same parameters."""
    return run_errors(lambda: run(backend), params, lambda: run("torch"), params, grad_names, backward)

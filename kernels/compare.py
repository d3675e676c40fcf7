"""Triton path against the PyTorch reference on the same inputs: shared by the interpreter tests
(`tests/kernels/triton_interp_cases.py`, CPU, TRITON_INTERPRET=1) and the CUDA check (`benchmarks/triton_kernels.py`).
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


def backend_errors(run: Callable[[str], torch.Tensor], params: list[torch.Tensor],
                   grad_names: list[str]) -> dict[str, float]:
    """Max |triton - reference| of the output and of each gradient (same upstream gradient), relative
    to the reference's largest magnitude; and `out_mismatch`, the fraction of output elements whose
    values (in the output dtype) differ at all. With fp16/bf16 inputs that fraction tells fp32
    features (both paths round the same fp32 numbers: under 0.1 %) from features cast to the input
    dtype (over 20 %), which the max error, dominated by one-ulp rounding flips, cannot."""
    results = {}
    for backend in ("triton", "torch"):
        out = run(backend)
        weight = torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)
        grads = torch.autograd.grad((out.float() * weight).sum(), params)
        results[backend] = [out.detach()] + [g.float() for g in grads]
    errors = {
        name: (a.float() - b.float()).abs().max().item() / max(1.0, b.float().abs().max().item())
        for name, a, b in zip(["out", *grad_names], results["triton"], results["torch"])
    }
    errors["out_mismatch"] = (results["triton"][0] != results["torch"][0]).float().mean().item()
    return errors

"""Shared test helpers: FlashAttention-style error bounds, poisoned allocations, devices."""
from __future__ import annotations

import math

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item() if a.numel() else 0.0


def assert_fa_close(out: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, name: str, factor: float = 2.0,
                    atol: float = 1e-5) -> None:
    """FlashAttention's criterion: the kernel's error against the fp32 reference is at most
    `factor` times the error of the same computation done by PyTorch in the low precision
    (`pt`), plus a small absolute slack for outputs that PyTorch happens to get exact."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out.float()).all() or not torch.isfinite(ref.float()).all(), f"{name}: non-finite output"
    err = max_err(out, ref)
    pt_err = max_err(pt, ref)
    bound = factor * pt_err + atol
    assert err <= bound, f"{name}: max error {err:.3e} > {factor} x PyTorch-{pt.dtype} error {pt_err:.3e} + {atol:g}"


def poison_cuda_cache(*shapes_dtypes, value: float = math.nan) -> None:
    """Fill blocks of the caching allocator with NaN and free them, so the next allocations of
    these sizes (the op's outputs) start out poisoned: any element a kernel forgets to write
    then shows up as NaN."""
    def fill(dtype):  # integer outputs (block indices) are poisoned with a value no kernel writes
        return value if dtype.is_floating_point else torch.iinfo(dtype).min + 7
    held = [torch.full(shape, fill(dtype), dtype=dtype, device="cuda") for shape, dtype in shapes_dtypes]
    torch.cuda.synchronize()
    del held

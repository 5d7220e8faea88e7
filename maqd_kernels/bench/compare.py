"""How kernel outputs are compared with the reference's: exact counts, tolerances, rounding ties."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def count_mismatches(actual: Tensor, expected: Tensor, excused: Tensor) -> tuple[int, int]:
    """(values compared, values that differ) of two time-first tensors, skipping excused neurons."""
    a, e = actual.cpu()[:, ~excused.cpu()], expected.cpu()[:, ~excused.cpu()]
    differ = (a != e) & ~(a.isnan() & e.isnan())
    return a.numel(), int(differ.sum())


def count_far(actual: Tensor, expected: Tensor, rtol: float, excused: Tensor | None = None) -> tuple[int, int]:
    """(values compared, values further apart than rtol times expected's largest magnitude) of two
    tensors; with `excused`, time-first tensors whose excused neurons are skipped."""
    a, e = actual.cpu().float(), expected.cpu().float()
    if excused is not None:
        a, e = a[:, ~excused.cpu()], e[:, ~excused.cpu()]
    scale = e.abs().max().item() if e.numel() else 0.0
    return a.numel(), int(((a - e).abs() > rtol * scale).sum())


# Gradients differ from the reference by float32 rounding (expf, summation order) and, in bf16 and
# fp16, by one rounding of dL/dU_hat to the storage dtype.
GRADIENT_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-6, torch.float16: 2**-9}


def rounding_ties(v: Tensor, binary: bool, tol: float = 1e-5) -> Tensor:
    """Where v = x / scale lies within `tol` (relative) of a round-clip decision, a half-integer
    (or 0 for the binary grid, where an exact 0 is not ambiguous): there two correct float32
    computations of v may round apart."""
    v = v.double()
    if binary:
        return (v.abs() < tol) & (v != 0)
    return (v - v.floor() - 0.5).abs() < tol * v.abs().clamp(min=1.0)

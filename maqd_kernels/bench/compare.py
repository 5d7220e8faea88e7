"""How kernel outputs are compared with the reference's: exact counts, tolerances, rounding ties."""

from __future__ import annotations

from collections.abc import Callable

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


def count_close(got: Tensor | None, want: Tensor | None, dtype: torch.dtype) -> tuple[int, int, int]:
    """(compared, further apart than GRADIENT_RTOL[dtype] allows, excused = 0); an output present
    on one side only counts as one mismatch."""
    if got is None or want is None:
        return (0, 0, 0) if got is None and want is None else (1, 1, 0)
    return (*count_far(got, want, GRADIENT_RTOL[dtype]), 0)


def sum_counts(results) -> tuple[int, int, int]:
    """Element-wise sum of (compared, mismatches, excused) triples."""
    return tuple(sum(r[i] for r in results) for i in range(3))


def close_to_reference(dtype: torch.dtype) -> Callable:
    """A validation comparison: every output (one tensor or a tuple) within the dtype's tolerance."""

    def compare(got, want):
        if isinstance(want, Tensor):
            return count_close(got, want, dtype)
        return sum_counts(count_close(g, w, dtype) for g, w in zip(got, want))

    return compare


def random_tensor(shape, device, dtype, scale=1.5, shift=0.0) -> Tensor:
    """Gaussian values (never all zeros) drawn in float64 on the CPU, so every device and dtype
    sees the same numbers."""
    return (torch.randn(shape, dtype=torch.float64) * scale + shift).to(dtype).to(device)

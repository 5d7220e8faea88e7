"""Every kernel that can run here, held against the eager reference on small random inputs.

Kernels are found through ``maqd_kernels._backend``: each op's cuda and triton launchers, plus, on
the CPU, the CUDA kernels' host entry points (``<launcher>_host``) and the Triton kernels under the
interpreter. Each op with a kernel needs a case in ``CASES``; one without is reported as a failure.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from .. import _backend
from ..saf import reference as saf_reference

Tensor = torch.Tensor


@dataclass
class Result:
    op: str
    backend: str
    device: str
    dtype: str
    shape: str
    compared: int
    mismatches: int
    excused: int
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.mismatches == 0 and self.compared > 0 and not self.detail


def near_tie_neurons(
    u_hat: Tensor, state: Tensor | None, decay: float, threshold: float, spike_bits: int, tol: float = 1e-5
) -> Tensor:
    """Neurons (u_hat.shape[1:]) whose membrane comes within `tol` (relative) of a spike threshold at
    some step: there two correct float32 implementations may round to different spikes."""
    u = u_hat.double().cpu()
    traces, _ = saf_reference.saf_neuron_forward(
        u_hat.float().cpu(), None if state is None else state.cpu(), decay, threshold, spike_bits
    )
    previous = torch.zeros_like(u[0]) if state is None else state.double().cpu().expand_as(u[0])
    near = torch.zeros_like(u[0], dtype=torch.bool)
    for t in range(u.shape[0]):
        membrane = (u[t] - threshold * decay * previous) / threshold
        # Spike levels change where membrane / V crosses an integer k in 1 .. 2^b - 1.
        distance = (membrane - membrane.round().clamp(1, 2**spike_bits - 1)).abs()
        near |= distance < tol * membrane.abs().clamp(min=1.0)
        previous = traces[t].double()
    return near


def count_mismatches(actual: Tensor, expected: Tensor, excused: Tensor) -> tuple[int, int]:
    """(values compared, values that differ) of two time-first tensors, skipping excused neurons."""
    a, e = actual.cpu()[:, ~excused.cpu()], expected.cpu()[:, ~excused.cpu()]
    differ = (a != e) & ~(a.isnan() & e.isnan())
    return a.numel(), int(differ.sum())


def _saf_neuron_forward_cases(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[tuple, Callable]]:
    for steps, neurons, spike_bits in ((1, 257, 1), (5, 130, 2), (16, 67, 4)):
        u_hat = ((torch.randn(steps, neurons, dtype=torch.float64) * 1.5 + 0.6) * spike_bits).to(dtype).to(device)
        state = torch.rand(neurons, device=device) * 2
        args = (u_hat, state, 0.7, 0.85, spike_bits)
        near = near_tie_neurons(u_hat, state, 0.7, 0.85, spike_bits)

        def compare(got, want, near=near):
            compared, mismatches = count_mismatches(got[0], want[0], near)
            if not near.any() and got[1].item() != want[1].item():
                mismatches += 1
            return compared, mismatches, int(near.sum())

        yield args, compare


CASES: dict[str, Callable[[torch.device, torch.dtype], Iterator[tuple[tuple, Callable]]]] = {
    "saf_neuron_forward": _saf_neuron_forward_cases,
}


def launcher(op: str, backend: str) -> Callable:
    """The implementation of `op` on `backend`, all with the reference's signature: "reference",
    "cuda", "triton", or "cuda-host" for the CUDA kernel's host entry point (its math on CPU tensors)."""
    entry = _backend._OPS[op]
    if backend == "reference":
        return entry.reference
    path = entry.kernels[backend.removesuffix("-host")]
    if backend.endswith("-host"):
        module, _, name = path.partition(":")
        return getattr(importlib.import_module(module), f"{name}_host")
    return _backend._load(path)


def kernels_here(device: torch.device) -> list[tuple[str, str]]:
    """(op, backend) for every kernel that can run on `device` (see ``launcher``)."""
    found = []
    for op, entry in sorted(_backend._OPS.items()):
        for backend in entry.kernels:
            if _backend._unusable_reason(backend, device) is None:
                found.append((op, backend))
            elif backend == "cuda" and device.type == "cpu" and _backend.cuda_extension() is not None:
                found.append((op, "cuda-host"))
    return found


def validate(
    device: torch.device, dtypes=_backend.KERNEL_DTYPES, progress: Callable[[str], None] | None = None
) -> list[Result]:
    """Runs every kernel available on `device` against the reference; one Result per op, backend and case."""
    results = []
    for op, backend in kernels_here(device):
        reference, kernel = launcher(op, "reference"), launcher(op, backend)
        if op not in CASES:
            results.append(Result(op, backend, device.type, "-", "-", 0, 0, 0, "no validation case for this op"))
            continue
        for dtype in dtypes:
            for args, compare in CASES[op](device, dtype):
                if progress is not None:
                    progress(f"{op} on {backend}, {str(dtype).removeprefix('torch.')}")
                shape = "x".join(map(str, args[0].shape))
                try:
                    compared, mismatches, excused = compare(kernel(*args), reference(*args))
                    detail = ""
                except Exception as error:  # a crashing kernel is a failed validation, not a crashed report
                    compared = mismatches = excused = 0
                    detail = f"{type(error).__name__}: {error}"
                dtype_name = str(dtype).removeprefix("torch.")
                results.append(
                    Result(op, backend, device.type, dtype_name, shape, compared, mismatches, excused, detail)
                )
    return results

"""Every kernel that can run here, held against the eager reference on small random inputs.

Kernels are found through ``maqd_kernels._backend``: each op's cuda and triton launchers, plus, on
the CPU, the CUDA kernels' host entry points (``<launcher>_host``) and the Triton kernels under the
interpreter. Each op with a kernel needs a case in ``CASES``; one without is reported as a failure.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from .. import _backend
from ..saf import reference as saf_reference
from . import lbn_cases, quant_cases
from .compare import GRADIENT_RTOL, count_far, count_mismatches
from .progress import Progress

Tensor = torch.Tensor


@dataclass
class Result:
    """One validation: `compared` values of the kernel's output held against the reference's,
    `mismatches` of them apart, `excused` skipped at rounding ties; `detail` says why a case
    could not run."""

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
    traces, _, _ = saf_reference.saf_neuron_forward(
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


DECAY, THRESHOLD = 0.7, 0.85


def _u_hat(shape: tuple[int, ...], spike_bits: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    return ((torch.randn(shape, dtype=torch.float64) * 1.5 + 0.6) * spike_bits).to(dtype).to(device)


def _saf_neuron_forward_cases(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[tuple, Callable]]:
    for steps, neurons, spike_bits in ((1, 257, 1), (5, 130, 2), (16, 67, 4)):
        u_hat = _u_hat((steps, neurons), spike_bits, device, dtype)
        state = torch.rand(neurons, device=device) * 2
        args = (u_hat, state, DECAY, THRESHOLD, spike_bits, 2, True)
        near = near_tie_neurons(u_hat, state, DECAY, THRESHOLD, spike_bits)

        def compare(got, want, near=near, shape=u_hat.shape):
            compared, mismatches = count_mismatches(got[0], want[0], near)
            inside = [saf_reference.unpack_bits(mask.cpu(), shape) for mask in (got[2], want[2])]
            mask_compared, mask_mismatches = count_mismatches(*inside, near)
            if not near.any() and got[1].item() != want[1].item():
                mismatches += 1
            return compared + mask_compared, mismatches + mask_mismatches, int(near.sum())

        yield args, compare


def _saf_neuron_backward_cases(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[tuple, Callable]]:
    for steps, neurons, spike_bits, mode, surrogate in (
        (4, 129, 1, "saf_e", "sigmoid"),
        (7, 67, 2, "saf_e", "s2nn"),
        (5, 100, 1, "saf_e", "rectangle"),
        (9, 257, 3, "saf_f", "sigmoid"),
    ):
        u_hat = _u_hat((steps, neurons), spike_bits, device, dtype)
        state = torch.rand(neurons, device=device) * 2
        mask = saf_reference.saf_neuron_forward(u_hat, state, DECAY, THRESHOLD, spike_bits, 1, True)[2]
        saved = (u_hat, None, state) if mode == "saf_e" else (None, mask, None)
        grad_trace = torch.randn(u_hat.shape, device=device).to(dtype)
        args = (
            grad_trace,
            torch.tensor(0.25, device=device),
            *saved,
            DECAY,
            THRESHOLD,
            mode,
            surrogate,
            3.0,
            spike_bits,
        )
        near = near_tie_neurons(u_hat, state, DECAY, THRESHOLD, spike_bits)

        def compare(got, want, near=near):
            return (*count_far(got, want, GRADIENT_RTOL[dtype], near), int(near.sum()))

        yield args, compare


def _exact_cases(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[tuple, Callable]]:
    """spike_trace and saf_readout: no thresholds, so every value must agree bit for bit."""
    for shape, with_state in (((1, 300), False), ((6, 3, 41), True), ((33, 70), True)):
        x = _u_hat(shape, 1, device, dtype)
        state = torch.rand(shape[1:], device=device) if with_state else None
        nothing = torch.zeros(shape[1:], dtype=torch.bool)

        def compare(got, want, nothing=nothing):
            return (*count_mismatches(got, want, nothing), 0)

        yield (x, state, DECAY), compare


def _saf_linear_inputs(steps, batch, inputs, features, device, dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    a_in = (torch.rand(steps, batch, inputs) * 2).to(dtype).to(device)
    weight = (torch.randn(features, inputs) * 1.5 / inputs**0.5).to(dtype).to(device)
    bias = (torch.randn(features) * 0.5 + 0.3).to(dtype).to(device)
    return a_in, weight, bias, torch.rand(batch, features, device=device)


def _linear_near(a_in: Tensor, weight: Tensor, bias: Tensor, state: Tensor, step: int) -> Tensor:
    """Output neurons near a tie: the kernels' matmuls sum in another order than the reference's."""
    u_hat = saf_reference._linear_u_hat(a_in.cpu(), weight.cpu(), bias.cpu(), DECAY, step)
    return near_tie_neurons(u_hat, state.cpu(), DECAY, THRESHOLD, 1, tol=2e-5)


def _saf_linear_forward_cases(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[tuple, Callable]]:
    for steps, batch, inputs, features in ((1, 5, 33, 17), (6, 9, 70, 40)):
        a_in, weight, bias, state = _saf_linear_inputs(steps, batch, inputs, features, device, dtype)
        near = _linear_near(a_in, weight, bias, state, 3)

        def compare(got, want, near=near):
            compared, mismatches = count_mismatches(got[0], want[0], near)
            if not near.any() and got[1].item() != want[1].item():
                mismatches += 1
            return compared, mismatches, int(near.sum())

        yield (a_in, weight, bias, state, DECAY, THRESHOLD, 1, 3), compare


def _saf_linear_backward_cases(device: torch.device, dtype: torch.dtype) -> Iterator[tuple[tuple, Callable]]:
    for steps, batch, inputs, features, mode in ((3, 5, 33, 17, "saf_e"), (6, 9, 70, 40, "saf_f")):
        a_in, weight, bias, state = _saf_linear_inputs(steps, batch, inputs, features, device, dtype)
        near = _linear_near(a_in, weight, bias, state, 0)
        # No upstream gradient at neurons near a tie, where a moved spike would change every weight
        # gradient it feeds; the spike count's gradient would reach them, so it is zero here.
        grad_trace = torch.randn(steps, batch, features).masked_fill(near, 0.0).to(dtype).to(device)
        args = (grad_trace, torch.tensor(0.0, device=device), a_in, weight, bias, state, DECAY, THRESHOLD)
        args += (mode, "sigmoid", 4.0, 1, 0)

        def compare(got, want, excused=int(near.sum())):
            results = [count_far(g, w, GRADIENT_RTOL[dtype]) for g, w in zip(got, want)]
            return sum(r[0] for r in results), sum(r[1] for r in results), excused

        yield args, compare


CASES: dict[str, Callable[[torch.device, torch.dtype], Iterator[tuple[tuple, Callable]]]] = {
    "saf_neuron_forward": _saf_neuron_forward_cases,
    "saf_neuron_backward": _saf_neuron_backward_cases,
    "spike_trace_forward": _exact_cases,
    "saf_readout_forward": _exact_cases,
    "saf_linear_forward": _saf_linear_forward_cases,
    "saf_linear_backward": _saf_linear_backward_cases,
    **quant_cases.CASES,
    **lbn_cases.CASES,
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


def family(op: str) -> str:
    """The family of `op` ("saf", "quant" or "lbn"): the package its reference lives in."""
    return _backend._OPS[op].reference.__module__.split(".")[-2]


@dataclass
class Case:
    """One validation to run: `op` on `backend` with `args`, held against the reference by
    `compare`; None for an op that has a kernel but no validation case."""

    op: str
    backend: str
    device: torch.device
    dtype: torch.dtype | None
    args: tuple | None
    compare: Callable | None

    @property
    def label(self) -> str:
        dtype = "" if self.dtype is None else f", {str(self.dtype).removeprefix('torch.')}"
        return f"{self.op} on {self.backend}{dtype}"


def validation_cases(
    device: torch.device,
    dtypes=_backend.KERNEL_DTYPES,
    families: Collection[str] | None = None,
    per_kernel: int | None = None,
) -> list[Case]:
    """Every case of every kernel available on `device` (of `families`, all when None; at most
    `per_kernel` per op, backend and dtype when given), inputs made up front so that the count is
    known before any runs."""
    cases = []
    for op, backend in kernels_here(device):
        if families is not None and family(op) not in families:
            continue
        if op not in CASES:
            cases.append(Case(op, backend, device, None, None, None))
            continue
        for dtype in dtypes:
            chosen = itertools.islice(CASES[op](device, dtype), per_kernel)
            cases += [Case(op, backend, device, dtype, args, compare) for args, compare in chosen]
    return cases


def run_case(case: Case) -> Result:
    """Runs one case's kernel and the reference and compares them."""
    if case.compare is None:
        return Result(case.op, case.backend, case.device.type, "-", "-", 0, 0, 0, "no validation case for this op")
    shape = "x".join(map(str, case.args[0].shape))
    try:
        got = launcher(case.op, case.backend)(*case.args)
        compared, mismatches, excused = case.compare(got, launcher(case.op, "reference")(*case.args))
        detail = ""
    except Exception as error:  # a crashing kernel is a failed validation, not a crashed report
        compared = mismatches = excused = 0
        detail = f"{type(error).__name__}: {error}"
    dtype = str(case.dtype).removeprefix("torch.")
    return Result(case.op, case.backend, case.device.type, dtype, shape, compared, mismatches, excused, detail)


def run_cases(cases: Sequence[Case], progress: Progress | None = None) -> list[Result]:
    """Runs `cases` in order, advancing `progress` (whose total is ``len(cases)``) once per case."""
    results = []
    for case in cases:
        if progress is not None:
            progress.begin(case.label)
        results.append(run_case(case))
        if progress is not None:
            progress.advance()
    return results


def validate(
    device: torch.device, dtypes=_backend.KERNEL_DTYPES, families: Collection[str] | None = None
) -> list[Result]:
    """Runs every kernel available on `device` (of `families`, all when None) against the
    reference; one Result per op, backend and case."""
    return run_cases(validation_cases(device, dtypes, families))


RESULT_COLUMNS = {"op": "op", "backend": "backend", "dtypes": "dtypes", "cases": "cases", "compared": "compared"}
RESULT_COLUMNS |= {"mismatches": "mismatches", "excused": "ties excused", "result": "result"}


def summary_rows(results: Sequence[Result]) -> list[dict]:
    """One row per op and backend: its cases, values compared, mismatches and ties excused summed
    over dtypes and shapes, and "ok" or what failed first."""
    groups: dict[tuple[str, str], list[Result]] = {}
    for r in results:
        groups.setdefault((r.op, r.backend), []).append(r)
    rows = []
    for (op, backend), group in groups.items():
        failed = [r for r in group if not r.ok]
        first = failed[0] if failed else None
        result = "ok"
        if first is not None:
            what = first.detail or f"{first.mismatches} mismatches"
            result = f"{len(failed)} of {len(group)} failed; first: {first.dtype} {first.shape}: {what}"
        rows.append(
            {
                "op": op,
                "backend": backend,
                "dtypes": ", ".join(dict.fromkeys(r.dtype for r in group)),
                "cases": len(group),
                "compared": sum(r.compared for r in group),
                "mismatches": sum(r.mismatches for r in group),
                "excused": sum(r.excused for r in group),
                "result": result,
            }
        )
    return rows

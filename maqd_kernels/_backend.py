"""The one place that decides which backend runs a call.

Backends:

- ``cuda``: the hand-written kernels of ``maqd_kernels._C`` (built from ``csrc/`` when nvcc is
  present at install time); CUDA tensors only.
- ``triton``: the Triton kernels; CUDA tensors, or CPU tensors when the Triton interpreter is on
  (``TRITON_INTERPRET=1`` set before Triton is imported), which is how CI tests them.
- ``reference``: eager PyTorch, the executable form of SPEC.md; every op, device and dtype.

Choice, first match wins: the call's ``backend=`` keyword, the ``MAQD_BACKEND`` environment
variable, then the default: on a CUDA tensor the fastest kernel built for that op that takes the
tensor's dtype (``cuda``, then ``triton``), otherwise ``reference``. A ``backend=`` that cannot run
the call raises, naming what can. ``MAQD_BACKEND`` is a whole-model preference: a backend that
cannot run here (or an unknown name) raises, but an op with no kernel in it, or an input dtype its
kernels do not take, gets the default, so that one setting serves a model whose ops do not all
have kernels in every backend.
"""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch

BACKENDS = ("cuda", "triton", "reference")
# The dtypes the cuda and triton kernels take; float64 runs on the reference only.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Storage dtype codes shared with csrc/common.cuh (FloatDType).
FLOAT_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class BackendStatus(NamedTuple):
    available: bool
    detail: str


@functools.cache
def cuda_extension() -> ModuleType | None:
    """``maqd_kernels._C``, or None when the package was installed without it."""
    try:
        return importlib.import_module("maqd_kernels._C")
    except ImportError:
        return None


@functools.cache
def triton_module() -> ModuleType | None:
    try:
        return importlib.import_module("triton")
    except ImportError:
        return None


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _unusable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    if backend == "reference":
        return None
    if backend == "cuda":
        if cuda_extension() is None:
            return "maqd_kernels._C was not built (install with nvcc on PATH)"
        if device.type != "cuda":
            return f"its kernels run on CUDA tensors, not {device.type}"
        return None
    if backend == "triton":
        if triton_module() is None:
            return "triton is not installed (pip install triton)"
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter():
            return None
        return f"its kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1, not on {device.type}"
    raise AssertionError(backend)


def backends() -> dict[str, BackendStatus]:
    """What each backend can do on this machine, e.g. ``backends()["cuda"].available``."""
    has_gpu = torch.cuda.is_available()
    ext = cuda_extension()
    if ext is None:
        cuda = BackendStatus(False, "not built: maqd_kernels._C is missing (reinstall with nvcc on PATH)")
    else:
        version = ext.cuda_runtime_version()
        archs = ", sm_".join(ext.built_archs())
        runtime = f"{version // 1000}.{version % 1000 // 10}"
        built = f"built for sm_{archs} (+PTX compute_{ext.ptx_arch}), CUDA runtime {runtime}"
        where = (
            f"{torch.cuda.device_count()} CUDA device(s), {torch.cuda.get_device_name()}"
            if has_gpu
            else "no CUDA device here"
        )
        cuda = BackendStatus(has_gpu, f"{built}; {where}")
    tri = triton_module()
    if tri is None:
        triton = BackendStatus(False, "not installed (pip install triton)")
    elif has_gpu:
        triton = BackendStatus(True, f"triton {tri.__version__} on {torch.cuda.get_device_name()}")
    elif triton_interpreter():
        triton = BackendStatus(True, f"triton {tri.__version__} in the interpreter on the CPU (TRITON_INTERPRET=1)")
    else:
        triton = BackendStatus(
            False, f"triton {tri.__version__} installed, but no CUDA device and TRITON_INTERPRET is not 1"
        )
    reference = BackendStatus(True, f"eager PyTorch {torch.__version__}, every op, device and dtype")
    return {"cuda": cuda, "triton": triton, "reference": reference}


class _OpKernels(NamedTuple):
    reference: Callable
    # backend name -> "module:function", imported on first use so that importing the package
    # never imports Triton or _C.
    kernels: dict[str, str]


_OPS: dict[str, _OpKernels] = {}


def declare(op: str, reference: Callable, **kernels: str) -> None:
    """Declares the implementations of `op`: the reference callable and, per backend, the
    "module:function" path of its kernel launcher (all with the reference's signature)."""
    unknown = set(kernels) - set(BACKENDS)
    if unknown:
        raise ValueError(f"declare({op!r}): unknown backends {sorted(unknown)}")
    _OPS[op] = _OpKernels(reference, kernels)


@functools.cache
def _load(path: str) -> Callable:
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def implemented_backends(op: str) -> tuple[str, ...]:
    return tuple(b for b in BACKENDS if b == "reference" or b in _OPS[op].kernels)


def resolve(op: str, like: torch.Tensor, backend: str | None = None) -> Callable:
    """The implementation of `op` that runs for the tensor `like` (see the module docstring)."""
    entry = _OPS[op]
    if backend is None:
        preferred = os.environ.get("MAQD_BACKEND") or None
        if preferred is not None:
            _check_runs_here("MAQD_BACKEND=", preferred, op, like.device)
            if preferred == "reference":
                return entry.reference
            if preferred in entry.kernels and like.dtype in KERNEL_DTYPES:
                return _load(entry.kernels[preferred])
        return _default(entry, like)
    _check_runs_here("backend=", backend, op, like.device)
    if backend == "reference":
        return entry.reference
    if backend not in entry.kernels:
        raise ValueError(
            f"backend={backend!r}: maqd.{op} has no {backend} kernel; usable for it here: {_usable(op, like.device)}"
        )
    if like.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend={backend!r}: the {backend} kernel of maqd.{op} takes float32, bfloat16 or float16 "
            f"inputs, got {like.dtype}; use backend='reference' for it"
        )
    return _load(entry.kernels[backend])


def _default(entry: _OpKernels, like: torch.Tensor) -> Callable:
    if like.device.type == "cuda" and like.dtype in KERNEL_DTYPES:
        for name in ("cuda", "triton"):
            if name in entry.kernels and _unusable_reason(name, like.device) is None:
                return _load(entry.kernels[name])
    return entry.reference


def _usable(op: str, device: torch.device) -> str:
    return ", ".join(b for b in implemented_backends(op) if _unusable_reason(b, device) is None)


def _check_runs_here(source: str, requested: str, op: str, device: torch.device) -> None:
    """Raises when `requested` is not a backend, or is one that cannot run on `device` here."""
    if requested not in BACKENDS:
        raise ValueError(f"{source}{requested!r} is not a backend; expected one of {', '.join(BACKENDS)}")
    reason = _unusable_reason(requested, device)
    if reason is not None:
        raise ValueError(
            f"{source}{requested!r} cannot run maqd.{op} here: {reason}; usable for it here: {_usable(op, device)}"
        )


def check_backward(op: str, like: torch.Tensor, backend: str | None, *inputs: torch.Tensor | None) -> None:
    """Raises now, before any kernel runs, when autograd will need the backward `op` and the chosen
    backend has no kernel for it. Skipped while torch.compile traces: resolving imports the
    backend's module, which Dynamo cannot trace; a missing kernel then raises when backward runs."""
    if torch.compiler.is_compiling():
        return
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        resolve(op, like, backend)

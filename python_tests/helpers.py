"""What several test files share: which kernels can run here, how spikes are compared, and how
the examples are run."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maqd_kernels import _backend
from maqd_kernels.bench.compare import GRADIENT_RTOL
from maqd_kernels.bench.validation import count_mismatches, launcher

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()
requires_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA device")
LOW_PRECISION = (torch.bfloat16, torch.float16)
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_targets() -> list:
    """(backend, device) pairs whose kernels run here, as pytest params; the CUDA kernels' host
    entry points ("cuda-host") run their math on the CPU. Absent ones are kept as skips."""
    has_c = _backend.cuda_extension() is not None
    has_triton = _backend.triton_module() is not None
    interpreter = os.environ.get("TRITON_INTERPRET") == "1"
    targets = [
        pytest.param("cuda-host", "cpu", marks=pytest.mark.skipif(not has_c, reason="maqd_kernels._C not built")),
        pytest.param(
            "triton",
            "cpu",
            marks=pytest.mark.skipif(not (has_triton and interpreter), reason="needs triton and TRITON_INTERPRET=1"),
        ),
        pytest.param("cuda", "cuda", marks=[requires_gpu, pytest.mark.skipif(not has_c, reason="_C not built")]),
        pytest.param("triton", "cuda", marks=[requires_gpu, pytest.mark.skipif(not has_triton, reason="no triton")]),
    ]
    return targets


def op_backends() -> list:
    """Backends the public ops can be asked for on this machine, with the device they run on."""
    params = [pytest.param("reference", "cpu")]
    for backend, device in (("triton", "cpu"), ("cuda", "cuda"), ("triton", "cuda")):
        if device == "cuda" and not HAS_GPU:
            continue
        if _backend.backends()[backend].available and _backend._unusable_reason(backend, torch.device(device)) is None:
            params.append(pytest.param(backend, device))
    return params


def kernel_or_skip(op: str, backend: str):
    """``launcher(op, backend)``, or a skip when `op` has no kernel on that backend."""
    if backend.removesuffix("-host") not in _backend._OPS[op].kernels:
        pytest.skip(f"{op} has no {backend} kernel")
    return launcher(op, backend)


def saf_forward(backend: str, *args):
    """The SAF neuron forward of `backend` ("reference", "cuda", "triton" or "cuda-host")."""
    return launcher("saf_neuron_forward", backend)(*args)


def assert_equal_except_ties(actual: torch.Tensor, expected: torch.Tensor, near: torch.Tensor, max_ties: float = 0.1):
    """Exact equality of time-first tensors on every neuron that never comes near a tie."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert near.float().mean() <= max_ties, "too many near-ties for a meaningful comparison"
    compared, mismatches = count_mismatches(actual, expected, near)
    assert mismatches == 0, f"{mismatches} of {compared} values differ"


def assert_close_to_reference(got, want, dtype: torch.dtype, name: str) -> None:
    """`got` within GRADIENT_RTOL[dtype] of the reference `want`'s largest magnitude (at least 1):
    normalization kernels sum in another order than the reference and round once to the storage
    dtype. None must match None."""
    if want is None:
        assert got is None, name
        return
    assert got.shape == want.shape and got.dtype == want.dtype, name
    scale = want.float().abs().max().item() if want.numel() else 0.0
    tol = GRADIENT_RTOL[dtype] * max(scale, 1.0)
    torch.testing.assert_close(got.float().cpu(), want.float().cpu(), rtol=0, atol=tol, msg=name)


def example_modules():
    """(examples.models, examples.train): the example model builders and their training loss
    (``train.loss_of``). The repository root joins sys.path: examples/ is not an installed package."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module("examples.models"), importlib.import_module("examples.train")


def run_example(script: str, *options: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """examples/`script` run with `options` from the repository root, as a user would: on the CPU
    its models use the reference backend, not the Triton interpreter that conftest.py turns on for
    the kernel tests. Output is captured as text."""
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *options],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )

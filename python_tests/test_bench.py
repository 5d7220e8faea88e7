"""python -m maqd_kernels.bench: the validation suite runs here and finds every kernel sound."""

import subprocess
import sys
from pathlib import Path

import torch

from maqd_kernels import _backend
from maqd_kernels.bench import validate


def test_validation_covers_every_kernel_and_passes():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = validate(device)
    expected_backends = set()
    if _backend.cuda_extension() is not None:
        expected_backends.add("cuda" if device.type == "cuda" else "cuda-host")
    if _backend.triton_module() is not None:
        expected_backends.add("triton")
    assert {r.backend for r in results} == expected_backends
    assert {r.dtype for r in results} == {"float32", "bfloat16", "float16"}
    failed = [r for r in results if not r.ok]
    assert not failed, failed


def test_main_job_prints_a_table_and_exits_zero():
    """Run as the README runs it, from the checkout: it must see the same build as the tests."""
    checkout = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "maqd_kernels.bench"], capture_output=True, text=True, timeout=900, cwd=checkout
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "saf_neuron_forward" in result.stdout and "validations passed" in result.stdout
    if _backend.cuda_extension() is not None:
        assert "cuda-host" in result.stdout or "cuda " in result.stdout, result.stdout

"""python -m maqd_kernels.bench: the validation suite runs here and finds every kernel sound; without
a GPU the main job says so and validates only; its options and its progress bar."""

import io
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maqd_kernels import _backend
from maqd_kernels.bench import cli, validate
from maqd_kernels.bench.progress import Progress


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


def test_main_job_without_a_gpu_validates_only():
    """Run as the README runs it, from the checkout: it must see the same build as the tests. On a
    GPU machine --device cpu takes the same path (the default run there is the whole benchmark)."""
    checkout = Path(__file__).resolve().parents[1]
    results = checkout / cli.DEFAULT_OUT
    existed = results.exists()
    argv = ["--device", "cpu"] if torch.cuda.is_available() else []
    result = subprocess.run(
        [sys.executable, "-m", "maqd_kernels.bench", *argv],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=checkout,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (cli.CPU_CHOSEN if argv else cli.NO_GPU) in result.stdout
    assert "saf_neuron_forward" in result.stdout and "validations passed" in result.stdout
    assert "float32, bfloat16 and float16" in result.stdout
    if _backend.cuda_extension() is not None:
        assert "cuda-host" in result.stdout, result.stdout
    # Validation only: no ceilings, no benchmarks, and nothing written without --out.
    assert "ceilings" not in result.stdout and "measurements planned" not in result.stdout
    assert results.exists() == existed
    # The progress bar goes to stderr; off a terminal it ends with one plain line.
    assert "\r" not in result.stderr and "validation: " in result.stderr


def test_ops_takes_a_subset_of_the_families(capsys):
    assert cli.parse_args([]).ops == ["saf", "quant", "lbn"]
    assert cli.parse_args(["--ops", "lbn,saf"]).ops == ["saf", "lbn"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--ops", "saf,conv"])
    error = capsys.readouterr().err
    assert "--ops" in error and "saf,quant,lbn" in error and "conv" in error


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_progress_bar_redraws_one_line_on_a_terminal():
    stream, clock = FakeTerminal(), FakeClock()
    bar = Progress("bench", 4, stream, width=120, clock=clock)
    assert bar.interactive
    bar.begin("saf neuron: T=4")
    clock.now = 10
    bar.advance()
    bar.begin("saf neuron: T=8")
    drawn = stream.getvalue()
    assert "\n" not in drawn
    assert drawn.split("\r\033[K")[-1] == (
        "bench [######..................] 1/4  25%  0:10 elapsed, ~0:30 left  saf neuron: T=8"
    )

    bar.note("saf neuron failed: T=8")
    assert stream.getvalue().endswith("\r\033[Ksaf neuron failed: T=8\n\r\033[K" + bar.line())

    clock.now = 65
    for _ in range(3):
        bar.advance()
    bar.finish()
    assert stream.getvalue().endswith("\r\033[Kbench: 4/4 in 1:05\n")

    narrow = Progress("bench", 4, FakeTerminal(), width=30, clock=clock)
    narrow.begin("a label far too long for a narrow terminal")
    assert len(narrow.line()) == 29


def test_progress_bar_logs_a_plain_line_now_and_then_off_a_terminal():
    stream, clock = io.StringIO(), FakeClock()
    bar = Progress("validation", 100, stream, log_every_s=30, clock=clock)
    assert not bar.interactive
    for i in range(100):
        clock.now = i
        bar.begin(f"case {i}")
        bar.advance()
    bar.finish()
    assert stream.getvalue().splitlines() == [
        "validation: 30/100  30%  0:30 elapsed, ~1:10 left: case 30",
        "validation: 60/100  60%  1:00 elapsed, ~0:40 left: case 60",
        "validation: 90/100  90%  1:30 elapsed, ~0:10 left: case 90",
        "validation: 100/100 in 1:39",
    ]

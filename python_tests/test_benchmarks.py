"""The benchmark scripts under benchmarks/ keep running: CI has no GPU, so each runs its --smoke
mode (every section once, at tiny sizes) and must write complete tables."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def test_bench_saf_smoke_writes_every_section(tmp_path):
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # The Triton kernels then run in the interpreter; on a GPU they run for real.
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_saf.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "targets" in result.stdout

    with open(tmp_path / "saf.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    sections = {r["section"] for r in rows}
    assert sections == {"machine", "neuron", "linear", "vgg"}, sections
    assert not [r for r in rows if r.get("error")], "a smoke measurement failed"
    assert all(float(r["ms"]) > 0 for r in rows if r["section"] != "machine")
    neuron_impls = {r["impl"] for r in rows if r["section"] == "neuron"}
    expected = {"reference", "compile", "ottt"} | ({"triton"} if env.get("TRITON_INTERPRET") == "1" else set())
    assert expected <= neuron_impls, neuron_impls
    assert {r["method"] for r in rows if r["section"] == "vgg"} == {
        "SAF-E online",
        "SAF-E multi-step",
        "SAF-F",
        "OTTT_O",
        "OTTT_A",
    }

    markdown = (tmp_path / "saf.md").read_text()
    for heading in ("## Targets", "## (a) SAF neuron", "## (b) Fused saf_linear", "## (c) VGG training"):
        assert heading in markdown


def test_bench_saf_rejects_an_unknown_section():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import bench_saf
    finally:
        sys.path.remove(str(BENCHMARKS))
    with pytest.raises(SystemExit):
        bench_saf.parse_args(["--smoke", "--only", "neuron,convolution"])

"""The benchmark scripts under benchmarks/ keep running: CI has no GPU, so each runs its --smoke
mode (every section once, at tiny sizes) and must write complete tables."""

import csv
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _run_smoke(script: str, out: Path) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs `script` --smoke into `out`; (the finished process, its environment)."""
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # The Triton kernels then run in the interpreter; on a GPU they run for real.
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / script), "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=BENCHMARKS.parent,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, env


def _import_bench(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_bench_saf_smoke_writes_every_section(tmp_path):
    result, env = _run_smoke("bench_saf.py", tmp_path)
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
    bench_saf = _import_bench("bench_saf")
    with pytest.raises(SystemExit):
        bench_saf.parse_args(["--smoke", "--only", "neuron,convolution"])


def test_bench_quant_smoke_writes_every_section(tmp_path):
    result, env = _run_smoke("bench_quant.py", tmp_path)
    targets = result.stdout[result.stdout.index("\ntargets") :]
    for goal in ("W2A8", "W4A8", "W2A16", "W4A16", "train step"):
        assert goal in targets, goal

    with open(tmp_path / "quant.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["section"] for r in rows} == {"machine", "linear", "train", "prep"}
    assert not [r for r in rows if r.get("error")], "a smoke measurement failed"
    # Every measurement has a positive time, except torch._int_mm where cuBLASLt refuses the shape
    # (M <= 16), which is skipped with a note.
    skipped = [r for r in rows if r.get("note")]
    assert skipped and all(r["impl"] == "int_mm" and r["M"] == "1" for r in skipped), skipped
    assert all(float(r["ms"]) > 0 for r in rows if r["section"] != "machine" and not r.get("note"))

    kernels = {"reference"} | ({"triton"} if env.get("TRITON_INTERPRET") == "1" else set())
    linear = [r for r in rows if r["section"] == "linear"]
    assert {r["impl"] for r in linear} >= kernels | {"cublas", "int_mm", "eager", "compile"}
    for kernel in kernels:
        assert {(r["path"], r["bits"]) for r in linear if r["impl"] == kernel} == {
            (path, str(bits)) for path in ("A8", "A16") for bits in (1, 2, 4, 8)
        }
        assert all(r["x_cublas"] and r["x_eager"] and r["x_compile"] for r in linear if r["impl"] == kernel)
    train = {r["impl"] for r in rows if r["section"] == "train"}
    assert {"nn.Linear bf16", "eager fake-quant", "compile fake-quant"} <= train, train
    for kernel in kernels:
        assert {f"QuantAct+QuantLinear [{kernel}]", f"quant_linear act_bits=8 [{kernel}]"} <= train, train
    assert {r["op"] for r in rows if r["section"] == "prep"} == {"pack_weight", "quantize"}

    markdown = (tmp_path / "quant.md").read_text()
    for heading in ("## Targets", "## (a) lowbit_linear forward", "## (b) Training step", "## (c) pack_weight"):
        assert heading in markdown


def test_bench_quant_rejects_bad_options():
    bench_quant = _import_bench("bench_quant")
    for argv in (["--smoke", "--only", "linear,conv"], ["--smoke", "--bits", "3"], ["--smoke", "--bits", "x"]):
        with pytest.raises(SystemExit):
            bench_quant.parse_args(argv)
    assert bench_quant.parse_args(["--smoke", "--bits", "4,2", "--only", "train"]).bits == [2, 4]


def test_bench_lbn_smoke_writes_every_section(tmp_path):
    result, env = _run_smoke("bench_lbn.py", tmp_path)
    targets = result.stdout[result.stdout.index("\ntargets") :]
    assert "LBN + requant epilogue" in targets

    with open(tmp_path / "lbn.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["section"] for r in rows} == {"machine", "train", "infer"}
    assert not [r for r in rows if r.get("error")], "a smoke measurement failed"
    # Every measurement has a positive time, except GroupNorm(C, C) where a group would hold a
    # single value (the (N, C) and time-first shapes), which is skipped with a note.
    skipped = [r for r in rows if r.get("note")]
    assert skipped and all(r["impl"] == "groupnorm" and r["layout"] != "conv" for r in skipped), skipped
    assert all(float(r["ms"]) > 0 for r in rows if r["section"] != "machine" and not r.get("note"))

    kernels = {"reference"} | ({"triton"} if env.get("TRITON_INTERPRET") == "1" else set())
    train = [r for r in rows if r["section"] == "train"]
    assert {r["impl"] for r in train} >= kernels | {"compile", "batchnorm", "layernorm", "groupnorm"}
    assert {r["layout"] for r in train} == {"conv", "linear", "time-first"}
    assert {r["dtype"] for r in train} == {"bf16", "fp32"}
    for kernel in kernels:
        mine = [r for r in train if r["impl"] == kernel]
        # groups = 1 and groups = C at each shape and dtype.
        assert len({(r["shape"], r["dtype"], r["G"]) for r in mine}) == 12
        assert all(r["x_compile"] and r["x_batchnorm"] and r["x_layernorm"] for r in mine)
    assert all(r["of_copy_passes"] for r in train if r["impl"] == "triton")

    lowbit = [r for r in rows if r["section"] == "infer" and r["op"] == "lowbit_linear"]
    for kernel in kernels:
        forms = {(r["form"], r["bits"], r["M"]) for r in lowbit if r["impl"] == kernel}
        assert {f for f, _, _ in forms} == {"epilogue", "plain", "eager chain", "op chain", "compile chain"}
        assert {b for _, b, _ in forms} == {"2", "4"}
        fused = [r for r in lowbit if r["impl"] == kernel and r["form"] == "epilogue"]
        assert all(r["vs_plain"] and r["x_eager"] and r["x_ops"] and r["x_compile"] for r in fused)
        assert all(int(r["code_diff"]) <= 1 for r in fused)
    fold = {(r["form"], r["impl"]) for r in rows if r["section"] == "infer" and r["op"] == "fold"}
    assert {("Linear + eager LBN", "torch"), ("folded Linear", "torch"), ("fold_affine", "reference")} <= fold
    for kernel in kernels:
        assert {("Linear + LBN", kernel), ("LBN eval", kernel)} <= fold

    markdown = (tmp_path / "lbn.md").read_text()
    for heading in ("## Targets", "## (a) LayerBatchNorm training", "## (b) Inference", "## (b.v) Inference"):
        assert heading in markdown


def test_bench_lbn_rejects_an_unknown_section():
    bench_lbn = _import_bench("bench_lbn")
    with pytest.raises(SystemExit):
        bench_lbn.parse_args(["--smoke", "--only", "train,fold"])
    assert bench_lbn.parse_args(["--smoke", "--only", "infer"]).only == ["infer"]

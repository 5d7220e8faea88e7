"""The benchmarks keep running: CI has no GPU, so ``python -m maqd_kernels.bench --smoke`` runs every
family once at tiny sizes (one run for the whole module: it is the bulk of this file's time) and
must write complete tables and a complete summary. The scripts under benchmarks/ keep their options."""

import csv
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maqd_kernels.bench.harness import FAMILIES

CHECKOUT = Path(__file__).resolve().parents[1]
BENCHMARKS = CHECKOUT / "benchmarks"
SECTIONS = {"saf": {"neuron", "linear", "vgg"}, "quant": {"linear", "train", "prep"}, "lbn": {"train", "infer"}}


class SmokeRun:
    """The finished harness run: its stdout, its results folder, and what the smoke plans expect."""

    def __init__(self, stdout: str, out: Path):
        self.stdout, self.out = stdout, out
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        # Planned here as the run planned them: the same machine, the same environment.
        self.plans = {name: module.make_plan(device, smoke=True, quick=False) for name, module in FAMILIES.items()}

    def rows(self, family: str) -> list[dict]:
        with open(self.out / f"{family}.csv", newline="") as f:
            return list(csv.DictReader(f))

    def kernels(self, family: str) -> set[str]:
        return set(self.plans[family].kernels)

    def targets_text(self, family: str) -> str:
        """The family's part of the terminal table, from its targets heading to the next family."""
        start = self.stdout.index(f"\n== {family}:")
        end = self.stdout.find("\n== ", start + 1)
        part = self.stdout[start : end if end >= 0 else None]
        return part[part.index("\ntargets") :]


def _target_names(markdown: str) -> list[str]:
    """The first column of the table under a Markdown file's "## Targets" heading."""
    section = markdown.split("## Targets", 1)[1].split("\n## ", 1)[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return [line.split(" | ")[0].removeprefix("| ") for line in table[1:]]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> SmokeRun:
    out = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ)
    if not torch.cuda.is_available():
        # The Triton kernels then run in the interpreter; on a GPU they run for real.
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "maqd_kernels.bench", "--smoke", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=CHECKOUT,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return SmokeRun(result.stdout, out)


def test_smoke_run_writes_every_family_and_the_summary(smoke):
    for family, module in FAMILIES.items():
        rows = smoke.rows(family)
        assert {r["section"] for r in rows} == {"machine"} | SECTIONS[family], family
        assert not [r for r in rows if r.get("error")], f"a {family} smoke measurement failed"
        # The progress bar's total is counted from the plan: it must be what the run measured.
        measured = [r for r in rows if r["section"] != "machine"]
        assert len(measured) == module.count_measurements(smoke.plans[family]), family
        assert (smoke.out / f"{family}.md").read_text().count("## Targets") == 1
        assert (smoke.out / f"{family}.png").stat().st_size > 0

    summary = json.loads((smoke.out / "summary.json").read_text())
    assert set(summary["families"]) == set(FAMILIES)
    assert summary["ceilings"]["copy_gbps"] > 0 and summary["ceilings"]["matmul_tflops"] > 0
    assert summary["validation"]["total"] > 0 and summary["validation"]["failed"] == []
    for family in FAMILIES:
        targets = summary["families"][family]["targets"]
        assert targets and all({"measured", "goal", "status"} <= set(t) for t in targets)
        # The same targets as the family's own table, in its order.
        markdown = (smoke.out / f"{family}.md").read_text()
        assert [t["name"] for t in targets] == _target_names(markdown), family

    text = (smoke.out / "summary.md").read_text()
    assert "| commit |" in text and "| copy bandwidth |" in text and "Smoke run" in text
    for family in FAMILIES:
        assert f"[{family}.csv]({family}.csv)" in text and f"![{family}]({family}.png)" in text
    with open(smoke.out / "validation.csv", newline="") as f:
        validation = list(csv.DictReader(f))
    assert validation and {r["family"] for r in validation} == set(FAMILIES)
    assert all(r["ok"] == "True" for r in validation)


def test_smoke_run_prints_a_table_per_family(smoke):
    for family in FAMILIES:
        assert f"\n== {family}:" in smoke.stdout
    assert "validations passed" in smoke.stdout and "ceilings: copy" in smoke.stdout
    assert "targets:" in smoke.stdout and "(smoke run: not meaningful)" in smoke.stdout


def test_saf_smoke_measures_every_section(smoke):
    rows = smoke.rows("saf")
    assert all(float(r["ms"]) > 0 for r in rows if r["section"] != "machine")
    neuron_impls = {r["impl"] for r in rows if r["section"] == "neuron"}
    assert smoke.kernels("saf") | {"compile", "ottt"} <= neuron_impls, neuron_impls
    assert {r["method"] for r in rows if r["section"] == "vgg"} == {
        "SAF-E online",
        "SAF-E multi-step",
        "SAF-F",
        "OTTT_O",
        "OTTT_A",
    }
    assert "neuron fwd+bwd" in smoke.targets_text("saf")

    markdown = (smoke.out / "saf.md").read_text()
    for heading in ("## Targets", "## (a) SAF neuron", "## (b) Fused saf_linear", "## (c) VGG training"):
        assert heading in markdown


def test_quant_smoke_measures_every_section(smoke):
    targets = smoke.targets_text("quant")
    for goal in ("W2A8", "W4A8", "W2A16", "W4A16", "train step"):
        assert goal in targets, goal

    rows = smoke.rows("quant")
    # Every measurement has a positive time, except torch._int_mm where cuBLASLt refuses the shape
    # (M <= 16), which is skipped with a note.
    skipped = [r for r in rows if r.get("note")]
    assert skipped and all(r["impl"] == "int_mm" and r["M"] == "1" for r in skipped), skipped
    assert all(float(r["ms"]) > 0 for r in rows if r["section"] != "machine" and not r.get("note"))

    kernels = smoke.kernels("quant")
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

    markdown = (smoke.out / "quant.md").read_text()
    for heading in ("## Targets", "## (a) lowbit_linear forward", "## (b) Training step", "## (c) pack_weight"):
        assert heading in markdown


def test_lbn_smoke_measures_every_section(smoke):
    assert "LBN + requant epilogue" in smoke.targets_text("lbn")

    rows = smoke.rows("lbn")
    # Every measurement has a positive time, except GroupNorm(C, C) where a group would hold a
    # single value (the (N, C) and time-first shapes), which is skipped with a note.
    skipped = [r for r in rows if r.get("note")]
    assert skipped and all(r["impl"] == "groupnorm" and r["layout"] != "conv" for r in skipped), skipped
    assert all(float(r["ms"]) > 0 for r in rows if r["section"] != "machine" and not r.get("note"))

    kernels = smoke.kernels("lbn")
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

    markdown = (smoke.out / "lbn.md").read_text()
    for heading in ("## Targets", "## (a) LayerBatchNorm training", "## (b) Inference", "## (b.v) Inference"):
        assert heading in markdown


def _import_script(name: str):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_scripts_reject_unknown_sections_and_options():
    bench_saf, bench_quant, bench_lbn = (_import_script(f"bench_{name}") for name in ("saf", "quant", "lbn"))
    for script, argv in (
        (bench_saf, ["--smoke", "--only", "neuron,convolution"]),
        (bench_quant, ["--smoke", "--only", "linear,conv"]),
        (bench_quant, ["--smoke", "--bits", "3"]),
        (bench_quant, ["--smoke", "--bits", "x"]),
        (bench_lbn, ["--smoke", "--only", "train,fold"]),
    ):
        with pytest.raises(SystemExit):
            script.parse_args(argv)
    assert bench_quant.parse_args(["--smoke", "--bits", "4,2", "--only", "train"]).bits == [2, 4]
    assert bench_lbn.parse_args(["--smoke", "--only", "infer"]).only == ["infer"]
    assert bench_saf.parse_args(["--smoke", "--full", "--only", "vgg,neuron"]).only == ["neuron", "vgg"]


def test_a_script_runs_its_family_alone(tmp_path, capsys):
    """The thin script's path through the harness, on its cheapest section."""
    bench_saf = _import_script("bench_saf")
    assert bench_saf.main(["--smoke", "--only", "linear", "--out", str(tmp_path)]) == 0
    with open(tmp_path / "saf.csv", newline="") as f:
        assert {r["section"] for r in csv.DictReader(f)} == {"machine", "linear"}
    stdout = capsys.readouterr().out
    assert "\ntargets" in stdout and "saf_linear [triton]" in stdout
    assert not (tmp_path / "summary.md").exists()

"""The benchmark run that ``python -m maqd_kernels.bench`` and the scripts under benchmarks/ share:
the ceilings measured once, then each chosen family's measurements under one progress bar (its
total counted from the families' plans before anything runs), the terminal summary, and the
results folder's summary.md, summary.json and validation.csv.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType

import torch

from . import common, lbn, quant, saf
from .progress import Progress
from .validation import RESULT_COLUMNS, Result, family, summary_rows

# Each family module has FAMILY, TITLE, SECTIONS, make_plan(device, smoke, quick, sections, ...),
# count_measurements(plan) and run(plan, context) -> common.FamilyResult.
FAMILIES: dict[str, ModuleType] = {module.FAMILY: module for module in (saf, quant, lbn)}


@dataclass
class BenchmarkRun:
    """What ``run_families`` measured: the run's header, its ceilings, where it wrote, each
    family's result, and whether it was a smoke run (whose numbers mean nothing)."""

    header: dict[str, str]
    ceilings: common.Ceilings
    out_dir: Path
    results: list[common.FamilyResult]
    smoke: bool

    @property
    def failed_measurements(self) -> int:
        return sum(len(result.errors) for result in self.results)


def run_families(
    plans: Mapping[str, object],
    device: torch.device,
    *,
    smoke: bool,
    quick: bool,
    out: Path | None,
    default_out: Path,
    run_label: str,
) -> BenchmarkRun:
    """Measures the ceilings on `device`, then runs each family's plan (``{family: plan}``, in
    order) with the same timer and ceilings, writing into `out` (else a temporary folder for a
    smoke run, else `default_out`)."""
    timer = common.Timer(device, precise=not smoke, rep_ms=40 if quick else 100)
    torch.manual_seed(0)
    print("\nMeasuring the machine's ceilings ...", flush=True)
    ceilings = common.measure_ceilings(timer, smoke)
    print(f"ceilings: {ceilings.text()}")
    header = common.run_header(device, run_label, ceilings)
    out_dir = common.results_dir(out, smoke, default_out)
    counts = {name: FAMILIES[name].count_measurements(plan) for name, plan in plans.items()}
    planned = ", ".join(f"{name} {count}" for name, count in counts.items())
    print(f"\nBenchmarks ({run_label}), measurements planned: {planned}", flush=True)
    progress = Progress("benchmarks", sum(counts.values()))
    context = common.Context(timer, ceilings, header, out_dir, progress)
    results = [FAMILIES[name].run(plan, context) for name, plan in plans.items()]
    progress.finish()
    return BenchmarkRun(header, ceilings, out_dir, results, smoke)


def target_tally(results: Sequence[common.FamilyResult]) -> dict[str, int]:
    """How many targets of the run were met, not met, and not measured."""
    tally = {"met": 0, "not met": 0, "not measured": 0}
    for result in results:
        for target in result.targets:
            tally[target.status] += 1
    return tally


def tally_text(run: BenchmarkRun) -> str:
    """E.g. "targets: 9 met, 4 not met, 2 not measured", flagged in a smoke run."""
    counts = ", ".join(f"{count} {status}" for status, count in target_tally(run.results).items())
    return f"targets: {counts}" + (" (smoke run: not meaningful)" if run.smoke else "")


def results_text(run: BenchmarkRun) -> str:
    """The terminal summary: per family, its headline spreads and its targets (met or not, and by
    how much), then the tally over every family."""
    parts = []
    for result in run.results:
        failed = f", {len(result.errors)} failed (see `error` in {result.family}.csv)" if result.errors else ""
        parts.append(f"\n== {result.family}: {result.title}, {len(result.rows)} measurements{failed}")
        if result.headlines:
            parts.append(common.text_table(result.headlines, common.HEADLINE_COLUMNS))
        parts.append("\ntargets" + (" (smoke run: not meaningful)" if run.smoke else ""))
        parts.append(common.text_table([t.row() for t in result.targets], common.TARGET_COLUMNS))
    parts.append("\n" + tally_text(run))
    return "\n".join(parts)


def write_validation_csv(path: Path, results: Sequence[Result], header: dict[str, str]) -> None:
    """Every validation case, one line each, with the run's commit, GPU and versions."""
    rows = [{"family": family(r.op), **asdict(r), "ok": r.ok} for r in results]
    common.write_csv(path, rows, header)


def write_summary(
    out_dir: Path,
    header: dict[str, str],
    validation: Sequence[Result],
    run: BenchmarkRun | None,
    no_benchmarks: str = "",
) -> list[Path]:
    """validation.csv, summary.md (the run's header, the validation, every family's targets and
    headlines with links to its files and its plot) and summary.json (the ceilings, and per
    target: measured, goal, status); `run` None for a validation-only run, whose summary says
    `no_benchmarks`. Returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_validation_csv(out_dir / "validation.csv", validation, header)
    failed = [r for r in validation if not r.ok]
    passed = f"{len(validation) - len(failed)} of {len(validation)} validations passed"
    device = validation[0].device if validation else "-"
    parts = [
        "# maqd-kernels benchmark summary",
        common.markdown_table([{"k": k, "v": v} for k, v in header.items()], {"k": "run", "v": ""}),
        "## Validation against the eager reference",
        f"{passed} on {device}; every case is in [validation.csv](validation.csv).",
        common.markdown_table(summary_rows(validation), RESULT_COLUMNS),
    ]
    families = {}
    if run is None:
        parts += ["## Benchmarks", no_benchmarks]
    else:
        smoke = (
            "\n\n**Smoke run**: tiny sizes timed once with perf_counter; the numbers say that the code runs, "
            "nothing about speed."
            if run.smoke
            else ""
        )
        parts += ["## Targets", tally_text(run) + "." + smoke]
        for result in run.results:
            names = [path.name for path in result.files]
            links = " · ".join(f"[{name}]({name})" for name in names)
            failed_rows = f", {len(result.errors)} failed" if result.errors else ""
            parts += [
                f"## {result.family}: {result.title}",
                f"{len(result.rows)} measurements{failed_rows}; {links}.",
                common.markdown_table([t.row() for t in result.targets], common.TARGET_COLUMNS),
            ]
            if result.headlines:
                spread = common.markdown_table(result.headlines, common.HEADLINE_COLUMNS)
                parts.append(f"Spread over the kernels' measurements:\n\n{spread}")
            parts += [f"![{result.family}]({name})" for name in names if name.endswith(".png")]
            families[result.family] = {
                "title": result.title,
                "measurements": len(result.rows),
                "failed": len(result.errors),
                "files": names,
                "targets": [t.as_json() for t in result.targets],
            }
    (out_dir / "summary.md").write_text("\n\n".join(parts) + "\n")
    summary = {
        "header": header,
        "ceilings": None if run is None else asdict(run.ceilings),
        "validation": {
            "device": device,
            "passed": len(validation) - len(failed),
            "total": len(validation),
            "failed": [asdict(r) for r in failed],
        },
        "families": families,
        "targets": None if run is None else target_tally(run.results),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return [out_dir / name for name in ("summary.md", "summary.json", "validation.csv")]


def run_script(
    family_name: str, plan: object, *, quick: bool, out: Path | None, results_root: Path, run_label: str
) -> int:
    """What a script under benchmarks/ does with its family's plan: the benchmark run alone (no
    validation, no summary), written to `out`, else to results_root/<gpu>/. Exit status 1 when a
    measurement failed."""
    device, smoke = plan.device, plan.smoke
    default_out = results_root / common.slug(common.device_name(device))
    run = run_families(
        {family_name: plan}, device, smoke=smoke, quick=quick, out=out, default_out=default_out, run_label=run_label
    )
    print(results_text(run))
    print("\nwrote " + ", ".join(str(path) for result in run.results for path in result.files))
    return 1 if run.failed_measurements else 0

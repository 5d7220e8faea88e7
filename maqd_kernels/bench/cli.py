"""Command line of ``python -m maqd_kernels.bench``: options, the machine's description, then the
validation and, on a GPU, the benchmarks and the results folder."""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch

import maqd_kernels

from .. import _backend, backends
from . import common
from .harness import FAMILIES, results_text, run_families, write_summary
from .progress import Progress
from .validation import RESULT_COLUMNS, Result, run_cases, summary_rows, validation_cases

DEFAULT_OUT = Path("maqd_bench_results")
NO_GPU = (
    "No CUDA GPU here: the benchmarks need one, so this runs the CPU validation only (Triton kernels in the "
    "interpreter, CUDA kernels through their host entry points). --smoke runs the benchmarks' code at tiny "
    "sizes on the CPU."
)
CPU_CHOSEN = "--device cpu: the benchmarks need a CUDA GPU, so this runs the validation only, on the CPU."

DESCRIPTION = """\
The main job of maqd-kernels: validate every kernel available here against the eager reference,
then, on a CUDA GPU, measure the machine's ceilings (copy bandwidth, bf16 and int8 matmul) and
benchmark each op family against them and against its peers (the eager reference,
torch.compile, cuBLAS, torch's normalization layers, OTTT). Prints a table per family with its
targets met or not, and writes a results folder: <family>.csv / .md / .png, validation.csv,
summary.md and summary.json. Without a GPU it validates only (on the CPU)."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options; --ops becomes the list of chosen families, in run order."""
    parser = argparse.ArgumentParser(
        prog="python -m maqd_kernels.bench",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    families = ",".join(FAMILIES)
    parser.add_argument(
        "--ops",
        type=common.comma_subset(list(FAMILIES)),
        default=families,
        metavar=families,
        help=f"comma-separated op families to validate and benchmark, out of {families} (default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer shapes, dtypes and repetitions per family")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, one perf_counter timing per measurement, each kernel's first float32 validation case: "
        "proves the whole pipeline runs, on a CPU too; the numbers mean nothing",
    )
    parser.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help=f"results folder (default ./{DEFAULT_OUT}/<gpu>/; a new temporary folder with --smoke; "
        "with no GPU nothing is written unless this is given)",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the kernels run (auto: the GPU when there is one; the benchmarks need cuda, or --smoke)",
    )
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    return args


def describe_machine() -> str:
    """Versions, the GPU, and what each backend can do here."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    lines = [
        f"maqd_kernels {maqd_kernels.__version__}, python {platform.python_version()}, torch {torch.__version__}, {gpu}"
    ]
    for name, status in backends().items():
        lines.append(f"  {name:<9} {'yes' if status.available else 'no ':<4} {status.detail}")
    return "\n".join(lines)


def run_validation(device: torch.device, families: list[str], smoke: bool) -> list[Result]:
    """Validates the chosen families' kernels under a progress bar and prints a row per op and
    backend, then every failed case."""
    if smoke:
        # Each kernel's first float32 case: the whole path runs, in a fraction of the time.
        cases = validation_cases(device, (torch.float32,), families, per_kernel=1)
        which = "smoke: the first float32 case of each kernel"
    else:
        cases = validation_cases(device, _backend.KERNEL_DTYPES, families)
        which = "float32, bfloat16 and float16"
    print(f"\nValidation against the eager reference on {device.type} ({which}): {len(cases)} cases", flush=True)
    progress = Progress("validation", len(cases))
    results = run_cases(cases, progress)
    progress.finish()
    if not results:
        print("no kernel can run here (build _C or install triton)")
        return results
    print(common.text_table(summary_rows(results), RESULT_COLUMNS))
    failures = [r for r in results if not r.ok]
    if failures:
        print("\nfailed cases:")
        for r in failures:
            print(f"  {r.op} [{r.backend}] {r.dtype} {r.shape}: {r.detail or f'{r.mismatches} of {r.compared} differ'}")
    print(f"\n{len(results) - len(failures)} of {len(results)} validations passed.")
    return results


def main(argv: list[str] | None = None) -> int:
    """Runs the main job; exit status 1 when a validation or a measurement failed."""
    args = parse_args(argv)
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = auto if args.device == "auto" else torch.device(args.device)
    benchmarks = device.type == "cuda" or args.smoke
    run_label = "smoke" if args.smoke else "quick" if args.quick else "default"

    print(describe_machine())
    if not benchmarks:
        print("\n" + (CPU_CHOSEN if torch.cuda.is_available() else NO_GPU))
    torch.manual_seed(0)
    validation = run_validation(device, args.ops, args.smoke)
    validation_failed = not validation or any(not r.ok for r in validation)

    if not benchmarks:
        # The table above is the whole result; files only where asked for, so that running the
        # check from a checkout (as CI does) leaves nothing behind.
        if args.out is not None:
            header = common.run_header(device, "validation only", None)
            reason = "no CUDA GPU here" if auto.type == "cpu" else "--device cpu"
            written = write_summary(args.out, header, validation, None, f"Not run: {reason} (they need a CUDA GPU).")
            print("\nwrote " + ", ".join(str(path) for path in written))
        return 1 if validation_failed else 0

    plans = {name: FAMILIES[name].make_plan(device, args.smoke, args.quick) for name in args.ops}
    kernels = common.kernel_backends(device)
    stand_in = " (+ the reference, measured as a kernel so that every code path runs)" if args.smoke else ""
    print(f"\nkernels benchmarked: {', '.join(kernels) or 'none (only the peers are measured)'}{stand_in}")
    default_out = Path.cwd() / DEFAULT_OUT / common.slug(common.device_name(device))
    run = run_families(
        plans, device, smoke=args.smoke, quick=args.quick, out=args.out, default_out=default_out, run_label=run_label
    )
    print(results_text(run))
    written = write_summary(run.out_dir, run.header, validation, run)
    names = [path.name for path in written] + [path.name for result in run.results for path in result.files]
    print(f"\nwrote {run.out_dir}/: {', '.join(names)}")
    if run.failed_measurements:
        print(f"{run.failed_measurements} measurement(s) failed; see the 'error' column of the CSVs")
    return 1 if validation_failed or run.failed_measurements else 0

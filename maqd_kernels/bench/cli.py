"""Command line of the suite: options, the machine's description and the results table."""

from __future__ import annotations

import argparse
import platform
import sys

import torch

from .. import backends
from .validation import Result, validate


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def describe_machine() -> str:
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA device"
    lines = [f"python {platform.python_version()}, torch {torch.__version__}, {gpu}"]
    for name, status in backends().items():
        lines.append(f"  {name:<9} {'yes' if status.available else 'no ':<4} {status.detail}")
    return "\n".join(lines)


def results_table(results: list[Result]) -> str:
    rows = [
        [
            r.op,
            r.backend,
            r.device,
            r.dtype,
            r.shape,
            r.compared,
            r.mismatches,
            r.excused,
            "ok" if r.ok else (r.detail or "MISMATCH"),
        ]
        for r in results
    ]
    return _table(
        rows, ["op", "backend", "device", "dtype", "shape", "compared", "mismatches", "ties excused", "result"]
    )


def _show_progress(what: str) -> None:
    print(f"\r\033[K  {what}", end="", flush=True) if what else print("\r\033[K", end="", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m maqd_kernels.bench",
        description="Validate every maqd kernel available here against the eager reference and print a table.",
    )
    parser.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default="auto",
        help="where the kernels run (auto: the GPU when there is one)",
    )
    args = parser.parse_args(argv)
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else "cpu"
        if args.device == "auto"
        else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device here")

    print(describe_machine())
    if device.type == "cpu":
        print(
            "\nNo GPU in use: validating on the CPU (Triton kernels in the interpreter, CUDA kernels through "
            "their host entry points)."
        )
    print(f"\nValidation against the eager reference on {device.type}:")
    torch.manual_seed(0)
    interactive = sys.stdout.isatty()
    results = validate(device, progress=_show_progress if interactive else None)
    if interactive:
        _show_progress("")
    print(results_table(results) if results else "no kernel can run here (build _C or install triton)")
    failures = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failures)} of {len(results)} validations passed.")
    return 1 if failures or not results else 0

"""MaQD low-bit matmul benchmarks on a GPU: lowbit_linear against cuBLAS and torch._int_mm, the
quantized training step, pack_weight and quantize (the measurements are
``maqd_kernels.bench.quant``; ``python -m maqd_kernels.bench`` runs them with the other families).

    python benchmarks/bench_quant.py [--quick] [--only linear,train,prep] [--bits 2,4] [--out DIR]
    python benchmarks/bench_quant.py --smoke --out DIR      # tiny sizes, proves the script runs

Measures the machine's ceilings, then writes DIR/quant.csv, quant.md and quant.png; default DIR:
benchmarks/results/<gpu>/ (a new temporary folder for --smoke). Exit status 1 when a measurement
failed (it is recorded and the run goes on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from maqd_kernels.bench import common, harness, quant


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.script_parser(__doc__, quant.SECTIONS, "fewer shapes (N=K 8192; M 1, 16, 1024, 8192; bits 2, 4)")
    parser.add_argument(
        "--bits",
        type=lambda text: [int(b) for b in common.comma_subset([str(b) for b in quant.BITS])(text)],
        help="comma-separated weight bit widths out of 1,2,4,8 (default all; 2,4 with --quick)",
    )
    return common.parse_script_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = quant.make_plan(device, args.smoke, args.quick, args.only, bits=args.bits)
    run = "smoke" if plan.smoke else "quick" if args.quick else "default"
    return harness.run_script(
        quant.FAMILY,
        plan,
        quick=args.quick,
        out=args.out,
        results_root=Path(__file__).parent / "results",
        run_label=run,
    )


if __name__ == "__main__":
    sys.exit(main())

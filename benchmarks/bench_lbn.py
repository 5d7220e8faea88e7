"""Layer-Batch Normalization benchmarks on a GPU: LBN training against torch's normalization
layers, and its cost at inference fused into lowbit_linear's epilogue or folded into a Linear (the
measurements are ``maqd_kernels.bench.lbn``; ``python -m maqd_kernels.bench`` runs them with the
other families).

    python benchmarks/bench_lbn.py [--quick] [--only train,infer] [--out DIR]
    python benchmarks/bench_lbn.py --smoke --out DIR      # tiny sizes, proves the script runs

Measures the machine's ceilings, then writes DIR/lbn.csv, lbn.md and lbn.png; default DIR:
benchmarks/results/<gpu>/ (a new temporary folder for --smoke). Exit status 1 when a measurement
failed (it is recorded and the run goes on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from maqd_kernels.bench import common, harness, lbn


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.script_parser(
        __doc__, lbn.SECTIONS, "fewer shapes (train bf16, 3 shapes; infer N=K 8192, W4; fold M 1, 8192)"
    )
    return common.parse_script_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = lbn.make_plan(device, args.smoke, args.quick, args.only)
    run = "smoke" if plan.smoke else "quick" if args.quick else "default"
    return harness.run_script(
        lbn.FAMILY, plan, quick=args.quick, out=args.out, results_root=Path(__file__).parent / "results", run_label=run
    )


if __name__ == "__main__":
    sys.exit(main())

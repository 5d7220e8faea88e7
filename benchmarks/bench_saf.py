"""SAF benchmarks on a GPU: the SAF neuron, the fused saf_linear and the paper's VGG comparison
against OTTT (the measurements are ``maqd_kernels.bench.saf``; ``python -m maqd_kernels.bench``
runs them with the other families).

    python benchmarks/bench_saf.py [--quick] [--full] [--out DIR] [--only neuron,linear,vgg]
    python benchmarks/bench_saf.py --smoke --out DIR      # tiny sizes, proves the script runs

Measures the machine's ceilings, then writes DIR/saf.csv, saf.md and saf.png; default DIR:
benchmarks/results/<gpu>/ (a new temporary folder for --smoke). Exit status 1 when a measurement
failed (it is recorded and the run goes on).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from maqd_kernels.bench import common, harness, saf


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = common.script_parser(__doc__, saf.SECTIONS, "fewer shapes (T 4, 16; N 4M, 16M; bf16), fewer iterations")
    parser.add_argument("--full", action="store_true", help="run the slow peers at every N, not only the smallest")
    return common.parse_script_arguments(parser, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plan = saf.make_plan(device, args.smoke, args.quick, args.only, full=args.full)
    run = "smoke" if plan.smoke else ("quick" if args.quick else "default") + (" + full peers" if plan.full else "")
    return harness.run_script(
        saf.FAMILY, plan, quick=args.quick, out=args.out, results_root=Path(__file__).parent / "results", run_label=run
    )


if __name__ == "__main__":
    sys.exit(main())

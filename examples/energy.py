"""The energy/accuracy trade-off of the spiking synaptic penalty on real data.

    python examples/energy.py                       # both datasets, six penalty weights (about 3 min on 2 CPU cores)
    python examples/energy.py --quick               # a third of the epochs
    python examples/energy.py --smoke --out DIR     # tiny subsets, one epoch: proves it runs (CI)
    python examples/energy.py --datasets digits --weights 0,1e-5 --epochs 5

For each dataset (``examples.data``) and each penalty weight lambda it trains the SAF-E network of
``examples.models.saf_mlp`` (T = 4) with loss = cross-entropy + lambda * Omega, Omega the synaptic
operations per sample (``maqd_kernels.synaptic_penalty``; Suetake et al., arXiv 2302.01500), and
measures with ``maqd_kernels.energy_report`` on the test set: accuracy, spikes and synaptic
operations per sample, and their energy (0.9 pJ per spike-driven accumulate). The first layer reads
the image as a dense current: its multiply-accumulates (4.6 pJ each) do not depend on the spikes,
and are reported separately.

Runs on CUDA when available, else on the CPU. Writes OUT/energy.md (the table and the run's
settings), OUT/energy.csv and OUT/energy.png (accuracy against synaptic energy, one panel per
dataset); default OUT: examples/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: examples/ is on the path, the checkout is not
    sys.path.insert(0, str(ROOT))

from examples import data as datasets  # noqa: E402
from examples import models  # noqa: E402
from examples.report import figure_file, markdown_table, provenance, text_table, write_csv  # noqa: E402
from examples.run_all import HIDDEN, SMOKE_SIZES, choices, epochs_for  # noqa: E402
from examples.train import BATCH_SIZE, LR, accuracy, fit  # noqa: E402
from maqd_kernels import energy_report, synaptic_penalty  # noqa: E402

STEPS = 4
WEIGHTS = (0.0, 1e-6, 3e-6, 1e-5, 3e-5, 1e-4)
COLUMNS = (
    "dataset",
    "lambda",
    "test acc %",
    "hidden spikes/sample",
    "firing rate %",
    "synaptic ops/sample",
    "synaptic energy nJ/sample",
    "vs lambda=0",
    "first-layer MAC nJ/sample",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(datasets.DATASETS), help="comma-separated: digits,mnist")
    parser.add_argument(
        "--weights", default=",".join(map(str, WEIGHTS)), help="comma-separated penalty weights lambda >= 0"
    )
    parser.add_argument("--epochs", type=int, help="epochs for every dataset (default: as examples/run_all.py)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a third of the default epochs")
    mode.add_argument("--smoke", action="store_true", help="tiny subsets, one epoch (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.datasets = choices(parser, "--datasets", args.datasets, datasets.DATASETS)
    try:
        args.weights = sorted({float(w) for w in args.weights.split(",") if w.strip()})
    except ValueError:
        parser.error(f"--weights: numbers expected; got {args.weights!r}")
    if not args.weights or min(args.weights) < 0:
        parser.error("--weights: give one or more weights >= 0")
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def run(args: argparse.Namespace, device: torch.device) -> list[list[str]]:
    """Trains one network per dataset and weight; returns the table's rows."""
    rows = []
    for name in args.datasets:
        data = datasets.load(name, **(SMOKE_SIZES if args.smoke else {})).to(device)
        epochs = epochs_for(name, args)
        baseline = None  # the unpenalized network's synaptic energy, when weight 0 is in the sweep
        for weight in args.weights:
            torch.manual_seed(args.seed)  # every weight starts from the same initialisation
            model = models.saf_mlp(data.features, HIDDEN[name], data.classes, mode="saf_e", steps=STEPS).to(device)
            fit(model, data, epochs=epochs, seed=args.seed, penalty=lambda m, w=weight: synaptic_penalty(m, w))
            report = energy_report(model, data.x_test)
            spiking = [layer for layer in report.layers if layer.kind == "AC"]
            dense = [layer for layer in report.layers if layer.kind == "MAC"]
            spikes = sum(layer.spikes for layer in spiking) / report.samples
            hidden_neurons = 2 * HIDDEN[name] * STEPS
            synaptic_joules = sum(layer.joules for layer in spiking) / report.samples
            if weight == 0:
                baseline = synaptic_joules
            rows.append(
                [
                    name,
                    f"{weight:g}",
                    f"{100 * accuracy(model, data.x_test, data.y_test):.2f}",
                    f"{spikes:.1f}",
                    f"{100 * spikes / hidden_neurons:.2f}",
                    f"{report.synaptic_operations / report.samples:.0f}",
                    f"{1e9 * synaptic_joules:.3f}",
                    f"{synaptic_joules / baseline:.2f}x" if baseline else "-",
                    f"{1e9 * sum(layer.joules for layer in dense) / report.samples:.2f}",
                ]
            )
            print(text_table(COLUMNS, rows[-1:]).splitlines()[-1], flush=True)
    return rows


def write_markdown(path: Path, rows: list[list[str]], args: argparse.Namespace, device: torch.device, wall: float):
    settings = {
        "command": " ".join(["python examples/energy.py", *args.argv]),
        **provenance(device),
        "model": f"examples.models.saf_mlp, SAF-E, T = {STEPS}, hidden "
        + ", ".join(f"{d} {HIDDEN[d]}" for d in args.datasets),
        "epochs": ", ".join(f"{d} {epochs_for(d, args)}" for d in args.datasets),
        "training": f"Adam, lr {LR:g} with cosine decay, batch {BATCH_SIZE}; loss = mean per-step "
        "cross-entropy + lambda * synaptic operations per sample",
        "energy": "0.9 pJ per spike-driven accumulate, 4.6 pJ per first-layer multiply-accumulate",
        "seed": str(args.seed),
        "wall time": f"{wall:.0f} s",
    }
    text = [
        "# The synaptic penalty: energy against accuracy",
        "",
        "Generated by `examples/energy.py`. Each row is one SAF-E network trained with the spiking synaptic",
        "penalty lambda * Omega (Suetake et al., arXiv 2302.01500), Omega = sum over layers of fan-out times",
        "spikes, per sample. Measured on the test set by `maqd_kernels.energy_report`: *hidden spikes*: spikes",
        "of both hidden layers over all steps; *firing rate*: their fraction of (neurons x steps); *synaptic",
        "ops*: the accumulates those spikes cause downstream (spikes x fan-out); *synaptic energy*: at 0.9 pJ",
        "each; *vs lambda=0*: that energy relative to the unpenalized network. The first layer reads the",
        "image as a dense current, so its multiply-accumulates do not depend on the penalty.",
        "",
        markdown_table(COLUMNS, rows),
        "",
        "## Settings",
        "",
        *(f"- {key}: {value}" for key, value in settings.items()),
        "",
        "![energy against accuracy](energy.png)",
        "",
    ]
    path.write_text("\n".join(text))


def write_plot(path: Path, rows: list[list[str]]) -> None:
    """Test accuracy against synaptic energy per sample, one point per weight, one panel per dataset."""
    names = list(dict.fromkeys(row[0] for row in rows))
    with figure_file(path, 1, len(names), (6 * len(names), 4.2)) as axes:
        for axis, name in zip(axes[0], names):
            mine = [row for row in rows if row[0] == name]
            energy = [float(row[6]) for row in mine]
            acc = [float(row[2]) for row in mine]
            axis.plot(energy, acc, marker="o")
            labels: dict[tuple[float, float], list[str]] = {}  # weights that silenced every neuron share a point
            for row, point in zip(mine, zip(energy, acc)):
                labels.setdefault(point, []).append(row[1])
            for point, weights in labels.items():
                axis.annotate("λ=" + ", ".join(weights), point, textcoords="offset points", xytext=(4, 4), fontsize=8)
            axis.set(
                title=f"{name}: SAF-E, T = {STEPS}", xlabel="synaptic energy per sample (nJ)", ylabel="test accuracy %"
            )
            axis.grid(alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    rows = run(args, device)
    wall = time.perf_counter() - started
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "energy.md", rows, args, device, wall)
    write_csv(args.out / "energy.csv", COLUMNS, rows)
    write_plot(args.out / "energy.png", rows)
    print()
    print(text_table(COLUMNS, rows))
    print(f"\n{len(rows)} networks in {wall:.0f} s on {device}; wrote energy.md, .csv, .png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

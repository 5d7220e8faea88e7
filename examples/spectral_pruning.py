"""Spectral pruning of an RNN classifier against magnitude pruning, on real images read row by row.

    python examples/spectral_pruning.py                 # MNIST, 128 hidden units (about 1 min on one CPU core)
    python examples/spectral_pruning.py --quick         # fewer epochs
    python examples/spectral_pruning.py --smoke --out DIR   # tiny subsets, one epoch: proves it runs (CI)
    python examples/spectral_pruning.py --dataset digits

A tanh ``nn.RNN`` reads each image one row per step (MNIST: 28 steps of 28 pixels; digits: 8 of 8)
and a linear readout classifies its last hidden state. After a short Adam training
(``examples.train.fit``), the RNN and readout are pruned to 12.5%, 25%, 50% and 75% of their hidden units
by ``maqd_kernels.spectral_prune_rnn`` (Furuya et al., AISTATS 2022; calibrated on training images)
and by ``maqd_kernels.magnitude_prune_rnn`` (the largest outgoing weights, no reconstruction). For
each it reports the test accuracy, the relative error of the pruned network's own hidden states
against the full network's kept units over every step of the test images
(``maqd_kernels.prune.pruning_error``), and the relative error of the last step's logits. Neither
pruned network is fine-tuned.

Writes OUT/spectral_pruning.md (table and settings), OUT/spectral_pruning.csv and
OUT/spectral_pruning.png (accuracy and errors against the kept fraction, and the hidden-state error
per step at the middle fraction); default OUT: examples/results/.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: examples/ is on the path, the checkout is not
    sys.path.insert(0, str(ROOT))

from examples import data as datasets  # noqa: E402
from examples.report import figure_file, markdown_table, provenance, text_table, write_csv  # noqa: E402
from examples.train import BATCH_SIZE, accuracy, fit, outputs_of  # noqa: E402
from maqd_kernels import magnitude_prune_rnn, spectral_prune_rnn  # noqa: E402
from maqd_kernels.prune import DEFAULT_RIDGE, PrunedRNN, PruningError, pruning_error  # noqa: E402

HIDDEN = 128
SMOKE_HIDDEN = 32
EPOCHS = 20  # the default run; --quick runs a third, --smoke one
# A tanh RNN learns these sequences faster than fit's default learning rate allows, and is stable at this one.
RNN_LR = 5e-3
KEEP_FRACTIONS = (0.125, 0.25, 0.5, 0.75)
CALIBRATION_IMAGES = 1000  # training images whose hidden states form the covariance
SMOKE_SIZES = {"train_size": 200, "test_size": 100}
METHODS = ("spectral", "magnitude")


class RowRNNClassifier(nn.Module):
    """Flat images (B, side * side) -> (B, classes) logits: a tanh RNN reads one row of `side`
    pixels per step and a linear readout classifies the last hidden state."""

    def __init__(self, side: int, hidden: int, classes: int):
        super().__init__()
        self.side = side
        self.rnn = nn.RNN(side, hidden, batch_first=True)
        self.readout = nn.Linear(hidden, classes)

    def rows(self, images: torch.Tensor) -> torch.Tensor:
        """(B, side * side) -> (B, side, side): the RNN's batch-first input sequence."""
        return images.reshape(len(images), self.side, self.side)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.readout(self.rnn(self.rows(images))[0][:, -1])

    @classmethod
    def pruned(cls, model: RowRNNClassifier, result: PrunedRNN) -> RowRNNClassifier:
        """The classifier made of a pruned RNN and readout."""
        classifier = cls(model.side, result.rnn.hidden_size, result.readout.out_features)
        classifier.rnn, classifier.readout = result.rnn, result.readout
        return classifier


@dataclass
class Row:
    method: str
    keep: int
    accuracy: float
    errors: PruningError | None  # None for the full network
    logit_error: float
    calibration_error: float | None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="mnist", choices=datasets.DATASETS)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a third of the default epochs")
    mode.add_argument("--smoke", action="store_true", help=f"tiny subsets, {SMOKE_HIDDEN} hidden units, one epoch")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.epochs = 1 if args.smoke else max(1, EPOCHS // 3) if args.quick else EPOCHS
    args.hidden = SMOKE_HIDDEN if args.smoke else HIDDEN
    return args


def relative_error(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return ((approximation - reference).square().sum() / reference.square().sum()).item()


def run(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """Trains the classifier, prunes it with both methods at every fraction and evaluates each;
    returns the rows, the full network's first."""
    data = datasets.load(args.dataset, **(SMOKE_SIZES if args.smoke else {})).to(device)
    torch.manual_seed(args.seed)
    model = RowRNNClassifier(data.side, args.hidden, data.classes).to(device)
    history = fit(model, data, epochs=args.epochs, lr=RNN_LR, seed=args.seed)
    print(f"trained {args.epochs} epochs in {history.train_seconds:.1f} s: test {100 * history.test_accuracy[-1]:.1f}%")

    calibration = model.rows(data.x_train[:CALIBRATION_IMAGES])
    test_rows = model.rows(data.x_test)
    full_logits = outputs_of(model, data.x_test)
    rows = [Row("full", args.hidden, accuracy(model, data.x_test, data.y_test), None, 0.0, None)]
    for fraction in KEEP_FRACTIONS:
        keep = max(1, round(fraction * args.hidden))
        for method in METHODS:
            if method == "spectral":
                result = spectral_prune_rnn(model.rnn, calibration, keep, readout=model.readout)
            else:
                result = magnitude_prune_rnn(model.rnn, keep, readout=model.readout)
            pruned = RowRNNClassifier.pruned(model, result)
            row = Row(
                method,
                keep,
                accuracy(pruned, data.x_test, data.y_test),
                pruning_error(model.rnn, result, test_rows, readout=model.readout),
                relative_error(full_logits, outputs_of(pruned, data.x_test)),
                result.reconstruction_error,
            )
            rows.append(row)
            print(
                f"keep {keep:3} {method:9}  test {100 * row.accuracy:5.1f}%  hidden error {row.errors.hidden:.3e}  "
                f"last-step logit error {row.logit_error:.3e}",
                flush=True,
            )
    return rows


COLUMNS = (
    "method",
    "kept units",
    "kept %",
    "test acc %",
    "hidden error",
    "last-step hidden error",
    "last-step logit error",
    "calibration error",
)


def table_rows(rows: list[Row], hidden: int) -> list[list[str]]:
    return [
        [
            r.method,
            str(r.keep),
            f"{100 * r.keep / hidden:g}",
            f"{100 * r.accuracy:.2f}",
            "-" if r.errors is None else f"{r.errors.hidden:.3e}",
            "-" if r.errors is None else f"{r.errors.hidden_per_step[-1].item():.3e}",
            "-" if r.errors is None else f"{r.logit_error:.3e}",
            "-" if r.calibration_error is None else f"{r.calibration_error:.3e}",
        ]
        for r in rows
    ]


def write_markdown(path: Path, table: list[list[str]], args: argparse.Namespace, device: torch.device, wall: float):
    settings = {
        "command": " ".join(["python examples/spectral_pruning.py", *args.argv]),
        **provenance(device),
        "dataset": f"{args.dataset}, read row by row"
        + (f"; smoke subsets {SMOKE_SIZES}" if args.smoke else "")
        + f"; split stratified {100 - 100 * datasets.TEST_FRACTION:.0f}/{100 * datasets.TEST_FRACTION:.0f}, "
        f"seed {datasets.SPLIT_SEED}",
        "model": f"nn.RNN(tanh, {args.hidden} hidden units) -> Linear on the last hidden state",
        "training": f"{args.epochs} epochs of Adam, lr {RNN_LR:g} with cosine decay, batch {BATCH_SIZE}, cross-entropy",
        "calibration": f"the first {CALIBRATION_IMAGES} training images, every step; ridge {DEFAULT_RIDGE:g} (default)",
        "seed": str(args.seed),
        "wall time": f"{wall:.0f} s",
    }
    text = [
        "# Spectral pruning of an RNN classifier against magnitude pruning",
        "",
        "Generated by `examples/spectral_pruning.py`. Both methods prune the trained RNN and its readout",
        "to the same number of hidden units, without fine-tuning. *hidden error*: the relative squared",
        "error of the pruned network's own hidden states against the full network's kept units, over",
        "every step of the test images (errors feed back through the recurrence); *last-step*: the same",
        "at the last step, which the readout classifies, and for the logits; *calibration error*:",
        "spectral pruning's one-step reconstruction error `||H - H_J Aᵀ||² / ||H||²` on the",
        "calibration images.",
        "",
        markdown_table(COLUMNS, table),
        "",
        "## Settings",
        "",
        *(f"- {key}: {value}" for key, value in settings.items()),
        "",
        "![accuracy and errors against the kept fraction](spectral_pruning.png)",
        "",
    ]
    path.write_text("\n".join(text))


def write_plot(path: Path, rows: list[Row], hidden: int) -> None:
    """Accuracy and hidden-state error against the kept fraction, and the error per step at the
    middle fraction."""
    full = rows[0]
    middle = round(KEEP_FRACTIONS[len(KEEP_FRACTIONS) // 2] * hidden)
    with figure_file(path, 1, 3, (15, 4.2)) as axes:
        acc_axis, error_axis, step_axis = axes[0]
        for method, marker, color in zip(METHODS, "os", ("C0", "C1")):
            chosen = [r for r in rows if r.method == method]
            kept = [100 * r.keep / hidden for r in chosen]
            style = {"marker": marker, "color": color}
            acc_axis.plot(kept, [100 * r.accuracy for r in chosen], label=method, **style)
            error_axis.plot(kept, [r.errors.hidden for r in chosen], label=f"{method}: hidden, all steps", **style)
            error_axis.plot(kept, [r.logit_error for r in chosen], "--", label=f"{method}: last-step logits", **style)
            at_middle = next(r for r in chosen if r.keep == middle)
            steps = range(1, len(at_middle.errors.hidden_per_step) + 1)
            step_axis.plot(steps, at_middle.errors.hidden_per_step.tolist(), label=method, **style)
        acc_axis.axhline(100 * full.accuracy, color="grey", linestyle=":", label=f"full ({hidden} units)")
        acc_axis.set(title="test accuracy", xlabel="kept hidden units %", ylabel="%")
        error_axis.set(title="relative error, test images", xlabel="kept hidden units %", yscale="log")
        step_axis.set(title=f"hidden-state error per step, {middle} units kept", xlabel="step (row)")
        step_axis.set_yscale("log", nonpositive="mask")  # the first step is exact (error 0) from a zero state
        for axis in (acc_axis, error_axis, step_axis):
            axis.grid(alpha=0.3)
            axis.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Each RNN step multiplies (64, 128) matrices: handing them to a thread pool costs more than
        # it saves (an MNIST epoch: 1.3 s on one thread, 8 s on two busy cores).
        torch.set_num_threads(1)
    started = time.perf_counter()
    rows = run(args, device)
    wall = time.perf_counter() - started

    table = table_rows(rows, args.hidden)
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "spectral_pruning.md", table, args, device, wall)
    write_csv(args.out / "spectral_pruning.csv", COLUMNS, table)
    write_plot(args.out / "spectral_pruning.png", rows, args.hidden)
    print()
    print(text_table(COLUMNS, table))
    print(f"\n{wall:.0f} s on {device}; wrote spectral_pruning.md, .csv, .png in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Per-layer weight bits on real data: uniform widths against sensitivity- and kurtosis-driven
allocations (SensiBoost / KurtBoost) at equal total weight memory.

    python examples/bit_allocation.py                  # digits and MNIST, 3 seeds (about 75 s on a 2-core CPU)
    python examples/bit_allocation.py --quick          # fewer epochs
    python examples/bit_allocation.py --smoke --out DIR  # tiny subsets, one epoch: proves it runs (CI)
    python examples/bit_allocation.py --datasets digits --seed 3

For each dataset (``examples.data``) and each of 3 seeds it pretrains a MaQD MLP with three
QuantLinear -> LayerBatchNorm -> QuantAct(4-bit) blocks at 8-bit weights (near float: their
output error is about 1e-4 of the output's power), then reads each layer's weight kurtosis and its
output sensitivity at 2 bits on 256 training images (``maqd_kernels.weight_kurtosis``,
``layer_sensitivity``; Zhang et al., arXiv 2503.06518). The budget is the weight memory of uniform
3-bit weights; ``maqd_kernels.allocate_bits`` spends it from a 2-bit base on the layers with the
highest score, with widths 2, 4 or 8. Every allocation (and uniform 2, 3 and 4 bits for reference)
starts from the same pretrained weights, is evaluated as is (post-training quantization, with the
pretraining's LBN statistics) and after the same few epochs of quantization-aware fine-tuning.

Runs on CUDA when available, else on the CPU. Writes OUT/bit_allocation.md (tables, verdict and
settings), OUT/bit_allocation.csv (one row per dataset and allocation) and OUT/bit_allocation.png;
default OUT: examples/results/.
"""

from __future__ import annotations

import argparse
import copy
import statistics
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
from examples.models import PIXEL_BITS  # noqa: E402
from examples.report import figure_file, markdown_table, provenance, text_table, write_csv  # noqa: E402
from examples.run_all import SMOKE_SIZES, choices  # noqa: E402
from examples.train import BATCH_SIZE, accuracy, fit  # noqa: E402
from maqd_kernels import (  # noqa: E402
    LayerBitBudget,
    allocate_bits,
    apply_bits,
    bit_budget,
    layer_sensitivity,
    weight_kurtosis,
)
from maqd_kernels import nn as mnn  # noqa: E402

HIDDEN = {"digits": (128, 128, 64), "mnist": (256, 128, 128)}
ACT_BITS = 4
PRETRAIN_BITS = 8
BUDGET_BITS = 3  # the budget: every layer at this width
WIDTHS = (2, 4, 8)  # what the allocator may choose, from a base of the smallest
UNIFORM = (2, 3, 4)
SEEDS = 3
CALIBRATION_IMAGES = 256
# (pretraining, fine-tuning) epochs per dataset; --quick halves them, --smoke runs (1, 1).
EPOCHS = {"digits": (12, 3), "mnist": (6, 2)}
FINETUNE_LR = 5e-4  # Adam with a cosine decay, as examples/train.py; a quarter of its pretraining rate
ALLOCATIONS = tuple(f"uniform-{b}" for b in UNIFORM) + ("sensitivity", "kurtosis")
COLUMNS = (
    "dataset",
    "allocation",
    "bits per layer",
    "memory bits",
    "avg bits",
    "PTQ acc % mean",
    "test acc % mean",
    "test acc % std",
    "test acc % per seed",
)


def maqd_deep_mlp(features: int, hidden: tuple[int, ...], classes: int, *, weight_bits: int) -> nn.Sequential:
    """``examples.models.maqd_mlp`` with one QuantLinear -> LayerBatchNorm -> QuantAct block per
    entry of `hidden`: 8-bit input codes, `ACT_BITS`-bit activations, a float classifier."""
    layers: list[nn.Module] = [mnn.QuantAct(PIXEL_BITS, scale=1.0 / (2**PIXEL_BITS - 1))]
    for inputs, outputs in zip((features, *hidden), hidden):
        layers += [
            mnn.QuantLinear(inputs, outputs, weight_bits=weight_bits),
            mnn.LayerBatchNorm(outputs),
            mnn.QuantAct(ACT_BITS),
        ]
    return nn.Sequential(*layers, nn.Linear(hidden[-1], classes))


@dataclass
class Trial:
    """One allocation of one seed: its bits per layer, weight memory, and test accuracies in [0, 1]
    before (post-training quantization) and after fine-tuning."""

    allocation: dict[str, int]
    memory_bits: int
    ptq_accuracy: float
    accuracy: float


@dataclass
class SeedRun:
    """One seed on one dataset: the pretrained model's accuracy and per-layer scores, and each
    allocation's trial."""

    seed: int
    pretrained_accuracy: float
    kurtosis: dict[str, float]
    sensitivity: dict[str, float]
    trials: dict[str, Trial]


@dataclass
class DatasetResult:
    """Every seed's run on one dataset of `test_images` test images; `layers`: the model's
    ``bit_budget`` rows (names, weights, B_s)."""

    name: str
    test_images: int
    layers: list[LayerBitBudget]
    runs: list[SeedRun]

    @property
    def weights(self) -> int:
        return sum(layer.weights for layer in self.layers)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(datasets.DATASETS), help="comma-separated: digits,mnist")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="half the default epochs")
    mode.add_argument("--smoke", action="store_true", help="tiny subsets, one epoch each (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "results")
    parser.add_argument("--seed", type=int, default=0, help=f"the first of {SEEDS} consecutive seeds")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.datasets = choices(parser, "--datasets", args.datasets, datasets.DATASETS)
    return args


def epochs_for(dataset: str, args: argparse.Namespace) -> tuple[int, int]:
    """(pretraining, fine-tuning) epochs."""
    if args.smoke:
        return 1, 1
    pretrain, finetune = EPOCHS[dataset]
    return (max(1, pretrain // 2), max(1, finetune // 2)) if args.quick else (pretrain, finetune)


def seed_count(args: argparse.Namespace) -> int:
    """SEEDS, or 2 for a smoke run (the fewest with a spread)."""
    return 2 if args.smoke else SEEDS


def allocations_for(model: nn.Module, calibration: torch.Tensor) -> dict[str, dict[str, int]]:
    """Every compared allocation of `model`'s quantized layers, none above the uniform-3 memory."""
    layers = bit_budget(model)
    budget = BUDGET_BITS * sum(layer.weights for layer in layers)
    allocations = {f"uniform-{bits}": {layer.name: bits for layer in layers} for bits in UNIFORM}
    allocations["sensitivity"] = allocate_bits(model, budget, choices=WIDTHS, calibration_inputs=calibration)
    allocations["kurtosis"] = allocate_bits(model, budget, choices=WIDTHS, score="kurtosis")
    return allocations


def run_seed(data: datasets.Dataset, seed: int, epochs: tuple[int, int]) -> SeedRun:
    """Pretrains at 8-bit weights, scores the layers, and fine-tunes every allocation from there."""
    torch.manual_seed(seed)
    pretrained = maqd_deep_mlp(data.features, HIDDEN[data.name], data.classes, weight_bits=PRETRAIN_BITS)
    fit(pretrained.to(data.x_train.device), data, epochs=epochs[0], seed=seed)
    picks = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed))[:CALIBRATION_IMAGES]
    calibration = data.x_train[picks.to(data.x_train.device)]
    trials = {}
    for name, allocation in allocations_for(pretrained, calibration).items():
        model = apply_bits(copy.deepcopy(pretrained), allocation)
        ptq_accuracy = accuracy(model, data.x_test, data.y_test)
        history = fit(model, data, epochs=epochs[1], lr=FINETUNE_LR, seed=seed)
        memory = sum(layer.weight_memory_bits for layer in bit_budget(model))
        trials[name] = Trial(allocation, memory, ptq_accuracy, history.test_accuracy[-1])
    return SeedRun(
        seed,
        pretrained_accuracy=accuracy(pretrained, data.x_test, data.y_test),
        kurtosis=weight_kurtosis(pretrained),
        sensitivity=layer_sensitivity(pretrained, calibration, bits=WIDTHS[0]),
        trials=trials,
    )


def run(args: argparse.Namespace, device: torch.device) -> list[DatasetResult]:
    results = []
    for name in args.datasets:
        data = datasets.load(name, **(SMOKE_SIZES if args.smoke else {})).to(device)
        epochs = epochs_for(name, args)
        layers = bit_budget(maqd_deep_mlp(data.features, HIDDEN[name], data.classes, weight_bits=BUDGET_BITS))
        result = DatasetResult(name, len(data.y_test), layers, [])
        for seed in range(args.seed, args.seed + seed_count(args)):
            started = time.perf_counter()
            result.runs.append(run_seed(data, seed, epochs))
            shown = "  ".join(f"{a} {100 * t.accuracy:5.1f}%" for a, t in result.runs[-1].trials.items())
            print(f"{name:7} seed {seed}  {shown}  ({time.perf_counter() - started:.0f} s)", flush=True)
        results.append(result)
    return results


def _bits_text(result: DatasetResult, allocation: str) -> str:
    """The per-layer bits, "2/4/8"; the distinct ones comma-separated when seeds chose differently."""
    chosen = ["/".join(map(str, run.trials[allocation].allocation.values())) for run in result.runs]
    return ", ".join(dict.fromkeys(chosen))


def _accuracies(result: DatasetResult, allocation: str, *, ptq: bool = False) -> list[float]:
    """Per seed, in %: after fine-tuning, or before it (post-training quantization) when `ptq`."""
    return [
        100 * (run.trials[allocation].ptq_accuracy if ptq else run.trials[allocation].accuracy) for run in result.runs
    ]


def table_rows(results: list[DatasetResult]) -> list[list[str]]:
    rows = []
    for result in results:
        for name in ALLOCATIONS:
            trials = [run.trials[name] for run in result.runs]
            accuracies = _accuracies(result, name)
            memory = max(t.memory_bits for t in trials)
            rows.append(
                [
                    result.name,
                    name,
                    _bits_text(result, name),
                    str(memory),
                    f"{memory / result.weights:.2f}",
                    f"{statistics.mean(100 * t.ptq_accuracy for t in trials):.2f}",
                    f"{statistics.mean(accuracies):.2f}",
                    f"{statistics.stdev(accuracies):.2f}",
                    "/".join(f"{a:.1f}" for a in accuracies),
                ]
            )
    return rows


def verdicts(results: list[DatasetResult]) -> list[str]:
    """Per dataset, score and stage (before and after fine-tuning): the accuracy against uniform
    3-bit, seed by seed."""
    lines = []
    for result in results:
        lines.append(f"- {result.name}: one test image is {100 / result.test_images:.2f} points.")
        for ptq, stage in ((True, "before fine-tuning"), (False, "after fine-tuning")):
            uniform = _accuracies(result, f"uniform-{BUDGET_BITS}", ptq=ptq)
            for score in ("sensitivity", "kurtosis"):
                differences = [a - u for a, u in zip(_accuracies(result, score, ptq=ptq), uniform)]
                if all(d > 0 for d in differences):
                    outcome = "better than uniform on every seed"
                elif all(d < 0 for d in differences):
                    outcome = "worse than uniform on every seed"
                else:
                    outcome = "no consistent difference (mixed or tied across seeds)"
                lines.append(
                    f"  - {score}, {stage}: {statistics.mean(differences):+.2f} points against "
                    f"uniform-{BUDGET_BITS} (per seed {', '.join(f'{d:+.1f}' for d in differences)}): {outcome}."
                )
    return lines


def layer_table(result: DatasetResult) -> list[str]:
    """The first seed's per-layer scores and bits, with each allocation's bit budget T x B_w x B_s."""
    run = result.runs[0]
    columns = ("layer", "weights", "B_s", "kurtosis", f"sensitivity @{WIDTHS[0]} bits")
    compared = (f"uniform-{BUDGET_BITS}", "sensitivity", "kurtosis")
    rows = []
    for layer in result.layers:
        cells = [
            layer.name,
            str(layer.weights),
            str(layer.input_bits),
            f"{run.kurtosis[layer.name]:.2f}",
            f"{run.sensitivity[layer.name]:.3f}",
        ]
        for name in compared:
            bits = run.trials[name].allocation[layer.name]
            cells.append(f"{bits} ({layer.steps * bits * layer.input_bits})")
        rows.append(cells)
    return [
        f"### {result.name}: per layer (seed {run.seed}; pretrained at W{PRETRAIN_BITS}: "
        f"{100 * run.pretrained_accuracy:.2f}% test accuracy)",
        "",
        markdown_table((*columns, *(f"{name} bits (budget)" for name in compared)), rows),
        "",
    ]


def write_markdown(path: Path, results: list[DatasetResult], rows, args, device: torch.device, wall: float) -> None:
    settings = {
        "command": " ".join(["python examples/bit_allocation.py", *args.argv]),
        **provenance(device),
        "model": f"MaQD MLP, hidden {', '.join(f'{r.name} {HIDDEN[r.name]}' for r in results)}, "
        f"{ACT_BITS}-bit activations, {PIXEL_BITS}-bit input codes, float classifier",
        "epochs (pretrain, fine-tune)": ", ".join(f"{r.name} {epochs_for(r.name, args)}" for r in results),
        "training": f"Adam, batch {BATCH_SIZE}, cosine decay; pretraining at W{PRETRAIN_BITS} with examples/train.py's "
        f"rate, fine-tuning at {FINETUNE_LR:g}",
        "calibration": f"{CALIBRATION_IMAGES} training images per seed (all of a smaller training set)",
        "seeds": f"{args.seed}..{args.seed + seed_count(args) - 1}",
        "split": f"stratified {100 - 100 * datasets.TEST_FRACTION:.0f}/{100 * datasets.TEST_FRACTION:.0f}, "
        f"seed {datasets.SPLIT_SEED}" + (f"; smoke subsets {SMOKE_SIZES}" if args.smoke else ""),
        "wall time": f"{wall:.0f} s",
    }
    text = [
        "# Per-layer weight bits: uniform against sensitivity and kurtosis allocation",
        "",
        "Generated by `examples/bit_allocation.py`. The budget is the weight memory of uniform",
        f"{BUDGET_BITS}-bit weights; `allocate_bits` starts every quantized layer at {WIDTHS[0]} bits and raises",
        f"the layers with the highest score to {' or '.join(map(str, WIDTHS[1:]))} bits while the total stays",
        f"within it (*sensitivity*: the layer's relative output error at {WIDTHS[0]} bits on calibration images,",
        "as SensiBoost; *kurtosis*: of its standardized weights, as KurtBoost; Zhang et al., arXiv 2503.06518).",
        f"Uniform {UNIFORM[0]} and {UNIFORM[-1]} bits bracket the budget. Every row of a seed starts from the",
        f"same W{PRETRAIN_BITS}-pretrained weights. *bits per layer*: the quantized layers in order (several",
        "when seeds chose differently); *memory bits*: weights x bits (the largest over seeds), which can",
        "stay below the budget when the next step of a large layer does not fit; *PTQ acc*: the accuracy",
        "with the new bits before fine-tuning (mean over seeds); *test acc*: after fine-tuning, mean,",
        "sample standard deviation and each seed's.",
        "",
        markdown_table(COLUMNS, rows),
        "",
        "## Verdict",
        "",
        *verdicts(results),
        "",
        "## Per layer",
        "",
        "*B_s*: the bits of the activations the layer reads (8-bit input codes, then the 4-bit QuantAct);",
        "*budget*: the bit budget T x B_w x B_s of Yao et al. (T = 1 here).",
        "",
        *(line for result in results for line in layer_table(result)),
        "## Settings",
        "",
        *(f"- {key}: {value}" for key, value in settings.items()),
        "",
        "![accuracy and bits per layer](bit_allocation.png)",
        "",
    ]
    path.write_text("\n".join(text))


def write_plot(path: Path, results: list[DatasetResult]) -> None:
    """Per dataset: fine-tuned accuracy per allocation (mean, spread, seeds; PTQ as open circles)
    and the first seed's bits per layer for the allocations at the budget."""
    with figure_file(path, len(results), 2, (12, 4.2 * len(results))) as axes:
        for (accuracy_axis, bits_axis), result in zip(axes, results):
            for x, name in enumerate(ALLOCATIONS):
                accuracies = _accuracies(result, name)
                ptq = [100 * run.trials[name].ptq_accuracy for run in result.runs]
                accuracy_axis.bar(
                    x, statistics.mean(accuracies), yerr=statistics.stdev(accuracies), capsize=4, alpha=0.6
                )
                accuracy_axis.plot([x] * len(accuracies), accuracies, "k.")
                accuracy_axis.plot([x] * len(ptq), ptq, "o", mfc="none", color="tab:red")
            accuracy_axis.set_xticks(range(len(ALLOCATIONS)), ALLOCATIONS, rotation=15)
            low = min(
                min(_accuracies(result, n) + [100 * r.trials[n].ptq_accuracy for r in result.runs]) for n in ALLOCATIONS
            )
            accuracy_axis.set(title=f"{result.name}: test accuracy (bars: fine-tuned; red: PTQ)", ylabel="%")
            accuracy_axis.set_ylim(max(0.0, low - 5), 100)
            compared = (f"uniform-{BUDGET_BITS}", "sensitivity", "kurtosis")
            width = 0.8 / len(compared)
            for i, name in enumerate(compared):
                bits = [result.runs[0].trials[name].allocation[layer.name] for layer in result.layers]
                positions = [j + (i - (len(compared) - 1) / 2) * width for j in range(len(result.layers))]
                bits_axis.bar(positions, bits, width, label=name)
            bits_axis.set_xticks(
                range(len(result.layers)), [f"{layer.name}\n{layer.weights} weights" for layer in result.layers]
            )
            bits_axis.set(title=f"{result.name}: weight bits per layer (seed {result.runs[0].seed})", ylabel="bits")
            bits_axis.legend(fontsize=8)
            for axis in (accuracy_axis, bits_axis):
                axis.grid(alpha=0.3, axis="y")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        # Matmuls this small gain nothing from intra-op threads, and on shared cores waiting for a
        # descheduled thread made each step up to 20x slower (measured on the 2-core CI machine).
        torch.set_num_threads(1)
    started = time.perf_counter()
    results = run(args, device)
    wall = time.perf_counter() - started

    rows = table_rows(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "bit_allocation.md", results, rows, args, device, wall)
    write_csv(args.out / "bit_allocation.csv", COLUMNS, rows)
    write_plot(args.out / "bit_allocation.png", results)
    print()
    print(text_table(COLUMNS, rows))
    print("\n".join(["", *verdicts(results)]))
    fine_tunings = len(results) * seed_count(args) * len(ALLOCATIONS)
    print(f"\n{fine_tunings} fine-tunings in {wall:.0f} s on {device}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

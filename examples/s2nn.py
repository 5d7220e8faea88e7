"""The single-step spiking network (S2NN) on real data, against a binary and a float network of the same shape.

    python examples/s2nn.py                          # both datasets, four models, three seeds each
    python examples/s2nn.py --quick                  # a third of the epochs
    python examples/s2nn.py --smoke --out DIR        # tiny subsets, one epoch, one seed: proves it runs (CI)
    python examples/s2nn.py --datasets digits --epochs 5 --seed 1 --runs 1

S2NN (Suetake et al., arXiv 2201.10879) passes binary spikes between hidden layers, as an SNN
does, but has no time axis, as a binary network: s = H(u - V), trained with the SNN surrogate
gradient reduced to a single time step. Every model here is Linear -> LayerBatchNorm -> activation,
twice, then a Linear classifier, trained by ``examples.train.fit`` with the same epochs, optimizer
and seeds; only the hidden activation (and its gradient) differs:

- s2nn:         S2NNNeuron, spikes H(u - V), the s2nn surrogate (the paper's neuron);
- s2nn-sigmoid: the same spikes with the multi-step SNN's sigmoid surrogate (the "existing SNN
                neuron" the paper compares against);
- binary-ste:   the same spikes with a binary network's straight-through estimator clipped to
                |u - V| < 1 (the "rectangle" surrogate, alpha = 1/2; its constant factor 1/2 is
                undone by Adam's per-parameter step size); weights stay float, as in the others;
- float-relu:   ``examples.models.float_mlp``, ReLU activations.

For each it reports test accuracy, the hidden layers' activity (the fraction of neurons that spike,
or for ReLU that are non-zero, per test sample), and the hidden layers' synaptic operations per
sample: a spike costs one accumulate (AC) per outgoing synapse, a float activation one
multiply-accumulate (MAC) per synapse, and their energy at 45 nm float32 costs (Horowitz, ISSCC 2014).
Each trained model is also converted with ``maqd_kernels.convert_for_inference`` (the LBNs fold into
the Linears before them) and its test predictions compared with the eval-mode model's.

Writes OUT/s2nn.md (table and settings), OUT/s2nn.csv and OUT/s2nn.png (accuracy against
hidden-layer energy); default OUT: examples/results/. Runs on CUDA when available, else on the CPU.
"""

from __future__ import annotations

import argparse
import statistics
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
from examples.run_all import EPOCHS, HIDDEN, SMOKE_SIZES, choices, epochs_for  # noqa: E402
from examples.train import BATCH_SIZE, LR, check_conversion, fit, outputs_of  # noqa: E402
from maqd_kernels import nn as mnn  # noqa: E402
from maqd_kernels.energy import ENERGY_PER_AC, ENERGY_PER_MAC  # noqa: E402

THRESHOLD = 1.0  # V; the LBN's learned shift moves each layer's pre-activations relative to it
# Seeds per model: the four networks differ by about as much as one network across seeds.
RUNS = 3


@dataclass(frozen=True)
class Model:
    """One compared network: its name, hidden activation and gradient (for the table), whether its
    hidden activations are binary spikes (synapses cost ACs) or floats (MACs), and its builder."""

    name: str
    activation: str
    gradient: str
    spiking: bool
    build: Callable[[datasets.Dataset, int], nn.Module]


def binary_mlp(in_features: int, hidden: int, classes: int, neuron: Callable[[], nn.Module]) -> nn.Sequential:
    """Linear -> LayerBatchNorm -> neuron(), twice, then a Linear classifier: ``float_mlp``'s shape
    with a binary activation."""
    return nn.Sequential(
        nn.Linear(in_features, hidden),
        mnn.LayerBatchNorm(hidden),
        neuron(),
        nn.Linear(hidden, hidden),
        mnn.LayerBatchNorm(hidden),
        neuron(),
        nn.Linear(hidden, classes),
    )


def _spiking(name: str, gradient: str, **neuron) -> Model:
    return Model(
        name,
        activation="H(u - V) spikes",
        gradient=gradient,
        spiking=True,
        build=lambda d, h: binary_mlp(d.features, h, d.classes, lambda: mnn.S2NNNeuron(THRESHOLD, **neuron)),
    )


MODELS = (
    _spiking("s2nn", "s2nn surrogate"),
    _spiking("s2nn-sigmoid", "sigmoid surrogate", surrogate="sigmoid"),
    _spiking("binary-ste", "clipped STE", surrogate="rectangle", alpha=0.5),
    Model(
        "float-relu",
        activation="ReLU",
        gradient="exact",
        spiking=False,
        build=lambda d, h: models.float_mlp(d.features, h, d.classes),
    ),
)


@dataclass
class Activity:
    """Per hidden layer: the mean fraction of its neurons with a non-zero output per sample, and
    its fan-out (outgoing synapses per neuron); `neurons` per layer."""

    active: list[float]
    fan_out: list[int]
    neurons: list[int]

    def synaptic_ops(self, spiking: bool) -> float:
        """Per sample: spikes x fan-out for a spiking network (each spike an AC on every outgoing
        synapse), neurons x fan-out for a float one (a MAC on every synapse, zero or not)."""
        return sum((a if spiking else 1.0) * n * f for a, n, f in zip(self.active, self.neurons, self.fan_out))


def hidden_activity(model: nn.Sequential, images: torch.Tensor) -> Activity:
    """The activity of every hidden activation (S2NNNeuron or ReLU) of `model` on `images`, each
    followed, in the Sequential, by the Linear its outputs feed."""
    layers = list(model)
    hidden = [i for i, m in enumerate(layers) if isinstance(m, (mnn.S2NNNeuron, nn.ReLU))]
    fan_out = [next(m.out_features for m in layers[i + 1 :] if isinstance(m, nn.Linear)) for i in hidden]
    nonzero = {i: 0.0 for i in hidden}

    def count(index):
        def hook(module, inputs, output):
            nonzero[index] += (output != 0).sum().item()

        return hook

    handles = [layers[i].register_forward_hook(count(i)) for i in hidden]
    try:
        outputs_of(model, images)
    finally:
        for handle in handles:
            handle.remove()
    neurons = [next(m.in_features for m in layers[i + 1 :] if isinstance(m, nn.Linear)) for i in hidden]
    active = [nonzero[i] / (len(images) * n) for i, n in zip(hidden, neurons)]
    return Activity(active, fan_out, neurons)


@dataclass
class Run:
    """One trained model: its test accuracy, its converted copy's predictions equal to its own
    (`equal` of `total`), its hidden activity on the test set and its training time."""

    accuracy: float
    equal: int
    total: int
    activity: Activity
    train_seconds: float


@dataclass
class Result:
    """One model on one dataset, trained once per seed."""

    dataset: str
    model: Model
    epochs: int
    input_macs: int  # the first layer's, on real-valued pixels: the same for every model
    runs: list[Run]

    @property
    def accuracy(self) -> float:
        return statistics.mean(r.accuracy for r in self.runs)

    @property
    def accuracy_std(self) -> float | None:
        """The sample standard deviation over seeds; None for a single run."""
        return statistics.stdev(r.accuracy for r in self.runs) if len(self.runs) > 1 else None

    @property
    def equal(self) -> int:
        """Test predictions of the converted models equal to their originals', over all runs."""
        return sum(r.equal for r in self.runs)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.runs)

    @property
    def active(self) -> list[float]:
        return [statistics.mean(layer) for layer in zip(*(r.activity.active for r in self.runs))]

    @property
    def synaptic_ops(self) -> float:
        return statistics.mean(r.activity.synaptic_ops(self.model.spiking) for r in self.runs)

    @property
    def energy_nj(self) -> float:
        cost = ENERGY_PER_AC if self.model.spiking else ENERGY_PER_MAC
        return self.synaptic_ops * cost * 1e9


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", default=",".join(datasets.DATASETS), help="comma-separated: digits,mnist")
    parser.add_argument("--epochs", type=int, help=f"epochs for every dataset (default {EPOCHS})")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a third of the default epochs")
    mode.add_argument("--smoke", action="store_true", help="tiny subsets, one epoch (CI)")
    parser.add_argument("--out", type=Path, default=ROOT / "examples" / "results")
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--runs", type=int, default=RUNS, help=f"seeds per model (default {RUNS}; --smoke: 1)")
    args = parser.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    args.datasets = choices(parser, "--datasets", args.datasets, datasets.DATASETS)
    if args.epochs is not None and args.epochs < 1:
        parser.error("--epochs must be at least 1")
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def seeds(args: argparse.Namespace) -> range:
    return range(args.seed, args.seed + (1 if args.smoke else args.runs))


def run(args: argparse.Namespace, device: torch.device) -> list[Result]:
    results = []
    for name in args.datasets:
        dataset = datasets.load(name, **(SMOKE_SIZES if args.smoke else {})).to(device)
        epochs = epochs_for(name, args)
        for spec in MODELS:
            result = Result(name, spec, epochs, dataset.features * HIDDEN[name], [])
            for seed in seeds(args):
                torch.manual_seed(seed)  # each model's initialisation independent of which ran before
                model = spec.build(dataset, HIDDEN[name]).to(device)
                history = fit(model, dataset, epochs=epochs, seed=seed)
                conversion = check_conversion(model, dataset)
                activity = hidden_activity(model, dataset.x_test)
                accuracy = history.test_accuracy[-1]
                result.runs.append(Run(accuracy, conversion.equal, conversion.total, activity, history.train_seconds))
                print(
                    f"{name:7} {spec.name:13} seed {seed}  {epochs:3} epochs  test {100 * accuracy:5.1f}%  "
                    f"active {' / '.join(f'{100 * a:4.1f}%' for a in activity.active)}  "
                    f"synops {activity.synaptic_ops(spec.spiking):9.0f}  {history.train_seconds:5.1f} s",
                    flush=True,
                )
            results.append(result)
    return results


COLUMNS = (
    "dataset",
    "model",
    "activation",
    "gradient",
    "epochs",
    "runs",
    "test acc %",
    "acc std",
    "equal preds",
    "L1 active %",
    "L2 active %",
    "hidden synops/sample",
    "op",
    "hidden energy nJ/sample",
    "train s",
)


def table_rows(results: list[Result]) -> list[list[str]]:
    return [
        [
            r.dataset,
            r.model.name,
            r.model.activation,
            r.model.gradient,
            str(r.epochs),
            str(len(r.runs)),
            f"{100 * r.accuracy:.2f}",
            "-" if r.accuracy_std is None else f"{100 * r.accuracy_std:.2f}",
            f"{r.equal}/{r.total}",
            *(f"{100 * a:.1f}" for a in r.active),
            f"{r.synaptic_ops:.0f}",
            "AC" if r.model.spiking else "MAC",
            f"{r.energy_nj:.1f}",
            f"{statistics.mean(run.train_seconds for run in r.runs):.1f}",
        ]
        for r in results
    ]


def write_markdown(path: Path, results: list[Result], args: argparse.Namespace, device: torch.device, wall: float):
    first_layer = ", ".join(f"{d} {r.input_macs}" for d, r in {r.dataset: r for r in results}.items())
    settings = {
        "command": " ".join(["python examples/s2nn.py", *args.argv]),
        **provenance(device),
        "epochs": ", ".join(f"{d} {epochs_for(d, args)}" for d in args.datasets),
        "hidden width": ", ".join(f"{d} {HIDDEN[d]}" for d in args.datasets),
        "neurons": f"threshold V = {THRESHOLD}, s2nn and sigmoid surrogates with alpha = 4",
        "training": f"Adam, lr {LR:g} with cosine decay, batch {BATCH_SIZE}, cross-entropy",
        "split": f"stratified {100 - 100 * datasets.TEST_FRACTION:.0f}/{100 * datasets.TEST_FRACTION:.0f}, "
        f"seed {datasets.SPLIT_SEED}" + (f"; smoke subsets {SMOKE_SIZES}" if args.smoke else ""),
        "seeds": ", ".join(map(str, seeds(args))),
        "wall time": f"{wall:.0f} s",
    }
    text = [
        "# S2NN: single-step spiking network against binary and float networks",
        "",
        "Generated by `examples/s2nn.py`. S2NN (Suetake et al., arXiv 2201.10879): hidden layers pass",
        "binary spikes H(u - V) with no time axis, trained with the single-step s2nn surrogate. Every",
        "model is Linear -> LayerBatchNorm -> activation, twice, then a Linear classifier; only the",
        "hidden activation and its gradient differ. *s2nn-sigmoid*: the same spikes with the multi-step",
        "SNN's sigmoid surrogate; *binary-ste*: the same spikes with a binary network's straight-through",
        "estimator clipped to |u - V| < 1 (float weights); *float-relu*: ReLU.",
        "",
        "*runs*: seeds per model; *test acc* their mean and *acc std* its sample standard deviation;",
        "the other columns are means over the runs. *equal preds*: test predictions of",
        "`convert_for_inference(model)` (LBN folded into the Linear) equal to the eval-mode model's,",
        "over all runs. *L1/L2 active*: the mean fraction of each hidden layer's neurons",
        "that spike (ReLU: are non-zero) per test sample. *hidden synops/sample*: synaptic operations of",
        "the two hidden layers' outputs, spikes x fan-out (each an accumulate, AC) for the spiking",
        "networks, neurons x fan-out (each a multiply-accumulate, MAC) for the float one; *hidden",
        f"energy*: at {ENERGY_PER_AC * 1e12:g} pJ per AC and {ENERGY_PER_MAC * 1e12:g} pJ per MAC (45 nm float32,",
        "Horowitz, ISSCC 2014). The first layer reads real-valued pixels: every model spends the same",
        f"input x hidden MACs there ({first_layer}), left out of the comparison.",
        "",
        markdown_table(COLUMNS, table_rows(results)),
        "",
        "## Settings",
        "",
        *(f"- {key}: {value}" for key, value in settings.items()),
        "",
        "![accuracy against hidden-layer energy](s2nn.png)",
        "",
    ]
    path.write_text("\n".join(text))


def write_plot(path: Path, results: list[Result]) -> None:
    """Test accuracy (mean, and standard deviation over seeds) against hidden-layer energy per
    sample, one panel per dataset."""
    from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

    names = list(dict.fromkeys(r.dataset for r in results))
    with figure_file(path, 1, len(names), (6 * len(names), 4.2)) as axes:
        for axis, name in zip(axes[0], names):
            for r in (r for r in results if r.dataset == name):
                std = 0.0 if r.accuracy_std is None else 100 * r.accuracy_std
                axis.errorbar(
                    r.energy_nj,
                    100 * r.accuracy,
                    yerr=std,
                    fmt="o" if r.model.spiking else "s",
                    capsize=4,
                    markersize=7,
                )
                axis.annotate(r.model.name, (r.energy_nj, 100 * r.accuracy), textcoords="offset points", xytext=(6, 4))
            axis.set(
                title=f"{name}: accuracy against hidden-layer energy",
                xlabel="hidden-layer synaptic energy per sample (nJ, log)",
                ylabel="test accuracy %",
            )
            axis.set_xscale("log", nonpositive="clip")  # a smoke run's untrained network may not spike at all
            axis.xaxis.set_major_locator(LogLocator(subs=(1.0, 3.0)))
            axis.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.grid(alpha=0.3)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    results = run(args, device)
    wall = time.perf_counter() - started

    rows = table_rows(results)
    args.out.mkdir(parents=True, exist_ok=True)
    write_markdown(args.out / "s2nn.md", results, args, device, wall)
    write_csv(args.out / "s2nn.csv", COLUMNS, rows)
    write_plot(args.out / "s2nn.png", results)
    print()
    print(text_table(COLUMNS, rows))
    trained = sum(len(r.runs) for r in results)
    print(f"\n{trained} trained models in {wall:.0f} s on {device}; wrote s2nn.md, .csv, .png in {args.out}")
    differing = [r for r in results if r.equal != r.total]
    for r in differing:
        print(
            f"CONVERSION MISMATCH {r.dataset} {r.model.name}: {r.total - r.equal} predictions differ", file=sys.stderr
        )
    return 1 if differing else 0


if __name__ == "__main__":
    sys.exit(main())

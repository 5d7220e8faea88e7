"""What the benchmark scripts under benchmarks/ share: the machine's ceilings, timing, the run's
header, and the CSV / Markdown / PNG writers.

Every script reports its kernels against two ceilings measured in the same run on the same GPU
(copy bandwidth and the bf16 matmul rate), so a number means the same thing on any machine and a
slow run (a throttled or shared GPU) shows up in the ceilings too. Timings on the GPU come from
``triton.testing.do_bench``: the median after warm-up, with the L2 cache flushed before every
repetition, so data comes from HBM even for inputs smaller than L2. ``--smoke`` runs time one call
with ``time.perf_counter`` instead: they prove the scripts run, not how fast anything is.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import maqd_kernels

GIB = 1 << 30
MIB = 1 << 20
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- timing


@dataclass
class Timer:
    """Times GPU work with ``do_bench`` (median ms after warm-up, L2 flushed before each
    repetition), or, when ``precise`` is False (smoke runs, the CPU), one call with perf_counter."""

    device: torch.device
    precise: bool
    warmup_ms: int = 25
    rep_ms: int = 100

    def __post_init__(self):
        if self.precise and self.device.type != "cuda":
            raise ValueError("precise timing uses triton.testing.do_bench and needs a CUDA device")

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def ms(self, fn: Callable[[], object], grad_to_none: Sequence[torch.Tensor] = ()) -> float:
        """Milliseconds per call of `fn`; `grad_to_none` are cleared before each call so that
        backward passes write fresh gradients instead of accumulating into old ones."""
        if self.precise:
            from triton.testing import do_bench

            return float(
                do_bench(
                    fn,
                    warmup=self.warmup_ms,
                    rep=self.rep_ms,
                    grad_to_none=list(grad_to_none) or None,
                    return_mode="median",
                )
            )
        for tensor in grad_to_none:
            tensor.grad = None
        self._sync()
        start = time.perf_counter()
        fn()
        self._sync()
        return (time.perf_counter() - start) * 1e3

    def iterations(self, step: Callable[[], object], warmup: int, iters: int) -> IterationStats:
        """Median wall time of whole training iterations (each ends in a synchronize, so a kernel's
        time lands in its own iteration) and the peak memory they allocate."""
        for _ in range(warmup):
            step()
        self._sync()
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        resident = torch.cuda.memory_allocated(self.device) if cuda else None
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            step()
            self._sync()
            times.append((time.perf_counter() - start) * 1e3)
        peak = torch.cuda.max_memory_allocated(self.device) if cuda else None
        return IterationStats(statistics.median(times), peak, resident)


@dataclass
class IterationStats:
    """ms: median per iteration. peak_bytes: torch's peak allocation over the timed iterations
    (None off the GPU). resident_bytes: what was allocated when they began (weights, optimizer
    state, inputs), so peak - resident is what the iterations themselves add."""

    ms: float
    peak_bytes: int | None
    resident_bytes: int | None


# ----------------------------------------------------------------------------- ceilings


@dataclass
class Ceilings:
    """The machine's measured limits: device-to-device copy bandwidth (GB/s, bytes read plus
    written) and the dense bf16 matmul rate (TFLOP/s), with the sizes they were measured at."""

    copy_gbps: float
    copy_bytes: int
    matmul_tflops: float
    matmul_n: int

    def memory_floor_ms(self, nbytes: float) -> float:
        return nbytes / self.copy_gbps / 1e6

    def matmul_floor_ms(self, flops: float) -> float:
        return flops / self.matmul_tflops / 1e9


def measure_ceilings(timer: Timer, copy_bytes: int, matmul_n: int) -> Ceilings:
    """Copies a `copy_bytes` buffer (at least 1 GiB on a GPU, so no cache holds it) and multiplies
    two bf16 `matmul_n`-square matrices (8192 on a GPU: large enough for cuBLAS's best rate)."""
    return Ceilings(
        copy_gbps=2 * copy_bytes / _copy_ms(timer, copy_bytes) / 1e6,
        copy_bytes=copy_bytes,
        matmul_tflops=2 * matmul_n**3 / _matmul_ms(timer, matmul_n) / 1e9,
        matmul_n=matmul_n,
    )


def _copy_ms(timer: Timer, nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=timer.device)
    dst = torch.empty_like(src)
    return timer.ms(lambda: dst.copy_(src))


def _matmul_ms(timer: Timer, n: int) -> float:
    a = torch.randn(n, n, device=timer.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=timer.device, dtype=torch.bfloat16)
    return timer.ms(lambda: torch.matmul(a, b))


# ----------------------------------------------------------------------------- the run's header


def _commit() -> str:
    """The checkout's commit, "-dirty" when tracked files differ from it. A copy of the tree
    without .git (as shipped to a bare GPU machine) can name its commit in MAQD_COMMIT."""
    if os.environ.get("MAQD_COMMIT"):
        return os.environ["MAQD_COMMIT"]
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (no git checkout; set MAQD_COMMIT)"
    return head + ("-dirty" if dirty else "")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_dir(out: Path | None, smoke: bool, gpu: str, script: str) -> Path:
    """Where a script writes its tables (created): ``--out``, a fresh temporary folder for smoke
    runs, else benchmarks/results/<gpu>/."""
    if out is None:
        out = (
            Path(tempfile.mkdtemp(prefix=f"{script}_smoke_")) if smoke else REPO / "benchmarks" / "results" / slug(gpu)
        )
    out.mkdir(parents=True, exist_ok=True)
    return out


def machine_rows(ceilings: Ceilings) -> list[dict]:
    """The run's measured ceilings as rows of the "machine" section."""
    return [
        {"section": "machine", "impl": "copy", "bytes": ceilings.copy_bytes, "gbps": ceilings.copy_gbps},
        {"section": "machine", "impl": "matmul bf16", "N": ceilings.matmul_n, "tflops": ceilings.matmul_tflops},
    ]


def run_header(device: torch.device, ceilings: Ceilings, run: str) -> dict[str, str]:
    """What a reader needs to reproduce or compare a table: code, machine, software, ceilings."""
    backends = maqd_kernels.backends()
    return {
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "run": run,
        "copy bandwidth": f"{ceilings.copy_gbps:.0f} GB/s (read + written, {ceilings.copy_bytes / GIB:g} GiB copy)",
        "bf16 matmul": f"{fmt(ceilings.matmul_tflops)} TFLOP/s (torch.matmul, {ceilings.matmul_n}^3)",
        **{f"backend {name}": ("yes: " if s.available else "no: ") + s.detail for name, s in backends.items()},
    }


# ----------------------------------------------------------------------------- environment


@contextlib.contextmanager
def environment(name: str, value: str) -> Iterator[None]:
    """Sets an environment variable for the block, e.g. MAQD_BACKEND, which is the one way to pick
    the backend of the maqd_kernels.nn modules."""
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous


# ----------------------------------------------------------------------------- output


def fmt(value: object) -> str:
    """A table cell: floats to 3 significant digits (no exponent below 1e6), None as blank."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e6:
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return f"{value:.2e}"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: dict[str, str]) -> str:
    """`rows` as a Markdown table; `columns` maps each row key to its heading."""
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(key)) for key in columns) + " |" for row in rows]
    return "\n".join(lines)


def text_table(rows: Sequence[dict], columns: dict[str, str]) -> str:
    """`rows` as aligned plain text, for the terminal."""
    cells = [list(columns.values())] + [[fmt(row.get(key)) for key in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in cells)


def write_csv(path: Path, rows: Sequence[dict], header: dict[str, str]) -> None:
    """One line per measurement. The run's commit, GPU and versions are repeated on every line, so
    CSVs from several runs or machines can be concatenated and still be told apart."""
    machine = {key: header[key] for key in ("commit", "gpu", "torch", "triton", "cuda")}
    keys: dict[str, None] = dict.fromkeys(machine)
    for row in rows:
        keys.update(dict.fromkeys(row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(keys))
        writer.writeheader()
        for row in rows:
            writer.writerow({**machine, **{k: _csv_value(v) for k, v in row.items()}})


def _csv_value(value: object) -> object:
    return f"{value:.6g}" if isinstance(value, float) else value


def write_markdown(path: Path, title: str, header: dict[str, str], sections: Sequence[tuple[str, str]]) -> None:
    """A title, the run's header as a two-column table, then each (heading, body) section."""
    parts = [f"# {title}", markdown_table([{"k": k, "v": v} for k, v in header.items()], {"k": "run", "v": ""})]
    parts += [f"## {heading}\n\n{body}" for heading, body in sections]
    path.write_text("\n\n".join(parts) + "\n")


@dataclass
class Panel:
    """One grouped bar chart: a bar per series in each category; None leaves a gap. `line` draws
    a target (e.g. 0.8 of copy bandwidth); `log` puts speedups on a log axis."""

    title: str
    ylabel: str
    categories: list[str]
    series: dict[str, list[float | None]] = field(default_factory=dict)
    line: float | None = None
    log: bool = False


def write_png(path: Path, panels: Sequence[Panel]) -> bool:
    """Draws `panels` one above the other into `path` with matplotlib's Agg backend (no display
    needed). Without matplotlib it prints a note and returns False: the CSV and Markdown carry
    every number, the plot is a convenience."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {path.name} was not drawn (the CSV and Markdown are complete)")
        return False
    panels = [p for p in panels if p.categories and any(v is not None for vs in p.series.values() for v in vs)]
    if not panels:
        return False
    bars = max(len(p.categories) * len(p.series) for p in panels)
    fig, axes = plt.subplots(len(panels), 1, figsize=(min(max(8.0, 0.25 * bars + 3), 24.0), 4.2 * len(panels)))
    for ax, panel in zip(fig.axes, panels):
        series = {label: values for label, values in panel.series.items() if any(v is not None for v in values)}
        width = 0.8 / len(series)
        for i, (label, values) in enumerate(series.items()):
            offset = (i - (len(series) - 1) / 2) * width
            drawn = [(j + offset, v) for j, v in enumerate(values) if v is not None]
            ax.bar([x for x, _ in drawn], [v for _, v in drawn], width=width, label=label)
        if panel.line is not None:
            ax.axhline(panel.line, color="black", linestyle="--", linewidth=1)
        if panel.log:
            ax.set_yscale("log")
        ax.set_xticks(range(len(panel.categories)))
        crowded = len(panel.categories) > 6 or max(len(c) for c in panel.categories) > 12
        ax.set_xticklabels(panel.categories, rotation=30 if crowded else 0, ha="right" if crowded else "center")
        ax.set_title(panel.title)
        ax.set_ylabel(panel.ylabel)
        # Outside the axes, on the right, where it cannot cover a bar.
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- targets


@dataclass
class Target:
    """A performance goal and how the run did against it. `higher` says which way is better;
    `measured` is None when the run did not measure it (a section skipped, a backend missing)."""

    name: str
    goal: float
    measured: float | None
    unit: str = "x"
    higher: bool = True
    where: str = ""

    @property
    def status(self) -> str:
        if self.measured is None:
            return "not measured"
        met = self.measured >= self.goal if self.higher else self.measured <= self.goal
        return "met" if met else "not met"

    @property
    def gap(self) -> str:
        """How far a missed goal is: the factor still to gain (or to cut, for lower-is-better)."""
        if self.status != "not met":
            return ""
        if self.measured <= 0:
            return "nothing measured above zero"
        factor = self.goal / self.measured if self.higher else self.measured / self.goal
        return f"{factor:.2f}x short"

    def row(self) -> dict:
        sign = ">=" if self.higher else "<="
        return {
            "target": self.name,
            "goal": f"{sign} {fmt(float(self.goal))}{self.unit}",
            "measured": "" if self.measured is None else f"{fmt(float(self.measured))}{self.unit}",
            "where": self.where,
            "status": self.status,
            "gap": self.gap,
        }


TARGET_COLUMNS = {
    "target": "target",
    "goal": "goal",
    "measured": "measured",
    "where": "at",
    "status": "status",
    "gap": "gap",
}


def argument_parser(doc: str, sections: Sequence[str], quick_help: str) -> argparse.ArgumentParser:
    """The options every benchmark script takes: --quick, --smoke, --out and --only (of `sections`);
    a script adds its own before ``parse_arguments``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one perf_counter timing each; runs on a CPU")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>/)")
    parser.add_argument("--only", default=",".join(sections), help=f"comma-separated subset of {','.join(sections)}")
    return parser


def parse_arguments(parser: argparse.ArgumentParser, argv: list[str] | None, sections: Sequence[str]):
    """Parses `argv`: --only becomes a list of known sections, and a run without --smoke needs a GPU."""
    args = parser.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(args.only) - set(sections)
    if unknown or not args.only:
        parser.error(f"--only takes a comma-separated subset of {','.join(sections)}; got {sorted(unknown) or 'none'}")
    if not args.smoke and not torch.cuda.is_available():
        parser.error("measurements need a CUDA GPU; --smoke runs the script at tiny sizes on the CPU")
    return args

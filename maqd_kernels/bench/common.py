"""What the benchmark families (``saf``, ``quant``, ``lbn``) share: the machine's ceilings, timing,
the run's header, recording measurements, the targets, and the CSV / Markdown / PNG writers.

Every family reports its kernels against ceilings measured once at the start of the same run on
the same GPU (copy bandwidth, the bf16 matmul rate, and torch._int_mm's int8 rate), so a number
means the same thing on any machine and a slow run (a throttled or shared GPU) shows up in the
ceilings too. Timings on the GPU come from ``triton.testing.do_bench``: the median after warm-up,
with the L2 cache flushed before every repetition, so data comes from HBM even for inputs smaller
than L2. Smoke runs time one call with ``time.perf_counter`` instead: they prove the code runs,
not how fast anything is.
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
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

import maqd_kernels

from .. import _backend
from .progress import Progress

GIB = 1 << 30
MIB = 1 << 20


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
    written), the dense bf16 matmul rate (TFLOP/s) and torch._int_mm's int8 rate (TOP/s; None
    where it could not be measured), with the sizes they were measured at."""

    copy_gbps: float
    copy_bytes: int
    matmul_tflops: float
    matmul_n: int
    int8_tops: float | None

    def memory_floor_ms(self, nbytes: float) -> float:
        return nbytes / self.copy_gbps / 1e6

    def matmul_floor_ms(self, flops: float) -> float:
        return flops / self.matmul_tflops / 1e9

    def text(self) -> str:
        """One line for the terminal."""
        int8 = f", int8 matmul {fmt(self.int8_tops)} TOP/s" if self.int8_tops else ""
        return f"copy {self.copy_gbps:.0f} GB/s, bf16 matmul {fmt(self.matmul_tflops)} TFLOP/s{int8}"


def measure_ceilings(timer: Timer, smoke: bool) -> Ceilings:
    """Copies a 1 GiB buffer (so no cache holds it) and multiplies two bf16 8192-square matrices
    (large enough for cuBLAS's best rate), and two int8 ones with torch._int_mm; a smoke run takes
    32 MiB and 256."""
    copy_bytes, matmul_n = (32 * MIB, 256) if smoke else (GIB, 8192)
    return Ceilings(
        copy_gbps=2 * copy_bytes / _copy_ms(timer, copy_bytes) / 1e6,
        copy_bytes=copy_bytes,
        matmul_tflops=2 * matmul_n**3 / _matmul_ms(timer, matmul_n) / 1e9,
        matmul_n=matmul_n,
        int8_tops=_int8_tops(timer, matmul_n),
    )


def _copy_ms(timer: Timer, nbytes: int) -> float:
    src = torch.randn(nbytes // 4, device=timer.device)
    dst = torch.empty_like(src)
    return timer.ms(lambda: dst.copy_(src))


def _matmul_ms(timer: Timer, n: int) -> float:
    a = torch.randn(n, n, device=timer.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=timer.device, dtype=torch.bfloat16)
    return timer.ms(lambda: torch.matmul(a, b))


def _int8_tops(timer: Timer, n: int) -> float | None:
    """TOP/s of torch._int_mm on n-square int8 matrices (B column-major, as cuBLASLt wants it)."""
    try:
        a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=timer.device)
        b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device=timer.device)
        ms = timer.ms(lambda: torch._int_mm(a, b.t()))
    except Exception as error:  # an old torch or a device without int8 GEMMs: a note, not a failure
        print(f"note: torch._int_mm could not be measured: {type(error).__name__}: {error}")
        return None
    return 2 * n**3 / ms / 1e9


def machine_rows(ceilings: Ceilings) -> list[dict]:
    """The run's measured ceilings as rows of the "machine" section."""
    rows = [
        {"section": "machine", "impl": "copy", "bytes": ceilings.copy_bytes, "gbps": ceilings.copy_gbps},
        {"section": "machine", "impl": "matmul bf16", "N": ceilings.matmul_n, "tflops": ceilings.matmul_tflops},
    ]
    if ceilings.int8_tops:
        rows.append(
            {"section": "machine", "impl": "_int_mm int8", "N": ceilings.matmul_n, "tflops": ceilings.int8_tops}
        )
    return rows


# ----------------------------------------------------------------------------- the run's header


PACKAGE = Path(maqd_kernels.__file__).resolve().parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=PACKAGE, capture_output=True, text=True, check=True).stdout.strip()


def commit() -> str:
    """The commit of the checkout this package runs from, "-dirty" when tracked files differ from
    it. An installed package (site-packages, which may itself sit inside some other repository)
    has none; a copy of the tree without .git (as shipped to a bare GPU machine) can name its
    commit in MAQD_COMMIT."""
    if os.environ.get("MAQD_COMMIT"):
        return os.environ["MAQD_COMMIT"]
    unknown = "unknown (not run from a git checkout; set MAQD_COMMIT)"
    try:
        if Path(_git("rev-parse", "--show-toplevel")).resolve() != PACKAGE.parent:
            return unknown
        head = _git("rev-parse", "--short=12", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return unknown
    return head + ("-dirty" if dirty else "")


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def kernel_backends(device: torch.device) -> list[str]:
    """The kernel backends (cuda, triton) that can run on `device`."""
    return [backend for backend in ("cuda", "triton") if _backend._unusable_reason(backend, device) is None]


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def slug(name: str) -> str:
    """A file-name-safe form of a device name: "NVIDIA H200" -> "nvidia-h200"."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def results_dir(out: Path | None, smoke: bool, default: Path) -> Path:
    """Where a run writes its files (created): `out` when given; else a fresh temporary folder for
    a smoke run (whose numbers mean nothing and must not overwrite a real run's), else `default`."""
    if out is None:
        out = Path(tempfile.mkdtemp(prefix="maqd_bench_smoke_")) if smoke else default
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_header(device: torch.device, run: str, ceilings: Ceilings | None) -> dict[str, str]:
    """What a reader needs to reproduce or compare a table: code, machine, software and, when the
    run measured them, the ceilings."""
    header = {
        "commit": commit(),
        "maqd_kernels": maqd_kernels.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "gpu": device_name(device),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cuda": torch.version.cuda or "none",
        "python": platform.python_version(),
        "run": run,
    }
    if ceilings is not None:
        header["copy bandwidth"] = (
            f"{ceilings.copy_gbps:.0f} GB/s (read + written, {ceilings.copy_bytes / GIB:g} GiB copy)"
        )
        header["bf16 matmul"] = f"{fmt(ceilings.matmul_tflops)} TFLOP/s (torch.matmul, {ceilings.matmul_n}^3)"
        header["int8 matmul"] = (
            f"{fmt(ceilings.int8_tops)} TOP/s (torch._int_mm, {ceilings.matmul_n}^3)"
            if ceilings.int8_tops
            else "not measured"
        )
    for name, status in maqd_kernels.backends().items():
        header[f"backend {name}"] = ("yes: " if status.available else "no: ") + status.detail
    return header


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


def write_png(path: Path, panels: Sequence[Panel], note: Callable[[str], None] = print) -> bool:
    """Draws `panels` one above the other into `path` with matplotlib's Agg backend (no display
    needed); False when there is nothing to draw. Without matplotlib it passes a line to `note`
    and returns False: the CSV and Markdown carry every number, the plot is a convenience."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note(f"note: matplotlib is not installed, so {path.name} was not drawn (the CSV and Markdown are complete)")
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

    def as_json(self) -> dict:
        """The target for summary.json: its fields, status and gap."""
        return {
            "name": self.name,
            "goal": self.goal,
            "measured": self.measured,
            "unit": self.unit,
            "higher_is_better": self.higher,
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


def targets_section(goals: Sequence[Target], smoke: bool, explanation: str, compiled: bool) -> tuple[str, str]:
    """A family's Markdown "Targets" section: the targets table and how to read it, after a warning,
    in a smoke run, that its numbers mean nothing (`compiled`: its torch.compile peers ran with
    the aot_eager backend)."""
    note = ""
    if smoke:
        how = "tiny sizes timed once with perf_counter" + (
            ", torch.compile with the aot_eager backend" if compiled else ""
        )
        note = f"**Smoke run**: {how}; these numbers say that the script runs, nothing about speed.\n\n"
    return "Targets", note + markdown_table([g.row() for g in goals], TARGET_COLUMNS) + "\n\n" + explanation


# ----------------------------------------------------------------------------- headlines


@dataclass(frozen=True)
class Headline:
    """A line per group of a family's terminal summary: the spread of the row field `key` over the
    rows of `section` that `group` names (None leaves a row out, e.g. a peer's)."""

    section: str
    key: str
    label: str
    group: Callable[[dict], str | None]


def group_by(*keys: str, impls: Sequence[str] | None = None) -> Callable[[dict], str | None]:
    """A Headline's group: the row's `keys` joined by spaces, for the rows whose impl is one of
    `impls` (every row when None)."""

    def group(row: dict) -> str | None:
        if impls is not None and row.get("impl") not in impls:
            return None
        return " ".join(str(row[key]) for key in keys)

    return group


HEADLINE_COLUMNS = {"section": "section", "what": "kernel", "metric": "metric", "n": "n"}
HEADLINE_COLUMNS |= {"min": "min", "median": "median", "max": "max"}


def headline_rows(rows: Sequence[dict], headlines: Sequence[Headline]) -> list[dict]:
    """For each headline and group: how many rows measured it, and its min, median and max."""
    out = []
    for headline in headlines:
        groups: dict[str, list[float]] = {}
        for row in rows:
            if row.get("section") == headline.section and row.get(headline.key) is not None:
                name = headline.group(row)
                if name is not None:
                    groups.setdefault(name, []).append(float(row[headline.key]))
        for name, values in groups.items():
            out.append(
                {
                    "section": headline.section,
                    "what": name,
                    "metric": headline.label,
                    "n": len(values),
                    "min": min(values),
                    "median": statistics.median(values),
                    "max": max(values),
                }
            )
    return out


# ----------------------------------------------------------------------------- running a family


@dataclass
class Context:
    """What every family's run shares in one invocation: the timer, the ceilings measured at its
    start, the run's header, the output folder and the progress bar."""

    timer: Timer
    ceilings: Ceilings
    header: dict[str, str]
    out_dir: Path
    progress: Progress


# Row fields that describe a shape's floor rather than what is measured: not in the progress label.
UNLABELLED = {"section", "bytes", "flops", "memory_floor_ms", "matmul_floor_ms", "floor_ms", "channels", "kind"}


class Recorder:
    """Runs each measurement under the progress bar and keeps its row. A failure (a kernel missing
    or broken, out of memory) is recorded in the row's `error`, its traceback's last frames
    printed, and the run goes on, in smoke runs too: one bad kernel should not hide the others'
    numbers. `measure` returns the row's results, or {"note": ...} for a measurement skipped on
    purpose."""

    def __init__(self, family: str, device: torch.device, progress: Progress):
        self.family, self.device, self.progress = family, device, progress
        self.rows: list[dict] = []

    def __call__(self, row: dict, measure: Callable[[], dict]) -> dict:
        described = " ".join(f"{k}={fmt(v)}" for k, v in row.items() if k not in UNLABELLED and v is not None)
        self.progress.begin(f"{self.family} {row['section']}: {described}")
        try:
            row.update(measure())
        except Exception as error:
            self.progress.note(f"{self.family} {row['section']} failed: {described}\n{traceback.format_exc(limit=-3)}")
            row["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"[:200]
        if "error" in row and self.device.type == "cuda":
            # Out here, where the exception and the tensors its frames held are gone.
            torch.cuda.empty_cache()
        self.progress.advance()
        self.rows.append(row)
        return row

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if "error" in r]


@dataclass
class FamilyResult:
    """What one family's run produced: its measurement rows (the ceilings' rows not included),
    its targets, its terminal summary (``headline_rows``) and the files it wrote."""

    family: str
    title: str
    rows: list[dict]
    targets: list[Target]
    headlines: list[dict]
    files: list[Path]

    @property
    def errors(self) -> list[dict]:
        return [r for r in self.rows if "error" in r]


def write_family_files(
    context: Context,
    family: str,
    title: str,
    rows: Sequence[dict],
    sections: Sequence[tuple[str, str]],
    panels: Sequence[Panel],
) -> list[Path]:
    """<family>.csv (the ceilings' rows, then every measurement), <family>.md (the run's header,
    then `sections`) and <family>.png (`panels`, when matplotlib can draw them); the paths written."""
    out = context.out_dir
    write_csv(out / f"{family}.csv", machine_rows(context.ceilings) + list(rows), context.header)
    write_markdown(out / f"{family}.md", title, context.header, sections)
    files = [out / f"{family}.csv", out / f"{family}.md"]
    if write_png(out / f"{family}.png", panels, context.progress.note):
        files.append(out / f"{family}.png")
    return files


# ----------------------------------------------------------------------------- options


def comma_subset(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argparse ``type``: a comma-separated, non-empty subset of `choices`, returned in the
    order of `choices` (the order things run in)."""

    def parse(text: str) -> list[str]:
        chosen = {item.strip() for item in text.split(",") if item.strip()}
        unknown = sorted(chosen - set(choices))
        if unknown or not chosen:
            raise argparse.ArgumentTypeError(
                f"takes a comma-separated subset of {','.join(choices)}; got {','.join(unknown) or 'nothing'}"
            )
        return [choice for choice in choices if choice in chosen]

    return parse


def script_parser(doc: str, sections: Sequence[str], quick_help: str) -> argparse.ArgumentParser:
    """The options every script under benchmarks/ takes: --quick, --smoke, --out and --only (of
    `sections`); a script adds its own before ``parse_script_arguments``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one perf_counter timing each; runs on a CPU")
    parser.add_argument("--out", type=Path, help="output folder (default benchmarks/results/<gpu>/)")
    parser.add_argument(
        "--only",
        type=comma_subset(sections),
        default=",".join(sections),
        help=f"comma-separated subset of {','.join(sections)}",
    )
    return parser


def parse_script_arguments(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parses `argv`; a run without --smoke needs a GPU."""
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        parser.error("measurements need a CUDA GPU; --smoke runs the script at tiny sizes on the CPU")
    return args

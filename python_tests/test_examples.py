"""The end-to-end examples (examples/run_all.py) keep running and keep learning. Each test runs the
command itself in a subprocess, as a user would, and reads the files it writes."""

import csv
from pathlib import Path

import torch

from helpers import run_example

# Every configuration of examples/run_all.py, per dataset.
MODELS = (
    "float",
    "maqd-w4a4",
    "maqd-w2a2",
    "maqd-cnn-w4a4",
    "saf-e-T4",
    "saf-f-T4",
    "saf-e-T8",
    "saf-f-T8",
    "maqd-saf-w4s2-T4",
)


def _rows(out: Path) -> list[dict]:
    with open(out / "accuracy.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_trains_converts_and_reports_every_model(tmp_path):
    result = run_example("run_all.py", "--smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    rows = _rows(tmp_path)
    assert [(r["dataset"], r["model"]) for r in rows] == [(d, m) for d in ("digits", "mnist") for m in MODELS]
    for r in rows:
        equal, total = map(int, r["equal preds"].split("/"))
        assert equal == total > 0, r
        assert r["test acc %"] == r["converted acc %"], r
    assert {r["kind"] for r in rows} == {"float", "quantized", "spiking", "quantized spiking"}

    with open(tmp_path / "curves.csv", newline="") as f:
        curves = list(csv.DictReader(f))
    assert len(curves) == len(rows)  # one epoch each
    markdown = (tmp_path / "accuracy.md").read_text()
    assert "| digits | maqd-saf-w4s2-T4 |" in markdown and "## Settings" in markdown
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_float_and_maqd_mlps_learn_digits(tmp_path):
    # Two epochs reach 91-94% test accuracy (seeds 0-2); an untrained model scores about 10%.
    options = ("--datasets", "digits", "--models", "float,maqd-w4a4", "--epochs", "2", "--out", str(tmp_path))
    result = run_example("run_all.py", *options)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]

    accuracies = {r["model"]: float(r["test acc %"]) for r in _rows(tmp_path)}
    assert accuracies.keys() == {"float", "maqd-w4a4"}
    assert all(a >= 85.0 for a in accuracies.values()), accuracies
    assert ("cuda" if torch.cuda.is_available() else "cpu") in result.stdout


def test_unknown_model_is_rejected_with_the_choices(tmp_path):
    result = run_example("run_all.py", "--smoke", "--models", "float,saf-x", "--out", str(tmp_path))
    assert result.returncode == 2
    assert "saf-x" in result.stderr and "maqd-saf-w4s2-T4" in result.stderr
    assert not (tmp_path / "accuracy.csv").exists()

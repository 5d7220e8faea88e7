"""Test configuration: the Triton interpreter on machines without a GPU, and shared fixtures.

TRITON_INTERPRET must be set before Triton is imported, so it is set here, at collection time;
on a GPU machine the Triton kernels run for real.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed_and_default_backend(monkeypatch):
    """Every test starts from the same random state and with no MAQD_BACKEND override."""
    monkeypatch.delenv("MAQD_BACKEND", raising=False)
    torch.manual_seed(0)

"""python -m maqd_kernels.bench: validate every kernel available here against the reference and, on a
GPU, benchmark every op family (see ``cli``)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    # Before Triton is imported: with no GPU its kernels run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from .cli import main  # noqa: E402

sys.exit(main())

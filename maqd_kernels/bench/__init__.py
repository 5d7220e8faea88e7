"""The benchmark and validation suite behind ``python -m maqd_kernels.bench``.

Today it validates every kernel that can run on this machine against the eager reference (on the
GPU when there is one; on the CPU through the Triton interpreter and the CUDA kernels' host entry
points otherwise) and prints a table; exit status 1 when any kernel disagrees.
"""

from .validation import Result, validate

__all__ = ["Result", "validate"]

"""The main job, ``python -m maqd_kernels.bench``: every kernel available here validated against
the eager reference (on the GPU when there is one; on the CPU through the Triton interpreter and
the CUDA kernels' host entry points otherwise), then, on a CUDA GPU, the benchmarks of each op
family (``saf``, ``quant``, ``lbn``) against ceilings measured in the same run, written to a
results folder. ``cli`` is the command line, ``harness`` the run shared with the scripts under
benchmarks/, ``common`` what the families share, ``validation`` the validation suite.
"""

from .validation import Result, validate

__all__ = ["Result", "validate"]

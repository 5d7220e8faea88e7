"""What the CUDA and Triton launchers of the SAF kernels share: the float32 initial state, and the
per-step constants the kernels read (S_t and SAF-F's bounds), kept on the device.

The constants are built from ``reference``'s float32 recurrence, so kernels and reference agree bit for bit, and
cached per device: copying a fresh host tensor on every call would make each launch wait for the
stream. Streaming calls ask for ever larger steps; once S_t has reached its fixed point they all
share one entry.
"""

from __future__ import annotations

import functools

import torch

from . import reference

Tensor = torch.Tensor


def neurons(x: Tensor) -> int:
    """Neurons per step of a time-first tensor (T, *)."""
    return x.shape[1:].numel()


def float32_state(state: Tensor | None, like: Tensor) -> Tensor | None:
    """The contiguous float32 (neurons,) initial state the kernels read for the time-first `like`,
    or None for zeros. Keep it in a variable until the launch: a pointer does not keep it alive."""
    if state is None:
        return None
    return state.to(device=like.device, dtype=torch.float32).expand(like.shape[1:]).contiguous()


@functools.lru_cache(maxsize=1024)
def _table(kind: str, decay: float, step: int, steps: int, spike_bits: int, device: torch.device) -> Tensor:
    if kind == "bias":
        values = reference.bias_factors(decay, step, steps, torch.float32)
    else:
        values = reference.saf_f_upper_bounds(decay, step, steps, spike_bits, torch.float32)
    return values.to(device)


def bias_factors(decay: float, step: int, steps: int, device: torch.device) -> Tensor:
    """S_step .. S_{step+steps-1}, float32 on `device`. Shared: callers must not write to it."""
    return _table("bias", decay, reference.steady_step(decay, step, steps), steps, 0, torch.device(device))


def saf_f_upper_bounds(decay: float, step: int, steps: int, spike_bits: int, device: torch.device) -> Tensor:
    """(2^b - 1) S_t for the same steps, float32 on `device`. Shared: callers must not write to it."""
    key_step = reference.steady_step(decay, step, steps)
    return _table("upper", decay, key_step, steps, spike_bits, torch.device(device))

"""Plumbing shared by the torch.library custom ops of every family."""

from __future__ import annotations

import functools

import torch


def empty_if_none(t: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Custom ops cannot return None: an absent gradient travels as an empty (0,) tensor."""
    return like.new_empty(0) if t is None else t


def none_if_empty(t: torch.Tensor) -> torch.Tensor | None:
    """The inverse of ``empty_if_none``."""
    return None if t.dim() == 1 and t.numel() == 0 else t


def contiguous_or_none(t: torch.Tensor | None) -> torch.Tensor | None:
    """An optional operand as the kernels read it: contiguous, or still None."""
    return None if t is None else t.contiguous()


# The dtypes torch.autocast casts; float64 stays float64 (its _cast's rule).
_AUTOCAST_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs matmuls in on x's device, or None outside an autocast region
    (and for float64 x, which autocast leaves alone).

    The matmul-like ops (quant_linear, quant_conv2d, saf_linear, ottt_linear) follow PyTorch's policy
    for F.linear / F.conv2d: inside the region they run in this dtype. It is read in the public
    functions rather than registered on the custom ops (``torch.library.register_autocast``, torch
    >= 2.7) because that casts every float input to one dtype fixed at registration, where these ops
    follow the region's dtype and keep a streaming state and a quantized layer's weight as given."""
    device = x.device.type
    if x.dtype in _AUTOCAST_INPUTS and torch.amp.is_autocast_available(device):
        if torch.is_autocast_enabled(device):
            return torch.get_autocast_dtype(device)
    return None


def cast(dtype: torch.dtype | None, *values):
    """`values` with each float32, bfloat16 or float16 tensor in `dtype`, as torch.autocast casts
    (anything else, float64 included, is left for the argument checks); unchanged for dtype None."""
    return tuple(
        v.to(dtype) if dtype is not None and isinstance(v, torch.Tensor) and v.dtype in _AUTOCAST_INPUTS else v
        for v in values
    )


# Holds run_below_autocast's registrations for the life of the process.
_AUTOCAST_LIBRARY = torch.library.Library("maqd", "FRAGMENT")


def run_below_autocast(*ops) -> None:
    """Runs each custom op's implementation with torch.autocast off, as PyTorch runs its own kernels:
    autocast acts at an op's boundary (for the matmul-like ops, in their public functions: see
    ``autocast_dtype``), never on the float32 arithmetic inside it. Otherwise, inside an autocast
    region, the matmuls within the reference implementations and the kernels' compositions would
    run in bfloat16 in eager mode, but not in a compiled graph (which runs its ops with autocast
    off), and the two would disagree."""
    for op in ops:
        for device in ("cpu", "cuda"):
            kernel = functools.partial(_autocast_off, op, device)
            _AUTOCAST_LIBRARY.impl(op._qualname, kernel, f"Autocast{device.upper()}")


def _autocast_off(op, device: str, *args):
    # Turning autocast off excludes its dispatch key, so the call below goes on to the op's kernels.
    with torch.autocast(device, enabled=False):
        return op(*args)

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


def strided_like(y: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor | None:
    """`y` (or None), a result of `like`'s shape, laid out as ``torch.empty_like(like)``.

    The custom ops follow PyTorch's convention: an output shaped like an input keeps that input's
    memory format (channels-last, transposed, ...), as elementwise ops and batch_norm do, and their
    fakes say so with empty_like. The kernels write contiguous tensors and eager compositions pick
    their own layouts, so each such result passes here: returned as it is when the strides that
    count (those of dims longer than 1, the ones Inductor's stride assertions compare) agree,
    else copied. Compiled graphs rely on the fake's strides, so the two must never differ. (Vectors
    need no such care: a fresh one is dense whatever the input's stride.)"""
    if y is None:
        return None
    target = torch.empty_like(like, dtype=y.dtype, device="meta")
    if all(a == b for size, a, b in zip(y.shape, y.stride(), target.stride()) if size > 1):
        return y
    return torch.empty_like(like, dtype=y.dtype, device=y.device).copy_(y)


def memory_order(x: torch.Tensor) -> tuple[list[int], list[int]]:
    """(order, inverse): x's dims from the largest stride to the smallest, and the permutation that
    undoes it. For x dense in any dim order (channels-last, transposed) x.permute(order) is
    contiguous, and a result of that view's shape permuted by `inverse` is laid out as
    ``torch.empty_like(x)``: an elementwise kernel, which reads contiguous tensors, runs on the
    view with no copy of x in and none of its result out."""
    order = sorted(range(x.dim()), key=x.stride, reverse=True)
    return order, sorted(range(x.dim()), key=order.__getitem__)

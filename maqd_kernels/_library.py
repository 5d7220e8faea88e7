"""Plumbing shared by the torch.library custom ops of every family."""

from __future__ import annotations

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

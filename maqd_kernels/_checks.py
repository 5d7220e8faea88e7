"""Argument checks shared by the public ops: each raises a TypeError or ValueError that names the
argument and what was expected, before any kernel launches."""

from __future__ import annotations

from collections.abc import Iterable

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(
    name: str,
    value: object,
    *,
    dtypes: Iterable[torch.dtype] = FLOAT_DTYPES,
    min_dim: int = 0,
    device: torch.device | None = None,
) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    dtypes = tuple(dtypes)
    if value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_dtype_names(dtypes)}; got {str(value.dtype).removeprefix('torch.')}")
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s); got shape {tuple(value.shape)}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} is on {value.device}, but the input is on {device}; move it to {device}")
    return value


def optional_tensor(name: str, value: object, **kwargs) -> torch.Tensor | None:
    return None if value is None else tensor(name, value, **kwargs)


def shape(name: str, value: torch.Tensor, expected: tuple[int, ...], what: str = "") -> None:
    if tuple(value.shape) != tuple(expected):
        hint = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {tuple(expected)}{hint}; got {tuple(value.shape)}")


def number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    return float(value)


def integer(name: str, value: object, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low} <= {name} <= {high}" if high is not None else f"{name} >= {low}"
        raise ValueError(f"{name} must satisfy {bounds}; got {value}")
    return value


def boolean(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def decay(value: object) -> float:
    value = number("decay", value)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"decay must satisfy 0 < decay <= 1; got {value}")
    return value


def positive(name: str, value: object) -> float:
    value = number(name, value)
    if not value > 0.0:
        raise ValueError(f"{name} must be > 0; got {value}")
    return value


def fraction(name: str, value: object) -> float:
    value = number(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must satisfy 0 <= {name} <= 1; got {value}")
    return value


def choice(name: str, value: object, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def backend(value: object) -> str | None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"backend must be a str or None, got {type(value).__name__}")
    return value

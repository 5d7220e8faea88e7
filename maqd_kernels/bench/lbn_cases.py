"""Validation cases of the Layer-Batch Normalization kernels and of postsynaptic-potential
normalization (PSP, the same kernels without a mean; see ``validation``): small random inputs per
dtype at group counts 1 (LBN), between, and C (BatchNorm), in training (statistics and
running-statistic update) and eval; every output within the dtype's tolerance of the reference's
(the kernels reduce in another order)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from ..lbn import reference
from .compare import close_to_reference, count_close, random_tensor, sum_counts

Cases = Iterator[tuple[tuple, Callable]]

# (shape, groups, training): a Linear output, a time-first trace folded to (T*B, C, L), a conv map.
_SHAPES = (((37, 6), 1, True), ((4 * 3, 8, 5), 4, True), ((2, 6, 7, 5), 6, True), ((3, 6, 9), 2, False))


def _inputs(device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(x, weight, bias, running_mean, running_var, training, momentum, eps, groups)."""
    for shape, groups, training in _SHAPES:
        channels = shape[1]
        weight = random_tensor((channels,), device, dtype, scale=0.3, shift=1.0)
        bias = random_tensor((channels,), device, dtype, scale=0.5)
        running_mean = random_tensor((groups,), device, torch.float32, scale=0.5)
        running_var = random_tensor((groups,), device, torch.float32, scale=0.1, shift=1.0)
        x = random_tensor(shape, device, dtype, scale=2.0, shift=0.7)
        yield x, weight, bias, running_mean, running_var, training, 0.1, 1e-5, groups


def _forward_compare(dtype: torch.dtype) -> Callable:
    """A forward's (y, *statistics): y in the storage dtype; the statistics are float32 whatever x is."""

    def compare(got, want):
        y, *statistics = zip(got, want)
        return sum_counts([count_close(*y, dtype)] + [count_close(g, w, torch.float32) for g, w in statistics])

    return compare


def _forward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for args in _inputs(device, dtype):
        yield args, _forward_compare(dtype)


def _backward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for x, weight, bias, running_mean, running_var, training, momentum, eps, groups in _inputs(device, dtype):
        _, mean, rstd, _, _ = reference.layer_batch_norm_forward(
            x, weight, bias, running_mean, running_var, training, momentum, eps, groups
        )
        grad = random_tensor(x.shape, device, dtype, scale=1.0, shift=0.2)
        yield (grad, x, weight, bias, mean, rstd, training, groups), close_to_reference(dtype)


def _psp_inputs(device: torch.device, dtype: torch.dtype) -> Iterator[tuple]:
    """(x, weight, bias, running_moment, training, momentum, eps, groups): LBN's inputs, the running
    variance standing for the running moment."""
    for x, weight, bias, _, running_moment, training, momentum, eps, groups in _inputs(device, dtype):
        yield x, weight, bias, running_moment, training, momentum, eps, groups


def _psp_forward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for args in _psp_inputs(device, dtype):
        yield args, _forward_compare(dtype)


def _psp_backward_cases(device: torch.device, dtype: torch.dtype) -> Cases:
    for x, weight, bias, running_moment, training, momentum, eps, groups in _psp_inputs(device, dtype):
        _, rstd, _ = reference.psp_norm_forward(x, weight, bias, running_moment, training, momentum, eps, groups)
        grad = random_tensor(x.shape, device, dtype, scale=1.0, shift=0.2)
        yield (grad, x, weight, bias, rstd, training, groups), close_to_reference(dtype)


CASES: dict[str, Callable[[torch.device, torch.dtype], Cases]] = {
    "layer_batch_norm_forward": _forward_cases,
    "layer_batch_norm_backward": _backward_cases,
    "psp_norm_forward": _psp_forward_cases,
    "psp_norm_backward": _psp_backward_cases,
}

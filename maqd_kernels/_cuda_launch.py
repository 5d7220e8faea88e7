"""What the launchers of the hand-written kernels in maqd_kernels._C share: finding the extension,
checking float operands, raw pointers, and running an entry point on the device or its host twin."""

from __future__ import annotations

import torch

from ._backend import FLOAT_DTYPE_CODES, cuda_extension

Tensor = torch.Tensor


def _extension():
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("maqd_kernels._C was not built; reinstall maqd-kernels with nvcc on PATH")
    return ext


def _check(name: str, tensor: Tensor, on_host: bool) -> None:
    if tensor.dtype not in FLOAT_DTYPE_CODES:
        raise TypeError(f"{name}: the cuda kernels take float32, bfloat16 or float16, got {tensor.dtype}")
    _check_device(name, tensor, on_host)


def _check_device(name: str, tensor: Tensor, on_host: bool) -> None:
    expected = "cpu" if on_host else "cuda"
    if tensor.device.type != expected:
        raise ValueError(f"{name} must be a {expected} tensor here, got one on {tensor.device}")


def _ptr(tensor: Tensor | None) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def _launch(entry: str, on_host: bool, device: torch.device, *args) -> None:
    """Runs `entry`'s host twin, or its kernel on the current stream of `device`."""
    ext = _extension()
    if on_host:
        getattr(ext, f"{entry}_host")(*args)
    else:
        with torch.cuda.device(device):
            getattr(ext, f"{entry}_cuda")(*args, torch.cuda.current_stream().cuda_stream)

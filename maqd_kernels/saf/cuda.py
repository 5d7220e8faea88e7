"""Launchers of the hand-written SAF kernels in csrc/saf.cu: checks, output allocation, stream.

Each launcher has the signature of its twin in ``reference``. The ``*_host`` variants run the
kernels' per-neuron math (the __host__ __device__ functions of csrc/saf.cuh) on CPU tensors: CI,
which has no GPU, tests the CUDA math through them.
"""

from __future__ import annotations

import torch

from .._backend import FLOAT_DTYPE_CODES, cuda_extension

Tensor = torch.Tensor


def _extension():
    ext = cuda_extension()
    if ext is None:
        raise RuntimeError("maqd_kernels._C was not built; reinstall maqd-kernels with nvcc on PATH")
    return ext


def _saf_neuron_forward(
    u_hat: Tensor, state: Tensor | None, decay: float, threshold: float, spike_bits: int, on_host: bool
) -> tuple[Tensor, Tensor]:
    if u_hat.dtype not in FLOAT_DTYPE_CODES:
        raise TypeError(f"u_hat: the cuda kernels take float32, bfloat16 or float16, got {u_hat.dtype}")
    expected = "cpu" if on_host else "cuda"
    if u_hat.device.type != expected:
        raise ValueError(f"u_hat must be a {expected} tensor here, got one on {u_hat.device}")
    u = u_hat.contiguous()
    steps = u.shape[0]
    neurons = u[0].numel() if steps else 0
    trace = torch.empty_like(u)
    count = torch.zeros((), dtype=torch.int64, device=u.device)
    initial = None if state is None else state.to(torch.float32).expand(u.shape[1:]).contiguous()
    args = (
        u.data_ptr(),
        trace.data_ptr(),
        0 if initial is None else initial.data_ptr(),
        count.data_ptr(),
        steps,
        neurons,
        FLOAT_DTYPE_CODES[u.dtype],
        decay,
        threshold,
        spike_bits,
    )
    if on_host:
        _extension().saf_neuron_forward_host(*args)
    else:
        with torch.cuda.device(u.device):
            _extension().saf_neuron_forward_cuda(*args, torch.cuda.current_stream().cuda_stream)
    return trace, count.to(torch.float32)


def saf_neuron_forward(
    u_hat: Tensor, state: Tensor | None, decay: float, threshold: float, spike_bits: int
) -> tuple[Tensor, Tensor]:
    """SAF neuron forward on the GPU: (a_hat in u_hat's dtype, spike count as float32)."""
    return _saf_neuron_forward(u_hat, state, decay, threshold, spike_bits, on_host=False)


def saf_neuron_forward_host(
    u_hat: Tensor, state: Tensor | None, decay: float, threshold: float, spike_bits: int
) -> tuple[Tensor, Tensor]:
    """The same per-neuron CUDA math run on CPU tensors (for tests without a GPU)."""
    return _saf_neuron_forward(u_hat, state, decay, threshold, spike_bits, on_host=True)

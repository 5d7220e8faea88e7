"""Spike accumulation forwarding as torch.library custom ops (namespace ``maqd``) and their
public Python faces. SPEC.md section 1 is the contract; each op's forward and backward run on the
backend that ``maqd_kernels._backend`` picks."""

from typing import Optional

import torch

from .. import _backend, _checks
from .._library import autocast_dtype, cast, empty_if_none, none_if_empty, run_below_autocast, strided_like
from . import reference, tables

Tensor = torch.Tensor

MODES = ("saf_e", "saf_f")
SURROGATES = tuple(reference.SURROGATE_CODES)
MAX_SPIKE_BITS = 8

_backend.declare(
    "saf_neuron_forward",
    reference.saf_neuron_forward,
    cuda="maqd_kernels.saf.cuda:saf_neuron_forward",
    triton="maqd_kernels.saf.triton:saf_neuron_forward",
)
_backend.declare(
    "saf_neuron_backward",
    reference.saf_neuron_backward,
    cuda="maqd_kernels.saf.cuda:saf_neuron_backward",
    triton="maqd_kernels.saf.triton:saf_neuron_backward",
)
_backend.declare(
    "spike_trace_forward",
    reference.spike_trace_forward,
    cuda="maqd_kernels.saf.cuda:spike_trace_forward",
    triton="maqd_kernels.saf.triton:spike_trace_forward",
)
_backend.declare(
    "saf_readout_forward",
    reference.saf_readout_forward,
    cuda="maqd_kernels.saf.cuda:saf_readout_forward",
    triton="maqd_kernels.saf.triton:saf_readout_forward",
)
_backend.declare(
    "saf_linear_forward", reference.saf_linear_forward, triton="maqd_kernels.saf.triton:saf_linear_forward"
)
_backend.declare(
    "saf_linear_backward", reference.saf_linear_backward, triton="maqd_kernels.saf.triton:saf_linear_backward"
)


# ----------------------------------------------------------------------------- saf_neuron


@torch.library.custom_op("maqd::saf_neuron", mutates_args=())
def _saf_neuron(
    u_hat: Tensor,
    state: Optional[Tensor],
    decay: float,
    threshold: float,
    mode: str,
    surrogate: str,
    alpha: float,
    spike_bits: int,
    step: int,
    grad_mask: bool,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backend.resolve("saf_neuron_forward", u_hat, backend)
    trace, count, mask = impl(u_hat, state, decay, threshold, spike_bits, step, grad_mask)
    return strided_like(trace, u_hat), count, mask


@_saf_neuron.register_fake
def _(u_hat, state, decay, threshold, mode, surrogate, alpha, spike_bits, step, grad_mask, backend):
    count = u_hat.new_empty((), dtype=reference.compute_dtype(u_hat.dtype))
    if not grad_mask:
        return torch.empty_like(u_hat), count, reference.no_grad_mask(u_hat.device)
    words = reference.mask_words(u_hat.shape[1:].numel())
    return torch.empty_like(u_hat), count, u_hat.new_empty((u_hat.shape[0], words), dtype=torch.int32)


@torch.library.custom_op("maqd::saf_neuron_backward", mutates_args=())
def _saf_neuron_backward(
    grad_trace: Tensor,
    grad_count: Tensor,
    u_hat: Optional[Tensor],
    grad_mask: Optional[Tensor],
    state: Optional[Tensor],
    decay: float,
    threshold: float,
    mode: str,
    surrogate: str,
    alpha: float,
    spike_bits: int,
    backend: Optional[str],
) -> Tensor:
    impl = _backend.resolve("saf_neuron_backward", grad_trace, backend)
    grad = impl(
        grad_trace.contiguous(),
        grad_count,
        u_hat,
        grad_mask,
        state,
        decay,
        threshold,
        mode,
        surrogate,
        alpha,
        spike_bits,
    )
    return strided_like(grad, grad_trace)


@_saf_neuron_backward.register_fake
def _(grad_trace, *args):
    return torch.empty_like(grad_trace)


def _saf_neuron_setup(ctx, inputs, output):
    u_hat, state, decay, threshold, mode, surrogate, alpha, spike_bits, step, grad_mask, backend = inputs
    # The least that each mode's backward needs: SAF-F one bit per neuron and step, SAF-E the
    # input it recomputes the trace from.
    if mode == "saf_f":
        ctx.save_for_backward(None, output[2], None)
    else:
        ctx.save_for_backward(u_hat, None, state)
    ctx.params = (decay, threshold, mode, surrogate, alpha, spike_bits, backend)


def _saf_neuron_grad(ctx, grad_trace, grad_count, _grad_mask):
    u_hat, mask, state = ctx.saved_tensors
    grad = torch.ops.maqd.saf_neuron_backward(grad_trace, grad_count, u_hat, mask, state, *ctx.params)
    return (grad,) + (None,) * 10


_saf_neuron.register_autograd(_saf_neuron_grad, setup_context=_saf_neuron_setup)


def _neuron_args(decay, threshold, mode, surrogate, alpha, spike_bits, step) -> tuple:
    return (
        _checks.decay(decay),
        _checks.positive("threshold", threshold),
        _checks.choice("mode", mode, MODES),
        _checks.choice("surrogate", surrogate, SURROGATES),
        _checks.positive("alpha", alpha),
        _checks.integer("spike_bits", spike_bits, 1, MAX_SPIKE_BITS),
        _checks.integer("step", step, 0),
    )


def _check_state(state, shape: tuple[int, ...], device: torch.device, what: str) -> Tensor | None:
    state = _checks.optional_tensor("state", state, device=device)
    if state is not None:
        _checks.shape("state", state, shape, what)
    return state


def saf_neuron(
    u_hat: Tensor,
    *,
    decay: float = 0.5,
    threshold: float = 1.0,
    mode: str = "saf_e",
    surrogate: str = "sigmoid",
    alpha: float = 4.0,
    spike_bits: int = 1,
    state: Tensor | None = None,
    step: int = 0,
    return_spike_count: bool = False,
    backend: str | None = None,
):
    """The SAF neuron (Saiin et al., TMLR 2024): accumulated spikes out, one soft-reset LIF layer.

    With m_t = U_hat[t] - V lambda a_hat[t-1]:
        s[t] = H(m_t - V)                      (spike_bits = 1)
        s[t] = clip(floor(m_t / V), 0, 2^b - 1) (spike_bits = b > 1, multi-bit spikes)
        a_hat[t] = lambda a_hat[t-1] + s[t]
    The spikes equal those of the soft-reset LIF layer fed U_hat[t] - lambda U_hat[t-1].

    Args:
        u_hat: (T, *) float32, bfloat16, float16 or float64 (reference only) accumulated input
            U_hat[t] = W a_in[t] + b S_t. Arithmetic is float32 (float64 for float64 input).
        decay: leak lambda, 0 < decay <= 1. threshold: V > 0.
        mode: "saf_e" (per-step loss; gradient equals OTTT's) or "saf_f" (loss on the last step;
            gradient equals the Spike Representation's, 1[0 < a_hat[t] < (2^b - 1) S_t] / V).
        surrogate, alpha: sigma' used by "saf_e": "sigmoid", "s2nn" or "rectangle" (SPEC.md).
        spike_bits: b in 1..8.
        state: (*) trace a_hat[t0-1] before u_hat[0] (default zeros); keep it in float32 when
            streaming reduced-precision inputs. step: global index t0 of u_hat[0], for S_t.
        return_spike_count: also return the number of spikes emitted (a scalar in the compute
            dtype, differentiable: its gradient joins each spike's upstream gradient).
        backend: "cuda", "triton" or "reference"; default: see ``maqd_kernels.backends()``.

    Returns:
        a_hat, (T, *) in u_hat's dtype and memory format; with return_spike_count, (a_hat, spike_count).
    """
    _checks.tensor("u_hat", u_hat, min_dim=1)
    args = _neuron_args(decay, threshold, mode, surrogate, alpha, spike_bits, step)
    state = _check_state(state, u_hat.shape[1:], u_hat.device, "u_hat.shape[1:]")
    _backend.check_backward("saf_neuron_backward", u_hat, _checks.backend(backend), u_hat)
    grad_mask = args[2] == "saf_f" and torch.is_grad_enabled() and u_hat.requires_grad
    trace, count, _ = _saf_neuron(u_hat, state, *args, grad_mask, backend)
    return (trace, count) if return_spike_count else trace


# ----------------------------------------------------------------------------- spike_trace


@torch.library.custom_op("maqd::spike_trace", mutates_args=())
def _spike_trace(x: Tensor, state: Optional[Tensor], decay: float, backend: Optional[str]) -> Tensor:
    return strided_like(_backend.resolve("spike_trace_forward", x, backend)(x, state, decay), x)


@_spike_trace.register_fake
def _(x, state, decay, backend):
    return torch.empty_like(x)


def _identity_grad(ctx, grad):
    return (grad, None, None, None)


_spike_trace.register_autograd(_identity_grad)


def spike_trace(x: Tensor, *, decay: float = 0.5, state: Tensor | None = None, backend: str | None = None) -> Tensor:
    """The presynaptic trace a_hat[t] = lambda a_hat[t-1] + x[t], SAF's first-layer encoder
    (spikes, or a static image repeated T times). Saiin et al., TMLR 2024.

    Args:
        x: (T, *) float tensor. state: (*) a_hat[t0-1], default zeros. decay: 0 < lambda <= 1.
    Returns:
        (T, *) in x's dtype and memory format. Gradient: da_hat[t]/dx[t] = 1, the recurrence detached.
    """
    _checks.tensor("x", x, min_dim=1)
    decay = _checks.decay(decay)
    state = _check_state(state, x.shape[1:], x.device, "x.shape[1:]")
    return _spike_trace(x, state, decay, _checks.backend(backend))


# ----------------------------------------------------------------------------- saf_readout


@torch.library.custom_op("maqd::saf_readout", mutates_args=())
def _saf_readout(u_hat: Tensor, state: Optional[Tensor], decay: float, backend: Optional[str]) -> Tensor:
    return strided_like(_backend.resolve("saf_readout_forward", u_hat, backend)(u_hat, state, decay), u_hat)


@_saf_readout.register_fake
def _(u_hat, state, decay, backend):
    return torch.empty_like(u_hat)


_saf_readout.register_autograd(_identity_grad)


def saf_readout(
    u_hat: Tensor, *, decay: float = 0.5, state: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """The classifier output of a SAF network's last layer: o[t] = U_hat[t] - lambda U_hat[t-1]
    (= W s[t] + b). Saiin et al., TMLR 2024.

    Args:
        u_hat: (T, *) float tensor. state: (*) U_hat[t0-1], default zeros. decay: 0 < lambda <= 1.
    Returns:
        (T, *) in u_hat's dtype and memory format. Gradient: do[t]/dU_hat[t] = 1, U_hat[t-1] detached.
    """
    _checks.tensor("u_hat", u_hat, min_dim=1)
    decay = _checks.decay(decay)
    state = _check_state(state, u_hat.shape[1:], u_hat.device, "u_hat.shape[1:]")
    return _saf_readout(u_hat, state, decay, _checks.backend(backend))


# ----------------------------------------------------------------------------- saf_linear


@torch.library.custom_op("maqd::saf_linear", mutates_args=())
def _saf_linear(
    a_in: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    state: Optional[Tensor],
    decay: float,
    threshold: float,
    mode: str,
    surrogate: str,
    alpha: float,
    spike_bits: int,
    step: int,
    backend: Optional[str],
) -> tuple[Tensor, Tensor]:
    impl = _backend.resolve("saf_linear_forward", a_in, backend)
    return impl(a_in, weight, bias, state, decay, threshold, spike_bits, step)


@_saf_linear.register_fake
def _(a_in, weight, bias, state, *args):
    out = a_in.new_empty((*a_in.shape[:-1], weight.shape[0]))
    return out, a_in.new_empty((), dtype=reference.compute_dtype(a_in.dtype))


@torch.library.custom_op("maqd::saf_linear_backward", mutates_args=())
def _saf_linear_backward(
    grad_trace: Tensor,
    grad_count: Tensor,
    a_in: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    state: Optional[Tensor],
    decay: float,
    threshold: float,
    mode: str,
    surrogate: str,
    alpha: float,
    spike_bits: int,
    step: int,
    backend: Optional[str],
) -> tuple[Tensor, Tensor, Tensor]:
    impl = _backend.resolve("saf_linear_backward", a_in, backend)
    grad_a_in, grad_weight, grad_bias = impl(
        grad_trace.contiguous(),
        grad_count,
        a_in,
        weight,
        bias,
        state,
        decay,
        threshold,
        mode,
        surrogate,
        alpha,
        spike_bits,
        step,
    )
    return strided_like(grad_a_in, a_in), strided_like(grad_weight, weight), empty_if_none(grad_bias, weight)


@_saf_linear_backward.register_fake
def _(grad_trace, grad_count, a_in, weight, bias, *args):
    grad_bias = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(a_in), torch.empty_like(weight), grad_bias


def _saf_linear_setup(ctx, inputs, output):
    a_in, weight, bias, state, *params = inputs
    ctx.save_for_backward(a_in, weight, bias, state)
    ctx.params = params


def _saf_linear_grad(ctx, grad_trace, grad_count):
    a_in, weight, bias, state = ctx.saved_tensors
    grad_a_in, grad_weight, grad_bias = torch.ops.maqd.saf_linear_backward(
        grad_trace, grad_count, a_in, weight, bias, state, *ctx.params
    )
    return (grad_a_in, grad_weight, none_if_empty(grad_bias)) + (None,) * 9


_saf_linear.register_autograd(_saf_linear_grad, setup_context=_saf_linear_setup)


def saf_linear(
    a_in: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    decay: float = 0.5,
    threshold: float = 1.0,
    mode: str = "saf_e",
    surrogate: str = "sigmoid",
    alpha: float = 4.0,
    spike_bits: int = 1,
    state: Tensor | None = None,
    step: int = 0,
    return_spike_count: bool = False,
    backend: str | None = None,
):
    """A SAF layer: saf_neuron(a_in @ weight^T + bias S_t), one matmul per step on the input trace
    (where OTTT needs two). Saiin et al., TMLR 2024.

    Args:
        a_in: (T, *, K) input trace. weight: (N, K). bias: (N,) or None. Same dtype and device;
            inside ``torch.autocast`` all three are cast to its dtype, as F.linear's operands are.
        Other arguments as in ``saf_neuron``; state is (*, N).
    Returns:
        a_hat, (T, *, N) in a_in's dtype (the autocast dtype inside an autocast region); with
        return_spike_count, (a_hat, spike_count).
    """
    _checks.tensor("a_in", a_in, min_dim=2)
    # Under torch.autocast, the matmul in the region's dtype (as F.linear); the state stays as given.
    a_in, weight, bias = cast(autocast_dtype(a_in), a_in, weight, bias)
    _checks.tensor("weight", weight, dtypes=(a_in.dtype,), min_dim=2, device=a_in.device)
    if weight.dim() != 2 or weight.shape[1] != a_in.shape[-1]:
        raise ValueError(
            f"weight must have shape (out_features, {a_in.shape[-1]}) to match a_in's last dimension; "
            f"got {tuple(weight.shape)}"
        )
    bias = _checks.optional_tensor("bias", bias, dtypes=(a_in.dtype,), device=a_in.device)
    if bias is not None:
        _checks.shape("bias", bias, (weight.shape[0],), "out_features")
    args = _neuron_args(decay, threshold, mode, surrogate, alpha, spike_bits, step)
    state = _check_state(state, (*a_in.shape[1:-1], weight.shape[0]), a_in.device, "(*a_in.shape[1:-1], out_features)")
    _backend.check_backward("saf_linear_backward", a_in, _checks.backend(backend), a_in, weight, bias)
    trace, count = _saf_linear(a_in, weight, bias, state, *args, backend)
    return (trace, count) if return_spike_count else trace


# ----------------------------------------------------------------------------- bias factors


@torch.library.custom_op("maqd::saf_bias_factors", mutates_args=())
def _saf_bias_factors(like: Tensor, decay: float, step: int) -> Tensor:
    if like.device.type == "cuda" and like.dtype != torch.float64:
        return tables.bias_factors(decay, step, like.shape[0], like.device).clone()
    return reference.bias_factors(decay, step, like.shape[0], like.dtype, like.device)


@_saf_bias_factors.register_fake
def _(like, decay, step):
    return like.new_empty(like.shape[0], dtype=reference.compute_dtype(like.dtype))


def _no_grad(ctx, grad):
    return None, None, None


_saf_bias_factors.register_autograd(_no_grad)


def saf_bias_factors(like: Tensor, *, decay: float = 0.5, step: int = 0) -> Tensor:
    """S_t = lambda S_{t-1} + 1 (S_{-1} = 0) for t = step .. step + T - 1, T = like.shape[0]: the
    factor of the bias in U_hat[t] = W a_hat_in[t] + b S_t (Saiin et al., TMLR 2024). Computed by
    the same rounded float32 recurrence as the kernels (float64 for float64 `like`).

    Returns: (T,) float32 (float64) on like's device; not differentiable.
    """
    _checks.tensor("like", like, min_dim=1)
    return _saf_bias_factors(like, _checks.decay(decay), _checks.integer("step", step, 0))


# ----------------------------------------------------------------------------- baselines


@torch.library.custom_op("maqd::lif_neuron", mutates_args=())
def _lif_neuron(current: Tensor, decay: float, threshold: float, surrogate: str, alpha: float, online: bool) -> Tensor:
    return strided_like(reference.lif_forward(current, decay, threshold)[0], current)


@_lif_neuron.register_fake
def _(current, *args):
    return torch.empty_like(current)


@torch.library.custom_op("maqd::lif_neuron_backward", mutates_args=())
def _lif_neuron_backward(
    grad: Tensor, current: Tensor, decay: float, threshold: float, surrogate: str, alpha: float, online: bool
) -> Tensor:
    backward = reference.ottt_neuron_backward if online else reference.lif_bptt_backward
    return strided_like(backward(grad, current, decay, threshold, surrogate, alpha), current)


@_lif_neuron_backward.register_fake
def _(grad, current, *args):
    return torch.empty_like(current)


def _lif_neuron_setup(ctx, inputs, output):
    current, *params = inputs
    ctx.save_for_backward(current)
    ctx.params = params


def _lif_neuron_grad(ctx, grad):
    return (torch.ops.maqd.lif_neuron_backward(grad, ctx.saved_tensors[0], *ctx.params),) + (None,) * 5


_lif_neuron.register_autograd(_lif_neuron_grad, setup_context=_lif_neuron_setup)


def _lif_args(current, decay, threshold, surrogate, alpha) -> tuple:
    _checks.tensor("current", current, min_dim=1)
    return (
        _checks.decay(decay),
        _checks.positive("threshold", threshold),
        _checks.choice("surrogate", surrogate, SURROGATES),
        _checks.positive("alpha", alpha),
    )


def lif_bptt(
    current: Tensor, *, decay: float = 0.5, threshold: float = 1.0, surrogate: str = "sigmoid", alpha: float = 4.0
) -> Tensor:
    """Baseline: the soft-reset LIF neuron u[t] = lambda (u[t-1] - V s[t-1]) + I[t],
    s[t] = H(u[t] - V), trained by backpropagation through time (reset included).

    Args: current: (T, *) input current I. Returns: spikes (T, *) in current's dtype and memory format.
    """
    return _lif_neuron(current, *_lif_args(current, decay, threshold, surrogate, alpha), False)


def ottt_neuron(
    current: Tensor, *, decay: float = 0.5, threshold: float = 1.0, surrogate: str = "sigmoid", alpha: float = 4.0
) -> Tensor:
    """Baseline: the same LIF neuron as ``lif_bptt`` with OTTT's online gradient (Xiao et al.,
    NeurIPS 2022): ds[t]/dI[t] = sigma'(u[t] - V), nothing through time.

    Args: current: (T, *) input current I. Returns: spikes (T, *) in current's dtype and memory format.
    """
    return _lif_neuron(current, *_lif_args(current, decay, threshold, surrogate, alpha), True)


@torch.library.custom_op("maqd::ottt_linear", mutates_args=())
def _ottt_linear(s_in: Tensor, weight: Tensor, bias: Optional[Tensor], decay: float) -> Tensor:
    return reference.ottt_linear_forward(s_in, weight, bias)


@_ottt_linear.register_fake
def _(s_in, weight, bias, decay):
    return s_in.new_empty((*s_in.shape[:-1], weight.shape[0]))


@torch.library.custom_op("maqd::ottt_linear_backward", mutates_args=())
def _ottt_linear_backward(
    grad: Tensor, s_in: Tensor, weight: Tensor, bias: Optional[Tensor], decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    grad_s_in, grad_weight, grad_bias = reference.ottt_linear_backward(grad, s_in, weight, bias, decay)
    return strided_like(grad_s_in, s_in), strided_like(grad_weight, weight), empty_if_none(grad_bias, weight)


@_ottt_linear_backward.register_fake
def _(grad, s_in, weight, bias, decay):
    grad_bias = torch.empty_like(bias) if bias is not None else weight.new_empty(0)
    return torch.empty_like(s_in), torch.empty_like(weight), grad_bias


def _ottt_linear_setup(ctx, inputs, output):
    s_in, weight, bias, decay = inputs
    ctx.save_for_backward(s_in, weight, bias)
    ctx.decay = decay


def _ottt_linear_grad(ctx, grad):
    s_in, weight, bias = ctx.saved_tensors
    grad_s_in, grad_weight, grad_bias = torch.ops.maqd.ottt_linear_backward(grad, s_in, weight, bias, ctx.decay)
    return grad_s_in, grad_weight, none_if_empty(grad_bias), None


_ottt_linear.register_autograd(_ottt_linear_grad, setup_context=_ottt_linear_setup)


def ottt_linear(s_in: Tensor, weight: Tensor, bias: Tensor | None = None, *, decay: float = 0.5) -> Tensor:
    """Baseline: OTTT's layer (Xiao et al., NeurIPS 2022): forward W s_in[t] + b on the spikes,
    weight gradient through the presynaptic trace a_hat_in[t] = lambda a_hat_in[t-1] + s_in[t], as in
    OTTT's code. Compose with ``ottt_neuron`` for a spiking layer; alone it is the readout.

    Args: s_in: (T, *, K) spikes; weight: (N, K); bias: (N,) or None. Returns: (T, *, N).
    """
    _checks.tensor("s_in", s_in, min_dim=2)
    s_in, weight, bias = cast(autocast_dtype(s_in), s_in, weight, bias)  # torch.autocast: as F.linear
    _checks.tensor("weight", weight, dtypes=(s_in.dtype,), min_dim=2, device=s_in.device)
    if weight.dim() != 2 or weight.shape[1] != s_in.shape[-1]:
        raise ValueError(f"weight must have shape (out_features, {s_in.shape[-1]}); got {tuple(weight.shape)}")
    bias = _checks.optional_tensor("bias", bias, dtypes=(s_in.dtype,), device=s_in.device)
    if bias is not None:
        _checks.shape("bias", bias, (weight.shape[0],), "out_features")
    return _ottt_linear(s_in, weight, bias, _checks.decay(decay))


# torch.autocast stops at these ops' boundary (see run_below_autocast).
run_below_autocast(
    _saf_neuron,
    _saf_neuron_backward,
    _spike_trace,
    _saf_readout,
    _saf_linear,
    _saf_linear_backward,
    _saf_bias_factors,
    _lif_neuron,
    _lif_neuron_backward,
    _ottt_linear,
    _ottt_linear_backward,
)

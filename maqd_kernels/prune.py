"""Spectral pruning of recurrent networks (SPEC.md section 4; Furuya, Suetake, Taniguchi, Kusumoto,
Saiin and Daimon, "Spectral pruning for recurrent neural networks", AISTATS 2022, arXiv 2105.10832),
the magnitude-pruning baseline it is compared with, and the error of a pruned network measured on
its own run.

A single-layer ``nn.RNN`` computes ``h_t = σ(W_ih x_t + b_ih + W_hh h_{t-1} + b_hh)``. Spectral
pruning keeps the hidden units J whose states best reconstruct all m states through one linear map,
``h ≈ A h_J``, and folds that map into the weights the dropped units fed: the kept units'
pre-activations ``W_hh[J, :] h + ...`` become ``(W_hh[J, :] A) h_J + ...``. Pruning errors feed
back through the recurrence and accumulate over time, so :func:`pruning_error` compares the pruned
network's own run with the full network's, step by step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import _checks

# Small enough that keep = hidden_size rebuilds the network to float32 precision (the pruned run drifts
# from the original by about 10 * ridge), large enough to keep the Cholesky solve well defined.
DEFAULT_RIDGE = 1e-8


@dataclass(frozen=True)
class PrunedRNN:
    """The result of :func:`spectral_prune_rnn` or :func:`magnitude_prune_rnn`.

    It reads as SPEC.md's two-tuple ``(pruned_rnn, reconstruction_error)``: it unpacks into those
    two, ``result[0]`` and ``result[1]`` are them and ``len(result) == 2``; the other fields are
    read by name.

    Attributes:
        rnn: the pruned ``nn.RNN``, hidden size ``keep``, same dtype, device, nonlinearity, bias
            and batch_first as the original.
        reconstruction_error: ``||H - H_J Aᵀ||_F² / ||H||_F²`` over the calibration run's hidden
            states H (a float; 0.0 when H is all zero); None for magnitude pruning, which sees no data.
        readout: the pruned readout ``nn.Linear(keep, out_features)``, or None when none was given.
        kept: int64 (keep,) the kept units' indices in the original network, ascending; unit i of
            the pruned network is unit ``kept[i]`` of the original.
        reconstruction: A, float64 (hidden_size, keep): the full hidden state is approximated by
            ``A @ h_kept``. Magnitude pruning's A is the 0/1 matrix that copies the kept units and
            sets the dropped ones to zero.
    """

    rnn: nn.RNN
    reconstruction_error: float | None
    readout: nn.Linear | None
    kept: torch.Tensor
    reconstruction: torch.Tensor

    def __iter__(self):
        return iter((self.rnn, self.reconstruction_error))

    def __getitem__(self, index):
        return (self.rnn, self.reconstruction_error)[index]

    def __len__(self) -> int:
        return 2


@dataclass(frozen=True)
class PruningError:
    """Relative squared errors of a pruned network's own run against the full network's
    (:func:`pruning_error`); each is ``||reference - pruned||² / ||reference||²`` (0.0 when the
    reference is all zero).

    Attributes:
        hidden: the pruned network's hidden states against the full network's kept units, over
            every step and sample.
        hidden_per_step: float64 (T,): the same error at each time step, which shows how it grows
            as pruning errors feed back through the recurrence.
        readout: the pruned readout of the pruned states against the full readout of the full
            states, over every step and sample; None when no readout was given.
    """

    hidden: float
    hidden_per_step: torch.Tensor
    readout: float | None


def spectral_prune_rnn(
    rnn: nn.RNN,
    calibration_inputs: torch.Tensor,
    keep: int,
    *,
    readout: nn.Linear | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> PrunedRNN:
    """Prunes ``rnn`` to ``keep`` hidden units by spectral pruning (Furuya et al., AISTATS 2022).

    1. Runs ``rnn`` (from a zero initial state, without gradients) on ``calibration_inputs`` and
       stacks every hidden state, over batch and time, into H (n, m), m = hidden_size.
    2. Forms the uncentred, time-averaged covariance ``Σ = Hᵀ H / n``, as the paper does: the
       reconstruction ``h ≈ A h_J`` has no intercept, so it is the second moment, not the
       variance, that it must explain.
    3. Chooses the kept set J, |J| = keep, to minimise the paper's input information loss
       ``trace(Σ_FF - Σ_FJ (Σ_JJ + τI)⁻¹ Σ_JF)`` (F: all units), by greedy forward selection:
       each step adds the unit whose addition lowers the loss most. Greedy is exact for keep = 1
       and keep = m and its losses fall as keep grows (the sets are nested), but in general it
       only approximates the best subset of the combinatorial problem: on 30 random 6-unit RNNs
       it missed the exhaustive optimum for 57 of the 150 (network, keep) pairs, by up to 4.5x
       in loss. The paper's objective can also weigh an output information loss; this is the
       input loss of SPEC.md alone.
    4. Builds ``A = Σ_FJ (Σ_JJ + τI)⁻¹`` (m, keep): the ridge regression of H on H_J,
       ``argmin_A ||H - H_J Aᵀ||_F² / n + τ ||A||_F²``, with ``τ = ridge · trace(Σ) / m`` (ridge
       relative to the mean second moment of a unit, so one value suits tanh and relu networks).
    5. Rebuilds: ``W_hh' = W_hh[J, :] A`` (keep, keep), ``W_ih' = W_ih[J, :]``, ``b' = b[J]`` for
       both biases, and for a readout ``W_out' = W_out A`` with its bias unchanged.

    The linear algebra runs in float64; the new weights take the rnn's dtype. The units keep their
    original order (``kept`` ascending). ``rnn`` and ``readout`` are not modified.

    Args:
        rnn: ``torch.nn.RNN``, single layer, unidirectional, tanh or relu, with or without bias,
            batch_first either way, any floating dtype.
        calibration_inputs: what ``rnn`` reads, in its dtype and on its device: (T, B, input_size),
            (B, T, input_size) when batch_first, or unbatched (T, input_size). Not a PackedSequence.
        keep: hidden units to keep, 1 <= keep <= hidden_size.
        readout: optional ``nn.Linear(hidden_size, out_features)`` applied to the hidden states.
        ridge: τ relative to ``trace(Σ) / m``; > 0 so that ``Σ_JJ + τI`` is invertible even when
            units are dead or duplicated.
    Returns:
        :class:`PrunedRNN`; unpacks as ``(pruned_rnn, reconstruction_error)``, the relative
        reconstruction error ``||H - H_J Aᵀ||_F² / ||H||_F²`` on the calibration run; the pruned
        readout, kept indices and A are its fields ``readout``, ``kept``, ``reconstruction``.
    """
    _check_rnn(rnn)
    keep = _checks.integer("keep", keep, 1, rnn.hidden_size)
    _check_readout(readout, rnn)
    ridge = _checks.positive("ridge", ridge)
    calibration_inputs = _check_inputs("calibration_inputs", calibration_inputs, rnn)
    if calibration_inputs[..., 0].numel() == 0:
        shape = tuple(calibration_inputs.shape)
        raise ValueError(f"calibration_inputs must hold at least one step of one sequence; got shape {shape}")
    states = _run(rnn, calibration_inputs).reshape(-1, rnn.hidden_size).double()
    covariance = states.T @ states / states.shape[0]
    trace = covariance.trace().item()
    # An all-zero H is reconstructed exactly by A = 0; any τ > 0 then keeps the solve defined.
    tau = ridge * (trace / rnn.hidden_size if trace > 0 else 1.0)
    kept = greedy_spectral_selection(covariance, keep, tau)
    reconstruction = reconstruction_matrix(covariance, kept, tau)

    error = _relative(states, states[:, kept] @ reconstruction.T)
    return _rebuild(rnn, readout, kept, reconstruction, error)


def magnitude_prune_rnn(rnn: nn.RNN, keep: int, readout: nn.Linear | None = None) -> PrunedRNN:
    """The baseline spectral pruning is compared with: keeps the ``keep`` hidden units whose outgoing
    weights are largest, ``||W_hh[:, j]||² + ||W_out[:, j]||²`` (recurrent column plus readout
    column, when a readout is given), and drops the others without reconstruction: the kept units'
    rows and columns of every weight are copied unchanged.

    Args: as :func:`spectral_prune_rnn` (no calibration data). Ties go to the lower index.
    Returns: :class:`PrunedRNN` with ``reconstruction_error`` None and ``reconstruction`` the 0/1
        (hidden_size, keep) matrix of the kept units.
    """
    _check_rnn(rnn)
    keep = _checks.integer("keep", keep, 1, rnn.hidden_size)
    _check_readout(readout, rnn)
    with torch.no_grad():
        importance = rnn.weight_hh_l0.double().square().sum(dim=0)
        if readout is not None:
            importance += readout.weight.double().square().sum(dim=0)
    # A stable sort of the negated scores: among equal scores the lower index comes first.
    kept = torch.sort(-importance.cpu(), stable=True).indices[:keep].sort().values
    selection = torch.zeros(rnn.hidden_size, keep, dtype=torch.float64)
    selection[kept, torch.arange(keep)] = 1.0
    return _rebuild(rnn, readout, kept, selection, None)


def greedy_spectral_selection(covariance: torch.Tensor, keep: int, tau: float) -> torch.Tensor:
    """The kept set J of :func:`spectral_prune_rnn`: greedy forward selection on the loss
    ``L(J) = trace(Σ - Σ_FJ (Σ_JJ + τI)⁻¹ Σ_JF)``.

    The residual ``R = Σ - Σ_FJ (Σ_JJ + τI)⁻¹ Σ_JF`` is updated in place: adding unit j lowers L by
    ``||R[:, j]||² / (R[j, j] + τ)`` and updates ``R -= R[:, j] R[j, :] / (R[j, j] + τ)`` (block
    inversion of ``Σ_JJ + τI``), so selection costs O(keep · m²) instead of a solve per candidate.

    Args: covariance float64 (m, m) symmetric positive semi-definite; 1 <= keep <= m; tau > 0.
    Returns: int64 (keep,) the selected units, ascending (the greedy order is not kept).
    """
    residual = covariance.clone()
    available = torch.ones(covariance.shape[0], dtype=torch.bool, device=covariance.device)
    chosen = []
    for _ in range(keep):
        gain = residual.square().sum(dim=0) / (residual.diagonal() + tau)
        unit = torch.where(available, gain, -torch.inf).argmax().item()
        chosen.append(unit)
        available[unit] = False
        column = residual[:, unit].clone()
        residual -= torch.outer(column, column) / (column[unit] + tau)
    return torch.tensor(sorted(chosen), dtype=torch.int64)


def reconstruction_matrix(covariance: torch.Tensor, kept: torch.Tensor, tau: float) -> torch.Tensor:
    """``A = Σ_FJ (Σ_JJ + τI)⁻¹``, float64 (m, keep), by a Cholesky solve (Σ_JJ + τI is symmetric
    positive definite for τ > 0). Args: covariance float64 (m, m); kept int64 (keep,); tau > 0."""
    kept = kept.to(covariance.device)
    regularized = covariance[kept][:, kept] + tau * torch.eye(
        len(kept), dtype=covariance.dtype, device=covariance.device
    )
    return torch.cholesky_solve(covariance[kept, :], torch.linalg.cholesky(regularized)).T


@torch.no_grad()
def pruning_error(
    rnn: nn.RNN, pruned: PrunedRNN, inputs: torch.Tensor, *, readout: nn.Linear | None = None
) -> PruningError:
    """How far the pruned network's own run drifts from the full network's on ``inputs``.

    Both run from a zero initial state. The pruned hidden states are compared with the full states
    of the kept units (``h[..., kept]``), over all steps and per step; with ``readout``, the pruned
    readout of the pruned states (``pruned.readout``) is compared with ``readout`` of the full
    states at every step. Unlike the one-step calibration ``reconstruction_error``, errors here
    feed back through the recurrence, as they do when the pruned network is used.

    Args:
        rnn: the original ``nn.RNN``; pruned: what :func:`spectral_prune_rnn` or
            :func:`magnitude_prune_rnn` returned for it; inputs: as ``calibration_inputs`` of
            :func:`spectral_prune_rnn` (use held-out data); readout: the original readout, when
            ``pruned`` was made with one.
    Returns: :class:`PruningError`.
    """
    _check_rnn(rnn)
    if not isinstance(pruned, PrunedRNN):
        raise TypeError(
            f"pruned must be a PrunedRNN (from spectral_prune_rnn or magnitude_prune_rnn), got {type(pruned).__name__}"
        )
    if pruned.reconstruction.shape[0] != rnn.hidden_size:
        raise ValueError(
            f"pruned was made from an rnn with hidden_size {pruned.reconstruction.shape[0]}, "
            f"but rnn has hidden_size {rnn.hidden_size}"
        )
    _check_readout(readout, rnn)
    if readout is not None and pruned.readout is None:
        raise ValueError("readout was given, but pruned has no readout: prune with readout= to compare readouts")
    inputs = _check_inputs("inputs", inputs, rnn)
    full = _run(rnn, inputs)
    reduced = _run(pruned.rnn, inputs)
    time_dim = 1 if rnn.batch_first and inputs.dim() == 3 else 0
    reference = full[..., pruned.kept.to(full.device)].double().movedim(time_dim, 0).flatten(1)
    difference = (reduced.double().movedim(time_dim, 0).flatten(1) - reference).square().sum(dim=1)
    reference_energy = reference.square().sum(dim=1)
    readout_error = None
    if readout is not None:
        readout_error = _relative(readout(full).double(), pruned.readout(reduced).double())
    return PruningError(
        hidden=_ratio(difference.sum(), reference_energy.sum()),
        hidden_per_step=torch.where(reference_energy > 0, difference / reference_energy, 0.0).cpu(),
        readout=readout_error,
    )


def _relative(reference: torch.Tensor, approximation: torch.Tensor) -> float:
    return _ratio((approximation - reference).square().sum(), reference.square().sum())


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> float:
    return (numerator / denominator).item() if denominator > 0 else 0.0


@torch.no_grad()
def _run(rnn: nn.RNN, inputs: torch.Tensor) -> torch.Tensor:
    """Every hidden state of ``rnn`` on ``inputs`` from a zero initial state, shaped as its output."""
    return rnn(inputs)[0]


def _rebuild(
    rnn: nn.RNN, readout: nn.Linear | None, kept: torch.Tensor, reconstruction: torch.Tensor, error: float | None
) -> PrunedRNN:
    """The pruned network and readout of kept units J and reconstruction A (m, keep), float64."""
    keep = len(kept)
    weight = rnn.weight_hh_l0
    pruned = nn.RNN(
        rnn.input_size,
        keep,
        num_layers=1,
        nonlinearity=rnn.nonlinearity,
        bias=rnn.bias,
        batch_first=rnn.batch_first,
        device=weight.device,
        dtype=weight.dtype,
    )
    rows = kept.to(weight.device)
    a = reconstruction.to(weight.device)
    with torch.no_grad():
        pruned.weight_hh_l0.copy_(weight[rows].double() @ a)
        pruned.weight_ih_l0.copy_(rnn.weight_ih_l0[rows])
        if rnn.bias:
            pruned.bias_ih_l0.copy_(rnn.bias_ih_l0[rows])
            pruned.bias_hh_l0.copy_(rnn.bias_hh_l0[rows])
        pruned_readout = None
        if readout is not None:
            pruned_readout = nn.Linear(
                keep,
                readout.out_features,
                bias=readout.bias is not None,
                device=readout.weight.device,
                dtype=readout.weight.dtype,
            )
            pruned_readout.weight.copy_(readout.weight.double() @ a.to(readout.weight.device))
            if readout.bias is not None:
                pruned_readout.bias.copy_(readout.bias)
    pruned.train(rnn.training)
    if pruned_readout is not None:
        pruned_readout.train(readout.training)
    return PrunedRNN(pruned, error, pruned_readout, kept.cpu(), reconstruction.cpu())


def _check_rnn(rnn: object) -> None:
    if not isinstance(rnn, nn.RNN):
        raise TypeError(
            f"rnn must be a torch.nn.RNN (tanh or relu), got {type(rnn).__name__}; "
            "LSTM and GRU have gates that spectral pruning's rebuild does not cover"
        )
    if rnn.num_layers != 1:
        raise ValueError(f"rnn must have num_layers=1; got {rnn.num_layers} (prune a stack layer by layer)")
    if rnn.bidirectional:
        raise ValueError("rnn must be unidirectional; got bidirectional=True")


def _check_readout(readout: object, rnn: nn.RNN) -> None:
    if readout is None:
        return
    if not isinstance(readout, nn.Linear):
        raise TypeError(f"readout must be a torch.nn.Linear or None, got {type(readout).__name__}")
    if readout.in_features != rnn.hidden_size:
        raise ValueError(
            f"readout must read the rnn's hidden states: in_features {rnn.hidden_size}; got {readout.in_features}"
        )


def _check_inputs(name: str, inputs: object, rnn: nn.RNN) -> torch.Tensor:
    weight = rnn.weight_ih_l0
    inputs = _checks.tensor(name, inputs, dtypes=(weight.dtype,))
    if inputs.dim() not in (2, 3) or inputs.shape[-1] != rnn.input_size:
        layout = "(B, T, input_size)" if rnn.batch_first else "(T, B, input_size)"
        raise ValueError(
            f"{name} must have shape {layout} or (T, input_size) with input_size {rnn.input_size}; "
            f"got {tuple(inputs.shape)}"
        )
    if inputs.device != weight.device:
        raise ValueError(f"{name} is on {inputs.device}, but rnn is on {weight.device}; move it to {weight.device}")
    return inputs

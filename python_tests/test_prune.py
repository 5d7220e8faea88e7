"""Spectral pruning of RNNs (maqd_kernels.prune; SPEC.md section 4; Furuya et al., AISTATS 2022):
the reconstruction matrix is the ridge regression, the rebuilt weights are the stated products,
the greedy selection does what it guarantees, spectral pruning beats magnitude pruning where the
hidden states are redundant, and the example runs."""

import csv
import itertools
from collections.abc import Callable

import pytest
import torch
from torch import nn

from maqd_kernels import magnitude_prune_rnn, spectral_prune_rnn
from maqd_kernels.prune import (
    DEFAULT_RIDGE,
    PrunedRNN,
    greedy_spectral_selection,
    pruning_error,
    reconstruction_matrix,
)

from helpers import requires_gpu, run_example

DEVICES = ["cpu", pytest.param("cuda", marks=requires_gpu)]
DTYPES = [torch.float32, torch.float64]
INPUT_SIZE, HIDDEN, OUTPUTS = 3, 12, 2


def _rnn(*, hidden=HIDDEN, dtype=torch.float64, device="cpu", **options) -> nn.RNN:
    return nn.RNN(INPUT_SIZE, hidden, dtype=dtype, device=device, **options)


def _readout(*, hidden=HIDDEN, dtype=torch.float64, device="cpu") -> nn.Linear:
    return nn.Linear(hidden, OUTPUTS, dtype=dtype, device=device)


def _inputs(steps=15, batch=8, *, dtype=torch.float64, device="cpu", batch_first=False) -> torch.Tensor:
    shape = (batch, steps, INPUT_SIZE) if batch_first else (steps, batch, INPUT_SIZE)
    return torch.randn(shape, dtype=dtype, device=device)


def _states(rnn: nn.RNN, inputs: torch.Tensor) -> torch.Tensor:
    """H (n, m): every hidden state, float64."""
    with torch.no_grad():
        return rnn(inputs)[0].reshape(-1, rnn.hidden_size).double()


def _input_loss(covariance: torch.Tensor, kept, tau: float) -> float:
    """The paper's input information loss trace(Σ - Σ_FJ (Σ_JJ + τI)⁻¹ Σ_JF), by a direct solve."""
    kept = list(kept)
    regularized = covariance[kept][:, kept] + tau * torch.eye(len(kept), dtype=covariance.dtype)
    explained = covariance[:, kept] @ torch.linalg.solve(regularized, covariance[kept, :])
    return (covariance - explained).trace().item()


def _tau(covariance: torch.Tensor, ridge: float = DEFAULT_RIDGE) -> float:
    return ridge * covariance.trace().item() / covariance.shape[0]


# The reconstruction and the rebuilt weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_reconstruction_error_falls_as_keep_grows_and_vanishes_at_full_size(dtype, device):
    rnn, readout = _rnn(dtype=dtype, device=device), _readout(dtype=dtype, device=device)
    calibration = _inputs(dtype=dtype, device=device)
    errors = [spectral_prune_rnn(rnn, calibration, keep)[1] for keep in range(1, HIDDEN + 1)]

    assert all(later <= earlier + 1e-12 for earlier, later in zip(errors, errors[1:])), errors
    assert errors[0] > errors[HIDDEN // 3] > errors[2 * HIDDEN // 3] > errors[-1], errors
    assert errors[0] > 0.05 and errors[-1] < 1e-6

    full = spectral_prune_rnn(rnn, calibration, HIDDEN, readout=readout)
    assert full.kept.tolist() == list(range(HIDDEN))
    held_out = _inputs(steps=30, dtype=dtype, device=device)
    # The ridge keeps A from being exactly I: the rebuilt run drifts by about 10 * ridge.
    tolerance = {} if dtype == torch.float32 else {"atol": 1e-6, "rtol": 1e-6}
    with torch.no_grad():
        torch.testing.assert_close(full.rnn(held_out)[0], rnn(held_out)[0], **tolerance)
        torch.testing.assert_close(full.readout(full.rnn(held_out)[0]), readout(rnn(held_out)[0]), **tolerance)


def test_reconstruction_matrix_is_the_ridge_regression_solution_and_the_error_its_residual():
    rnn, calibration = _rnn(), _inputs()
    ridge = 1e-3  # large enough that an unregularised solution would differ visibly
    result = spectral_prune_rnn(rnn, calibration, 5, ridge=ridge)
    states = _states(rnn, calibration)
    n, m = states.shape
    tau = ridge * (states.square().sum() / (n * m)).item()
    kept = result.kept

    # min_A ||H - H_J Aᵀ||² / n + τ ||A||²  <=>  least squares on H_J stacked over sqrt(nτ) I.
    design = torch.cat([states[:, kept], (n * tau) ** 0.5 * torch.eye(len(kept), dtype=torch.float64)])
    target = torch.cat([states, torch.zeros(len(kept), m, dtype=torch.float64)])
    ridge_solution = torch.linalg.lstsq(design, target).solution.T
    torch.testing.assert_close(result.reconstruction, ridge_solution, rtol=1e-9, atol=1e-10)

    unregularised = torch.linalg.lstsq(states[:, kept], states).solution.T
    assert (result.reconstruction - unregularised).abs().max() > 1e-6
    residual = (states - states[:, kept] @ ridge_solution.T).square().sum() / states.square().sum()
    assert result.reconstruction_error == pytest.approx(residual.item(), rel=1e-9)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rebuilt_weights_are_the_stated_products_and_the_original_is_unchanged(dtype, device):
    rnn, readout = _rnn(dtype=dtype, device=device), _readout(dtype=dtype, device=device)
    before = {k: v.clone() for k, v in [*rnn.state_dict().items(), *readout.state_dict().items()]}
    keep = 5
    result = spectral_prune_rnn(rnn, _inputs(dtype=dtype, device=device), keep, readout=readout)
    after = {k: v for k, v in [*rnn.state_dict().items(), *readout.state_dict().items()]}
    assert all(torch.equal(before[k], after[k]) for k in before)

    pruned, kept, a = result.rnn, result.kept.to(device), result.reconstruction.to(device)
    assert isinstance(pruned, nn.RNN) and pruned is not rnn
    assert (pruned.hidden_size, pruned.input_size, pruned.nonlinearity) == (keep, INPUT_SIZE, "tanh")
    assert a.shape == (HIDDEN, keep) and a.dtype == torch.float64
    assert kept.tolist() == sorted(kept.tolist()) and len(set(kept.tolist())) == keep
    shapes = {name: tuple(p.shape) for name, p in pruned.named_parameters()}
    assert shapes == {
        "weight_ih_l0": (keep, INPUT_SIZE),
        "weight_hh_l0": (keep, keep),
        "bias_ih_l0": (keep,),
        "bias_hh_l0": (keep,),
    }
    assert all(p.dtype == dtype and p.device.type == device for p in pruned.parameters())
    assert result.readout.weight.shape == (OUTPUTS, keep)

    expected_hh = (rnn.weight_hh_l0.detach().double()[kept] @ a).to(dtype)
    torch.testing.assert_close(pruned.weight_hh_l0.detach(), expected_hh, rtol=0, atol=0)
    assert torch.equal(pruned.weight_ih_l0, rnn.weight_ih_l0[kept])
    assert torch.equal(pruned.bias_ih_l0, rnn.bias_ih_l0[kept])
    assert torch.equal(pruned.bias_hh_l0, rnn.bias_hh_l0[kept])
    expected_out = (readout.weight.detach().double() @ a).to(dtype)
    torch.testing.assert_close(result.readout.weight.detach(), expected_out, rtol=0, atol=0)
    assert torch.equal(result.readout.bias, readout.bias)


def test_result_unpacks_as_the_spec_two_tuple():
    rnn = _rnn()
    pruned, error = spectral_prune_rnn(rnn, _inputs(), 4)
    result = spectral_prune_rnn(rnn, _inputs(), 4)
    assert isinstance(pruned, nn.RNN) and pruned.hidden_size == 4
    assert isinstance(error, float) and 0 < error < 1
    assert isinstance(result, PrunedRNN) and result.readout is None


def test_batch_first_either_way_and_unbatched_inputs_give_the_same_pruning():
    time_first = _rnn()
    batch_first = _rnn(batch_first=True)
    batch_first.load_state_dict(time_first.state_dict())
    inputs = _inputs()
    a = spectral_prune_rnn(time_first, inputs, 6)
    b = spectral_prune_rnn(batch_first, inputs.transpose(0, 1).contiguous(), 6)
    assert b.rnn.batch_first and not a.rnn.batch_first
    assert torch.equal(a.kept, b.kept)
    torch.testing.assert_close(a.reconstruction, b.reconstruction, rtol=1e-12, atol=1e-14)
    assert a.reconstruction_error == pytest.approx(b.reconstruction_error, rel=1e-10)

    sequence = inputs[:, 0]  # (T, input_size): one unbatched sequence
    unbatched = spectral_prune_rnn(time_first, sequence, 6)
    batched = spectral_prune_rnn(time_first, sequence.unsqueeze(1), 6)
    assert torch.equal(unbatched.kept, batched.kept)
    assert unbatched.reconstruction_error == pytest.approx(batched.reconstruction_error, rel=1e-12)
    held_out = _inputs(batch_first=True)
    errors = pruning_error(batch_first, b, held_out)
    assert errors.hidden_per_step.shape == (held_out.shape[1],)
    assert errors.hidden == pytest.approx(pruning_error(time_first, a, held_out.transpose(0, 1)).hidden, rel=1e-9)


@pytest.mark.parametrize("bias", [True, False])
def test_relu_without_bias_keeps_its_kind_and_is_exact_at_full_size_as_the_ridge_vanishes(bias):
    rnn = _rnn(nonlinearity="relu", bias=bias)
    inputs = _inputs()
    with torch.no_grad():
        drift = {
            ridge: (spectral_prune_rnn(rnn, inputs, HIDDEN, ridge=ridge).rnn(inputs)[0] - rnn(inputs)[0]).abs().max()
            for ridge in (1e-4, 1e-8, 1e-12)
        }
    assert drift[1e-12] < 1e-9 < drift[1e-8] < 1e-6 < drift[1e-4], drift
    result = spectral_prune_rnn(rnn, inputs, HIDDEN)
    assert result.rnn.nonlinearity == "relu" and result.rnn.bias == bias
    assert len(list(result.rnn.parameters())) == (4 if bias else 2)
    assert spectral_prune_rnn(rnn, inputs, 4).reconstruction_error > 1e-3


def test_all_zero_hidden_states_are_reconstructed_exactly():
    rnn = _rnn(nonlinearity="relu", bias=False)
    with torch.no_grad():
        rnn.weight_ih_l0.zero_()
    result = spectral_prune_rnn(rnn, _inputs(), 3)
    assert result.reconstruction_error == 0.0
    assert torch.equal(result.reconstruction, torch.zeros(HIDDEN, 3, dtype=torch.float64))


# The greedy selection


def test_greedy_adds_the_best_unit_at_every_step_and_its_first_unit_is_the_best_single_one():
    states = _states(_rnn(hidden=7), _inputs())
    covariance = states.T @ states / len(states)
    tau = _tau(covariance)
    previous: list[int] = []
    for keep in range(1, 8):
        chosen = greedy_spectral_selection(covariance, keep, tau).tolist()
        assert set(previous) < set(chosen)  # the sets are nested: one more unit per step
        added = (set(chosen) - set(previous)).pop()
        losses = {j: _input_loss(covariance, previous + [j], tau) for j in range(7) if j not in previous}
        assert losses[added] == pytest.approx(min(losses.values()), rel=1e-9, abs=1e-12)
        previous = chosen
    best_single = min(range(7), key=lambda j: _input_loss(covariance, [j], tau))
    assert greedy_spectral_selection(covariance, 1, tau).tolist() == [best_single]


def test_greedy_finds_the_exhaustive_optimum_when_a_few_units_determine_the_rest():
    # Units 3..5 copy units 0..2 and units 6..7 are their sums: any basis of three independent units
    # reconstructs everything, and greedy must find one, as the exhaustive search does.
    base = _rnn(hidden=3)
    mixing = torch.tensor(
        [[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0, 1, 1]],
        dtype=torch.float64,
    )
    with torch.no_grad():
        states = base(_inputs(steps=20, batch=16))[0].reshape(-1, 3) @ mixing.T
    covariance = states.T @ states / len(states)
    tau = _tau(covariance, 1e-9)
    exhaustive = min(_input_loss(covariance, subset, tau) for subset in itertools.combinations(range(8), 3))
    greedy = greedy_spectral_selection(covariance, 3, tau).tolist()
    assert _input_loss(covariance, greedy, tau) == pytest.approx(exhaustive, abs=1e-8)
    assert _input_loss(covariance, greedy, tau) < 1e-7 * covariance.trace().item()
    assert torch.linalg.matrix_rank(states[:, greedy]) == 3


def test_reconstruction_matrix_solves_the_regularized_normal_equations():
    states = _states(_rnn(), _inputs())
    covariance = states.T @ states / len(states)
    kept, tau = torch.tensor([1, 4, 7]), 0.01
    a = reconstruction_matrix(covariance, kept, tau)
    torch.testing.assert_close(
        a @ (covariance[kept][:, kept] + tau * torch.eye(3, dtype=torch.float64)),
        covariance[:, kept],
        rtol=1e-10,
        atol=1e-12,
    )


# Spectral against magnitude pruning, on held-out inputs of the pruned networks' own runs


def _low_rank_rnn(rank: int) -> tuple[nn.RNN, nn.Linear]:
    """A tanh RNN whose input, bias and recurrent weights all write into one rank-`rank` subspace,
    so its pre-activations, and nearly its states, live in a `rank`-dimensional space."""
    hidden = 32
    rnn, readout = _rnn(hidden=hidden), _readout(hidden=hidden)
    columns = torch.randn(hidden, rank, dtype=torch.float64)
    rows = torch.linalg.qr(torch.randn(hidden, rank, dtype=torch.float64)).Q.T
    with torch.no_grad():
        rnn.weight_hh_l0.copy_(0.9 * columns @ rows / columns.norm(dim=0).mean())
        rnn.weight_ih_l0.copy_(0.3 * columns @ torch.randn(rank, INPUT_SIZE, dtype=torch.float64))
        rnn.bias_ih_l0.copy_(0.1 * columns @ torch.randn(rank, dtype=torch.float64))
        rnn.bias_hh_l0.zero_()
    return rnn, readout


def _trained_rnn() -> tuple[nn.RNN, nn.Linear, Callable]:
    """A tanh RNN with a readout trained to track a weighted running sum of its two inputs."""
    rnn, readout = nn.RNN(2, 24), nn.Linear(24, 1)

    def task(batch: int, steps: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(steps, batch, 2)
        sums = torch.cumsum(x, 0) / torch.arange(1, steps + 1).view(-1, 1, 1) ** 0.5
        return x, sums[..., :1] - 0.5 * sums[..., 1:]

    optimizer = torch.optim.Adam([*rnn.parameters(), *readout.parameters()], lr=2e-2)
    threads = torch.get_num_threads()
    # Matrices this small gain nothing from a thread pool, which on a busy machine costs 100x.
    torch.set_num_threads(1)
    try:
        for _ in range(60):
            x, y = task(32)
            loss = (readout(rnn(x)[0]) - y).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    assert loss < 0.2 * task(256)[1].square().mean(), "the RNN did not learn the task"
    return rnn, readout, task


def _compare(rnn, readout, calibration, held_out, keep):
    spectral = pruning_error(
        rnn, spectral_prune_rnn(rnn, calibration, keep, readout=readout), held_out, readout=readout
    )
    magnitude = pruning_error(rnn, magnitude_prune_rnn(rnn, keep, readout=readout), held_out, readout=readout)
    return spectral, magnitude


@pytest.mark.parametrize("keep", [4, 8, 16])
def test_spectral_beats_magnitude_on_low_rank_dynamics(keep):
    rnn, readout = _low_rank_rnn(rank=4)
    spectral, magnitude = _compare(rnn, readout, _inputs(steps=20, batch=32), _inputs(steps=40, batch=64), keep)
    assert spectral.hidden < magnitude.hidden / 5, (spectral, magnitude)
    assert spectral.readout < magnitude.readout / 5, (spectral, magnitude)


def test_spectral_beats_magnitude_on_a_trained_rnn():
    rnn, readout, task = _trained_rnn()
    calibration, held_out = task(64)[0], task(128, steps=20)[0]  # held-out sequences are also longer
    for keep in (6, 12, 18):
        spectral, magnitude = _compare(rnn, readout, calibration, held_out, keep)
        assert spectral.hidden < magnitude.hidden / 3, (keep, spectral, magnitude)
        assert spectral.readout < magnitude.readout / 3, (keep, spectral, magnitude)


# The magnitude baseline and the error of the pruned run


def test_magnitude_keeps_the_largest_outgoing_weights_and_copies_them():
    rnn, readout = _rnn(), _readout()
    keep = 5
    result = magnitude_prune_rnn(rnn, keep, readout=readout)
    scores = [rnn.weight_hh_l0[:, j].norm() ** 2 + readout.weight[:, j].norm() ** 2 for j in range(HIDDEN)]
    assert result.kept.tolist() == sorted(sorted(range(HIDDEN), key=lambda j: -scores[j])[:keep])
    without_readout = magnitude_prune_rnn(rnn, keep)
    recurrent_only = [rnn.weight_hh_l0[:, j].norm() for j in range(HIDDEN)]
    assert without_readout.kept.tolist() == sorted(sorted(range(HIDDEN), key=lambda j: -recurrent_only[j])[:keep])

    kept = result.kept
    assert result.reconstruction_error is None
    assert torch.equal(result.rnn.weight_hh_l0, rnn.weight_hh_l0[kept][:, kept])
    assert torch.equal(result.rnn.weight_ih_l0, rnn.weight_ih_l0[kept])
    assert torch.equal(result.rnn.bias_hh_l0, rnn.bias_hh_l0[kept])
    assert torch.equal(result.readout.weight, readout.weight[:, kept])
    assert torch.equal(result.reconstruction, torch.eye(HIDDEN, dtype=torch.float64)[:, kept])


@pytest.mark.parametrize("method", ["spectral", "magnitude"])
def test_pruning_error_runs_the_pruned_network_against_the_full_ones_kept_units(method):
    rnn, readout, inputs = _rnn(), _readout(), _inputs(steps=10)
    if method == "spectral":
        result = spectral_prune_rnn(rnn, _inputs(), 6, readout=readout)
    else:
        result = magnitude_prune_rnn(rnn, 6, readout=readout)
    errors = pruning_error(rnn, result, inputs, readout=readout)

    with torch.no_grad():
        full = rnn(inputs)[0]
        state, pruned_states = torch.zeros(8, 6, dtype=torch.float64), []
        w_ih, w_hh = result.rnn.weight_ih_l0, result.rnn.weight_hh_l0
        bias = result.rnn.bias_ih_l0 + result.rnn.bias_hh_l0
        for x in inputs:  # the pruned network's own recurrence, step by step
            state = torch.tanh(x @ w_ih.T + state @ w_hh.T + bias)
            pruned_states.append(state)
        pruned_states = torch.stack(pruned_states)
        reference = full[..., result.kept]
        per_step = (pruned_states - reference).square().sum((1, 2)) / reference.square().sum((1, 2))
        readout_error = (result.readout(pruned_states) - readout(full)).square().sum() / readout(full).square().sum()
    torch.testing.assert_close(errors.hidden_per_step, per_step, rtol=1e-9, atol=1e-15)
    total = (pruned_states - reference).square().sum() / reference.square().sum()
    assert errors.hidden == pytest.approx(total.item(), rel=1e-9)
    assert errors.readout == pytest.approx(readout_error.item(), rel=1e-9)
    # From a zero state the first step reads the kept units' own input weights: no error yet.
    assert errors.hidden_per_step[0] < 1e-28 and errors.hidden_per_step[1:].min() > 0
    assert pruning_error(rnn, result, inputs).readout is None


# Bad input


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: nn.LSTM(INPUT_SIZE, HIDDEN, dtype=torch.float64), TypeError, "torch.nn.RNN"),
        (lambda: nn.GRU(INPUT_SIZE, HIDDEN, dtype=torch.float64), TypeError, "torch.nn.RNN"),
        (lambda: nn.Linear(INPUT_SIZE, HIDDEN), TypeError, "torch.nn.RNN"),
        (lambda: _rnn(num_layers=2), ValueError, "num_layers=1"),
        (lambda: _rnn(bidirectional=True), ValueError, "unidirectional"),
    ],
)
def test_unsupported_networks_are_rejected(make, error, match):
    for prune in (lambda m: spectral_prune_rnn(m, _inputs(), 4), lambda m: magnitude_prune_rnn(m, 4)):
        with pytest.raises(error, match=match):
            prune(make())


@pytest.mark.parametrize(
    "change, error, match",
    [
        ({"keep": 0}, ValueError, "1 <= keep <= 12"),
        ({"keep": HIDDEN + 1}, ValueError, "1 <= keep <= 12"),
        ({"keep": 2.0}, TypeError, "keep must be an int"),
        ({"calibration_inputs": _inputs().float()}, TypeError, "calibration_inputs must have dtype float64"),
        ({"calibration_inputs": torch.randn(5, 4, INPUT_SIZE + 1, dtype=torch.float64)}, ValueError, "input_size 3"),
        (
            {"calibration_inputs": torch.randn(2, 5, 4, INPUT_SIZE, dtype=torch.float64)},
            ValueError,
            "(T, B, input_size)",
        ),
        ({"calibration_inputs": torch.randn(0, 4, INPUT_SIZE, dtype=torch.float64)}, ValueError, "at least one step"),
        ({"calibration_inputs": [[0.0] * INPUT_SIZE]}, TypeError, "must be a torch.Tensor"),
        ({"readout": nn.Linear(HIDDEN + 1, 2, dtype=torch.float64)}, ValueError, "in_features 12"),
        ({"readout": nn.Conv1d(HIDDEN, 2, 1)}, TypeError, "readout must be a torch.nn.Linear"),
        ({"ridge": 0.0}, ValueError, "ridge must be > 0"),
    ],
)
def test_bad_arguments_are_rejected_with_their_names(change, error, match):
    arguments = {"calibration_inputs": _inputs(), "keep": 4, **change}
    with pytest.raises(error, match=match.replace("(", r"\(").replace(")", r"\)")):
        spectral_prune_rnn(_rnn(), arguments.pop("calibration_inputs"), arguments.pop("keep"), **arguments)


def test_packed_sequences_and_mismatched_pruning_errors_are_rejected():
    rnn, readout = _rnn(), _readout()
    packed = nn.utils.rnn.pack_sequence([torch.randn(4, INPUT_SIZE, dtype=torch.float64)])
    with pytest.raises(TypeError, match="calibration_inputs must be a torch.Tensor"):
        spectral_prune_rnn(rnn, packed, 4)
    result = magnitude_prune_rnn(rnn, 4)
    with pytest.raises(ValueError, match="pruned has no readout"):
        pruning_error(rnn, result, _inputs(), readout=readout)
    with pytest.raises(ValueError, match="hidden_size 12, but rnn has hidden_size 10"):
        pruning_error(_rnn(hidden=10), result, _inputs())
    with pytest.raises(TypeError, match="pruned must be a PrunedRNN"):
        pruning_error(rnn, result.rnn, _inputs())


# The example


def test_example_smoke_run_prunes_and_reports(tmp_path):
    result = run_example("spectral_pruning.py", "--smoke", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    with open(tmp_path / "spectral_pruning.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["kept %"]) for r in rows] == [("full", "100")] + [
        (method, percent) for percent in ("12.5", "25", "50", "75") for method in ("spectral", "magnitude")
    ]
    for spectral, magnitude in zip(rows[1::2], rows[2::2]):
        # Even after one epoch on 200 images, spectral pruning's own run stays closer to the full network.
        assert float(spectral["hidden error"]) < float(magnitude["hidden error"]), (spectral, magnitude)
        assert float(spectral["calibration error"]) < 1 and magnitude["calibration error"] == "-"
    assert "## Settings" in (tmp_path / "spectral_pruning.md").read_text()
    assert (tmp_path / "spectral_pruning.png").read_bytes().startswith(b"\x89PNG")

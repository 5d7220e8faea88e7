"""torch.library.opcheck on every custom op in namespace maqd: schema, fake (meta) impl,
autograd registration and AOT dispatch. A new op without a case here fails the coverage test.

Each case also runs with its tensors in other layouts (channels-last, transposed, sliced), where
the real outputs must have the fake's strides, which compiled graphs rely on: through opcheck on
the default backend, and on every backend here against the contiguous run's values. The rule: an
output shaped like an input keeps that input's layout (``torch.empty_like``), as PyTorch's
elementwise ops and batch_norm do; quant_conv2d's output has F.conv2d's layout (channels-last for
a channels-last x); any other output is contiguous."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._pytree import tree_leaves

import maqd_kernels as mk  # noqa: F401  (registers the ops)
from maqd_kernels import _backend

from helpers import op_backends

ops = torch.ops.maqd


def _r(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def _cases():
    neuron = (0.5, 1.0, "saf_e", "sigmoid", 4.0, 1, 0, None)
    neuron_f = (0.7, 0.9, "saf_f", "rectangle", 2.0, 2, 3, None)
    backward_e, backward_f = (0.5, 1.0, "saf_e", "s2nn", 4.0, 2, None), (0.7, 0.9, "saf_f", "sigmoid", 4.0, 1, None)
    mask = torch.randint(-(2**31), 2**31 - 1, (4, 1), dtype=torch.int32)
    packed = mk.pack_weight(torch.randn(5, 11), 3)
    scale, state = torch.tensor(0.7), torch.rand(3, 4)
    return {
        "saf_neuron": [
            (_r(4, 3, 4, grad=True), None) + neuron[:-1] + (False, None),
            ((torch.randn(3, 3, 4) + 1).requires_grad_(True), state) + neuron_f[:-1] + (True, None),
            ((torch.randn(3, 3, 4) + 1), state) + neuron_f[:-1] + (False, None),
        ],
        "saf_neuron_backward": [
            (_r(4, 3, 4), torch.tensor(0.5), _r(4, 3, 4), None, state) + backward_e,
            (_r(4, 3, 4), torch.tensor(0.5), None, mask, None) + backward_f,
        ],
        "spike_trace": [(_r(5, 2, 3, grad=True), None, 0.5, None), (_r(2, 3, 4, grad=True), state, 0.8, None)],
        "saf_readout": [(_r(5, 2, 3, grad=True), None, 0.5, None), (_r(2, 3, 4, grad=True), state, 0.8, None)],
        "saf_linear": [
            (_r(4, 3, 6, grad=True), _r(4, 6, grad=True), _r(4, grad=True), state) + neuron,
            (_r(4, 3, 6, grad=True), _r(4, 6, grad=True), None, None) + neuron_f,
        ],
        "saf_linear_backward": [(_r(4, 3, 4), torch.tensor(1.0), _r(4, 3, 6), _r(4, 6), _r(4), None) + neuron_f],
        "saf_bias_factors": [(_r(6, 2, grad=True), 0.6, 4)],
        "lif_neuron": [
            (_r(5, 3, grad=True), 0.5, 1.0, "sigmoid", 4.0, False),
            (_r(5, 3, grad=True), 0.5, 1.0, "s2nn", 4.0, True),
        ],
        "lif_neuron_backward": [
            (_r(5, 3), _r(5, 3), 0.5, 1.0, "s2nn", 4.0, False),
            (_r(5, 3), _r(5, 3), 0.5, 1.0, "rectangle", 4.0, True),
        ],
        "ottt_linear": [
            (_r(4, 2, 5, grad=True), _r(3, 5, grad=True), _r(3, grad=True), 0.5),
            (_r(4, 2, 5, grad=True), _r(3, 5, grad=True), None, 0.5),
        ],
        "ottt_linear_backward": [(_r(4, 2, 3), _r(4, 2, 5), _r(3, 5), None, 0.5)],
        "weight_standardize": [(_r(4, 3, 2, grad=True), 1e-5, None)],
        "weight_standardize_backward": [(_r(4, 6), _r(4, 6), 1e-5, None)],
        "round_clip": [
            (_r(5, 7, grad=True), None, 0.6, 4, True, "ste", 4.0, None),
            (_r(5, 7, grad=True), scale.clone().requires_grad_(True), 0.0, 1, True, "sigmoid", 3.0, None),
            (_r(5, 7, grad=True), torch.rand(5, 1, requires_grad=True), 0.0, 3, False, "ste", 4.0, None),
        ],
        "round_clip_backward": [(_r(5, 7), _r(5, 7), torch.rand(1, 7) + 0.1, 0.0, 2, True, "sigmoid", 4.0, None)],
        "quantize": [(_r(5, 7), None, 0.5, 4, False, None), (_r(5, 7), torch.rand(5, 1) + 0.1, 0.0, 1, True, None)],
        "pack_weight": [
            (_r(5, 11), None, 0.8, 2, True, 1e-5, None),
            (_r(5, 11), torch.rand(5, 1, requires_grad=True), 0.0, 8, False, 1e-5, None),
        ],
        "unpack_weight": [(packed.packed, 3, 11, None)],
        "lowbit_linear": [
            (
                _r(2, 11, grad=True),
                packed.packed,
                packed.scale,
                3,
                11,
                _r(5, grad=True),
                None,
                None,
                _r(5, grad=True),
                _r(5, grad=True),
                None,
                None,
                None,
            ),
            (_r(2, 11, grad=True), packed.packed, packed.scale, 3, 11, None, 4, 0.3, None, None, None, None, None),
            (
                torch.randint(0, 255, (3, 11), dtype=torch.uint8),
                packed.packed,
                packed.scale,
                3,
                11,
                _r(5),
                None,
                0.1,
                _r(5),
                _r(5),
                4,
                0.2,
                None,
            ),
        ],
        "lowbit_linear_backward": [
            (_r(2, 5), _r(2, 11), packed.packed, packed.scale, 3, 11, _r(5), 4, 0.3, _r(5), _r(5), None),
            (
                _r(2, 5),
                torch.randint(0, 255, (2, 11), dtype=torch.uint8),
                packed.packed,
                packed.scale,
                3,
                11,
                _r(5),
                None,
                0.3,
                None,
                None,
                None,
            ),
        ],
        "quant_linear": [
            (_r(3, 6, grad=True), _r(4, 6, grad=True), _r(4, grad=True), 2, 1.2, 4, 0.2, "ste", None),
            (_r(3, 6, grad=True), _r(4, 6, grad=True), None, 1, 0.8, None, None, "sigmoid", None),
        ],
        "quant_linear_backward": [(_r(3, 4), _r(3, 6), _r(4, 6), _r(4), 4, 0.35, 4, 0.2, "sigmoid", None)],
        "quant_conv2d": [
            (
                _r(2, 4, 5, 5, grad=True),
                _r(6, 2, 3, 3, grad=True),
                _r(6, grad=True),
                [1, 1],
                [1, 1],
                [1, 1],
                2,
                3,
                0.65,
                4,
                0.2,
                "ste",
                None,
            )
        ],
        "quant_conv2d_backward": [
            (
                _r(2, 6, 2, 2),
                _r(2, 4, 5, 5),
                _r(6, 4, 3, 3),
                None,
                [2, 2],
                [0, 0],
                [1, 1],
                1,
                2,
                1.2,
                None,
                None,
                "ste",
                None,
            )
        ],
        "layer_batch_norm": [
            (
                _r(4, 6, 3, grad=True),
                _r(6, grad=True),
                _r(6, grad=True),
                torch.zeros(2),
                torch.ones(2),
                True,
                0.1,
                1e-5,
                2,
                None,
            ),
            (_r(4, 6, 3, grad=True), None, None, torch.zeros(6), torch.ones(6), False, 0.1, 1e-5, 6, None),
            (_r(1, 6, grad=True), _r(6, grad=True), None, None, None, True, 0.1, 1e-5, 1, None),
        ],
        "layer_batch_norm_backward": [
            (_r(4, 6, 3), _r(4, 6, 3), _r(6), None, _r(3), torch.rand(3) + 0.5, True, 3, None)
        ],
        "psp_norm": [
            (_r(4, 6, 3, grad=True), _r(6, grad=True), _r(6, grad=True), torch.ones(2), True, 0.1, 1e-5, 2, None),
            (_r(4, 6, 3, grad=True), None, None, torch.rand(6) + 0.5, False, 0.1, 1e-5, 6, None),
            # One value per group: a raw moment needs no second one (LBN's variance does).
            (_r(1, 6, grad=True), _r(6, grad=True), None, torch.ones(6), True, 0.1, 1e-5, 6, None),
            (_r(1, 6, grad=True), _r(6, grad=True), None, None, True, 0.1, 1e-5, 1, None),
        ],
        "psp_norm_backward": [(_r(4, 6, 3), _r(4, 6, 3), _r(6), None, torch.rand(3) + 0.5, True, 3, None)],
        "lbn_inference_affine": [
            (
                _r(6, grad=True),
                _r(6, grad=True),
                _r(3, grad=True),
                (torch.rand(3) + 0.5).requires_grad_(True),
                1e-5,
                3,
                6,
                None,
            ),
            (None, None, _r(1), torch.rand(1) + 0.5, 1e-5, 1, 4, None),
        ],
        "lbn_inference_affine_backward": [(_r(6), _r(6), _r(6), None, _r(2), torch.rand(2) + 0.5, 1e-5, 2, 6, None)],
        "fold_affine": [
            (_r(6, 3, 2, 2, grad=True), _r(6, grad=True), _r(6, grad=True), _r(6, grad=True), None),
            (_r(6, 5, grad=True), None, _r(6, grad=True), _r(6, grad=True), None),
        ],
        "fold_affine_backward": [(_r(6, 5), _r(6), _r(6, 5), _r(6), _r(6), _r(6), None)],
    }


CASES = _cases()
REGISTERED = sorted(
    name.removeprefix("maqd::") for name in torch._C._dispatch_get_all_op_names() if name.startswith("maqd::")
)


def test_every_registered_op_has_a_case():
    assert sorted(CASES) == REGISTERED


def _same_values(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """`layout` holding t's values; a leaf that requires grad when t does."""
    return layout.detach().copy_(t.detach()).requires_grad_(t.requires_grad)


def _reordered(t: torch.Tensor) -> torch.Tensor:
    """t channels-last when 4-D, else with its dims stored in reverse order (dense, not contiguous)."""
    if t.dim() == 4:
        return _same_values(t, torch.empty_like(t, memory_format=torch.channels_last))
    order = list(range(t.dim()))[::-1]
    return _same_values(t, torch.empty_like(t.permute(order), memory_format=torch.contiguous_format).permute(order))


def _sliced(t: torch.Tensor) -> torch.Tensor:
    """t as every other element of a tensor twice as long in its last dim (not dense)."""
    return _same_values(t, t.new_empty((*t.shape[:-1], 2 * t.shape[-1]))[..., ::2])


def layout_variants(args: tuple) -> list[tuple[str, tuple]]:
    """(label, args) with the tensors of `args` in other layouts, values unchanged: each tensor of
    2+ dims reordered (``_reordered``) in turn, then all of them at once (a channels-last network
    hands its ops gradients as channels-last as its activations), then each tensor sliced."""
    indices = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.numel() > 1]
    reorderable = [i for i in indices if args[i].dim() >= 2]

    def replaced(transform, chosen):
        return tuple(transform(a) if i in chosen else a for i, a in enumerate(args))

    variants = [(f"reordered arg {i}", replaced(_reordered, {i})) for i in reorderable]
    if len(reorderable) > 1:
        variants.append(("all reordered", replaced(_reordered, set(reorderable))))
    return variants + [(f"sliced arg {i}", replaced(_sliced, {i})) for i in indices]


@pytest.mark.parametrize("name", REGISTERED)
def test_opcheck(name):
    op = getattr(ops, name).default
    for args in CASES[name]:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("name", REGISTERED)
def test_opcheck_layouts(name):
    op = getattr(ops, name).default
    for args in CASES[name]:
        for label, variant in layout_variants(args):
            try:
                torch.library.opcheck(op, variant, test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))
            except Exception as error:
                raise AssertionError(f"{name} with {label}") from error


def _on_backend(name: str, args: tuple, backend: str, device: str) -> tuple | None:
    """`args` on `device` asking for `backend`, or None when the op has no kernel of that backend
    (the ops without a backend argument run their reference everywhere)."""
    names = [argument.name for argument in getattr(ops, name).default._schema.arguments]
    if "backend" in names:
        kernels = _backend._OPS[name if name in _backend._OPS else f"{name}_forward"].kernels
        if backend != "reference" and backend not in kernels:
            return None
    elif backend != "reference":
        return None
    moved = [a.detach().to(device).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    if "backend" in names:
        moved[names.index("backend")] = backend
    return tuple(moved)


def _fake_outputs(op, args: tuple) -> list:
    with FakeTensorMode() as mode:
        return tree_leaves(op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]))


def _significant_strides(t: torch.Tensor) -> tuple:
    """The strides Inductor's assertions and opcheck compare: those of dims longer than 1."""
    return tuple(stride for size, stride in zip(t.shape, t.stride()) if size > 1)


def _backend_params() -> list:
    return [
        pytest.param(
            name,
            *target.values,
            id=f"{name}-{target.values[0]}-{target.values[1]}",
        )
        for name in REGISTERED
        for target in op_backends()
    ]


@pytest.mark.parametrize("name,backend,device", _backend_params())
def test_layouts_on_every_backend(name, backend, device):
    """Outputs from inputs in other layouts have the fake's strides and the contiguous run's values."""
    op = getattr(ops, name).default
    cases = [args for args in (_on_backend(name, case, backend, device) for case in CASES[name]) if args is not None]
    if not cases:
        pytest.skip(f"maqd.{name} has no {backend} kernel")
    with torch.no_grad():
        for args in cases:
            want = tree_leaves(op(*args))
            for label, variant in layout_variants(args):
                outputs = zip(tree_leaves(op(*variant)), _fake_outputs(op, variant), want)
                for index, (out, fake, expected) in enumerate(outputs):
                    where = f"{name} output {index} with {label}"
                    assert _significant_strides(out) == _significant_strides(fake), where
                    torch.testing.assert_close(out, expected, msg=lambda message: f"{where}: {message}")

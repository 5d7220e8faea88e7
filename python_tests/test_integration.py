"""The example models (examples/models.py) with the rest of PyTorch: torch.compile of whole training
steps and of converted models, torch.autocast, channels_last convolutions, and state_dict round
trips of trained models. DistributedDataParallel is in test_distributed.py.

Every example is built at a small size; its training loss is the examples' own
(``examples.train.loss_of``: SAF-F through ``saf_f_last_step``)."""

import copy
import io

import pytest
import torch
from torch import nn

import maqd_kernels as mk
from maqd_kernels import _backend
from maqd_kernels import nn as mnn

from helpers import example_modules, op_backends

models, train = example_modules()

FEATURES, SIDE, HIDDEN, CLASSES, STEPS, BATCH = 36, 6, 32, 5, 4, 16
CHANNELS_LAST = torch.channels_last

EXAMPLES = {
    "float_mlp": lambda: models.float_mlp(FEATURES, HIDDEN, CLASSES),
    "maqd_mlp": lambda: models.maqd_mlp(FEATURES, HIDDEN, CLASSES, weight_bits=2, act_bits=4),
    "maqd_cnn": lambda: models.maqd_cnn(SIDE, CLASSES, weight_bits=4, act_bits=4, channels=4),
    "saf_e_mlp": lambda: models.saf_mlp(FEATURES, HIDDEN, CLASSES, mode="saf_e", steps=STEPS),
    "saf_f_mlp": lambda: models.saf_mlp(FEATURES, HIDDEN, CLASSES, mode="saf_f", steps=STEPS),
    "maqd_saf_mlp": lambda: models.maqd_saf_mlp(FEATURES, HIDDEN, CLASSES, weight_bits=2, spike_bits=2, steps=STEPS),
}


def _batch(device="cpu", batch=BATCH):
    """Images in [0, 1] and labels, as the examples train on."""
    return torch.rand(batch, FEATURES, device=device), torch.randint(0, CLASSES, (batch,), device=device)


def _require_kernel(backend: str, op: str) -> None:
    if backend not in _backend.implemented_backends(op):
        pytest.skip(f"maqd.{op} has no {backend} kernel")


def _twins(name, device="cpu"):
    """Two identical copies of an example model."""
    model = EXAMPLES[name]().to(device)
    return model, copy.deepcopy(model)


def _training_step(model):
    return lambda images, labels: train.loss_of(model, images, labels)


def _assert_same_state(actual: nn.Module, expected: nn.Module, **tolerance):
    """Equal gradients of every parameter (each one non-zero somewhere, so that the comparison
    means something) and equal buffers (LBN running statistics)."""
    for (name, p_actual), p_expected in zip(actual.named_parameters(), expected.parameters()):
        assert p_expected.grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(p_actual.grad, p_expected.grad, **tolerance, msg=name)
    for (name, b_actual), b_expected in zip(actual.named_buffers(), expected.buffers()):
        torch.testing.assert_close(b_actual, b_expected, **tolerance, msg=name)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(
        torch.nn.functional.cosine_similarity(a.detach().flatten().double(), b.detach().flatten().double(), dim=0)
    )


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_models_trace_as_one_graph(name):
    """Dynamo captures each example's training step (forward and loss; SAF-F's through
    saf_f_last_step, whose no_grad steps and streaming state trace too) and its converted model's
    forward without a graph break."""
    model = EXAMPLES[name]()
    images, labels = _batch()
    explanation = torch._dynamo.explain(_training_step(model))(images, labels)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    explanation = torch._dynamo.explain(mk.convert_for_inference(model))(images)
    assert explanation.graph_break_count == 0, explanation.break_reasons


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "autocast"])
@pytest.mark.parametrize("name", EXAMPLES)
def test_compiled_training_step_equals_eager(name, autocast):
    """torch.compile(fullgraph=True) of each example's training step, with AOT autograd tracing the
    backward through every custom op's autograd formula and fake impl (eager kernels): the loss,
    every gradient and the running statistics equal eager's, inside torch.autocast too (the
    autocast policy of the matmul layers traces as well)."""
    torch._dynamo.reset()
    eager, twin = _twins(name)
    compiled = torch.compile(_training_step(twin), fullgraph=True, backend="aot_eager")
    images, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss_eager = train.loss_of(eager, images, labels)
        loss_compiled = compiled(images, labels)
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-6)
    _assert_same_state(twin, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maqd_cnn", "saf_e_mlp", "saf_f_mlp"])
def test_inductor_training_step_equals_eager(name):
    """The same through Inductor (generated code around the custom ops): a convolutional MaQD
    network, SAF-E, and SAF-F's last-step training."""
    torch._dynamo.reset()
    eager, twin = _twins(name)
    compiled = torch.compile(_training_step(twin), fullgraph=True)
    images, labels = _batch()
    loss_eager, loss_compiled = train.loss_of(eager, images, labels), compiled(images, labels)
    loss_eager.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-5, atol=1e-6)
    _assert_same_state(twin, eager, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["maqd_cnn", "maqd_saf_mlp"])
def test_inductor_converted_model_equals_eager(name):
    """A converted model (uint8 codes from kernel to kernel, im2col of codes, weight-only low-bit
    layers inside a spiking network) compiled by Inductor gives exactly its eager outputs."""
    torch._dynamo.reset()
    model = EXAMPLES[name]()
    for _ in range(3):
        train.loss_of(model, *_batch())
    converted = mk.convert_for_inference(model)
    images, _ = _batch()
    assert torch.equal(torch.compile(converted, fullgraph=True)(images), converted(images))


@pytest.mark.parametrize("backend,device", op_backends())
def test_compiled_training_step_with_a_chosen_backend_traces_whole(backend, device, monkeypatch):
    """Choosing the kernels (MAQD_BACKEND, or a module's backend=) keeps the training step one graph.
    (On a CUDA tensor the default choice takes the same path.)"""
    monkeypatch.setenv("MAQD_BACKEND", backend)
    model = EXAMPLES["maqd_mlp"]().to(device)
    explanation = torch._dynamo.explain(_training_step(model))(*_batch(device))
    assert explanation.graph_break_count == 0, explanation.break_reasons


# ----------------------------------------------------------------------------- torch.autocast


def _matmul_case(layer: str, backend: str):
    """(leaves: input, weight, bias; the public function; the same computation with its operands
    cast by hand and handed to the op, outside autocast)."""
    bf16 = torch.bfloat16
    if layer == "quant_linear":
        leaves = torch.randn(6, 24), torch.randn(16, 24), torch.randn(16)
        scale = mk.default_scale(2, True)
        return (
            leaves,
            lambda x, w, b: mk.quant_linear(x, w, b, weight_bits=2, backend=backend),
            lambda x, w, b: torch.ops.maqd.quant_linear(
                x.to(bf16), w, b.to(bf16), 2, scale, None, None, "ste", backend
            ),
        )
    if layer == "quant_conv2d":
        leaves = torch.randn(2, 3, 6, 6), torch.randn(8, 3, 3, 3), torch.randn(8)
        scale, one = mk.default_scale(4, True), [1, 1]
        return (
            leaves,
            lambda x, w, b: mk.quant_conv2d(x, w, b, padding=1, weight_bits=4, backend=backend),
            lambda x, w, b: torch.ops.maqd.quant_conv2d(
                x.to(bf16), w, b.to(bf16), one, one, one, 1, 4, scale, None, None, "ste", backend
            ),
        )
    if layer == "saf_linear":
        # Traces and weights that make the neurons fire; a float32 streaming state of the layer.
        leaves = torch.rand(4, 3, 24) * 2, torch.randn(16, 24) * 0.5, torch.randn(16)
        state = torch.rand(3, 16)
        return (
            leaves,
            lambda x, w, b: mk.saf_linear(x, w, b, state=state, spike_bits=2, backend=backend),
            lambda x, w, b: mk.saf_linear(
                x.to(bf16), w.to(bf16), b.to(bf16), state=state, spike_bits=2, backend=backend
            ),
        )
    if layer == "saf_conv2d":
        # F.conv2d under autocast, then the bias times S_t and the neuron in its output dtype.
        module = mnn.SAFConv2d(3, 5, 3, padding=1, spike_bits=2, backend=backend)
        leaves = torch.rand(3, 2, 3, 6, 6) * 2, torch.randn(5, 3, 3, 3) * 0.5, torch.randn(5)
        run = lambda x, w, b: torch.func.functional_call(module, {"weight": w, "bias": b}, (x,))  # noqa: E731
        return leaves, run, lambda x, w, b: run(x.to(bf16), w.to(bf16), b.to(bf16))
    assert layer == "ottt_linear"
    leaves = torch.rand(4, 3, 24).bernoulli(), torch.randn(16, 24), torch.randn(16)
    return leaves, mk.ottt_linear, lambda x, w, b: mk.ottt_linear(x.to(bf16), w.to(bf16), b.to(bf16))


def _forward_backward(fn, leaves, grad_seed=7):
    leaves = [t.clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    generator = torch.Generator(out.device).manual_seed(grad_seed)
    out.backward(torch.randn(out.shape, generator=generator, device=out.device).to(out.dtype))
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("layer", ["quant_linear", "quant_conv2d", "saf_linear", "saf_conv2d", "ottt_linear"])
def test_matmul_layers_run_in_the_autocast_dtype(layer, backend, device):
    """Inside torch.autocast(bfloat16) each matmul-like layer computes exactly what it computes
    outside autocast on operands cast by hand as torch casts F.linear's: input and bias in bfloat16,
    the SAF and OTTT layers' weight too (saf_linear's streaming state stays float32), the quantized
    layers' weight left float32 (the op standardizes and quantizes it from float32, so the codes
    trained with are ``packed_weight()``'s). The output is bfloat16; the float32 leaves get float32
    gradients equal to the hand-cast run's."""
    if layer == "ottt_linear" and backend != "reference":
        pytest.skip("ottt_linear is a reference-only baseline")
    if layer == "saf_linear":
        _require_kernel(backend, "saf_linear_forward")
    leaves, public, by_hand = _matmul_case(layer, backend)
    leaves = [t.to(device) for t in leaves]
    with torch.autocast(device, dtype=torch.bfloat16):
        out, grads = _forward_backward(public, leaves)
    want, want_grads = _forward_backward(by_hand, leaves)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)
    for grad, want_grad in zip(grads, want_grads):
        assert grad.dtype == torch.float32 and grad.abs().sum() > 0
        assert torch.equal(grad, want_grad)


def test_every_op_runs_below_autocast():
    """Every custom op in namespace maqd has run_below_autocast's kernels (cpu and cuda): without
    them its internal matmuls would run in bfloat16 in eager mode only, and the compiled and eager
    autocast steps above would disagree."""
    names = [name for name in torch._C._dispatch_get_all_op_names() if name.startswith("maqd::")]
    keys = ("AutocastCPU", "AutocastCUDA")
    missing = [f"{n} {k}" for n in names for k in keys if not torch._C._dispatch_has_kernel_for_dispatch_key(n, k)]
    assert names and not missing


ELEMENTWISE_LAYERS = [
    "lbn",
    "lbn_time_first_groups",
    "quant_act",
    "quant_act_learned_scale",
    "saf_neuron",
    "spike_trace",
    "saf_readout",
]


def _elementwise_case(layer: str, backend: str):
    """(module, input shape): the layers that are not matmuls."""
    if layer == "lbn":
        return mnn.LayerBatchNorm(8, backend=backend), (6, 8)
    if layer == "lbn_time_first_groups":
        return mnn.LayerBatchNorm(8, groups=4, time_first=True, backend=backend), (3, 4, 8)
    if layer == "quant_act":
        return mnn.QuantAct(4, backend=backend), (6, 8)
    if layer == "quant_act_learned_scale":
        return mnn.QuantAct(4, learn_scale=True, surrogate="sigmoid", backend=backend), (6, 8)
    if layer == "saf_neuron":
        return mnn.SAFNeuron(spike_bits=2, backend=backend), (4, 3, 8)
    if layer == "spike_trace":
        return mnn.SpikeTrace(backend=backend), (4, 3, 8)
    assert layer == "saf_readout"
    return mnn.SAFReadout(backend=backend), (4, 3, 8)


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layer", ELEMENTWISE_LAYERS)
def test_elementwise_and_norm_layers_keep_their_dtype_under_autocast(layer, dtype, backend, device):
    """Not matmuls: as torch's autocast leaves batch_norm and activations alone, these layers run in
    their input's dtype (float32 parameters with bfloat16 input included). Inside an autocast region
    each returns exactly what it returns outside, and its float32 parameters (LBN's affine, a
    learned QuantAct scale) get the same float32 gradients."""
    module, shape = _elementwise_case(layer, backend)
    module.to(device)
    twin = copy.deepcopy(module)
    x = (torch.randn(shape, device=device) * 1.5 + 0.5).to(dtype)
    with torch.autocast(device, dtype=torch.bfloat16):
        out, (grad_x,) = _forward_backward(module, [x])
    want, (want_grad_x,) = _forward_backward(twin, [x])
    assert out.dtype == dtype and grad_x.dtype == dtype
    assert torch.equal(out, want) and torch.equal(grad_x, want_grad_x)
    for p, p_want in zip(module.parameters(), twin.parameters()):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, p_want.grad)
    for b, b_want in zip(module.buffers(), twin.buffers()):
        assert torch.equal(b, b_want)


# How closely a bfloat16 training step follows the float32 one, as the cosine of the logits and of
# each parameter's gradient. bfloat16 rounds a value next to a quantization step or a firing
# threshold to the other side, and one flipped spike changes its trace at every later step, so the
# quantized and spiking models move further than the float one (over seeds and both backends here,
# at worst 0.998 / 0.977 quantized, 0.95 / 0.97 spiking).
AUTOCAST_COSINE = {
    "float_mlp": 0.999,
    "maqd_mlp": 0.95,
    "maqd_cnn": 0.95,
    "saf_e_mlp": 0.9,
    "saf_f_mlp": 0.9,
    "maqd_saf_mlp": 0.9,
}


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_models_train_under_autocast(name, backend, device, monkeypatch):
    """A user's training step inside torch.autocast(bfloat16) (cpu here, cuda on a GPU): forward and
    backward run, the logits are bfloat16, every parameter's gradient and every running statistic
    stays float32, and logits and gradients point where the float32 step's do (AUTOCAST_COSINE)."""
    if name in ("saf_e_mlp", "saf_f_mlp"):
        _require_kernel(backend, "saf_linear_forward")
    monkeypatch.setenv("MAQD_BACKEND", backend)
    model, reference = _twins(name, device)
    images, labels = _batch(device, batch=32)
    with torch.autocast(device, dtype=torch.bfloat16):
        logits = model(images)
        train.loss_of(model, images, labels).backward()
    assert logits.dtype == torch.bfloat16
    want = reference(images)
    train.loss_of(reference, images, labels).backward()
    assert _cosine(logits, want) >= AUTOCAST_COSINE[name]
    for (param_name, p), p_want in zip(model.named_parameters(), reference.parameters()):
        assert p.grad.dtype == torch.float32 and p.grad.isfinite().all(), param_name
        assert _cosine(p.grad, p_want.grad) >= AUTOCAST_COSINE[name], param_name
    for (buffer_name, b), b_want in zip(model.named_buffers(), reference.buffers()):
        assert b.dtype == torch.float32, buffer_name
        torch.testing.assert_close(b, b_want, rtol=0.05, atol=0.02, msg=buffer_name)


# ----------------------------------------------------------------------------- channels_last


def _frames_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(T, B, C, H, W) with every frame (C, H, W) stored channels-last: SAFConv2d's (T * B, C, H, W)
    batch of frames is then a torch.channels_last tensor."""
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _channels_last_case(layer: str, backend: str):
    """(module, input, the input in the channels-last layout)."""
    if layer == "saf_conv2d":
        x = torch.rand(3, 2, 3, 6, 6) * 2
        return mnn.SAFConv2d(3, 5, 3, padding=1, spike_bits=2, backend=backend), x, _frames_channels_last(x)
    x = torch.randn(4, 3, 6, 6) * 1.5 + 0.5
    modules = {
        "quant_conv2d": lambda: mnn.QuantConv2d(3, 5, 3, stride=2, padding=1, weight_bits=2, backend=backend),
        "lbn": lambda: mnn.LayerBatchNorm(3, backend=backend),
        "lbn_as_batchnorm": lambda: mnn.LayerBatchNorm(3, groups=3, backend=backend),
    }
    return modules[layer](), x, x.to(memory_format=CHANNELS_LAST)


@pytest.mark.parametrize("backend,device", op_backends())
@pytest.mark.parametrize("layer", ["quant_conv2d", "saf_conv2d", "lbn", "lbn_as_batchnorm"])
def test_channels_last_layers_match_contiguous(layer, backend, device):
    """Channels-last input, with the weights as model.to(memory_format=torch.channels_last) leaves
    them, gives the contiguous run's output, input gradient, parameter gradients and running
    statistics, to float32 rounding (a convolution may sum in another order)."""
    module, x, x_channels_last = _channels_last_case(layer, backend)
    module.to(device)
    twin = copy.deepcopy(module).to(memory_format=CHANNELS_LAST)
    want, (want_grad_x,) = _forward_backward(module, [x.to(device)])
    out, (grad_x,) = _forward_backward(twin, [x_channels_last.to(device)])
    assert want.abs().sum() > 0
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, want_grad_x, rtol=1e-5, atol=1e-6)
    _assert_same_state(twin, module, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", op_backends())
def test_channels_last_converted_convolutions_match_contiguous(backend, device):
    """LowBitConv2d, fed uint8 codes (a fused block after Quantize) or floats (a lone converted
    QuantConv2d), gives exactly the same output for a channels-last input."""
    block = nn.Sequential(
        mnn.QuantAct(4, backend=backend),
        mnn.QuantConv2d(3, 8, 3, padding=1, weight_bits=4, backend=backend),
        mnn.LayerBatchNorm(8, backend=backend),
        mnn.QuantAct(4, backend=backend),
    ).to(device)
    for _ in range(3):
        block(torch.randn(8, 3, 6, 6, device=device) * 1.5 + 0.5)
    fused, lone = mk.convert_for_inference(block), mk.convert_for_inference(block[1])
    assert isinstance(fused[1], mnn.LowBitConv2d) and isinstance(lone, mnn.LowBitConv2d)
    x = torch.randn(4, 3, 6, 6, device=device) * 1.5 + 0.5
    for converted in (fused, lone):
        assert torch.equal(converted(x.to(memory_format=CHANNELS_LAST)), converted(x))


def _feed_convolutions_channels_last(model: nn.Module) -> nn.Module:
    """``model`` as a channels-last pipeline runs it: weights channels-last, and every convolution
    given channels-last activations."""
    model.to(memory_format=CHANNELS_LAST)
    for module in model.modules():
        if isinstance(module, mnn.QuantConv2d):
            module.register_forward_pre_hook(lambda m, args: (args[0].contiguous(memory_format=CHANNELS_LAST),))
    return model


@pytest.mark.parametrize("backend,device", op_backends())
def test_channels_last_maqd_cnn_matches_contiguous(backend, device, monkeypatch):
    """maqd_cnn (its layers after Unflatten) on channels-last images, run channels-last throughout,
    trains as the contiguous model does: the same logits, input gradient, parameter gradients and
    running statistics, to float32 rounding."""
    monkeypatch.setenv("MAQD_BACKEND", backend)
    contiguous, twin = _twins("maqd_cnn", device)
    body, body_channels_last = contiguous[1:], _feed_convolutions_channels_last(twin[1:])
    images = torch.rand(BATCH, 1, SIDE, SIDE, device=device)
    want, (want_grad,) = _forward_backward(body, [images])
    out, (grad,) = _forward_backward(body_channels_last, [images.to(memory_format=CHANNELS_LAST)])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    _assert_same_state(body_channels_last, body, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_channels_last_block_equals_eager():
    """A MaQD conv block trained channels-last, compiled by Inductor, matches eager."""
    torch._dynamo.reset()
    block = nn.Sequential(
        mnn.QuantConv2d(3, 8, 3, padding=1, weight_bits=4), mnn.LayerBatchNorm(8), mnn.QuantAct(4), nn.Flatten()
    ).to(memory_format=CHANNELS_LAST)
    twin = copy.deepcopy(block)
    x = (torch.randn(4, 3, 6, 6) * 1.5 + 0.5).to(memory_format=CHANNELS_LAST)
    out, (grad,) = _forward_backward(torch.compile(twin, fullgraph=True), [x])
    want, (want_grad,) = _forward_backward(block, [x])
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- state_dict


def _with_learned_scales(model: nn.Sequential) -> nn.Sequential:
    """``model`` with the QuantAct of each block (not the input's 8-bit one) learning its scale."""
    for index, module in enumerate(model):
        if isinstance(module, mnn.QuantAct) and module.bits != models.PIXEL_BITS:
            model[index] = mnn.QuantAct(module.bits, learn_scale=True)
    return model


STATE_DICT_MODELS = {
    "maqd_mlp": EXAMPLES["maqd_mlp"],
    "maqd_cnn": EXAMPLES["maqd_cnn"],
    "maqd_cnn_learned_scales": lambda: _with_learned_scales(EXAMPLES["maqd_cnn"]()),
    "saf_e_mlp": EXAMPLES["saf_e_mlp"],
    "saf_f_mlp": EXAMPLES["saf_f_mlp"],
    "maqd_saf_mlp": EXAMPLES["maqd_saf_mlp"],
}


def _trained(name: str) -> nn.Module:
    """A few optimizer steps on random batches: weights, LBN running statistics and learned scales
    all move."""
    model = STATE_DICT_MODELS[name]()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        optimizer.zero_grad()
        train.loss_of(model, *_batch()).backward()
        optimizer.step()
    return model.eval()


def _saved_and_loaded(state_dict: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", STATE_DICT_MODELS)
def test_state_dict_round_trip_of_trained_models(name):
    """A trained model's state_dict, saved to bytes and loaded with weights_only=True into a freshly
    built model (another initialisation), makes it compute the trained model's eval outputs
    exactly; so does the converted model's state_dict loaded into convert_for_inference of a fresh
    model."""
    trained = _trained(name)
    images, _ = _batch()
    fresh = STATE_DICT_MODELS[name]().eval()
    assert not torch.equal(fresh(images), trained(images)), "the load would have nothing to do"
    fresh.load_state_dict(_saved_and_loaded(trained.state_dict()))
    assert torch.equal(fresh(images), trained(images))

    converted = mk.convert_for_inference(trained)
    fresh_converted = mk.convert_for_inference(STATE_DICT_MODELS[name]())
    fresh_converted.load_state_dict(_saved_and_loaded(converted.state_dict()))
    assert torch.equal(fresh_converted(images), converted(images))
    if name == "maqd_cnn_learned_scales":
        learned = [float(m.scale.detach()) for m in trained if isinstance(m, mnn.QuantAct) and m.learn_scale]
        assert learned and mk.default_scale(4, False) not in learned, "the scales did not train"

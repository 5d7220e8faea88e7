"""Training under torch.nn.parallel.DistributedDataParallel: two CPU processes on the gloo backend
(initialised through a file store, so no ports are involved), each running an example model wrapped
in DDP on its half of one batch, one backward pass and one SGD step. The gradients DDP leaves on
the two ranks are equal, and equal to a single-process computation; after the step so are the
parameters. PyTorch's own engine scales these models out; nothing in maqd_kernels is special to it.
"""

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from maqd_kernels import nn as mnn

from helpers import example_modules

models, train = example_modules()

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="this torch build has no torch.distributed with the gloo backend",
)

WORLD = 2
FEATURES, HIDDEN, CLASSES, STEPS, BATCH = 36, 32, 5, 4, 16
LEARNING_RATE = 0.1
BUILDERS = {
    "maqd_mlp": lambda: models.maqd_mlp(FEATURES, HIDDEN, CLASSES, weight_bits=2, act_bits=4),
    "saf_e_mlp": lambda: models.saf_mlp(FEATURES, HIDDEN, CLASSES, mode="saf_e", steps=STEPS),
    "maqd_saf_mlp": lambda: models.maqd_saf_mlp(FEATURES, HIDDEN, CLASSES, weight_bits=2, spike_bits=2, steps=STEPS),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)  # one initialisation in every process
    return BUILDERS[name]()


def _shard(rank: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of images and labels, the same in every process; `rank`'s half of it (None: all)."""
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(BATCH, FEATURES, generator=generator)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    if rank is None:
        return images, labels
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return images[half], labels[half]


def _distributed(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with DDP around what runs its forward: the whole MLP, or a spiking classifier's
    network (so that ``train.loss_of`` still sees the classifier and picks its loss)."""
    if isinstance(model, models.SpikingClassifier):
        model.network = DistributedDataParallel(model.network)
        return model
    return DistributedDataParallel(model)


def _worker(rank: int, store: str, results: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)  # the two processes share the machine's cores
    outcome = {}
    for name in BUILDERS:
        model = _model(name)
        trained = _distributed(model)
        train.loss_of(trained, *_shard(rank)).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        torch.optim.SGD(model.parameters(), lr=LEARNING_RATE).step()
        outcome[name] = {"grads": grads, "params": [p.detach().clone() for p in model.parameters()]}
    torch.save(outcome, f"{results}.{rank}")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Each rank's gradients and stepped parameters, per model."""
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "store"), str(tmp / "results")), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"results.{rank}", weights_only=True) for rank in range(WORLD)]


def _gradients(name: str, rank: int | None) -> list[torch.Tensor]:
    """A single process's gradients of the loss on `rank`'s shard (None: on the whole batch)."""
    model = _model(name)
    train.loss_of(model, *_shard(rank)).backward()
    return [p.grad for p in model.parameters()]


@pytest.mark.parametrize("name", BUILDERS)
def test_ddp_gradients_and_step_equal_a_single_process(ranks, name):
    """Both ranks hold the same gradients and, after one SGD step, the same parameters.

    The reference is the mean over the two shards of each shard's gradient, computed in one
    process: DDP averages the ranks' gradients, and LayerBatchNorm, like BatchNorm without
    SyncBatchNorm, takes its batch statistics per rank, so for the models with LBN that mean is
    what DDP computes. A model without batch statistics (saf_mlp) has no per-rank state, and its
    gradient equals the whole batch's with a mean loss too."""
    first, second = ranks[0][name], ranks[1][name]
    for g_first, g_second in zip(first["grads"], second["grads"]):
        assert g_first.abs().sum() > 0 and torch.equal(g_first, g_second)
    for p_first, p_second in zip(first["params"], second["params"]):
        assert torch.equal(p_first, p_second)

    per_shard = [_gradients(name, rank) for rank in range(WORLD)]
    want = [torch.stack(shard_grads).mean(0) for shard_grads in zip(*per_shard)]
    for got, expected in zip(first["grads"], want):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    stepped = [p.detach() - LEARNING_RATE * g for p, g in zip(_model(name).parameters(), want)]
    for got, expected in zip(first["params"], stepped):
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)

    if not any(isinstance(m, mnn.LayerBatchNorm) for m in _model(name).modules()):
        for got, expected in zip(first["grads"], _gradients(name, None)):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)

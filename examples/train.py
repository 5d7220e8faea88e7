"""Training, evaluation and the conversion check for the example models (``examples.models``).

One loss per kind of model:
- float and MaQD models return logits (B, classes): cross-entropy;
- SAF-E (``SpikingClassifier`` in mode "saf_e"): the mean over steps of each step's cross-entropy,
  whose gradients are OTTT's (Saiin et al., TMLR 2024, Theorem 1);
- SAF-F (mode "saf_f"): cross-entropy of the last step's logits, computed by
  ``maqd_kernels.nn.saf_f_last_step`` so that only the last step keeps an autograd graph.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from examples.data import Dataset
from examples.models import SpikingClassifier
from maqd_kernels import convert_for_inference
from maqd_kernels.nn import saf_f_last_step

Tensor = torch.Tensor
BATCH_SIZE = 64
LR = 2e-3  # Adam's initial learning rate, decayed to zero by a cosine over the run


@dataclass
class History:
    """Per epoch: the mean training loss and the test accuracy (in [0, 1]) after it; `train_seconds`
    counts the optimisation steps only, not the evaluations."""

    train_loss: list[float] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    train_seconds: float = 0.0


@dataclass
class Conversion:
    """Predictions of ``convert_for_inference(model)`` against the eval-mode model's on the test set.

    `accuracy`: the converted model's; `equal` of `total` predictions agree; `max_abs_diff`: the
    largest |difference| between the two models' outputs (logits, per step for spiking models);
    `differing`: the test indices whose predictions differ."""

    accuracy: float
    equal: int
    total: int
    max_abs_diff: float
    differing: list[int]


def loss_of(model: nn.Module, images: Tensor, labels: Tensor) -> Tensor:
    """The training loss of `model` on images (B, features) float32 and labels (B,) int64."""
    if isinstance(model, SpikingClassifier):
        if model.mode == "saf_f":
            return F.cross_entropy(saf_f_last_step(model.network, model.encode(images))[0], labels)
        logits = model(images)
        # Every step has B samples, so the mean over (step, sample) is the mean of per-step losses.
        return F.cross_entropy(logits.flatten(0, 1), labels.repeat(logits.shape[0]))
    return F.cross_entropy(model(images), labels)


def class_scores(model: nn.Module, outputs: Tensor) -> Tensor:
    """(B, classes) scores whose argmax is the prediction, from `model`'s outputs."""
    return model.predict(outputs) if isinstance(model, SpikingClassifier) else outputs


@torch.no_grad()
def outputs_of(model: nn.Module, images: Tensor, batch_size: int = 1024) -> Tensor:
    """`model`'s outputs on `images` (N, features), evaluated in batches in eval mode: (N, classes),
    or (T, N, classes) for spiking models, float32."""
    model.eval()
    batch_dim = 1 if isinstance(model, SpikingClassifier) else 0
    return torch.cat([model(chunk).float() for chunk in images.split(batch_size)], dim=batch_dim)


def accuracy(model: nn.Module, images: Tensor, labels: Tensor) -> float:
    """Eval-mode test accuracy in [0, 1]."""
    predictions = class_scores(model, outputs_of(model, images)).argmax(-1)
    return (predictions == labels).float().mean().item()


def fit(
    model: nn.Module,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int = BATCH_SIZE,
    lr: float = LR,
    seed: int = 0,
    penalty: Callable[[nn.Module], Tensor] | None = None,
) -> History:
    """Trains `model` (on `data`'s device) with Adam and a cosine learning-rate decay to zero over
    `epochs` epochs of shuffled mini-batches; returns the per-epoch curves. `penalty(model)`, called
    after each forward, is added to the loss (e.g. ``maqd_kernels.synaptic_penalty``); the curves'
    train loss is the task loss alone."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = -(-len(data.y_train) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * batches)
    # The shuffling has its own generator: each model sees the same batches whatever ran before it.
    order = torch.Generator().manual_seed(seed)
    history = History()
    for _ in range(epochs):
        model.train()
        started = time.perf_counter()
        total = torch.zeros((), device=data.x_train.device)
        for index in torch.randperm(len(data.y_train), generator=order).to(data.x_train.device).split(batch_size):
            loss = loss_of(model, data.x_train[index], data.y_train[index])
            optimizer.zero_grad(set_to_none=True)
            (loss if penalty is None else loss + penalty(model)).backward()
            optimizer.step()
            schedule.step()
            total += loss.detach() * len(index)
        mean_loss = total.item() / len(data.y_train)  # .item() also waits for the GPU before timing
        history.train_seconds += time.perf_counter() - started
        history.train_loss.append(mean_loss)
        history.test_accuracy.append(accuracy(model, data.x_test, data.y_test))
    return history


def check_conversion(model: nn.Module, data: Dataset) -> Conversion:
    """Converts `model` (``convert``) and compares both on the test set."""
    before = outputs_of(model, data.x_test)
    converted = convert_for_inference(model)
    after = outputs_of(converted, data.x_test)
    predicted_before = class_scores(model, before).argmax(-1)
    predicted_after = class_scores(converted, after).argmax(-1)
    same = predicted_before == predicted_after
    return Conversion(
        accuracy=(predicted_after == data.y_test).float().mean().item(),
        equal=int(same.sum()),
        total=len(same),
        max_abs_diff=(before - after).abs().max().item(),
        differing=(~same).nonzero().flatten().tolist(),
    )

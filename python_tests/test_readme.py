"""The README's swap-in example runs as printed: a newcomer's first copy and paste must work."""

import re
from pathlib import Path

import torch
import torch.nn.functional as F

README = Path(__file__).resolve().parents[1] / "README.md"


def _swap_in_example() -> str:
    section = README.read_text().split("## Swap it in", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def _train(model: torch.nn.Module) -> None:
    """The `train(model)` the example leaves to the reader: a few Adam steps on random images."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(3):
        images, labels = torch.rand(16, 784), torch.randint(0, 10, (16,))
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()


def test_swap_in_example_trains_converts_and_predicts_as_the_original():
    code = _swap_in_example()
    assert len(code.strip().splitlines()) <= 10, "the README promises a swap-in in ten lines"
    scope = {"train": _train}
    exec(compile(code, str(README), "exec"), scope)
    model, fast = scope["model"].eval(), scope["fast"]
    images = torch.rand(32, 784)
    assert torch.equal(fast(images).argmax(-1), model(images).argmax(-1))

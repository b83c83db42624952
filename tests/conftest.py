"""Shared tiny fixtures: a base state dict with every kind of tensor a merge meets, and experts
fine-tuned from it.

``tiny_base``      state dict of :class:`TinyNet` (embedding, Conv2d + BatchNorm2d with running
                   statistics and the integer ``num_batches_tracked``, Linear + LayerNorm, a
                   classifier head), float32, seeded.
``make_experts``   factory ``make_experts(base, n, *, seed=1, rank=2, scale=0.1, noise=0.01)``:
                   ``n`` experts = base + a random rank-``rank`` delta of size ``scale`` plus
                   Gaussian ``noise`` on every matrix, small noise on 1-D float tensors (running
                   variances stay positive), and ``num_batches_tracked`` advanced differently per
                   expert (so a test sees whether integer buffers were averaged instead of copied).
``tiny_experts``   ``make_experts(tiny_base, 3)``.

Everything is small (the largest tensor has 384 entries) so the whole contract suite runs in
seconds on two CPU cores.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lib.statedict import StateDict


class TinyNet(nn.Module):
    """A few of each layer type, named like real models so name filters (``classifier``) work."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(24, 8)
        self.conv = nn.Conv2d(3, 6, kernel_size=3)
        self.bn = nn.BatchNorm2d(6)
        self.fc1 = nn.Linear(8, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 12)
        self.classifier = nn.Linear(12, 3)


def make_base(seed: int = 0) -> StateDict:
    torch.manual_seed(seed)
    net = TinyNet()
    with torch.no_grad():  # non-trivial running statistics and norm affine parameters
        net.bn.running_mean.normal_(0.0, 0.1)
        net.bn.running_var.uniform_(0.5, 1.5)
        net.bn.num_batches_tracked.fill_(100)
        net.norm.weight.normal_(1.0, 0.1)
        net.norm.bias.normal_(0.0, 0.1)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def make_experts(
    base: StateDict, n: int, *, seed: int = 1, rank: int = 2, scale: float = 0.1, noise: float = 0.01
) -> list[StateDict]:
    """``n`` experts fine-tuned from ``base``: low-rank-plus-noise deltas (see the module docstring)."""
    g = torch.Generator().manual_seed(seed)
    experts = []
    for i in range(n):
        expert = {}
        for k, w in base.items():
            if not torch.is_floating_point(w):
                expert[k] = w + 10 * (i + 1)
            elif w.ndim >= 2:
                rows, cols = w.shape[0], w[0].numel()
                u = torch.randn(rows, rank, generator=g) / rank**0.5
                v = torch.randn(rank, cols, generator=g) / cols**0.5
                delta = scale * (u @ v) + noise * torch.randn(rows, cols, generator=g)
                expert[k] = w + delta.reshape(w.shape)
            else:
                jitter = noise * torch.randn(w.shape, generator=g)
                expert[k] = w + (jitter.abs() if "running_var" in k else jitter)  # variances stay positive
        experts.append(expert)
    return experts


@pytest.fixture
def tiny_base() -> StateDict:
    return make_base()


@pytest.fixture(name="make_experts")
def make_experts_fixture():
    return make_experts


@pytest.fixture
def tiny_experts(tiny_base) -> list[StateDict]:
    return make_experts(tiny_base, 3)

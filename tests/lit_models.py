"""Small Lightning models for the callback tests, for either namespace."""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs

MODES, RADIUS, SIGMA = 8, 4.0, 0.3
_ANGLES = torch.arange(MODES, dtype=torch.float64) * (2 * math.pi / MODES)
MEANS = RADIUS * torch.stack((_ANGLES.cos(), _ANGLES.sin()), 1)


def namespace(name: str = "lightning.pytorch"):
    return importlib.import_module(name)


def mixture_log_prob(x: torch.Tensor, weights: torch.Tensor, scale: float) -> torch.Tensor:
    """log density of Σ_k w_k N(μ_k, (scale·σ)² I) at x (float64)."""
    s = SIGMA * scale
    sq = ((x[:, None, :] - MEANS[None]) ** 2).sum(-1)
    comp = -sq / (2 * s * s) - 2 * math.log(s) - math.log(2 * math.pi)
    return torch.logsumexp(comp + torch.log(weights.clamp_min(1e-300))[None], dim=1)


def mixture_sample(n: int, weights: torch.Tensor, scale: float, generator=None) -> torch.Tensor:
    comp = torch.multinomial(weights, n, replacement=True, generator=generator)
    return MEANS[comp] + SIGMA * scale * torch.randn(n, 2, dtype=torch.float64, generator=generator)


def ring_data(n: int, seed: int, batch_size: int = 256) -> DataLoader:
    """Held-out samples of the 8-mode reference with their mode index."""
    g = torch.Generator().manual_seed(seed)
    mode = torch.randint(MODES, (n,), generator=g)
    x = MEANS[mode] + SIGMA * torch.randn(n, 2, dtype=torch.float64, generator=g)
    return DataLoader(TensorDataset(x, mode), batch_size=batch_size)


def train_data(n: int = 512, dim: int = 4, batch_size: int = 16, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, dim, generator=g)), batch_size=batch_size)


def scripted_schedule(onset: int | None, dropped: tuple[int, ...] = (1, 2, 5, 6)) -> Callable:
    """Model weights and spread by evaluation index: converging, then (optionally) dropping.

    The model starts too wide (scale 2.5) and converges to the reference (scale 1,
    uniform weights); from evaluation ``onset`` the weights of ``dropped`` modes
    decay by a factor 1e-3 per evaluation (mass gone within two evaluations).
    """

    def at(index: int) -> tuple[torch.Tensor, float]:
        scale = 1.0 + 1.5 * math.exp(-index / 4)
        w = torch.ones(MODES, dtype=torch.float64)
        if onset is not None and index >= onset:
            w[list(dropped)] = 1e-3 ** (index - onset + 1)
        return w / w.sum(), scale

    return at


def scripted_mixture_module(ns: str, schedule: Callable, every: int):
    """A model whose distribution follows ``schedule``; training does nothing to it."""
    pl = namespace(ns)

    class ScriptedMixture(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            return (self.dummy**2).sum() + 0.0 * batch[0].sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def kl_inputs(self, batch):
            x, mode = batch
            weights, scale = schedule(self.trainer.global_step // every)
            y = mixture_sample(x.shape[0], weights, scale)
            nearest = torch.cdist(y, MEANS).argmin(1)
            ref = mixture_log_prob
            uniform = torch.full((MODES,), 1.0 / MODES, dtype=torch.float64)
            return KLInputs.from_log_probs(
                ref(x, uniform, 1.0),
                ref(x, weights, scale),
                model_samples_log_q=ref(y, weights, scale),
                model_samples_log_p=ref(y, uniform, 1.0),
                groups=mode,
                model_samples_groups=nearest,
            )

    return ScriptedMixture()


def student_module(
    ns: str, dim: int = 4, classes: int = 5, dropout: float = 0.0, sample: bool = False
):
    """A linear student distilled from a frozen random teacher (exact categorical KL).

    With ``sample=True`` its ``kl_inputs`` also draws from the global RNG (tests RNG
    isolation); with ``dropout`` the forward pass is stochastic in train mode.
    """
    pl = namespace(ns)

    class Student(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            g = torch.Generator().manual_seed(1234)
            self.teacher = nn.Linear(dim, classes).requires_grad_(False)
            with torch.no_grad():
                self.teacher.weight.copy_(torch.randn(classes, dim, generator=g))
            self.net = nn.Sequential(nn.Dropout(dropout), nn.Linear(dim, classes))
            self.fail_at: set[int] = set()
            self.calls = 0

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            (x,) = batch
            log_q = self(x).log_softmax(-1)
            log_p = self.teacher(x).log_softmax(-1)
            return torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="batchmean")

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

        def kl_inputs(self, batch):
            self.calls += 1
            if self.calls in self.fail_at:
                raise RuntimeError(f"injected failure at call {self.calls}")
            (x,) = batch
            if sample:
                x = x + 0.01 * torch.randn_like(x)
            return KLInputs.from_logits(self.teacher(x), self(x))

    return Student()


class FrozenLinear(pl.LightningModule):
    """A linear layer that never learns (zero loss, lr = 0): the model a test scripts
    through ``kl_inputs`` stays exactly where the test puts it."""

    def __init__(self, classes: int) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, classes)

    def training_step(self, batch, batch_idx):
        return self.lin(batch[0]).sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

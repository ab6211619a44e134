"""The first user project of issue 12, end to end through `Trainer.fit` with the defaults.

A 1-D mixture with six fixed, well-separated modes and learnable weights, started
away from the optimum and trained by maximum likelihood; `KLMonitor()` every 10 steps
with model samples (drawn by inverse CDF from the global RNG, which the monitor seeds
the same at every evaluation: common random numbers) grouped by mode. Written for
this test, not tuned on: the healthy run must stay silent, and when from step 100 the
data hold only modes 0 and 1, the first evaluation after it (the true weights of modes
2-5 are then at 0.50, 0.56, 0.52 and 0.58 of the reference's) must name exactly modes
2, 3, 4, 5 as losing mass. With `rules=AlertRules()` (0.1.0's detectors) the collapse
run raises `collapse` at step 0, `coverage_gap` at 30 and `over_dispersion` at 60,
all before the fault. Before the baseline fix in `alerting._rises_without_mass_part`
the engine's first alert named modes 2, 4, 5 only (mode 3's baseline was stuck at its
early-training mass).
"""

from __future__ import annotations

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from kl_monitor import KLInputs, KLMonitor

MEANS = torch.arange(6, dtype=torch.float64) * 10.0
P = torch.tensor([0.25, 0.2, 0.2, 0.15, 0.1, 0.1], dtype=torch.float64)


def mix_logpdf(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    comp = torch.distributions.Normal(MEANS, 1.0).log_prob(x[:, None])
    return torch.logsumexp(comp + w.log(), dim=1)


class Stream(IterableDataset):
    """Batches of P; from batch `collapse_at` on, modes 0 and 1 only."""

    def __init__(self, steps: int, collapse_at: int | None) -> None:
        self.steps, self.collapse_at = steps, collapse_at

    def __iter__(self):
        g = torch.Generator().manual_seed(7)
        for i in range(self.steps):
            p = P.clone()
            if self.collapse_at is not None and i >= self.collapse_at:
                p[2:] = 0
            c = torch.multinomial(p / p.sum(), 256, replacement=True, generator=g)
            yield (MEANS[c] + torch.randn(256, generator=g, dtype=torch.float64),)


class Mixture(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        init = torch.tensor([2.0, 1.0, 0.0, -0.5, -1.0, -1.5], dtype=torch.float64)
        self.theta = torch.nn.Parameter(init)

    def w(self) -> torch.Tensor:
        return torch.softmax(self.theta, 0)

    def training_step(self, batch, batch_idx):
        return -mix_logpdf(batch[0], self.w()).mean()

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)

    def kl_inputs(self, batch):
        x, mode = batch
        w = self.w().detach()
        c = torch.searchsorted(w.cumsum(0), torch.rand(len(x), dtype=torch.float64))
        c = c.clamp(max=len(w) - 1)
        y = MEANS[c] + torch.randn(len(x), dtype=torch.float64)
        return KLInputs.from_log_probs(
            mix_logpdf(x, P), mix_logpdf(x, w), groups=mode,
            model_samples_log_q=mix_logpdf(y, w), model_samples_log_p=mix_logpdf(y, P),
            model_samples_groups=c,
        )  # fmt: skip


def _fit(collapse_at: int | None, steps: int = 200) -> KLMonitor:
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(100)
    mode = torch.multinomial(P, 4096, replacement=True, generator=g)
    x = MEANS[mode] + torch.randn(4096, generator=g, dtype=torch.float64)
    monitor = KLMonitor(DataLoader(TensorDataset(x, mode), batch_size=1024),
                        every_n_train_steps=10, max_batches=4)  # fmt: skip
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[monitor])  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Mixture(), DataLoader(Stream(steps, collapse_at), batch_size=None))
    return monitor


@pytest.mark.parametrize("steps", [300])
def test_healthy_mixture_run_is_silent(steps):
    monitor = _fit(None, steps)
    assert monitor.failures == 0 and monitor.n_evals == steps // 10 + 1
    assert monitor.alerts == [], [a.message for a in monitor.alerts]


def test_mode_collapse_is_named_at_the_first_evaluation_after_it():
    monitor = _fit(collapse_at=100)
    first = monitor.alerts[0]
    assert (first.kind, first.step) == ("collapse", 110), first.message
    assert first.details["signature"] == "mode_dropping"
    assert set(first.groups) == {2, 3, 4, 5}, first.message
    lost = dict(re.findall(r"(\d+) lost (\d+)%", first.message))
    assert set(lost) == {"2", "3", "4", "5"} and all(int(v) >= 20 for v in lost.values())

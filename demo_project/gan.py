"""A GAN on the 8-mode ring, watched by KLMonitor from samples alone.

Written like Lightning's own GAN example (``basic_gan.py``): a ``Generator`` and a
``Discriminator``, manual optimization with two optimizers, the non-saturating
generator loss. A GAN has no density, so ``kl_inputs`` hands the monitor held-out
ring samples (with their mode as the group) and as many generator samples:
``KLInputs.from_samples``, k-NN KL in both directions.

Two runs:

- ``healthy``: plain alternating updates. It covers all 8 modes.
- ``collapse``: the same GAN, but from ``collapse_at`` on the discriminator is no
  longer updated and the generator takes ``generator_steps`` steps per batch. This is
  the textbook route to mode collapse (the "Helvetica scenario" of Goodfellow's 2016
  tutorial: a generator trained too much against a fixed discriminator moves all its
  mass onto the points the discriminator likes best). It is induced on purpose, at a
  known step, so that the demo is short and deterministic; everything else is a
  real GAN trained with ``Trainer.fit``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs, KLMonitor

from .ring import Ring


class Generator(nn.Module):
    """z ~ N(0, I) in ``latent_dim`` dimensions -> a point in the plane."""

    def __init__(self, latent_dim: int = 4, hidden: int = 32) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(latent_dim, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 2),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.model(z)


class Discriminator(nn.Module):
    """A point in the plane -> logit of "real"."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.model = nn.Sequential(
            nn.Linear(2, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class RingGAN(pl.LightningModule):
    """GAN trained on ring samples; ``collapse_at`` induces mode collapse (module doc)."""

    def __init__(
        self,
        latent_dim: int = 4,
        hidden: int = 32,
        lr: float = 3e-3,
        collapse_at: int | None = None,
        generator_steps: int = 5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.generator = Generator(latent_dim, hidden)
        self.discriminator = Discriminator(hidden)
        self.ring = Ring()
        self.batches_seen = 0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)

    @staticmethod
    def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
        target = torch.ones_like(logits) if real else torch.zeros_like(logits)
        return nn.functional.binary_cross_entropy_with_logits(logits, target)

    def collapsing(self) -> bool:
        at = self.hparams.collapse_at
        return at is not None and self.batches_seen >= at

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        real, _ = batch
        opt_g, opt_d = self.optimizers()
        z = torch.randn(real.shape[0], self.hparams.latent_dim, device=real.device)
        # generator: make the discriminator call its samples real (non-saturating loss)
        for _ in range(self.hparams.generator_steps if self.collapsing() else 1):
            self.toggle_optimizer(opt_g)
            g_loss = self.adversarial_loss(self.discriminator(self(z)), True)
            opt_g.zero_grad()
            self.manual_backward(g_loss)
            opt_g.step()
            self.untoggle_optimizer(opt_g)
        # self.log costs about as much as a step of these tiny networks: log every 25th
        log = batch_idx % 25 == 0
        if log:
            self.log("train/g_loss", g_loss)
        self.batches_seen += 1
        if self.collapsing():
            return  # the induced failure: the discriminator stops learning
        # discriminator: real ring samples against the generator's
        self.toggle_optimizer(opt_d)
        fake = self(z).detach()
        d_loss = 0.5 * (
            self.adversarial_loss(self.discriminator(real), True)
            + self.adversarial_loss(self.discriminator(fake), False)
        )
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        if log:
            self.log("train/d_loss", d_loss)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        # foreach: one kernel per step for all of these small tensors
        opts = dict(lr=self.hparams.lr, betas=(0.5, 0.999), foreach=True)
        return [
            torch.optim.Adam(self.generator.parameters(), **opts),
            torch.optim.Adam(self.discriminator.parameters(), **opts),
        ]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` generator samples; pass ``generator`` to leave the global RNG alone."""
        z = torch.randn(n, self.hparams.latent_dim, generator=generator)
        return self(z.to(self.device))

    def kl_inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> KLInputs:
        """Held-out ring samples with their mode, and as many generator samples."""
        x, mode = batch
        return KLInputs.from_samples(x, self.sample(x.shape[0]), groups=mode)


#: a mode is lost when the generator puts less than this share of its samples nearest
#: to it (an equal share is 1/8 = 0.125)
LOST_SHARE = 0.02


def lost_modes(ring: Ring, samples: torch.Tensor) -> list[int]:
    """Modes with less than ``LOST_SHARE`` of the samples nearest to them."""
    share = torch.bincount(ring.nearest_mode(samples), minlength=ring.modes) / samples.shape[0]
    return [g for g in range(ring.modes) if share[g] < LOST_SHARE]


def train(
    name: str, collapse_at: int | None, out: Path, batches: int, every: int, seed: int,
    progress: bool,
) -> dict:
    """One GAN run watched by KLMonitor; returns what the table and the figure need.

    ``collapse_at`` (in batches) induces the collapse (module doc); ``every`` is the
    monitor's cadence in optimizer steps (two per batch: generator and discriminator).
    At the first alert the hook draws generator samples with its own RNG, so the
    figure can show the model at the alert without touching the training run.
    """
    pl.seed_everything(seed, verbose=False)
    ring = Ring()
    g = torch.Generator().manual_seed(seed)
    train_x, train_mode = ring.sample(batches * 128, generator=g)
    held_x, held_mode = ring.sample(1024, generator=g)
    model = RingGAN(collapse_at=collapse_at)
    alerts: list[dict] = []
    snapshot: dict = {}

    def on_alert(alert: Any) -> None:
        alerts.append(alert.to_dict())
        if "samples" not in snapshot:
            with torch.no_grad():
                snapshot["samples"] = model.sample(4000, torch.Generator().manual_seed(1))
            snapshot["step"] = alert.step

    monitor = KLMonitor(
        DataLoader(TensorDataset(held_x, held_mode), batch_size=1024),
        every_n_train_steps=every, max_batches=1, num_groups=ring.modes, on_alert=on_alert,
    )
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, callbacks=[monitor],
        logger=TensorBoardLogger(str(out), name=f"gan_{name}", version=""),
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        log_every_n_steps=every,
    )
    # one item per batch (batch_size=None): no per-sample indexing and collation
    loader = DataLoader(
        TensorDataset(train_x.view(batches, 128, 2), train_mode.view(batches, 128)),
        batch_size=None,
    )
    trainer.fit(model, loader)
    with torch.no_grad():
        samples = model.sample(4000, torch.Generator().manual_seed(1))
    covered, quality = ring.modes_covered(samples)
    last = monitor.last_result
    return {
        "objective": f"gan-{name}", "forward": last["kl/forward"],
        "forward_stderr": last["kl/forward_stderr"], "reverse": last["kl/reverse"],
        "reverse_stderr": last["kl/reverse_stderr"], "alerts": alerts,
        "evaluations": monitor.n_evals,
        "modes_covered": covered, "high_quality": quality, "samples": samples,
        "alert_samples": snapshot.get("samples"), "alert_step": snapshot.get("step"),
        "lost_at_alert": lost_modes(ring, snapshot["samples"]) if snapshot else [],
        "lost_at_end": lost_modes(ring, samples),
    }


def figure(results: list[dict], png: Path) -> None:
    """Generator samples over the ring's density contours: per run at the end, and the
    collapsing run at its first alert."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for r in results:
        if r["alert_samples"] is not None:
            named = ", ".join(map(str, r["alerts"][0]["groups"]))
            panels.append((r["alert_samples"], f"{r['objective']} at the alert "
                           f"(step {r['alert_step']}): modes {named} named"))
        panels.append((r["samples"], f"{r['objective']} at the end: "
                       f"{r['modes_covered']}/8 modes covered"))
    ring = Ring()
    grid = torch.linspace(-6, 6, 200)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    density = ring.log_prob(torch.stack((xx.reshape(-1), yy.reshape(-1)), 1)).exp()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4),
                             constrained_layout=True, squeeze=False)
    for ax, (s, title) in zip(axes[0], panels, strict=True):
        ax.contour(xx, yy, density.reshape(200, 200), levels=6, cmap="Greys")
        for g, (mx, my) in enumerate(ring.means.tolist()):
            ax.annotate(str(g), (1.3 * mx, 1.3 * my), ha="center", va="center", color="grey")
        s = s[:1500]
        ax.scatter(s[:, 0], s[:, 1], s=3, alpha=0.5, color="C3")
        ax.set_title(title, fontsize=9)
        ax.set_aspect("equal")
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
    fig.savefig(png, dpi=80)
    plt.close(fig)

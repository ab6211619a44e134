"""Run by tests/test_callback_ddp.py: `python _ddp_callback_script.py {single|ddp} OUTDIR`.

Two monitors on one run: exact categorical KL from logits, and sampled forward KL with
importance-weighted reverse (no model samples, so no RNG enters the numbers). The
model does not learn (lr = 0), so both launches see the same model at every step;
at step 3 a scripted fault (the same on every rank) moves the student's class 0, so
the alert engine's paired evidence, reduced across ranks, must raise the same alerts.
Each rank writes its monitors' alerts to OUTDIR/MODE_alerts_rankR.json.
"""

from __future__ import annotations

import json
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs, KLMonitor


class Frozen(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.teacher = torch.nn.Linear(3, 6).requires_grad_(False)
        self.student = torch.nn.Linear(3, 6)
        with torch.no_grad():
            self.teacher.weight.copy_(torch.randn(6, 3, generator=g))
            self.student.weight.copy_(torch.randn(6, 3, generator=g))

    def training_step(self, batch, batch_idx):
        if self.global_step == 3:  # the fault: class 0 takes most of the student's mass
            with torch.no_grad():
                self.student.bias[0] += 4.0
                self.student.weight[:, 0] += 1.0
        return self.student(batch[0]).logsumexp(-1).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def logits_inputs(module, batch):
    x, label = batch
    return KLInputs.from_logits(module.teacher(x), module.student(x), groups=label)


def sample_inputs(module, batch):
    x, label = batch
    # log p and log q of a point under two Gaussians whose means come from the models
    mu_p, mu_q = module.teacher.weight[:, 0], module.student.weight[:, 0]
    log_p = torch.distributions.Normal(mu_p[label], 1.0).log_prob(x[:, 0])
    log_q = torch.distributions.Normal(mu_q[label], 1.5).log_prob(x[:, 0])
    return KLInputs.from_log_probs(log_p.double(), log_q.double(), groups=label)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    pl.seed_everything(0, verbose=False)  # same biases in both launches and on every rank
    g = torch.Generator().manual_seed(1)
    held = TensorDataset(torch.randn(700, 3, generator=g), torch.randint(6, (700,), generator=g))
    train = TensorDataset(torch.randn(64, 3, generator=g))
    # 7 batches of 100: under DDP rank 0 takes 0,2,4,6 and rank 1 takes 1,3,5 (uneven)
    per_rank = 4 if mode == "ddp" else 7
    monitors = [
        KLMonitor(DataLoader(held, batch_size=100), inputs_fn=logits_inputs, num_groups=6,
                  every_n_train_steps=2, max_batches=per_rank, prefix="kl_logits"),
        KLMonitor(DataLoader(held, batch_size=100), inputs_fn=sample_inputs, num_groups=6,
                  every_n_train_steps=2, max_batches=per_rank, prefix="kl_samples"),
    ]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2 if mode == "ddp" else 1,
        strategy="ddp" if mode == "ddp" else "auto",
        max_steps=6, logger=pl.loggers.CSVLogger(out, name=mode, version=""),
        callbacks=monitors, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1,
    )
    trainer.fit(Frozen(), DataLoader(train, batch_size=4))
    alerts = {m.prefix: [a.to_dict() for a in m.alerts] for m in monitors}
    with open(f"{out}/{mode}_alerts_rank{trainer.global_rank}.json", "w") as fh:
        json.dump(alerts, fh, default=str)


if __name__ == "__main__":
    main()

"""Run by tests/test_num_groups.py: `python _ddp_infer_script.py {single|ddp} OUTDIR`.

No `num_groups`: the monitor infers it at the sanity evaluation. The held-out batches
alternate: even batches carry labels 0..2 only, odd batches 0..5. Under 2-process DDP
rank 0 reads the even batches and rank 1 the odd ones, so only the agreement across
ranks gives rank 0 the six groups. Each rank writes what it inferred and its logged
group tags to OUTDIR/MODE_rankR.json.
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
        self.student = torch.nn.Linear(3, 6)

    def training_step(self, batch, batch_idx):
        return self.student(batch[0]).sum() * 0.0

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)

    def kl_inputs(self, batch):
        x, label = batch
        return KLInputs.from_logits(torch.zeros(len(x), 6), self.student(x), groups=label)


def main() -> None:
    mode, out = sys.argv[1], sys.argv[2]
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(400, 3, generator=g)
    labels = torch.randint(3, (400,), generator=g)
    odd = (torch.arange(400) // 50) % 2 == 1  # batches of 50: odd batches reach label 5
    labels[odd] = torch.randint(6, (int(odd.sum()),), generator=g)
    per_rank = 4 if mode == "ddp" else 8
    monitor = KLMonitor(DataLoader(TensorDataset(x, labels), batch_size=50),
                        every_n_train_steps=2, max_batches=per_rank)  # fmt: skip
    trainer = pl.Trainer(
        accelerator="cpu", devices=2 if mode == "ddp" else 1,
        strategy="ddp" if mode == "ddp" else "auto", max_steps=2, logger=False,
        callbacks=[monitor], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Frozen(), DataLoader(TensorDataset(torch.randn(16, 3)), batch_size=4))
    tags = sorted(k for k in monitor.last_result if "/group_" in k)
    with open(f"{out}/{mode}_rank{trainer.global_rank}.json", "w") as fh:
        json.dump({"num_groups": monitor.num_groups, "failures": monitor.failures,
                   "tags": tags}, fh)  # fmt: skip


if __name__ == "__main__":
    main()

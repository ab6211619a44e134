"""With many groups the dashboard shows the top groups by their part of forward KL."""

from __future__ import annotations

import os
import re
import warnings

import lightning.pytorch as pl
import torch
from lit_models import FrozenLinear
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs, KLMonitor
from kl_monitor.tensorboard import TOP_GROUPS

GROUPS = 50
BAD = (7, 31, 44)  # the groups where the student is far from the teacher


class FiftyGroups(FrozenLinear):
    def __init__(self) -> None:
        super().__init__(6)

    def kl_inputs(self, batch):
        x, g = batch
        model = torch.zeros(len(x), 6)
        model[torch.isin(g, torch.tensor(BAD)), 0] = 4.0  # far off in three groups
        return KLInputs.from_logits(torch.zeros(len(x), 6) + 0 * self.lin(x), model, groups=g)


def _last_layout(path: str):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.custom_scalar import layout_pb2

    files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if "tfevents" in f]
    acc = ea.EventAccumulator(files[0], size_guidance={ea.TENSORS: 0, ea.SCALARS: 0})
    acc.Reload()
    events = acc.Tensors("custom_scalars__config__")
    return layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0]), acc


def test_fifty_groups_chart_the_top_groups_by_part_of_forward_kl(tmp_path):
    g = torch.Generator().manual_seed(0)
    held = TensorDataset(torch.randn(1000, 3, generator=g), torch.arange(1000) % GROUPS)
    monitor = KLMonitor(DataLoader(held, batch_size=500), every_n_train_steps=2)
    trainer = pl.Trainer(
        max_steps=2, logger=pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version=""),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[monitor],
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(FiftyGroups(), DataLoader(TensorDataset(torch.randn(8, 3)), batch_size=4))
    layout, acc = _last_layout(str(tmp_path))
    charts = {c.title: c for cat in layout.category for c in cat.chart}
    part = next(t for t in charts if t.startswith("per-group part of forward KL"))
    assert f"top {TOP_GROUPS} groups" in part and "nats per token" in part, part
    regex = charts[part].multiline.tag[0]
    shown = {int(m) for m in re.search(r"group_\((.*)\)\$", regex).group(1).split("|")}
    assert len(shown) == TOP_GROUPS and set(BAD) <= shown, shown
    # the parts are logged and add up to the forward KL
    tags = acc.Tags()["scalars"]
    parts = [acc.Scalars(f"kl/forward_contribution/group_{k}")[-1].value for k in range(GROUPS)]
    assert abs(sum(parts) - acc.Scalars("kl/forward")[-1].value) < 1e-5 * GROUPS
    assert "kl/forward_contribution/group_49" in tags

"""KLMonitor on sample-only inputs (``KLInputs.from_samples``): alerts name the dropped
modes' cells, the cells are logged and survive a checkpoint, configuration errors are
clear.

The "generator" draws ring samples from the modes it currently keeps; at step 60 it
drops modes 3, 5 and 7 (a scripted collapse), so the truth is known exactly.
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs, KLMonitor

MODES, DROPPED = 8, {3, 5, 7}


def _means() -> torch.Tensor:
    ang = torch.arange(MODES) * 2 * math.pi / MODES
    return 4 * torch.stack((ang.cos(), ang.sin()), 1)


class ScriptedGenerator(pl.LightningModule):
    def __init__(self, collapse_at: int = 60) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.collapse_at = collapse_at

    def training_step(self, batch, batch_idx):
        return (self.w**2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def kl_inputs(self, batch):
        x = batch[0]
        keep = [g for g in range(MODES) if self.global_step < self.collapse_at or g not in DROPPED]
        lab = torch.tensor(keep)[torch.randint(len(keep), (x.shape[0],))]
        return KLInputs.from_samples(x, _means()[lab] + 0.25 * torch.randn(x.shape[0], 2))


def _fit(monitor: KLMonitor, steps: int = 100) -> pl.Trainer:
    trainer = pl.Trainer(max_steps=steps, callbacks=[monitor], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(ScriptedGenerator(), DataLoader(TensorDataset(torch.zeros(400, 1))))
    return trainer


def _held_out(seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(MODES, (2048,), generator=g)
    x = _means()[lab] + 0.25 * torch.randn(2048, 2, generator=g)
    return DataLoader(TensorDataset(x), batch_size=1024)


@pytest.mark.parametrize("estimator", ["knn"])
def test_collapse_alert_names_the_cells_of_the_dropped_modes(estimator):
    monitor = KLMonitor(_held_out(), every_n_train_steps=10, max_batches=2,
                        sample_estimator=estimator, num_cells=16)
    _fit(monitor)
    assert monitor.failures == 0
    assert [a.kind for a in monitor.alerts] == ["collapse"], [a.message for a in monitor.alerts]
    alert = monitor.alerts[0]
    assert 60 <= alert.step <= 80
    cells = torch.tensor(monitor.state_dict()["cells"])
    cell_mode = torch.cdist(cells.float(), _means()).argmin(1)
    lost = {c for c in range(16) if int(cell_mode[c]) in DROPPED}
    # every cell losing mass is a cell of a dropped mode, and all of them are losing it
    assert set(alert.details["groups_losing_mass"]) == lost, (alert.details, lost)
    # the alert names the cells carrying 90% of the rise (AlertRules' rule): all of them
    # in dropped modes, and between them every dropped mode
    assert set(alert.groups) <= lost and {int(cell_mode[c]) for c in alert.groups} == DROPPED
    assert "k-means cells" in alert.message and "lost 100% of its mass" in alert.message
    assert set(alert.details["cell_centroids"]) == set(alert.groups)


def test_cells_survive_a_checkpoint():
    monitor = KLMonitor(_held_out(), every_n_train_steps=10, max_batches=2)
    _fit(monitor, steps=20)
    state = monitor.state_dict()
    assert len(state["cells"]) == 16
    # resumed on other held-out samples: cells fitted on them would differ
    resumed = KLMonitor(_held_out(seed=1), every_n_train_steps=10, max_batches=2)
    resumed.load_state_dict(state)
    _fit(resumed, steps=30)
    assert resumed.evaluator.metric.centroids.tolist() == state["cells"]
    fresh = KLMonitor(_held_out(seed=1), every_n_train_steps=10, max_batches=2)
    _fit(fresh, steps=10)
    assert fresh.evaluator.metric.centroids.tolist() != state["cells"]


def test_configuration_errors():
    with pytest.raises(ValueError, match="sample_estimator"):
        KLMonitor(sample_estimator="kde")
    with pytest.raises(ValueError, match="num_cells"):
        KLMonitor(num_cells=1)
    with pytest.raises(ValueError, match="groups"):
        KLMonitor(sample_estimator="binned", num_groups=8)
    with pytest.raises(ValueError, match="d = 3"):
        KLInputs.from_samples(torch.randn(10, 2), torch.randn(10, 3))
    with pytest.raises(TypeError, match="floating"):
        KLInputs.from_samples(torch.ones(10, 2, dtype=torch.long), torch.randn(10, 2))
    with pytest.raises(ValueError, match="one label per reference sample"):
        KLInputs.from_samples(torch.randn(10, 2), torch.randn(10, 2), groups=torch.zeros(9))

"""`num_groups` inferred from the sanity evaluation when `groups` come without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lit_models import FrozenLinear
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs, KLMonitor, KLMonitorWarning

SCRIPT = Path(__file__).with_name("_ddp_infer_script.py")


class Labelled(FrozenLinear):
    """Logits with group labels 0..3; from step `shift_at`, labels 3..6 (a new label)."""

    def __init__(self, shift_at: int | None = None) -> None:
        super().__init__(5)
        self.shift_at = shift_at

    def kl_inputs(self, batch):
        x, g = batch
        if self.shift_at is not None and self.trainer.global_step >= self.shift_at:
            g = g + 3
        return KLInputs.from_logits(torch.zeros(len(x), 5), self.lin(x), groups=g)


def _fit(module: Labelled) -> tuple[KLMonitor, list]:
    g = torch.Generator().manual_seed(0)
    held = TensorDataset(torch.randn(64, 3, generator=g), torch.randint(4, (64,), generator=g))
    monitor = KLMonitor(DataLoader(held, batch_size=32), every_n_train_steps=2)
    trainer = pl.Trainer(max_steps=6, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[monitor])  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(module, DataLoader(TensorDataset(torch.randn(16, 3)), batch_size=2))
    return monitor, caught


def test_inferred_from_the_labels_of_the_sanity_evaluation():
    monitor, _ = _fit(Labelled())
    assert monitor.num_groups == 4 and monitor.failures == 0
    assert {f"kl/forward/group_{g}" for g in range(4)} <= set(monitor.last_result)
    assert "kl/forward/group_4" not in monitor.last_result


def test_a_later_label_beyond_the_inferred_count_is_a_clear_error_and_a_skip():
    monitor, caught = _fit(Labelled(shift_at=4))
    assert monitor.num_groups == 4 and monitor.failures == 2  # steps 4 and 6 skipped
    msgs = [str(w.message) for w in caught if issubclass(w.category, KLMonitorWarning)]
    assert any("label 6, outside [0, 4)" in m or "label 5, outside [0, 4)" in m for m in msgs)
    assert any("inferred as 4" in m and "KLMonitor(num_groups=G)" in m for m in msgs), msgs


@pytest.mark.parametrize("mode", ["single", "ddp"])
def test_ranks_agree_on_the_inferred_count(tmp_path, mode):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), mode, str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in range(2 if mode == "ddp" else 1):
        got = json.loads((tmp_path / f"{mode}_rank{rank}.json").read_text())
        assert got["num_groups"] == 6 and got["failures"] == 0, (rank, got)
        assert "kl/forward/group_5" in got["tags"], (rank, got)

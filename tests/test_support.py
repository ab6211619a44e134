"""Support mismatch: KL on the shared support and the mass outside, against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch

from kl_monitor import categorical_kl_rows


def _reference(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float, float]:
    p, q = np.exp(x - x.max()), np.exp(y - y.max())
    p, q = p / p.sum(), q / q.sum()
    s = (p > 0) & (q > 0)
    p_out, q_out = 1 - p[s].sum(), 1 - q[s].sum()
    if not s.any():
        return math.inf, math.inf, 1.0, 1.0
    ps, qs = p[s] / p[s].sum(), q[s] / q[s].sum()
    return scipy.stats.entropy(ps, qs), scipy.stats.entropy(qs, ps), p_out, q_out


def test_support_rows_match_numpy():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 9, generator=g, dtype=torch.float64)
    y = torch.randn(64, 9, generator=g, dtype=torch.float64)
    x[torch.rand(64, 9, generator=g) < 0.2] = -math.inf
    y[torch.rand(64, 9, generator=g) < 0.2] = -math.inf
    x[0, :] = -math.inf
    x[0, 0] = 0.0
    y[0, 0] = -math.inf  # no shared class at all
    x[1], y[1] = x[2], x[2]  # identical rows with a -inf: nothing outside
    out = categorical_kl_rows(x, y, support=True)
    fwd, rev = out.forward, out.reverse
    assert out.valid.all()
    rows = out
    for i in range(64):
        want = _reference(x[i].numpy(), y[i].numpy())
        got = [float(t[i]) for t in (rows.forward_shared, rows.reverse_shared,
                                     rows.reference_mass_outside, rows.model_mass_outside)]
        assert got == pytest.approx(want, abs=1e-10), i
    plain = ~(torch.isinf(fwd) | torch.isinf(rev))
    assert torch.equal(rows.forward_shared[plain], fwd[plain])
    assert (rows.model_mass_outside[plain] == 0).all()
    assert torch.isfinite(rows.reverse_shared[1:]).all()


def test_support_rows_keep_shape():
    x = torch.zeros(2, 3, 4)
    x[0, 1, 3] = -math.inf
    rows = categorical_kl_rows(x, torch.zeros(2, 3, 4), support=True)
    rev = rows.reverse
    assert all(t.shape == (2, 3) for t in rows)
    assert float(rows.model_mass_outside[0, 1]) == pytest.approx(0.25)
    assert float(rows.reverse_shared[0, 1]) == 0.0 and rev[0, 1] == math.inf


# ------------------------------------------------------------------ in the monitor
class _Leaky:
    """A scripted policy over 6 tokens whose reference forbids tokens 4 and 5; from
    evaluation ``onset`` on, the model puts 20% of its mass there (5e-4 before)."""

    def __init__(self, onset: int) -> None:
        import lightning.pytorch as pl

        from kl_monitor import KLInputs

        class Module(pl.LightningModule):
            def __init__(self) -> None:
                super().__init__()
                self.w = torch.nn.Parameter(torch.zeros(1))
                self.calls = 0

            def training_step(self, batch, batch_idx):
                return (self.w - batch[0].mean()) ** 2

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=0.1)

            def kl_inputs(self, batch):
                self.calls += 1
                g = torch.Generator().manual_seed(self.calls)
                ref = torch.randn(32, 5, 6, generator=g)
                ref[..., 4:] = -math.inf
                model = ref.clone()
                model[..., :4] += 0.05 * torch.randn(32, 5, 4, generator=g)
                leak = 0.2 if self.calls > onset else 5e-4
                mass = torch.logsumexp(model[..., :4], -1, keepdim=True)
                model[..., 4:] = mass + math.log(leak / 2 / (1 - leak))
                groups = torch.arange(32) % 2
                return KLInputs.from_logits(ref, model, groups=groups, sampled_from="model")

        self.module = Module()


def test_leaked_mass_is_logged_finite_and_alerts(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import TensorBoardLogger

    from kl_monitor import KLMonitor
    from kl_monitor.report import load_runs

    leaky = _Leaky(onset=9)  # the sanity evaluation is call 1
    alerts = []
    monitor = KLMonitor(
        torch.utils.data.DataLoader(torch.zeros(8, 1), batch_size=8), every_n_train_steps=1,
        max_batches=1, reduction="sequence_sum", num_groups=2, on_alert=alerts.append,
    )
    trainer = pl.Trainer(
        max_steps=12, accelerator="cpu", logger=TensorBoardLogger(tmp_path, name="run"),
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[monitor], log_every_n_steps=1,
    )
    data = torch.utils.data.DataLoader(torch.randn(64, 1), batch_size=4)
    with pytest.warns(UserWarning):
        trainer.fit(leaky.module, data)
    run = next(iter(load_runs(tmp_path)))
    # the reverse KL is +inf at every evaluation: never sent; its companions always are
    assert not run.series("kl/reverse")[1]
    steps, shared = run.series("kl/reverse_shared")
    assert len(steps) == 13 and all(math.isfinite(v) for v in shared)
    _, leaked = run.series("kl/model_mass_outside")
    assert leaked[0] == pytest.approx(5e-4, rel=1e-3) and leaked[-1] == pytest.approx(0.2)
    assert all(math.isfinite(v) for pts in run.scalars.values() for _, v in pts)
    kinds = [(a.kind, a.details.get("signature"), a.step) for a in alerts]
    assert ("over_dispersion", "leaked_mass", 9) in kinds, kinds
    state = monitor.state_dict()
    assert "leak_rule" in state
    fresh = KLMonitor()
    fresh.load_state_dict(state)
    assert fresh.leak_rule.state_dict() == monitor.leak_rule.state_dict()

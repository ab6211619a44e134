"""PairedRows (torch) against the scenario benchmark's numpy evidence builder."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kl_monitor import KLInputs
from kl_monitor.alerting import AlertEngine, Decision, assess
from kl_monitor.metrics import CategoricalKL
from kl_monitor.pairing import PairedRows

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import alert_scenarios as bench  # noqa: E402


def _close(a, b):
    assert a.current == pytest.approx(b.current, rel=1e-9, abs=1e-12)
    assert a.baseline == pytest.approx(b.baseline, rel=1e-9, abs=1e-12)
    assert a.se == pytest.approx(b.se, rel=1e-6, abs=1e-12)


def _sampled(rng, g=5, n=300, m=200):
    lab = rng.integers(0, g, n)
    lp = rng.normal(size=n)
    return lab, lp, rng.integers(0, g, m)


def test_sampled_evidence_matches_the_numpy_reference():
    rng = np.random.default_rng(0)
    g = 5
    lab, lp, rlab0 = _sampled(rng, g)
    evals = []
    for t in range(3):
        f = rng.normal(0.1 * t, 0.3, lp.size)
        r = rng.normal(0.05 * t, 0.2, rlab0.size)
        rlab = np.where(rng.random(rlab0.size) < 0.2, rng.integers(0, g, rlab0.size), rlab0)
        evals.append({"sampled": True, "f": f, "flab": lab, "r": r, "rlab": rlab})
    pr = PairedRows()
    base = bases = None
    for t, cur in enumerate(evals):
        pr.start()
        pr.add(KLInputs.from_log_probs(
            torch.tensor(lp), torch.tensor(lp - cur["f"]), groups=torch.tensor(lab),
            model_samples_log_q=torch.tensor(cur["r"]), model_samples_log_p=torch.zeros(rlab0.size,
                                                                                     dtype=torch.float64),
            model_samples_groups=torch.tensor(cur["rlab"])))  # fmt: skip
        ev = pr.evidence(t, g)
        base = base or cur
        bases = bases or {k: cur for k in range(g)}
        ref = bench.evidence(t, cur, base, bases, g)
        for name in ("forward", "reverse"):
            _close(getattr(ev, name), getattr(ref, name))
        for name in ("group_forward", "group_reverse", "group_mass"):
            for k in range(g):
                _close(getattr(ev, name)[k], getattr(ref, name)[k])
        # rebase group 1 and the global baseline after the first evaluation
        decision = Decision([], t == 0, assess(ev), (1,) if t == 0 else ())
        pr.rebase(decision)
        if decision.rebase:
            base = cur
        bases.update({k: cur for k in decision.rebase_groups})


def test_logits_evidence_conditional_entropy_and_reference_mass():
    torch.manual_seed(0)
    ref = torch.randn(2, 6, 7, dtype=torch.float64)
    groups = torch.tensor([0, 1])
    metric = CategoricalKL(num_groups=2)
    pr = PairedRows()
    evs = []
    for scale in (1.0, 0.5):
        model = ref * scale
        pr.start()
        pr.add(KLInputs.from_logits(ref, model, groups=groups), metric)
        evs.append(pr.evidence(len(evs), 2))
    lq = torch.log_softmax(ref * 0.5, -1)
    h1 = -(lq.exp() * lq).sum(-1)
    lq0 = torch.log_softmax(ref, -1)
    h0 = -(lq0.exp() * lq0).sum(-1)
    ev = evs[1]
    assert ev.group_reference_mass == {0: 0.5, 1: 0.5}
    for k in (0, 1):
        assert ev.group_entropy[k].current == pytest.approx(float(h1[k].mean()))
        assert ev.group_entropy[k].baseline == pytest.approx(float(h0[k].mean()))
        assert ev.group_entropy_reference[k] == pytest.approx(float(h0[k].mean()))
    kl = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=ref),
        torch.distributions.Categorical(logits=ref * 0.5),
    )
    assert ev.forward.current == pytest.approx(float(kl.mean()))
    assert ev.group_forward[0].current == pytest.approx(float(kl[0].sum() / kl.numel()))


def test_engine_on_paired_rows_catches_a_dropped_mode_and_not_noise():
    rng = np.random.default_rng(1)
    g, n = 4, 2000
    lab = rng.integers(0, g, n)
    lp = rng.normal(size=n)
    u = rng.random(n)
    pr, eng = PairedRows(), AlertEngine()
    fired = []
    for t in range(12):
        w = np.full(g, 0.25) * np.exp(0.02 * rng.normal(size=g))
        if t >= 8:
            w[2] *= 0.2  # mode 2 keeps 20% of its weight
        w /= w.sum()
        f = np.log(0.25 / w[lab])  # exact: mass part only
        rlab = np.minimum(np.searchsorted(np.cumsum(w), u), g - 1)  # common random numbers
        r = np.log(w[rlab] / 0.25)
        pr.start()
        pr.add(KLInputs.from_log_probs(
            torch.tensor(lp), torch.tensor(lp - f), groups=torch.tensor(lab),
            model_samples_log_q=torch.tensor(r),
            model_samples_log_p=torch.zeros(n, dtype=torch.float64),
            model_samples_groups=torch.tensor(rlab)))  # fmt: skip
        d = eng.update(pr.evidence(t, g))
        pr.rebase(d)
        fired += [(t, a.kind, a.groups) for a in d.alerts]
    assert fired == [(8, "collapse", (2,))], fired
    assert math.isfinite(fired[0][0])


def _scripted(onset, seed, rules):
    import warnings

    from lit_models import (
        namespace,
        ring_data,
        scripted_mixture_module,
        scripted_schedule,
        train_data,
    )

    from kl_monitor import KLMonitor

    monitor = KLMonitor(ring_data(1024, seed=seed), every_n_train_steps=1, max_batches=2,
                        num_groups=8, seed=seed, rules=rules)  # fmt: skip
    model = scripted_mixture_module("lightning.pytorch", scripted_schedule(onset=onset), every=1)
    t = namespace("lightning.pytorch").Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, max_steps=24,
        callbacks=[monitor],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, train_data(4096, dim=2, batch_size=8))
    return monitor


def test_monitor_with_the_paired_engine_names_the_dropped_modes():
    from kl_monitor import AlertEngine, AlertThresholds

    monitor = _scripted(onset=12, seed=0, rules=AlertThresholds())
    assert isinstance(monitor.rules, AlertEngine)
    first = monitor.alerts[0]
    assert first.kind == "collapse" and first.details["signature"] == "mode_dropping"
    assert 0 <= first.step - 12 < 5
    assert first.groups and set(first.groups) <= {1, 2, 5, 6}
    assert "lost" in first.message
    assert "pairing" in monitor.state_dict()
    healthy = _scripted(onset=None, seed=1, rules=AlertThresholds())
    assert healthy.alerts == [], [a.message for a in healthy.alerts]


def test_model_sample_baselines_stay_bounded_over_many_rebases():
    """One model-sample baseline per group baseline evaluation still in use: at most
    groups + 1 evaluations are kept, however many evaluations and rebases there are."""
    rng = np.random.default_rng(3)
    g = 6
    lab, lp, rlab0 = _sampled(rng, g)
    pr = PairedRows()
    for t in range(200):
        r = rng.normal(0.0, 0.2, rlab0.size)
        pr.start()
        pr.add(KLInputs.from_log_probs(
            torch.tensor(lp), torch.tensor(lp - rng.normal(0.1, 0.3, lp.size)),
            groups=torch.tensor(lab), model_samples_log_q=torch.tensor(r),
            model_samples_log_p=torch.zeros(rlab0.size, dtype=torch.float64),
            model_samples_groups=torch.tensor(rlab0)))  # fmt: skip
        ev = pr.evidence(t, g)
        groups = tuple(int(k) for k in rng.choice(g, size=int(rng.integers(0, 3)), replace=False))
        pr.rebase(Decision([], bool(rng.random() < 0.3), assess(ev), groups))
        assert len(pr._pool) <= g + 1, (t, len(pr._pool))
    tensors = [v for d in pr._pool.values() for v in d.values() if v is not None]
    assert len(tensors) <= 2 * (g + 1)


def test_logits_pairing_reuses_the_metrics_rows(monkeypatch):
    """One pass over the logits per batch: the pairing takes the metric's per-row values
    (a second kernel pass doubled a large-vocabulary evaluation: 0.23 s vs 0.12 s for
    1024 rows x 32,000 classes), and computes its own only for logits it did not see."""
    from kl_monitor import metrics, pairing

    calls = []
    kernel = metrics.categorical_kl_rows

    def counted(*args, **kwargs):
        calls.append(1)
        return kernel(*args, **kwargs)

    monkeypatch.setattr(metrics, "categorical_kl_rows", counted)
    monkeypatch.setattr(pairing, "categorical_kl_rows", counted)
    gen = torch.Generator().manual_seed(0)
    p = torch.randn(6, 5, 7, generator=gen)
    inputs = KLInputs.from_logits(p, p + torch.randn(6, 5, 7, generator=gen),
                                  groups=torch.arange(6) % 2)  # fmt: skip
    metric, pr = CategoricalKL(num_groups=2), PairedRows()
    pr.start()
    metric.update_from(inputs)
    pr.add(inputs, metric)
    assert len(calls) == 1
    other = KLInputs.from_logits(p.clone(), p, groups=torch.arange(6) % 2)
    pr.add(other, metric)  # logits the metric did not see: computed, not borrowed
    assert len(calls) == 2
    # the borrowed rows are the kernel's: the paired forward KL is their mean
    alone = PairedRows()
    alone.start()
    alone.add(inputs, metric)
    want = float(kernel(p, inputs.model)[0].double().mean())
    assert alone.evidence(0, 2).forward.current == pytest.approx(want, rel=1e-12)

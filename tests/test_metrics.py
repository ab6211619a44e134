"""Tests of the torchmetrics classes in kl_monitor.metrics (single process).

Every accumulation test compares against the functional core (or an independent
reference: torch.distributions, scipy) evaluated on the concatenated data.
"""

from __future__ import annotations

import copy
import math
import pickle
import warnings
from collections.abc import Mapping

import matplotlib
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kl_monitor.estimators import categorical_kl, iw_reverse_kl, mc_kl
from kl_monitor.metrics import CategoricalKL, KLResult, MonteCarloKL, SampledKL

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

F64 = torch.float64


@pytest.fixture(autouse=True)
def _quiet() -> None:
    # the core warns once about dropped samples; torchmetrics warns on compute before update
    warnings.filterwarnings("ignore", message="kl_monitor:")
    warnings.filterwarnings("ignore", message=".*was called before the ``update``")


def _close(got: float, want: float, rtol: float, atol: float = 0.0) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    if math.isinf(want):
        return got == want
    return abs(got - want) <= atol + rtol * abs(want)


def _gaussians(n: int = 3000, seed: int = 0, scale_q: float = 0.9):
    g = torch.Generator().manual_seed(seed)
    p = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    q = torch.distributions.Normal(torch.tensor(0.6, dtype=F64), torch.tensor(scale_q, dtype=F64))
    x = torch.randn(n, generator=g, dtype=F64)
    y = 0.6 + scale_q * torch.randn(n, generator=g, dtype=F64)
    return p, q, x, y


def _splits(n: int, cuts: list[int]) -> list[slice]:
    edges = [0, *sorted(set(c for c in cuts if 0 < c < n)), n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]


def _mixture_logpdf(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    comps = torch.distributions.Normal(means, torch.ones_like(means))
    return torch.logsumexp(comps.log_prob(x[:, None]), dim=-1) - math.log(means.numel())


# ----------------------------------------------------------------------------- conventions
ALL = [MonteCarloKL, CategoricalKL, SampledKL]


@pytest.mark.parametrize("cls", ALL)
def test_metric_class_conventions(cls: type) -> None:
    assert cls.is_differentiable is False
    assert cls.higher_is_better is False
    assert cls.full_state_update is False
    m = cls()
    assert all(t.dtype == F64 for t in m.metric_state.values())
    # precision plugins and .to(dtype) must not lower the accumulators' precision
    m = m.to(torch.float32).half()
    assert all(t.dtype == F64 for t in m.metric_state.values())


# ----------------------------------------------------------------------------- MonteCarloKL
@pytest.mark.parametrize("method", ["cv", "k3", "naive"])
def test_montecarlo_batches_equal_core(method: str) -> None:
    p, q, x, _ = _gaussians()
    lp, lq = p.log_prob(x), q.log_prob(x)
    lq[[3, 400]] = math.nan  # dropped and counted, identically in both
    metric = MonteCarloKL(method=method)
    for sl in _splits(x.numel(), [1, 250, 251, 1999]):
        metric.update(lp[sl], lq[sl])
    out = metric.compute()
    est = mc_kl(lp, lq, method)
    assert isinstance(out, KLResult) and out.method == method
    assert out.method_used == est.method_used
    assert int(out["n"]) == est.n == x.numel() - 2 and int(out["nonfinite"]) == 2
    for key, want in [
        ("kl", est.value), ("stderr", est.stderr), ("c", est.c),
        ("variance_reduction", est.variance_reduction), ("tail_index", est.tail_index),
    ]:
        assert _close(float(out[key]), want, 1e-10, 1e-14), key


def test_montecarlo_float32_inputs_are_accumulated_in_float64() -> None:
    p, q, x, _ = _gaussians(2000, seed=1)
    lp, lq = p.log_prob(x).float(), q.log_prob(x).float()
    metric = MonteCarloKL()
    for sl in _splits(2000, [700, 1500]):
        metric.update(lp[sl], lq[sl])
    out, est = metric.compute(), mc_kl(lp, lq)
    assert out["kl"].dtype == F64
    assert _close(float(out["kl"]), est.value, 1e-10)
    assert _close(float(out["stderr"]), est.stderr, 1e-10)


def test_montecarlo_accuracy_against_closed_form() -> None:
    p, q, x, y = _gaussians(20_000, seed=2, scale_q=1.0)
    metric = MonteCarloKL()
    metric.update(p.log_prob(x), q.log_prob(x))
    out = metric.compute()
    true = float(torch.distributions.kl_divergence(p, q))  # 0.18
    assert abs(float(out["kl"]) - true) < 4 * float(out["stderr"])
    # sign trap, where the default applies the control variate (near A ≈ B; at KL = 0.18
    # its gain is too small to be worth the risk and the default is naive)
    near = MonteCarloKL()
    near.update(p.log_prob(x), torch.distributions.Normal(0.05, 1.0).log_prob(x))
    out = near.compute()
    assert float(out["variance_reduction"]) > 1.5 and float(out["c"]) < 0


@settings(max_examples=25, deadline=None)
@given(cuts=st.lists(st.integers(1, 599), max_size=6))
def test_montecarlo_any_split_same_result(cuts: list[int]) -> None:
    p, q, x, _ = _gaussians(600, seed=3)
    lp, lq = p.log_prob(x), q.log_prob(x)
    metric = MonteCarloKL()
    for sl in _splits(600, cuts):
        metric.update(lp[sl], lq[sl])
    out, est = metric.compute(), mc_kl(lp, lq)
    assert _close(float(out["kl"]), est.value, 1e-10)
    assert _close(float(out["tail_index"]), est.tail_index, 0.0)  # top-k merge is exact


def test_montecarlo_forward_returns_batch_value_and_accumulates() -> None:
    p, q, x, _ = _gaussians(1000, seed=4)
    lp, lq = p.log_prob(x), q.log_prob(x)
    metric = MonteCarloKL()
    batch = metric(lp[:300], lq[:300])
    assert isinstance(batch, KLResult) and batch.method_used in ("cv", "naive")
    assert _close(float(batch["kl"]), mc_kl(lp[:300], lq[:300]).value, 1e-12)
    batch2 = metric(lp[300:], lq[300:])
    assert _close(float(batch2["kl"]), mc_kl(lp[300:], lq[300:]).value, 1e-12)
    assert _close(float(metric.compute()["kl"]), mc_kl(lp, lq).value, 1e-10)


def test_montecarlo_groups_sum_to_naive_overall() -> None:
    p, q, x, _ = _gaussians(2000, seed=5)
    lp, lq = p.log_prob(x), q.log_prob(x)
    groups = (x > 0).long() + (x > 1).long()  # 0, 1, 2; group 3 stays empty
    metric = MonteCarloKL(num_groups=4)
    for sl in _splits(2000, [500, 1300]):
        metric.update(lp[sl], lq[sl], groups[sl])
    out = metric.compute()
    assert "kl/group_3" not in out and "n/group_3" not in out  # empty groups are left out
    counts = [float(out[f"n/group_{g}"]) for g in range(3)]
    assert sum(counts) == float(out["n"]) == 2000
    weighted = sum(c * float(out[f"kl/group_{g}"]) for g, c in enumerate(counts)) / sum(counts)
    assert _close(weighted, mc_kl(lp, lq, "naive").value, 1e-10)
    for g in range(3):
        sel = groups == g
        assert _close(float(out[f"kl/group_{g}"]), float((lp[sel] - lq[sel]).mean()), 1e-10)


def test_montecarlo_support_violation_is_inf_not_nan() -> None:
    lp = torch.zeros(50, dtype=F64)
    lq = torch.full((50,), -0.5, dtype=F64)
    lq[7] = -math.inf
    out = MonteCarloKL()(lp, lq)
    assert float(out["kl"]) == math.inf and int(out["support_violations"]) == 1
    assert not any(math.isnan(float(v)) for k, v in out.items() if k != "tail_index")


# ----------------------------------------------------------------------------- CategoricalKL
def _logits(b: int, s: int, k: int, seed: int, dtype: torch.dtype = F64):
    g = torch.Generator().manual_seed(seed)
    lp = torch.randn(b, s, k, generator=g, dtype=F64) * 2.0
    lq = lp + torch.randn(b, s, k, generator=g, dtype=F64)
    mask = torch.rand(b, s, generator=g) > 0.25
    mask[:, 0] = True
    return lp.to(dtype), lq.to(dtype), mask


@pytest.mark.parametrize(
    "dtype,rtol", [(F64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)]
)
def test_categorical_token_mean_equals_core(dtype: torch.dtype, rtol: float) -> None:
    lp, lq, mask = _logits(9, 6, 13, seed=0, dtype=dtype)
    metric = CategoricalKL()
    for sl in _splits(9, [2, 3, 7]):
        metric.update(lp[sl], lq[sl], mask[sl])
    out = metric.compute()
    assert out.reduction == "token_mean"
    core = categorical_kl(lp, lq, mask, reduction="none")
    n = int(mask.sum())
    f = core.forward.double()[mask]
    r = core.reverse.double()[mask]
    assert int(out["n"]) == int(out["n_rows"]) == n
    expected = {
        "forward": float(f.mean()),
        "reverse": float(r.mean()),
        "asymmetry": float(f.mean() - r.mean()),
        "forward_stderr": float(f.std() / math.sqrt(n)),
        "reverse_stderr": float(r.std() / math.sqrt(n)),
        "entropy_reference": float(core.entropy_reference.double()[mask].mean()),
        "entropy_model": float(core.entropy_model.double()[mask].mean()),
    }
    for key, want in expected.items():
        assert _close(float(out[key]), want, rtol), key
    # the core's own mean (reduced in the compute dtype)
    mean_core = categorical_kl(lp, lq, mask, reduction="mean")
    assert _close(float(out["forward"]), float(mean_core.forward), 10 * rtol)


def test_categorical_independent_references() -> None:
    lp, lq, _ = _logits(4, 5, 7, seed=1)
    out = CategoricalKL()(lp, lq)
    p = torch.distributions.Categorical(logits=lp)
    q = torch.distributions.Categorical(logits=lq)
    assert _close(float(out["forward"]), float(torch.distributions.kl_divergence(p, q).mean()),
                  1e-10)
    assert _close(float(out["reverse"]), float(torch.distributions.kl_divergence(q, p).mean()),
                  1e-10)
    pp = lp.softmax(-1).reshape(-1, 7).numpy()
    assert _close(float(out["entropy_reference"]), float(scipy.stats.entropy(pp, axis=-1).mean()),
                  1e-10)


def test_categorical_sequence_sum_equals_core() -> None:
    lp, lq, mask = _logits(11, 8, 5, seed=2)
    mask[4] = False  # a sequence of padding only: not a unit
    metric = CategoricalKL(reduction="sequence_sum")
    for sl in _splits(11, [1, 6]):
        metric.update(lp[sl], lq[sl], mask[sl])
    out = metric.compute()
    assert out.reduction == "sequence_sum" and metric.reduction == "sequence_sum"
    core = categorical_kl(lp, lq, mask, reduction="sum")
    seqs = mask.any(-1)
    f, r = core.forward[seqs], core.reverse[seqs]
    assert int(out["n"]) == 10 and int(out["n_rows"]) == int(mask.sum())
    assert _close(float(out["forward"]), float(f.mean()), 1e-10)
    assert _close(float(out["reverse"]), float(r.mean()), 1e-10)
    assert _close(float(out["forward_stderr"]), float(f.std() / math.sqrt(10)), 1e-10)
    hp = (core.entropy_reference.sum(-1))[seqs].mean()
    assert _close(float(out["entropy_reference"]), float(hp), 1e-10)
    # the two reductions differ by the mean sequence length
    tok = CategoricalKL()(lp, lq, mask)
    ratio = float(out["forward"]) / float(tok["forward"])
    assert _close(ratio, int(mask.sum()) / 10, 1e-10)


def test_categorical_support_violations_inf_never_nan() -> None:
    lp = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 2.0], [0.0, -math.inf, 0.0]], dtype=F64)
    lq = torch.tensor([[0.0, -math.inf, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]], dtype=F64)
    out = CategoricalKL()(lp, lq)
    assert float(out["forward"]) == math.inf and float(out["forward_stderr"]) == math.inf
    assert float(out["reverse"]) == math.inf  # row 2: p = 0 < q
    assert int(out["support_violations"]) == 2 and int(out["n"]) == 3
    # one direction only: the other stays finite, asymmetry is ±inf, nothing is NaN
    out = CategoricalKL()(lp[:2], lq[:2])
    assert float(out["forward"]) == math.inf and math.isfinite(float(out["reverse"]))
    assert float(out["asymmetry"]) == math.inf
    assert not any(math.isnan(float(v)) for v in out.values())


def test_categorical_nonfinite_rows() -> None:
    lp, lq, _ = _logits(2, 4, 3, seed=3)
    lp[0, 1, 2] = math.nan
    out = CategoricalKL()(lp, lq)
    assert int(out["nonfinite"]) == 1 and int(out["n"]) == 7
    keep = torch.ones(2, 4, dtype=torch.bool)
    keep[0, 1] = False
    assert _close(float(out["forward"]), float(categorical_kl(lp, lq, keep).forward), 1e-10)
    with pytest.raises(ValueError, match="NaN"):
        CategoricalKL(nonfinite="raise").update(lp, lq)


def test_categorical_groups_sum_to_overall() -> None:
    lp, lq, mask = _logits(10, 6, 9, seed=4)
    groups = torch.randint(0, 4, (10, 6), generator=torch.Generator().manual_seed(0))
    groups[~mask] = -100  # labels of masked rows are ignored
    metric = CategoricalKL(num_groups=5)
    for sl in _splits(10, [3, 4]):
        metric.update(lp[sl], lq[sl], mask[sl], groups[sl])
    out = metric.compute()
    assert "n/group_4" not in out
    n = float(out["n"])
    for direction in ("forward", "reverse"):
        total = sum(float(out[f"n/group_{g}"]) * float(out[f"{direction}/group_{g}"])
                    for g in range(4))
        assert _close(total / n, float(out[direction]), 1e-10)
    core = categorical_kl(lp, lq, mask, reduction="none")
    for g in range(4):
        sel = mask & (groups == g)
        assert _close(float(out[f"forward/group_{g}"]), float(core.forward[sel].mean()), 1e-10)
        sd = float(core.forward[sel].std() / math.sqrt(int(sel.sum())))
        assert _close(float(out[f"forward_stderr/group_{g}"]), sd, 1e-8)


def test_categorical_groups_per_sequence() -> None:
    lp, lq, mask = _logits(8, 5, 4, seed=5)
    seq_groups = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2])
    # token_mean: one label per sequence broadcasts over its positions
    per_seq = CategoricalKL(num_groups=3)(lp, lq, mask, seq_groups)
    per_row = CategoricalKL(num_groups=3)(lp, lq, mask, seq_groups[:, None].expand(8, 5))
    assert per_seq.to_floats() == per_row.to_floats()
    # sequence_sum: groups label sequences
    out = CategoricalKL(reduction="sequence_sum", num_groups=3)(lp, lq, mask, seq_groups)
    total = sum(float(out[f"n/group_{g}"]) * float(out[f"forward/group_{g}"]) for g in range(3))
    assert _close(total / float(out["n"]), float(out["forward"]), 1e-10)


def test_categorical_mode_dropping_groups_locate_the_gap() -> None:
    """8 prompt types, each with its own mode of 6 classes; the model covers the modes of
    types 0 and 1 only and answers every other type with them."""
    k, modes, rows = 48, 8, 40
    g = torch.Generator().manual_seed(7)
    labels = torch.arange(modes).repeat_interleave(rows)
    lp = torch.full((modes * rows, k), -12.0, dtype=F64)
    lq = torch.full((modes * rows, k), -12.0, dtype=F64)
    for i, m in enumerate(labels.tolist()):
        lp[i, 6 * m:6 * m + 6] = torch.randn(6, generator=g, dtype=F64) * 0.3
        kept = m if m < 2 else int(torch.randint(0, 2, (1,), generator=g))
        lq[i, 6 * kept:6 * kept + 6] = lp[i, 6 * m:6 * m + 6]
    metric = CategoricalKL(num_groups=modes)
    metric.update(lp, lq, groups=labels)
    out = metric.compute()
    share = [float(out[f"n/group_{m}"]) * float(out[f"forward/group_{m}"]) for m in range(modes)]
    dropped = sum(share[2:]) / sum(share)
    assert dropped > 0.99
    assert min(share[2:]) > 100 * max(share[:2])


def test_categorical_forward_returns_batch_value() -> None:
    lp, lq, mask = _logits(6, 4, 5, seed=8)
    metric = CategoricalKL(reduction="sequence_sum")
    b1 = metric(lp[:2], lq[:2], mask[:2])
    assert b1.reduction == "sequence_sum"
    solo = CategoricalKL(reduction="sequence_sum")
    solo.update(lp[:2], lq[:2], mask[:2])
    assert b1.to_floats() == solo.compute().to_floats()
    metric(lp[2:], lq[2:], mask[2:])
    whole = CategoricalKL(reduction="sequence_sum")
    whole.update(lp, lq, mask)
    got, want = metric.compute().to_floats(), whole.compute().to_floats()
    assert all(_close(got[k], want[k], 1e-12) for k in want)


# ----------------------------------------------------------------------------- SampledKL
def test_sampled_with_model_samples_equals_core() -> None:
    p, q, x, y = _gaussians(3000, seed=9)
    lp, lq, mq, mp = p.log_prob(x), q.log_prob(x), q.log_prob(y), p.log_prob(y)
    metric = SampledKL()
    for sl in _splits(3000, [10, 1000, 2999]):
        metric.update(lp[sl], lq[sl], mq[sl], mp[sl])
    out = metric.compute()
    fwd, rev = mc_kl(lp, lq), mc_kl(mq, mp)
    assert out.reverse_estimator == "model_samples"
    assert float(out["reverse_importance_weighted"]) == 0.0
    pairs = {
        "forward": fwd.value, "forward_stderr": fwd.stderr, "forward_c": fwd.c,
        "forward_tail_index": fwd.tail_index, "reverse": rev.value, "reverse_stderr": rev.stderr,
        "reverse_c": rev.c, "reverse_ess": rev.n, "asymmetry": fwd.value - rev.value,
    }
    for key, want in pairs.items():
        assert _close(float(out[key]), want, 1e-10, 1e-14), key
    true_f = float(torch.distributions.kl_divergence(p, q))
    true_r = float(torch.distributions.kl_divergence(q, p))
    assert abs(float(out["forward"]) - true_f) < 4 * float(out["forward_stderr"])
    assert abs(float(out["reverse"]) - true_r) < 4 * float(out["reverse_stderr"])


def test_sampled_importance_weighted_equals_core() -> None:
    p, q, x, _ = _gaussians(4000, seed=10)
    lp, lq = p.log_prob(x), q.log_prob(x)
    metric = SampledKL()
    for sl in _splits(4000, [123, 2000]):
        metric.update(lp[sl], lq[sl])
    out = metric.compute()
    iw = iw_reverse_kl(lp, lq)
    assert out.reverse_estimator == "importance_weighted"
    assert float(out["reverse_importance_weighted"]) == 1.0
    assert "reverse_c" not in out
    for key, want in [("reverse", iw.value), ("reverse_stderr", iw.stderr),
                      ("reverse_ess", iw.ess), ("reverse_n", iw.n)]:
        assert _close(float(out[key]), want, 1e-10), key
    assert float(out["reverse_ess"]) < float(out["reverse_n"])


def test_sampled_groups_sum_to_overall() -> None:
    p, q, x, y = _gaussians(3000, seed=11)
    lp, lq, mq, mp = p.log_prob(x), q.log_prob(x), q.log_prob(y), p.log_prob(y)
    gx, gy = (x > 0.3).long() + (x > 1.5).long(), (y > 0.3).long() + (y > 1.5).long()
    with_model, iw_only = SampledKL(num_groups=3), SampledKL(num_groups=3)
    for sl in _splits(3000, [700, 2100]):
        with_model.update(lp[sl], lq[sl], mq[sl], mp[sl], gx[sl], gy[sl])
        iw_only.update(lp[sl], lq[sl], groups=gx[sl])
    for out, reverse_want in [
        (with_model.compute(), mc_kl(mq, mp, "naive").value),
        (iw_only.compute(), iw_reverse_kl(lp, lq).value),
    ]:
        n = float(out["forward_n"])
        fwd = sum(float(out[f"forward_n/group_{g}"]) * float(out[f"forward/group_{g}"])
                  for g in range(3)) / n
        assert _close(fwd, mc_kl(lp, lq, "naive").value, 1e-10)
        masses = [float(out[f"reverse_mass/group_{g}"]) for g in range(3)]
        assert _close(sum(masses), 1.0, 1e-10)
        rev = sum(m * float(out[f"reverse/group_{g}"]) for g, m in enumerate(masses))
        assert _close(rev, reverse_want, 1e-10)


def test_sampled_iw_single_group_matches_core_stderr() -> None:
    p, q, x, _ = _gaussians(2000, seed=12)
    lp, lq = p.log_prob(x), q.log_prob(x)
    metric = SampledKL(num_groups=1)
    metric.update(lp, lq, groups=torch.zeros(2000, dtype=torch.long))
    out, iw = metric.compute(), iw_reverse_kl(lp, lq)
    assert _close(float(out["reverse/group_0"]), iw.value, 1e-10)
    assert _close(float(out["reverse_stderr/group_0"]), iw.stderr, 1e-8)


@pytest.mark.parametrize("model_samples", [True, False])
def test_sampled_mode_dropping_fixture(model_samples: bool) -> None:
    """P = 8 separated unit Gaussians, Q keeps 2: D(Q‖P) = ln 4 exactly, D(P‖Q) is huge,
    and the dropped modes carry almost all of the forward KL."""
    g = torch.Generator().manual_seed(13)
    means = torch.arange(8, dtype=F64) * 10.0
    kept = means[:2]
    n = 4000
    cx = torch.randint(0, 8, (n,), generator=g)
    x = means[cx] + torch.randn(n, generator=g, dtype=F64)
    cy = torch.randint(0, 2, (n,), generator=g)
    y = kept[cy] + torch.randn(n, generator=g, dtype=F64)
    metric = SampledKL(num_groups=8)
    for sl in _splits(n, [1000, 2500]):
        extra = {}
        if model_samples:
            extra = dict(model_log_q=_mixture_logpdf(y[sl], kept),
                         model_log_p=_mixture_logpdf(y[sl], means), model_groups=cy[sl])
        metric.update(_mixture_logpdf(x[sl], means), _mixture_logpdf(x[sl], kept),
                      groups=cx[sl], **extra)
    out = metric.compute()
    share = [float(out[f"forward_n/group_{m}"]) * float(out[f"forward/group_{m}"])
             for m in range(8)]
    assert sum(share[2:]) / sum(share) > 0.99
    assert float(out["forward"]) > 100
    assert abs(float(out["reverse"]) - math.log(4)) < 4 * float(out["reverse_stderr"]) + 1e-9
    assert float(out["asymmetry"]) > 100
    for m in range(2, 8):  # Q has no mass on the dropped modes: no reverse keys there
        assert f"reverse/group_{m}" not in out
    assert _close(float(out["reverse_mass/group_0"]) + float(out["reverse_mass/group_1"]), 1, 1e-9)
    # the weights are constant on the kept modes: no tail to fit, no nonsense tail index
    assert not float(out["forward_tail_index"]) > 1


# ----------------------------------------------------------------------------- shared behaviour
def _filled(cls: type):
    p, q, x, y = _gaussians(500, seed=14)
    lp, lq, mq, mp = p.log_prob(x), q.log_prob(x), q.log_prob(y), p.log_prob(y)
    groups = (x > 0).long()
    if cls is MonteCarloKL:
        m = cls(num_groups=2)
        m.update(lp, lq, groups)
        return m, lambda: m.update(lp[:100], lq[:100], groups[:100])
    if cls is SampledKL:
        m = cls(num_groups=2)
        m.update(lp, lq, mq, mp, groups, (y > 0).long())
        return m, lambda: m.update(lp[:100], lq[:100], mq[:100], mp[:100], groups[:100],
                                   groups[:100])
    a, b, mask = _logits(5, 4, 6, seed=15)
    grp = torch.tensor([0, 1, 1, 0, 1])
    m = cls(num_groups=2)
    m.update(a, b, mask, grp)
    return m, lambda: m.update(a[:2], b[:2], mask[:2], grp[:2])


@pytest.mark.parametrize("cls", ALL)
def test_log_dict_ready(cls: type) -> None:
    metric, _ = _filled(cls)
    out = metric.compute()
    assert isinstance(out, Mapping) and isinstance(out, KLResult)
    for key, value in out.items():
        assert isinstance(key, str)
        assert isinstance(value, torch.Tensor) and value.dim() == 0, key
    assert any("/group_1" in k for k in out)


@pytest.mark.parametrize("cls", ALL)
def test_pickle_clone_reset_roundtrip(cls: type) -> None:
    metric, more = _filled(cls)
    before = metric.compute().to_floats()
    restored = pickle.loads(pickle.dumps(metric))
    assert restored.compute().to_floats() == before
    assert pickle.loads(pickle.dumps(metric.compute())).to_floats() == before
    twin = metric.clone()
    assert twin.compute().to_floats() == before
    more()  # the clone is independent
    assert twin.compute().to_floats() == before
    assert metric.compute().to_floats() != before
    metric.reset()
    with pytest.raises(ValueError, match="call update"):
        metric.compute()
    more()
    assert metric.compute().to_floats() != before


@pytest.mark.parametrize("cls", ALL)
def test_persistent_state_dict_roundtrip(cls: type) -> None:
    metric, _ = _filled(cls)
    assert metric.state_dict() == {}  # torchmetrics default: not saved
    metric.persistent(True)
    state = metric.state_dict()
    assert state
    fresh = cls(num_groups=2)
    fresh.load_state_dict(state)
    assert fresh.compute().to_floats() == metric.compute().to_floats()
    wrong = cls(num_groups=3)
    with pytest.raises(ValueError, match="num_groups"):
        wrong.load_state_dict(state)


@pytest.mark.parametrize("cls", ALL)
def test_plot_returns_figure(cls: type) -> None:
    metric, more = _filled(cls)
    fig, ax = metric.plot()
    assert isinstance(fig, matplotlib.figure.Figure)
    values = [metric.compute()]
    more()
    values.append(metric.compute())
    fig2, _ = metric.plot(values)
    assert isinstance(fig2, matplotlib.figure.Figure)
    assert len(ax.get_lines()) >= 1
    plt.close("all")


@pytest.mark.parametrize("cls", ALL)
def test_compute_before_update_raises(cls: type) -> None:
    with pytest.raises(ValueError, match="call update"):
        cls().compute()


def test_lightning_log_dict() -> None:
    """A LightningModule logs the result with self.log_dict(metric.compute())."""
    import lightning.pytorch as pl

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(4, 3)
            self.kl = CategoricalKL(num_groups=2)

        def validation_step(self, batch, batch_idx):
            x, target_logits, groups = batch
            self.kl.update(target_logits, self.layer(x), groups=groups)

        def on_validation_epoch_end(self) -> None:
            self.log_dict(self.kl.compute())
            self.kl.reset()

    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(24, 4, generator=g), torch.randn(24, 3, generator=g),
        torch.randint(0, 2, (24,), generator=g),
    )
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )
    module = Module()
    logged = trainer.validate(module, torch.utils.data.DataLoader(data, batch_size=5),
                              verbose=False)[0]
    reference = CategoricalKL(num_groups=2)
    with torch.no_grad():
        for x, target_logits, groups in torch.utils.data.DataLoader(data, batch_size=5):
            reference.update(target_logits, module.layer(x), groups=groups)
    want = reference.compute().to_floats()
    assert set(logged) == set(want)
    bad = {k: (logged[k], want[k]) for k in want if not _close(logged[k], want[k], 1e-6)}
    assert not bad


# ----------------------------------------------------------------------------- bad input
def test_bad_groups() -> None:
    lp, lq = torch.zeros(10, dtype=F64), torch.zeros(10, dtype=F64)
    with pytest.raises(ValueError, match="num_groups"):
        MonteCarloKL().update(lp, lq, torch.zeros(10, dtype=torch.long))
    m = MonteCarloKL(num_groups=3)
    with pytest.raises(ValueError, match=r"every update needs `groups`"):
        m.update(lp, lq)
    with pytest.raises(TypeError, match="integer dtype.*float32"):
        m.update(lp, lq, torch.zeros(10))
    with pytest.raises(TypeError, match="integer dtype"):
        m.update(lp, lq, torch.zeros(10, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(10,\).*got \(2, 5\)"):
        m.update(lp, lq, torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="label 7, outside \\[0, 3\\)"):
        m.update(lp, lq, torch.tensor([0, 1, 2, 7, 0, 0, 0, 0, 0, 0]))
    with pytest.raises(ValueError, match="label -1"):
        m.update(lp, lq, torch.full((10,), -1))
    assert int(m.sums[:, 0].sum()) == 0  # rejected batches add nothing
    with pytest.raises(ValueError, match="num_groups"):
        MonteCarloKL(num_groups=0)
    c = CategoricalKL(num_groups=2)
    logits = torch.zeros(3, 4, 5)
    with pytest.raises(TypeError, match="integer dtype"):
        c.update(logits, logits, groups=torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(3, 4\) or \(3,\).*got \(4,\)"):
        c.update(logits, logits, groups=torch.zeros(4, dtype=torch.long))
    s = CategoricalKL(reduction="sequence_sum", num_groups=2)
    with pytest.raises(ValueError, match=r"shape \(3,\).*got \(3, 4\)"):
        s.update(logits, logits, groups=torch.zeros(3, 4, dtype=torch.long))
    sk = SampledKL(num_groups=2)
    # model samples without labels (issue 12): the global reverse KL comes from them;
    # per-group reverse KL and mass are not reported (no importance-weighted stand-in)
    sk.update(lp, lq, lp - 0.5, lq, groups=torch.zeros(10, dtype=torch.long))
    out = sk.compute()
    assert out.reverse_estimator == "model_samples" and out.reverse.value == pytest.approx(-0.5)
    assert dict(out.group_reverse) == {} and "reverse_mass/group_0" not in out
    sk.reset()
    with pytest.raises(TypeError, match="model_groups.*integer"):
        sk.update(lp, lq, lp, lq, torch.zeros(10, dtype=torch.long), torch.zeros(10))
    # a bad model batch is rejected before the (good) reference batch is stored
    strict = SampledKL(nonfinite="raise")
    with pytest.raises(ValueError, match="NaN"):
        strict.update(lp, lq, torch.full((10,), math.nan, dtype=F64), lq)
    assert int(strict.ref_sums[:, 0].sum()) == 0


def test_bad_logits_and_mask() -> None:
    c = CategoricalKL()
    with pytest.raises(ValueError, match="5 classes.*4"):
        c.update(torch.zeros(3, 5), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="same shape"):
        c.update(torch.zeros(3, 5), torch.zeros(2, 5))
    with pytest.raises(TypeError, match="floating"):
        c.update(torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5))
    with pytest.raises(ValueError, match=r"\(3,\), got \(3, 1\)"):
        c.update(torch.zeros(3, 5), torch.zeros(3, 5), torch.ones(3, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        c.update(torch.zeros(3, 5), torch.zeros(3, 5), torch.ones(3))
    with pytest.raises(ValueError, match="sequence axis"):
        CategoricalKL(reduction="sequence_sum").update(torch.zeros(3, 5), torch.zeros(3, 5))
    with pytest.raises(ValueError, match="token_mean"):
        CategoricalKL(reduction="mean")
    with pytest.raises(ValueError, match="method"):
        MonteCarloKL(method="k2")
    with pytest.raises(ValueError, match="same shape"):
        MonteCarloKL().update(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match="both"):
        SampledKL().update(torch.zeros(3), torch.zeros(3), model_log_q=torch.zeros(3))
    with pytest.raises(ValueError, match="none were passed"):
        SampledKL(num_groups=2).update(torch.zeros(3), torch.zeros(3),
                                       groups=torch.zeros(3, dtype=torch.long),
                                       model_groups=torch.zeros(3, dtype=torch.long))


def test_results_survive_copy() -> None:
    metric, _ = _filled(CategoricalKL)
    out = metric.compute()
    dup = copy.deepcopy(out)
    assert dup.reduction == "token_mean" and dup.to_floats() == out.to_floats()

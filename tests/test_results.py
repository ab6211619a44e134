"""The typed results of the metrics: fields, the flat Mapping view, the detectors' view.

The flat keys are the logged tag names users have dashboards on: they are pinned
here, key by key, for every metric and input shape.
"""

from __future__ import annotations

import copy
import math
import pickle
from collections.abc import Mapping

import pytest
import torch

from kl_monitor import Evaluation
from kl_monitor import metrics as metrics_module
from kl_monitor import tensorboard as tb
from kl_monitor.estimators import categorical_kl
from kl_monitor.metrics import CategoricalKL, MonteCarloKL, SampledKL
from kl_monitor.results import CategoricalResult, MonteCarloResult, SampledResult

F64 = torch.float64


def _logits(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(60, 4, generator=g, dtype=F64), torch.randn(60, 4, generator=g, dtype=F64)
    labels = torch.randint(0, 3, (60,), generator=g)
    labels[labels == 2] = 1  # group 2 gets no rows: it is left out, never NaN
    return a, b, labels


def _samples(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    p = torch.distributions.Normal(torch.tensor(0.0, dtype=F64), torch.tensor(1.0, dtype=F64))
    q = torch.distributions.Normal(torch.tensor(0.3, dtype=F64), torch.tensor(1.1, dtype=F64))
    x = torch.randn(400, generator=g, dtype=F64)
    y = 0.3 + 1.1 * torch.randn(400, generator=g, dtype=F64)
    lx, ly = torch.randint(0, 2, (400,), generator=g), torch.randint(0, 2, (400,), generator=g)
    return p, q, x, y, lx, ly


def _per_group(names: list[str], groups: list[int]) -> list[str]:
    return [f"{name}/group_{g}" for g in groups for name in names]


CATEGORICAL = ["forward", "reverse", "asymmetry", "forward_stderr", "reverse_stderr",
               "entropy_reference", "entropy_model", "support_violations", "nonfinite",
               "n", "n_rows"]  # fmt: skip
MONTE_CARLO = ["kl", "stderr", "n", "c", "variance_reduction", "tail_index", "nonfinite",
               "support_violations"]  # fmt: skip
SAMPLED = ["forward", "forward_stderr", "forward_n", "forward_c", "forward_variance_reduction",
           "forward_tail_index", "reverse", "reverse_stderr", "reverse_n", "reverse_ess",
           "reverse_tail_index", "reverse_importance_weighted", "reverse_reliable"]  # fmt: skip
SAMPLED_TAIL = ["asymmetry", "nonfinite", "support_violations"]
REVERSE_GROUP = ["reverse", "reverse_stderr", "reverse_n", "reverse_mass"]


def test_categorical_result_fields_and_keys():
    a, b, labels = _logits()
    metric = CategoricalKL(num_groups=3)
    metric.update(a, b, groups=labels)
    out = metric.compute()
    assert isinstance(out, CategoricalResult) and isinstance(out, Mapping)
    assert list(out) == CATEGORICAL + _per_group(
        ["forward", "reverse", "forward_stderr", "reverse_stderr", "n"], [0, 1]
    )
    want = categorical_kl(a, b)
    assert out.forward.value == pytest.approx(float(want.forward), rel=1e-12)
    assert out.reverse.value == pytest.approx(float(want.reverse), rel=1e-12)
    assert out.forward.method_used == "exact" and out.forward.n == 60
    assert sorted(out.group_forward) == [0, 1]
    for g in (0, 1):
        rows = labels == g
        assert out.group_forward[g].n == int(rows.sum())
        assert out.group_forward[g].mass == pytest.approx(float(rows.float().mean()))
        assert out.group_forward[g].value == pytest.approx(
            float(categorical_kl(a[rows], b[rows]).forward), rel=1e-12
        )
    # every key is one field, read without a device round trip
    floats = out.to_floats()
    assert floats["forward"] == out.forward.value and floats["n/group_1"] == out.group_forward[1].n
    assert all(v.dim() == 0 and v.dtype == F64 for v in out.values())


def test_monte_carlo_and_sampled_keys():
    p, q, x, y, lx, ly = _samples()
    mc = MonteCarloKL(num_groups=2)
    mc.update(p.log_prob(x), q.log_prob(x), lx)
    out = mc.compute()
    assert isinstance(out, MonteCarloResult)
    assert list(out) == MONTE_CARLO + _per_group(["kl", "stderr", "n"], [0, 1])
    assert out.method_used == out.estimate.method_used and out.method == "cv"

    with_model = SampledKL(num_groups=2)
    with_model.update(p.log_prob(x), q.log_prob(x), q.log_prob(y), p.log_prob(y), lx, ly)
    out = with_model.compute()
    assert isinstance(out, SampledResult) and out.reverse_estimator == "model_samples"
    forward_groups = _per_group(["forward", "forward_stderr", "forward_n"], [0, 1])
    assert list(out) == (SAMPLED + ["reverse_c", "reverse_variance_reduction"] + SAMPLED_TAIL
                         + forward_groups + _per_group(REVERSE_GROUP, [0, 1]))  # fmt: skip
    masses = [out.group_reverse[g].mass for g in (0, 1)]
    assert masses == pytest.approx([float((ly == g).double().mean()) for g in (0, 1)])

    iw = SampledKL(num_groups=2)
    iw.update(p.log_prob(x), q.log_prob(x), groups=lx)
    out = iw.compute()
    assert out.reverse_estimator == "importance_weighted" and out.reverse.method_used == "iw"
    interleaved = [key for g in (0, 1) for key in
                   _per_group(["forward", "forward_stderr", "forward_n"], [g])
                   + _per_group(REVERSE_GROUP, [g])]  # fmt: skip
    assert list(out) == SAMPLED + SAMPLED_TAIL + interleaved
    assert float(out["reverse_ess"]) == out.reverse.ess < out.reverse.n


def test_logged_tags_are_the_result_without_per_group_detail():
    a, b, labels = _logits()
    metric = CategoricalKL(num_groups=3)
    metric.update(a, b, groups=labels)
    out = metric.compute()
    tags = tb.scalars("kl", out)
    assert list(tags) == [f"kl/{k}" for k in CATEGORICAL] + [
        "kl/forward/group_0", "kl/reverse/group_0", "kl/mass/group_0",
        "kl/forward/group_1", "kl/reverse/group_1", "kl/mass/group_1",
        "kl/forward_lower", "kl/forward_upper", "kl/reverse_lower", "kl/reverse_upper",
        "kl/forward_contribution/group_0", "kl/forward_contribution/group_1",
    ]  # fmt: skip
    assert tags["kl/mass/group_1"] == out.group_forward[1].mass
    # each group's part of the forward KL: its share of the rows times its KL
    parts = [tags[f"kl/forward_contribution/group_{g}"] for g in (0, 1)]
    assert parts == pytest.approx([out.group_forward[g].mass * out.group_forward[g].value
                                   for g in (0, 1)])  # fmt: skip
    assert tags["kl/forward_upper"] == out.forward.value + 2 * out.forward.stderr


def test_one_host_transfer_per_compute(monkeypatch):
    calls = []
    real = metrics_module._to_host
    monkeypatch.setattr(metrics_module, "_to_host", lambda ts: calls.append(len(ts)) or real(ts))
    p, q, x, y, lx, ly = _samples()
    metric = SampledKL(num_groups=2)
    metric.update(p.log_prob(x), q.log_prob(x), q.log_prob(y), p.log_prob(y), lx, ly)
    metric.compute()
    a, b, labels = _logits()
    cat = CategoricalKL(num_groups=3)
    cat.update(a, b, groups=labels)
    cat.compute()
    assert calls == [10, 2]  # every state of the metric, in one transfer each


def test_result_is_read_only_and_survives_pickle_and_copy():
    a, b, labels = _logits()
    metric = CategoricalKL(num_groups=3)
    metric.update(a, b, groups=labels)
    out = metric.compute()
    with pytest.raises(TypeError):
        out["forward"] = torch.tensor(0.0)  # type: ignore[index]
    with pytest.raises(AttributeError):
        out.reduction = "sequence_sum"  # type: ignore[misc]
    for twin in (pickle.loads(pickle.dumps(out)), copy.deepcopy(out)):
        assert twin.to_floats() == out.to_floats() and twin.forward == out.forward
    assert dict(out).keys() == out.to_floats().keys()


def test_evaluation_from_result_is_the_detectors_view():
    a, b, labels = _logits()
    metric = CategoricalKL(num_groups=3)
    metric.update(a, b, groups=labels)
    out = metric.compute()
    ev = Evaluation.from_result(7, out)
    assert (ev.step, ev.forward, ev.reverse) == (7, out.forward.value, out.reverse.value)
    assert ev.entropy_model == out.entropy_model
    assert ev.group_forward == {g: e.value for g, e in out.group_forward.items()}
    assert ev.group_count == {0: out.group_forward[0].n, 1: out.group_forward[1].n}

    p, q, x, y, lx, ly = _samples()
    sampled = SampledKL(num_groups=3)
    sampled.update(p.log_prob(x), q.log_prob(x), q.log_prob(y), p.log_prob(y), lx, ly + 1)
    out = sampled.compute()
    ev = Evaluation.from_result(8, out)
    # samples: the model's share of mass; group 0 has reference samples only
    assert ev.group_count == {0: 0.0, 1: out.group_reverse[1].mass}
    assert ev.entropy_model is None and math.isfinite(ev.reverse_stderr)


def test_every_input_kind_has_a_metric():
    from kl_monitor import INPUT_KINDS, KLInputs
    from kl_monitor.evaluator import METRIC_FOR_KIND, MetricConfig

    assert set(METRIC_FOR_KIND) == set(INPUT_KINDS)
    g = torch.Generator().manual_seed(0)
    inputs = {"logits": KLInputs.from_logits(*_logits()[:2]),
              "log_probs": KLInputs.from_log_probs(torch.zeros(5), torch.zeros(5)),
              "samples": KLInputs.from_samples(torch.randn(64, 2, generator=g),
                                               torch.randn(64, 2, generator=g) + 2.0)}  # fmt: skip
    for kind in INPUT_KINDS:
        assert inputs[kind].kind == kind
        metric = METRIC_FOR_KIND[kind](MetricConfig())
        values = metric.update_from(inputs[kind])  # the histogram's values, from the same pass
        # sample-only inputs have no per-sample value before the union: no histogram
        assert (values.numel() > 0) != (kind == "samples")
        assert float(metric.compute()["forward"]) >= 0

"""Precision with half-precision inputs, where users of other tools see negative or noisy KL.

Exact categorical KL of bf16 and fp16 logits over a 50,257-class vocabulary (GPT-2's),
64 rows, with P and Q nearly identical (true KL around 1e-4 nats per row), compared
with float64 computed on the *same* half-precision values upcast (the inputs' own
values, not the float64 numbers they were rounded from). ``categorical_kl`` computes
in float32. Two layouts: logits of similar scale, and Q's logits offset by a constant
(softmax-invariant, common between a teacher and a student).

``python -m pytest tests/test_precision.py -s`` prints the table quoted in
docs/reliability.md.
"""

from __future__ import annotations

import math

import pytest
import torch

from kl_monitor import categorical_kl, iw_reverse_kl
from kl_monitor.metrics import CategoricalKL

ROWS, VOCAB = 64, 50257
SIGMA, DELTA = 2.0, 0.01  # logit scale, and Q's perturbation of it (KL ≈ DELTA² σ²-ish / 2)
F64 = torch.float64
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
OFFSETS = {"same scale": 0.0, "offset +7": 7.0}


pytestmark = pytest.mark.usefixtures("single_thread")


def _case(dtype: torch.dtype, offset: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = SIGMA * torch.randn(ROWS, VOCAB, generator=g, dtype=F64)
    other = base + DELTA * torch.randn(ROWS, VOCAB, generator=g, dtype=F64) + offset
    p, q = base.to(dtype), other.to(dtype)
    lp, lq = p.to(F64).log_softmax(-1), q.to(F64).log_softmax(-1)
    forward = (lp.exp() * (lp - lq)).sum(-1)
    reverse = (lq.exp() * (lq - lp)).sum(-1)
    return p, q, forward, reverse


_CACHE: dict = {}


def _errors(name: str, offset_name: str) -> dict:
    """Relative errors of categorical_kl on half logits against float64, per row and mean."""
    key = (name, offset_name)
    if key not in _CACHE:
        p, q, f64, r64 = _case(HALF[name], OFFSETS[offset_name])
        out = categorical_kl(p, q, reduction="none")
        f, r = out.forward.to(F64), out.reverse.to(F64)
        _CACHE[key] = {
            "kl": float(f64.mean()),
            "kl_min": float(f64.min()),
            "row_fwd": float(((f - f64).abs() / f64).max()),
            "row_rev": float(((r - r64).abs() / r64).max()),
            "row_fwd_mean": float(((f - f64).abs() / f64).mean()),
            "mean_fwd": abs(float(f.mean() - f64.mean())) / float(f64.mean()),
            "mean_rev": abs(float(r.mean() - r64.mean())) / float(r64.mean()),
            "min_value": float(torch.minimum(f, r).min()),
            "nan": bool(torch.isnan(f).any() or torch.isnan(r).any()),
            # what a half-precision pipeline gives (log-softmax and KL in the input dtype)
            "naive_min": float(
                torch.nn.functional.kl_div(
                    q.log_softmax(-1), p.log_softmax(-1), log_target=True, reduction="none"
                ).sum(-1).min()
            ),
            "naive_row": float(
                (
                    (
                        torch.nn.functional.kl_div(
                            q.log_softmax(-1), p.log_softmax(-1), log_target=True,
                            reduction="none",
                        ).sum(-1).to(F64) - f64
                    ).abs() / f64
                ).max()
            ),
        }  # fmt: skip
    return _CACHE[key]


CASES = [(n, o) for n in HALF for o in OFFSETS]


def test_print_precision_table():
    """The figures of docs/reliability.md (run with -s to see them)."""
    lines = [
        "| logits | layout | true KL (mean, min) | worst row rel. error fwd / rev "
        "| mean rel. error fwd / rev | smallest value "
        "| KL computed in the half dtype: min, worst row |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, offset in CASES:
        e = _errors(name, offset)
        lines.append(
            f"| {name} | {offset} | {e['kl']:.2e}, {e['kl_min']:.2e} | "
            f"{e['row_fwd']:.2%} / {e['row_rev']:.2%} | "
            f"{e['mean_fwd']:.3%} / {e['mean_rev']:.3%} | "
            f"{e['min_value']:.2e} | {e['naive_min']:.1e}, {e['naive_row']:.0%} |"
        )
    print("\n" + "\n".join(lines))


@pytest.mark.parametrize("name,offset", CASES)
def test_mean_kl_within_one_percent_of_float64(name, offset):
    e = _errors(name, offset)
    assert 5e-5 < e["kl"] < 1e-3  # the regime of the claim: true KL around 1e-4
    assert e["mean_fwd"] < 0.01 and e["mean_rev"] < 0.01, e


@pytest.mark.parametrize("name,offset", CASES)
def test_never_negative_never_nan(name, offset):
    e = _errors(name, offset)
    assert not e["nan"]
    assert e["min_value"] > 0, e  # every row's KL is positive, as the truth is
    assert e["naive_min"] < 0  # the half-precision pipeline users report does go negative


@pytest.mark.parametrize("name,offset", CASES)
def test_every_row_within_one_percent_of_float64(name, offset):
    # A kernel that subtracts two float32 log-softmaxes fails this: each log-normaliser
    # (about 11 nats over 50k classes) carries ~1e-6 of rounding, 1-3% of a 1e-4 KL.
    e = _errors(name, offset)
    assert e["row_fwd"] < 0.01 and e["row_rev"] < 0.01, e


@pytest.mark.parametrize("name", HALF)
def test_metric_accumulates_half_logits_in_float64(name):
    p, q, f64, r64 = _case(HALF[name], 0.0)
    metric = CategoricalKL()
    for chunk in range(0, ROWS, 16):
        metric.update(p[chunk : chunk + 16], q[chunk : chunk + 16])
    out = metric.compute()
    want = categorical_kl(p, q)
    assert out["forward"].dtype == F64
    assert float(out["forward"]) == pytest.approx(float(want.forward), rel=1e-6)
    assert float(out["reverse"]) == pytest.approx(float(want.reverse), rel=1e-6)
    assert abs(float(out["forward"]) - float(f64.mean())) < 0.01 * float(f64.mean())


def _iw_case(c: float, seed: int = 0) -> tuple[float, object]:
    """log q − log p = −c + N(0, 1) at 2,000 samples of P: exact (log space) and estimate."""
    g = torch.Generator().manual_seed(seed)
    log_p = torch.zeros(2000, dtype=F64)
    log_q = -c + torch.randn(2000, generator=g, dtype=F64)
    log_w = log_q - log_p
    lw = log_w - (torch.logsumexp(log_w, 0) - math.log(log_w.numel()))
    return float((lw.exp() * lw).mean()), iw_reverse_kl(log_p, log_q)


def test_print_importance_weighted_table():
    """The importance-weighted reverse KL as the model moves away (docs/reliability.md)."""
    cs = (0.0, 10.0, 20.0, 25.0, 30.0, 33.0, 36.0)
    rows = [_iw_case(c) for c in cs]
    print("\n| c (nats) | " + " | ".join(f"{c:g}" for c in cs) + " |")
    print("|---|" + "---|" * len(cs))
    print("| exact (log space) | " + " | ".join(f"{w:.4f}" for w, _ in rows) + " |")
    print("| `iw_reverse_kl` | " + " | ".join(
        f"{e.value:.4g}" + (f", ESS = {e.ess:g}" if e.ess == 0 else "") for _, e in rows
    ) + " |")  # fmt: skip
    for c, (want, est) in zip(cs, rows, strict=True):
        if c <= 20:  # the resolvable regime: exact to 1e-4
            assert est.value == pytest.approx(want, rel=1e-4), c


@pytest.mark.xfail(
    strict=True,
    reason="KLStats keeps Σw as n + Σ(w − 1): when every w = q/p at P's samples is below "
    "~1e-16 relative (log q − log p < −25 nats everywhere), the self-normalised reverse KL "
    "loses its digits (here far from 0.5); needs Σw and Σw·ℓ as their own columns.",
)
def test_importance_weighted_reverse_kl_far_from_the_reference():
    want, est = _iw_case(33.0)  # model density e^-33 below the reference's everywhere
    assert est.value == pytest.approx(want, rel=1e-3)

"""Fuzzing of every public function and ``update()`` in estimators, stats and metrics.

Inputs (hypothesis, bounded example counts): random shapes including 0-size and
1-element tensors; the dtypes float16, bfloat16, float32, float64, int32 and int64;
random patterns of NaN, +inf and −inf; values (log-densities, logits) up to ±1e4;
pairs that are independent, identical, near-identical or shifted.

Invariants checked on every example:

* A result is either finite, or ``+inf`` with a counted support violation. The only
  NaNs allowed are the documented, flagged ones (``tail_index`` when it cannot be
  estimated; ``asymmetry`` when both directions are ``+inf``).
* Otherwise the call fails with a ``ValueError`` or ``TypeError`` whose message names
  the argument, and only for input that is actually invalid (an oracle computed
  independently in float64 decides which). Any other exception fails the test.
* No silent dtype downcast: the Monte Carlo paths give bit-identical results for a
  half-precision input and for the same values upcast to float64; the categorical
  kernel (float32 for half inputs) stays within its stated tolerance of an
  independent float64 computation (``scipy.special.rel_entr``) on the same values.
* A rejected metric update leaves the metric's state unchanged.

The example counts are recorded in ``docs/reliability.md``; run
``pytest tests/test_fuzz.py --hypothesis-show-statistics`` to see them.
"""

from __future__ import annotations

import math
import os
import re
import warnings

import numpy as np
import pytest
import scipy.special
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kl_monitor import _utils
from kl_monitor.estimators import categorical_kl, categorical_kl_rows, iw_reverse_kl, mc_kl
from kl_monitor.metrics import CategoricalKL, MonteCarloKL, SampledKL
from kl_monitor.stats import KLEstimate, KLStats, pareto_tail_index, tail_may_be_heavy

INF = math.inf
F64 = torch.float64
FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int32, torch.int64)
#: largest |value| fuzzed (logits and log-densities)
MAX_ABS = 1e4
#: float32 unit roundoff
EPS32 = 2.0**-24

#: examples per test; raise it for a longer campaign: KL_FUZZ_EXAMPLES=5000 pytest ...
EXAMPLES = int(os.environ.get("KL_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(autouse=True)
def _quiet():
    # dropped-sample and clipping warnings are expected here (warn_once, process-wide)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="kl_monitor:")
        warnings.filterwarnings("ignore", message=".*was called before the ``update``")
        yield
    _utils._WARNED.clear()


# --------------------------------------------------------------------------- strategies
# Odds are tilted towards valid input (about half the calls reach a result), with every
# kind of invalid input still drawn often.
SIDES = st.sampled_from([0, 1, 1, 2, 2, 3, 3, 4, 5, 7, 8, 16, 30, 64])
SCALES = st.sampled_from([0.0, 1e-3, 0.5, 3.0, 30.0, 1e3, MAX_ABS])
PATTERNS = st.sampled_from(["none"] * 14 + ["sparse"] * 4 + ["dense", "all"])
DTYPE_DRAW = st.sampled_from([*FLOATS * 8, *INTS])
SPECIALS = ("nan", "pinf", "ninf")
MASK_KINDS = st.sampled_from(["none"] * 5 + ["random"] * 4 + ["wrong_shape", "wrong_dtype"])


@st.composite
def shapes(draw, min_dims: int = 0, max_dims: int = 3) -> tuple[int, ...]:
    sides = draw(st.lists(SIDES, min_size=min_dims, max_size=max_dims))
    while math.prod(sides) > 2048:  # keep an example to milliseconds
        sides[sides.index(max(sides))] = 1
    return tuple(sides)


@st.composite
def fills(draw) -> dict:
    """How to fill a tensor: seed, scale, offset and the odds of NaN, +inf and −inf."""
    odds = {"none": 0.0, "sparse": 0.05, "dense": 0.4, "all": 1.0}[draw(PATTERNS)]
    specials = draw(st.sets(st.sampled_from(SPECIALS), min_size=1))
    return dict(
        seed=draw(st.integers(0, 2**31 - 1)),
        scale=draw(SCALES),
        offset=draw(st.sampled_from([0.0, 0.0, -5.0, -MAX_ABS / 2, MAX_ABS / 2])),
        **{f"p_{k}": odds / len(specials) if k in specials else 0.0 for k in SPECIALS},
    )


def _values(shape, fill: dict, base: torch.Tensor | None = None, relation: str = "indep"):
    """float64 values for ``shape``; with ``base``, related to it by ``relation``."""
    g = torch.Generator().manual_seed(fill["seed"])
    noise = torch.randn(shape, generator=g, dtype=F64)
    if base is None or relation == "indep" or base.shape != noise.shape:
        x = fill["offset"] + fill["scale"] * noise
    elif relation == "equal":
        x = base.clone()
    elif relation == "near":
        x = base + 1e-3 * noise
    else:  # shifted
        x = base + fill["offset"] / 10 + 0.5
    x = x.clamp(-MAX_ABS, MAX_ABS)
    u = torch.rand((3, *shape), generator=g, dtype=F64)
    x = torch.where(u[0] < fill["p_ninf"], -INF, x)
    x = torch.where(u[1] < fill["p_pinf"], INF, x)
    return torch.where(u[2] < fill["p_nan"], math.nan, x)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return x.to(dtype)
    return torch.nan_to_num(x, nan=0.0, posinf=MAX_ABS, neginf=-MAX_ABS).round().to(dtype)


@st.composite
def pairs(draw, min_dims: int = 0, max_dims: int = 3, same_shape_odds: float = 0.93):
    """Two tensors (a, b) of random shapes, dtypes and special values."""
    shape_a = draw(shapes(min_dims, max_dims))
    same = draw(st.floats(0, 1)) < same_shape_odds
    shape_b = shape_a if same else draw(shapes(min_dims, max_dims))
    dtype_a = draw(DTYPE_DRAW)
    dtype_b = dtype_a if draw(st.booleans()) else draw(DTYPE_DRAW)
    relation = draw(st.sampled_from(["indep", "equal", "near", "shifted"]))
    a = _cast(_values(shape_a, draw(fills())), dtype_a)
    b = _cast(_values(shape_b, draw(fills()), a.to(F64), relation), dtype_b)
    return a, b


# --------------------------------------------------------------------------- invariants
def _names_argument(err: BaseException, names: tuple[str, ...]) -> None:
    assert isinstance(err, (ValueError, TypeError)), f"untyped exception {err!r}"
    msg = str(err)
    named = [n for n in names if re.search(rf"(?<!\w){re.escape(n)}(?!\w)", msg)]
    assert named, f"message names none of {names}: {msg!r}"
    event(f"rejected: {type(err).__name__} naming {max(named, key=len)}")


def _ok_number(x: float, *, allow_inf: bool, what: str) -> None:
    assert not math.isnan(x), f"{what} is NaN"
    if not allow_inf:
        assert math.isfinite(x), f"{what} = {x} without a support violation"


def _check_estimate(est: KLEstimate) -> None:
    flagged = est.support_violations > 0
    _ok_number(est.value, allow_inf=flagged, what="value")
    if math.isinf(est.value):
        assert est.value > 0
    _ok_number(est.stderr, allow_inf=True, what="stderr")
    assert est.stderr >= 0
    assert math.isfinite(est.stderr) or flagged or est.n < 2, est
    _ok_number(est.c, allow_inf=False, what="c")
    _ok_number(est.variance_reduction, allow_inf=True, what="variance_reduction")
    assert est.variance_reduction >= 0
    # tail_index may be NaN: documented "cannot tell" (n < 20, or no tail to fit)
    assert math.isnan(est.tail_index) or math.isfinite(est.tail_index)
    assert min(est.n, est.nonfinite, est.support_violations, est.clipped) >= 0


def _same(x: float, y: float) -> bool:
    return (math.isnan(x) and math.isnan(y)) or x == y


def _expected(oracle: dict, value_problem: bool) -> tuple[type, ...]:
    """The exception types a call may raise: TypeError for a type problem, ValueError for
    a value problem (either one when both are present: the order of checks is free)."""
    out: tuple[type, ...] = ()
    if oracle["error"] is TypeError:
        out += (TypeError,)
    if oracle["error"] is ValueError or value_problem:
        out += (ValueError,)
    return out


def _sample_oracle(a: torch.Tensor, b: torch.Tensor) -> dict:
    """What the Monte Carlo paths must do with samples (a, b), from float64 values."""
    if not (a.is_floating_point() and b.is_floating_point()):
        return {"error": TypeError}
    if a.shape != b.shape or a.numel() == 0:
        return {"error": ValueError}
    a, b = a.to(F64).reshape(-1), b.to(F64).reshape(-1)
    valid = torch.isfinite(a) & torch.isfinite(b)
    support = torch.isfinite(a) & (b == -INF)
    bad = ~(valid | support)
    ell = a[valid] - b[valid]
    return {
        "error": None,
        "n": int(valid.sum()),
        "support": int(support.sum()),
        "bad": int(bad.sum()),
        "naive": float(ell.mean()) if ell.numel() else math.nan,
    }


# --------------------------------------------------------------------------- estimators
@FUZZ
@given(
    ab=pairs(),
    method=st.sampled_from(["naive", "k3", "cv", "cv", "cv_fixed", "k4"]),
    nonfinite=st.sampled_from(["skip"] * 12 + ["raise", "raise", "ignore"]),
)
def test_fuzz_mc_kl(ab, method, nonfinite):
    a, b = ab
    c = -0.7 if method == "cv_fixed" else None
    method = "cv" if method == "cv_fixed" else method
    oracle = _sample_oracle(a, b)
    names = ("log_a", "log_b", "method", "nonfinite")
    config_error = nonfinite == "ignore" or method == "k4"
    expected = _expected(
        oracle,
        config_error
        or (oracle["error"] is None and nonfinite == "raise" and oracle["bad"] > 0)
        or (oracle["error"] is None and oracle["n"] + oracle["support"] == 0),
    )
    try:
        est = mc_kl(a, b, method, c=c, nonfinite=nonfinite)
    except (ValueError, TypeError) as err:
        assert expected, f"valid input rejected: {err!r}"
        assert isinstance(err, expected), err
        _names_argument(err, names)
        return
    assert not expected, "invalid input accepted"
    _check_estimate(est)
    event("result: +inf (support violation)" if est.support_violations else "result: finite")
    if est.nonfinite:
        event("NaN/inf samples dropped")
    if est.clipped:
        event("weights clipped")
    assert (est.n, est.support_violations, est.nonfinite) == (
        oracle["n"], oracle["support"], oracle["bad"]
    )
    if oracle["support"]:
        assert est.value == INF
    elif method == "naive" or est.method_used == "naive":
        assert est.value == pytest.approx(oracle["naive"], rel=1e-9, abs=1e-9)
    # no silent downcast: identical to the float64 path on the same values
    ref = mc_kl(a.to(F64), b.to(F64), method, c=c, nonfinite=nonfinite)
    for field in ("value", "stderr", "c", "variance_reduction", "tail_index"):
        assert _same(getattr(est, field), getattr(ref, field)), field


@FUZZ
@given(ab=pairs(), nonfinite=st.sampled_from(["skip", "skip", "skip", "raise"]))
def test_fuzz_iw_reverse_kl(ab, nonfinite):
    log_p, log_q = ab
    oracle = _sample_oracle(log_p, log_q)
    expected = _expected(
        oracle,
        oracle["error"] is None
        and ((nonfinite == "raise" and oracle["bad"] > 0) or oracle["n"] + oracle["support"] == 0),
    )
    try:
        est = iw_reverse_kl(log_p, log_q, nonfinite=nonfinite)
    except (ValueError, TypeError) as err:
        assert expected, f"valid input rejected: {err!r}"
        assert isinstance(err, expected), err
        _names_argument(err, ("log_p", "log_q", "nonfinite"))
        return
    assert not expected, "invalid input accepted"
    # an infinite reverse KL is flagged by ess = 0: no weight of Q where P's samples are
    _ok_number(est.value, allow_inf=est.ess == 0, what="value")
    _ok_number(est.stderr, allow_inf=True, what="stderr")
    _ok_number(est.ess, allow_inf=False, what="ess")
    assert est.stderr >= 0 and est.ess >= 0
    assert est.n == oracle["n"] + oracle["support"]
    event("result: +inf (no model weight, ess = 0)" if est.value == INF else "result: finite")
    # Against the self-normalised estimate computed in log space, where the mean weight
    # is resolvable from the stored sums n + Σ(w − 1). Below a mean weight of 1e-6 it is
    # not (a known limitation: test_precision.py, docs/reliability.md).
    a, b = log_p.to(F64).reshape(-1), log_q.to(F64).reshape(-1)
    ok = torch.isfinite(a) & torch.isfinite(b)
    log_w = (b - a)[ok]
    if oracle["support"] == 0 and log_w.numel() and log_w.max() < 80:
        log_mean_w = torch.logsumexp(log_w, 0) - math.log(log_w.numel())
        if log_mean_w > math.log(1e-6):
            lw = log_w - log_mean_w
            want = float((lw.exp() * lw).mean())
            ess = float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))
            assert est.value == pytest.approx(want, rel=1e-6, abs=1e-6)
            assert est.ess == pytest.approx(ess, rel=1e-6) and est.ess <= est.n * (1 + 1e-9)
            event("value and ess checked against log space")
        else:
            event("mean weight below 1e-6: outside the resolvable regime")
    ref = iw_reverse_kl(log_p.to(F64), log_q.to(F64), nonfinite=nonfinite)
    for field in ("value", "stderr", "ess", "tail_index"):
        assert _same(getattr(est, field), getattr(ref, field)), field


@st.composite
def logit_pairs(draw):
    """Logits (..., K) of P and Q, an optional mask, and what kind of mask it is."""
    lead = draw(shapes(0, 3))
    k = draw(st.sampled_from([0, 1, 2, 2, 3, 3, 5, 5, 5, 17, 64, 64, 64, 257, 257]))
    shape = (*lead, k)
    shape_q = shape if draw(st.floats(0, 1)) < 0.9 else (*draw(shapes(0, 2)), k + 1)
    dtype_p = draw(DTYPE_DRAW)
    dtype_q = dtype_p if draw(st.booleans()) else draw(DTYPE_DRAW)
    relation = draw(st.sampled_from(["indep", "equal", "near", "shifted"]))
    p = _cast(_values(shape, draw(fills())), dtype_p)
    q = _cast(_values(shape_q, draw(fills()), p.to(F64), relation), dtype_q)
    mask_kind = draw(MASK_KINDS)
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if mask_kind == "none":
        mask = None
    elif mask_kind == "random":
        mask = torch.rand(lead, generator=g) < 0.7
    elif mask_kind == "wrong_shape":
        mask = torch.ones((*lead, 2), dtype=torch.bool)
    else:
        mask = torch.ones(lead, dtype=torch.uint8)
    return p, q, mask, mask_kind


def _categorical_oracle(p: torch.Tensor, q: torch.Tensor) -> dict:
    """Per-row forward/reverse KL in float64 by scipy's rel_entr, and the invalid rows."""
    x, y = p.to(F64), q.to(F64)
    bad = (
        torch.isnan(x).any(-1) | torch.isnan(y).any(-1)
        | (x == INF).any(-1) | (y == INF).any(-1)
        | (x == -INF).all(-1) | (y == -INF).all(-1)
    )
    pp = torch.softmax(torch.nan_to_num(x, nan=0.0, posinf=0.0), -1).numpy()
    qq = torch.softmax(torch.nan_to_num(y, nan=0.0, posinf=0.0), -1).numpy()
    with np.errstate(all="ignore"):
        fwd = scipy.special.rel_entr(pp, qq).sum(-1)
        rev = scipy.special.rel_entr(qq, pp).sum(-1)
    return {"bad": bad, "forward": torch.as_tensor(fwd), "reverse": torch.as_tensor(rev)}


def _kernel_tolerance(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Stated tolerance of the float32 kernel per row, in nats.

    log-softmax in float32 rounds each log-probability to about EPS32·(|logit| + log K
    + |max logit|); the KL of a row is a p-weighted sum of their differences. Plus a
    relative 1e-5 for the weighted sum itself.
    """
    eps = 2.0**-53 if p.dtype == F64 else EPS32  # the kernel computes in p's compute dtype
    x = torch.nan_to_num(p.to(F64), nan=0.0, posinf=0.0, neginf=0.0).abs().amax(-1)
    y = torch.nan_to_num(q.to(F64), nan=0.0, posinf=0.0, neginf=0.0).abs().amax(-1)
    return 16 * eps * (2 * (x + y) + math.log(max(p.shape[-1], 1)) + 1)


def _kernel_matches_float64(fwd, rev, valid, p, q, oracle) -> None:
    """The float32 kernel against the float64 reference, row by row, on valid rows."""
    tol = _kernel_tolerance(p, q).reshape(-1)
    fwd, rev = fwd.to(F64).reshape(-1), rev.to(F64).reshape(-1)
    ok = valid.reshape(-1)
    assert torch.equal(ok, ~oracle["bad"].reshape(-1))
    for got, want in ((fwd, oracle["forward"].reshape(-1)), (rev, oracle["reverse"].reshape(-1))):
        got, want = got[ok], want[ok]
        assert not torch.isnan(got).any()
        both_inf = torch.isinf(got) & torch.isinf(want)
        # float32 has no mass below ~1e-45 (float64: ~1e-324): a class whose reference
        # probability lies between the two is a support violation in float64 only.
        f64_only = torch.isinf(want) & ~torch.isinf(got)
        if bool(f64_only.any()):
            event("support violation below float32's smallest mass")
        assert not (torch.isinf(got) & ~torch.isinf(want)).any(), "spurious +inf"
        close = (got - want).abs() <= tol[ok] + 1e-5 * want.abs()
        assert bool((close | both_inf | f64_only).all()), (got, want, tol[ok])


@FUZZ
@given(
    data=logit_pairs(),
    reduction=st.sampled_from(["mean", "mean", "sum", "none", "none", "median"]),
    nonfinite=st.sampled_from(["skip", "skip", "skip", "raise"]),
    chunk_rows=st.sampled_from([None] * 6 + [1, 2, 3, 0, -1]),
)
def test_fuzz_categorical_kl(data, reduction, nonfinite, chunk_rows):
    p, q, mask, mask_kind = data
    names = ("logits", "logits_p", "logits_q", "mask", "reduction", "nonfinite", "chunk_rows")
    floating = p.is_floating_point() and q.is_floating_point()
    shape_ok = p.dim() > 0 and p.shape == q.shape and p.numel() > 0
    expect_error = None
    if not floating or mask_kind == "wrong_dtype":
        expect_error = TypeError
    if (
        (floating and not shape_ok)
        or reduction == "median"
        or (reduction == "sum" and p.dim() < 3)
        or mask_kind == "wrong_shape"
        or (chunk_rows is not None and chunk_rows < 1)
    ):
        expect_error = expect_error or ValueError
    oracle = None
    if expect_error is None:
        oracle = _categorical_oracle(p, q)
        counted = oracle["bad"] if mask is None else oracle["bad"] & mask
        if nonfinite == "raise" and bool(counted.any()):
            expect_error = ValueError
        kept = ~oracle["bad"] if mask is None else ~oracle["bad"] & mask
        if reduction == "mean" and not bool(kept.any()):
            expect_error = ValueError  # the mean of zero rows is refused, as by the metric
    try:
        out = categorical_kl(p, q, mask, reduction, nonfinite=nonfinite, chunk_rows=chunk_rows)
    except (ValueError, TypeError) as err:
        assert expect_error is not None, f"valid input rejected: {err!r}"
        _names_argument(err, names)
        return
    assert expect_error is None, "invalid input accepted"
    assert oracle is not None
    keep = ~oracle["bad"] if mask is None else ~oracle["bad"] & mask
    counted = torch.ones_like(keep) if mask is None else mask
    assert out.n == int(keep.sum())
    assert out.nonfinite == int((counted & oracle["bad"]).sum())
    rows = categorical_kl(p, q, mask, "none", chunk_rows=chunk_rows)
    inf_rows = keep & (torch.isinf(rows.forward) | torch.isinf(rows.reverse))
    assert out.support_violations == int(inf_rows.sum())
    for t in (out.forward, out.reverse, out.entropy_reference, out.entropy_model):
        assert not torch.isnan(t).any(), "NaN result"
        assert not (t == -INF).any()
    for t in (out.forward, out.reverse):
        assert bool((t >= -1e-3).all()), "negative KL beyond rounding"
        if torch.isinf(t).any():
            assert out.support_violations > 0
    assert bool(torch.isfinite(out.entropy_reference).all())
    assert bool(torch.isfinite(out.entropy_model).all())
    event("result: +inf (support violation)" if out.support_violations else "result: finite")
    if out.nonfinite:
        event("NaN/+inf rows dropped")
    half = p.dtype in (torch.float16, torch.bfloat16) or q.dtype in (torch.float16, torch.bfloat16)
    event(f"kernel vs float64: {'half' if half else str(p.dtype)} input")
    # the float32 kernel against float64 on the same values
    fwd, rev, _, _, valid = categorical_kl_rows(p, q, chunk_rows=chunk_rows)
    _kernel_matches_float64(fwd, rev, valid, p, q, oracle)


# --------------------------------------------------------------------------- stats
@FUZZ
@given(
    batches=st.lists(pairs(same_shape_odds=0.97), min_size=1, max_size=3),
    method=st.sampled_from(["naive", "k3", "cv"]),
    fixed_c=st.sampled_from([None, None, -1.0, 0.3, 1e6]),
    nonfinite=st.sampled_from(["skip", "skip", "skip", "raise"]),
)
def test_fuzz_kl_stats(batches, method, fixed_c, nonfinite):
    stats, parts = KLStats(), []
    accepted = []
    for a, b in batches:
        before = (stats.sums.clone(), stats.top_log_w.clone(), stats.counts.clone())
        oracle = _sample_oracle(a, b)
        try:
            stats.update(a, b, nonfinite=nonfinite)
        except (ValueError, TypeError) as err:
            assert oracle["error"] or (nonfinite == "raise" and oracle["bad"]), err
            _names_argument(err, ("log_a", "log_b"))
            # a rejected batch adds nothing
            assert torch.equal(stats.sums, before[0]) and torch.equal(stats.counts, before[2])
            assert torch.equal(stats.top_log_w, before[1])
            continue
        assert oracle["error"] is None and not (nonfinite == "raise" and oracle["bad"])
        accepted.append(oracle)
        parts.append(KLStats().update(a, b, nonfinite="skip"))
    # merge of the parts equals the stats updated in sequence
    if parts:
        merged = parts[0]
        for part in parts[1:]:
            merged = merged + part
        assert torch.allclose(merged.sums, stats.sums, rtol=1e-12, atol=0, equal_nan=True)
        assert torch.equal(merged.counts, stats.counts)
    n = sum(o["n"] for o in accepted)
    support = sum(o["support"] for o in accepted)
    assert stats.n == n
    c = fixed_c if method == "cv" else None
    try:
        est = stats.estimate(method, c=c)
    except ValueError as err:
        assert n + support == 0, err
        return
    _check_estimate(est)
    assert est.support_violations == support
    _ok_number(stats.optimal_c(), allow_inf=False, what="optimal_c")
    tail = stats.tail_index()
    assert math.isnan(tail) or math.isfinite(tail)
    assert isinstance(tail_may_be_heavy(tail, max(stats.n, 0)), bool)
    try:
        iw = stats.importance_weighted_reverse()
    except ValueError:
        assert n + support == 0
        return
    _ok_number(iw.value, allow_inf=iw.ess == 0, what="iw value")
    _ok_number(iw.stderr, allow_inf=True, what="iw stderr")


@FUZZ
@given(
    shape=shapes(0, 2),
    dtype=DTYPE_DRAW,
    fill=fills(),
    n=st.sampled_from([-3, 0, 1, 19, 20, 100, 1000, 10**6]),
)
def test_fuzz_pareto_tail_index(shape, dtype, fill, n):
    top = _cast(_values(shape, fill), dtype)
    try:
        k = pareto_tail_index(top, n)
    except (ValueError, TypeError) as err:
        _names_argument(err, ("top_log_w", "n"))
        assert n < 0, err
        return
    # integer log-weights are exact in float64: accepted, not downcast
    assert n >= 0, "invalid input accepted"
    assert math.isnan(k) or math.isfinite(k)
    if n < 20:
        assert math.isnan(k)
    assert isinstance(tail_may_be_heavy(k, n), bool)


# --------------------------------------------------------------------------- metrics
def _states(metric) -> dict[str, torch.Tensor]:
    return {k: getattr(metric, k).clone() for k in metric._defaults}


def _unchanged(metric, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(getattr(metric, k), v) for k, v in before.items())


def _check_result(result, support: float) -> None:
    """Every value finite, or +inf with a support violation; documented NaNs only."""
    for key, value in result.items():
        v = float(value)
        assert value.dtype == F64, key
        if key == "asymmetry":
            # forward − reverse: infinite (or inf − inf = NaN) only when a direction is
            directions = (float(result["forward"]), float(result["reverse"]))
            assert math.isfinite(v) or any(math.isinf(d) for d in directions), v
            continue
        if math.isnan(v):
            base = key.split("/")[0]
            assert base.endswith("tail_index") or (base == "asymmetry" and support > 0), key
        elif math.isinf(v):
            base = key.split("/")[0]
            assert v > 0 or base == "asymmetry", (key, v)
            # an infinite stderr means "one unit only": not a result, a missing spread.
            # An importance-weighted reverse KL is +inf exactly when no sample of P carries
            # model weight, flagged by an effective sample size of 0.
            no_weight = base.startswith("reverse") and float(result.get("reverse_ess", 1)) == 0
            # variance_reduction is +inf when the method's variance is 0 (documented)
            spread = base.endswith("stderr") or base.endswith("variance_reduction")
            assert support > 0 or spread or no_weight, (key, v)


@st.composite
def labels_for(draw, shape, num_groups):
    kind = draw(st.sampled_from(["ok"] * 8 + ["out_of_range", "float", "wrong_shape"]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    if kind == "float":
        return torch.zeros(shape), kind
    if kind == "wrong_shape":
        return torch.zeros((*shape, 2), dtype=torch.long), kind
    hi = num_groups + (2 if kind == "out_of_range" else 0)
    labels = torch.randint(0, max(hi, 1), shape, generator=g)
    if kind == "out_of_range" and labels.numel():
        labels.view(-1)[0] = num_groups
    return labels, kind


@FUZZ
@given(
    batches=st.lists(pairs(same_shape_odds=0.97), min_size=1, max_size=3),
    method=st.sampled_from(["naive", "k3", "cv"]),
    num_groups=st.sampled_from([None, None, 1, 3]),
    cast=st.sampled_from([None, torch.float16, torch.bfloat16, torch.float32]),
    data=st.data(),
)
def test_fuzz_monte_carlo_kl_metric(batches, method, num_groups, cast, data):
    metric = MonteCarloKL(method=method, num_groups=num_groups)
    if cast is not None:
        metric = metric.to(cast)  # a precision plugin must not downcast the states
    support = 0.0
    usable = 0
    for a, b in batches:
        groups = kind = None
        if num_groups is not None:
            groups, kind = data.draw(labels_for(tuple(a.shape), num_groups))
        before = _states(metric)
        oracle = _sample_oracle(a, b)
        try:
            metric.update(a, b, groups=groups)
        except (ValueError, TypeError) as err:
            assert oracle["error"] or kind not in (None, "ok"), err
            _names_argument(err, ("log_a", "log_b", "groups"))
            assert _unchanged(metric, before), "rejected update changed the state"
            continue
        assert oracle["error"] is None and kind in (None, "ok"), "invalid input accepted"
        support += oracle["support"]
        usable += oracle["n"] + oracle["support"]
    for key in metric._defaults:
        assert getattr(metric, key).dtype in (F64, torch.int64), key
    try:
        result = metric.compute()
    except ValueError as err:
        assert usable == 0, err
        return
    assert usable > 0
    _check_result(result, support)
    assert float(result["support_violations"]) == support
    assert float(result["n"]) == usable - support


@FUZZ
@given(
    batches=st.lists(logit_pairs(), min_size=1, max_size=3),
    reduction=st.sampled_from(["token_mean", "token_mean", "token_mean", "sequence_sum"]),
    num_groups=st.sampled_from([None, None, 2]),
    cast=st.sampled_from([None, torch.float16, torch.bfloat16]),
    data=st.data(),
)
def test_fuzz_categorical_kl_metric(batches, reduction, num_groups, cast, data):
    metric = CategoricalKL(reduction=reduction, num_groups=num_groups)
    if cast is not None:
        metric = metric.to(cast)
    units = 0
    support = 0.0
    for p, q, mask, mask_kind in batches:
        lead = tuple(p.shape[:-1])
        groups = kind = None
        if num_groups is not None:
            shape = lead[:-1] if reduction == "sequence_sum" else lead
            groups, kind = data.draw(labels_for(shape, num_groups))
        floating = p.is_floating_point() and q.is_floating_point()
        invalid = (
            not floating
            or p.dim() == 0
            or p.shape != q.shape
            or p.numel() == 0
            or mask_kind in ("wrong_shape", "wrong_dtype")
            or (reduction == "sequence_sum" and p.dim() < 3)
            or kind in ("float", "wrong_shape")
        )
        before = _states(metric)
        try:
            metric.update(p, q, mask=mask, groups=groups)
        except (ValueError, TypeError) as err:
            # out-of-range labels only fail where a counted row carries them
            assert invalid or kind == "out_of_range", err
            _names_argument(err, ("logits", "logits_p", "logits_q", "mask", "groups"))
            assert _unchanged(metric, before), "rejected update changed the state"
            continue
        assert not invalid, "invalid input accepted"
        oracle = _categorical_oracle(p, q)
        keep = ~oracle["bad"] if mask is None else ~oracle["bad"] & mask
        if reduction == "sequence_sum":
            units += int(keep.any(-1).sum())
        else:
            units += int(keep.sum())
        rows = categorical_kl(p, q, mask, "none")
        support += rows.support_violations
    for key in metric._defaults:
        assert getattr(metric, key).dtype == F64, key
    try:
        result = metric.compute()
    except ValueError as err:
        assert units == 0, err
        return
    assert units > 0 and float(result["n"]) == units
    assert float(result["support_violations"]) == support
    _check_result(result, support)


@FUZZ
@given(
    ref=pairs(same_shape_odds=0.97),
    model=st.one_of(st.none(), pairs(same_shape_odds=0.97)),
    method=st.sampled_from(["naive", "k3", "cv"]),
    num_groups=st.sampled_from([None, None, 2]),
    data=st.data(),
)
def test_fuzz_sampled_kl_metric(ref, model, method, num_groups, data):
    metric = SampledKL(method=method, num_groups=num_groups)
    log_p, log_q = ref
    model_q, model_p = model if model is not None else (None, None)
    groups = model_groups = None
    kinds = []
    if num_groups is not None:
        groups, kind = data.draw(labels_for(tuple(log_p.shape), num_groups))
        kinds.append(kind)
        if model is not None:
            model_groups, kind = data.draw(labels_for(tuple(model_q.shape), num_groups))
            kinds.append(kind)
    o_ref = _sample_oracle(log_p, log_q)
    o_model = _sample_oracle(model_q, model_p) if model is not None else None
    invalid = o_ref["error"] or (o_model is not None and o_model["error"]) or any(
        k != "ok" for k in kinds
    )
    before = _states(metric)
    names = ("log_p", "log_q", "model_log_q", "model_log_p", "groups", "model_groups")
    try:
        metric.update(log_p, log_q, model_q, model_p, groups=groups, model_groups=model_groups)
    except (ValueError, TypeError) as err:
        assert invalid, err
        _names_argument(err, names)
        assert _unchanged(metric, before), "rejected update changed the state"
        return
    assert not invalid, "invalid input accepted"
    support = o_ref["support"] + (o_model["support"] if o_model else 0)
    try:
        result = metric.compute()
    except ValueError as err:
        ref_empty = o_ref["n"] + o_ref["support"] == 0
        model_empty = o_model is not None and o_model["n"] + o_model["support"] == 0
        assert ref_empty or model_empty, err
        return
    _check_result(result, support)
    assert float(result["support_violations"]) == support

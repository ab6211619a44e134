"""Tests of the mergeable statistics (kl_monitor.stats): the sign trap, standard-error
calibration, merge = concatenation, the tail diagnostic and the control variate's weight.

The repeated-estimate fixtures follow DESIGN §3: P = N(0, 1), n = 1000 samples per
estimate, forward KL D(P‖Q) for Q in {N(0.1,1), N(1,1), N(2,1), N(0,2²)}, with
fixed seeds. ``python tests/test_stats.py`` prints the measured table.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch.distributions import Normal

from kl_monitor import KLStats, iw_reverse_kl, mc_kl, pareto_tail_index
from kl_monitor.stats import COL, COLUMNS, NCOL, TOP_K, sample_features

METHODS = ("naive", "k3", "cv")
N_PER_ESTIMATE = 1000
REPEATS = 1500
# name -> (mean, sd) of Q; P = N(0, 1)
CASES = {
    "N(0.1,1)": (0.1, 1.0),
    "N(1,1)": (1.0, 1.0),
    "N(2,1)": (2.0, 1.0),
    "N(0,2^2)": (0.0, 2.0),
}
LIGHT = ("N(0.1,1)", "N(1,1)")
HEAVY = "N(0,2^2)"  # w = q/p has tail index 0.75 under P: Var(w) = ∞


pytestmark = pytest.mark.usefixtures("single_thread")


def true_forward_kl(mean: float, sd: float) -> float:
    """D(N(0,1) ‖ N(mean, sd²)) = ln sd + (1 + mean²)/(2 sd²) − ½."""
    return math.log(sd) + (1.0 + mean**2) / (2.0 * sd**2) - 0.5


def gaussian_repeats(repeats: int = REPEATS, n: int = N_PER_ESTIMATE, seed: int = 2024):
    """Per case: values, stderrs of every method over ``repeats`` independent batches,
    the cv coefficient and method used; for N(0.1,1) also fixed c = ±1 and optimal_c()."""
    gen = torch.Generator().manual_seed(seed)
    p = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    out = {}
    for name, (mean, sd) in CASES.items():
        x = torch.randn(repeats, n, generator=gen, dtype=torch.float64)  # samples of P
        q = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(sd, dtype=torch.float64))
        log_p, log_q = p.log_prob(x), q.log_prob(x)
        res = {m: ([], []) for m in METHODS}
        cs, used = [], []
        extra = {"c=+1": [], "c=-1": [], "optimal_c": [], "mc_kl.c": [], "fitted_c": []}
        for r in range(repeats):
            stats = KLStats(*KLStats.batch_tensors(log_p[r], log_q[r]))
            for m in METHODS:
                est = stats.estimate(m)
                res[m][0].append(est.value)
                res[m][1].append(est.stderr)
                if m == "cv":
                    cs.append(est.c)  # applied: λ·ĉ
                    if name == "N(0.1,1)" and est.cv_weight > 0:
                        extra["fitted_c"].append(est.c / est.cv_weight)  # ĉ itself
                    used.append(est.method_used)
            if name == "N(0.1,1)":
                extra["c=+1"].append(stats.estimate("cv", c=+1.0).value)
                extra["optimal_c"].append(stats.optimal_c())
                if r < 200:  # the functional API and c = -1, on a subset to save time
                    extra["c=-1"].append(stats.estimate("cv", c=-1.0).value)
                    func = mc_kl(log_p[r], log_q[r])
                    extra["mc_kl.c"].append(func.c / func.cv_weight)
                    if r < 20:
                        plus = mc_kl(log_p[r], log_q[r], "cv", c=+1.0)
                        assert plus.value == extra["c=+1"][-1] and plus.c == 1.0
        out[name] = {
            "truth": true_forward_kl(mean, sd),
            **{m: tuple(torch.tensor(v, dtype=torch.float64) for v in res[m]) for m in METHODS},
            "c": torch.tensor(cs, dtype=torch.float64),
            "fallback": sum(u != "cv" for u in used) / repeats,  # share with λ = 0
            **{k: torch.tensor(v, dtype=torch.float64) for k, v in extra.items() if v},
        }
    return out


@pytest.fixture(scope="module")
def repeats(single_thread):
    return gaussian_repeats()


def coverage(case: dict, method: str) -> float:
    values, stderrs = case[method]
    return float(((values - case["truth"]).abs() <= 1.96 * stderrs).double().mean())


# --------------------------------------------------------------------------- sign trap
def test_sign_trap_estimated_c_is_minus_one_near_equality(repeats):
    case = repeats["N(0.1,1)"]
    # every single estimate, not just the average, gets the sign and size right
    assert (case["optimal_c"] + 1).abs().max() < 0.05
    # the fitted coefficient ĉ (``c`` is the applied λ·ĉ; λ < 1 on a few batches)
    assert (case["mc_kl.c"] + 1).abs().max() < 0.05
    assert (case["fitted_c"] + 1).abs().max() < 0.05 and len(case["fitted_c"]) == REPEATS
    assert (case["c"] + 1).abs().mean() < 0.05
    assert case["fallback"] == 0.0


@pytest.mark.parametrize("name", list(CASES))
def test_cv_efficiency(repeats, name):
    # The default takes the control variate's gain where it is large and safe (near
    # A ≈ B: as good as k3) and is otherwise naive. At N(1,1) that gives up k3's 15%
    # (documented in docs/estimators.md: coverage wins over efficiency).
    case = repeats[name]
    sd = {m: float(case[m][0].std()) for m in METHODS}
    if name == "N(0.1,1)":
        # measured 1.14 at n = 1000: the gates fire on a few healthy batches (coverage
        # is unaffected, the value moves toward naive); far below naive all the same
        assert sd["cv"] <= 1.2 * sd["k3"] and sd["cv"] < 0.1 * sd["naive"], sd
    elif name == "N(1,1)":
        assert sd["cv"] <= 1.1 * sd["naive"], sd
    else:
        assert sd["cv"] <= 1.1 * min(sd["naive"], sd["k3"]), sd


def test_sign_trap_plus_one_is_worse(repeats):
    case = repeats["N(0.1,1)"]
    sd_plus, sd_minus = float(case["c=+1"].std()), float(case["k3"][0].std())
    sd_naive = float(case["naive"][0].std())
    assert sd_plus >= 1.5 * sd_minus, (sd_plus, sd_minus)
    # near A ≈ B, ℓ ≈ −(w − 1): c = +1 roughly doubles the naive noise
    assert sd_plus >= 1.5 * sd_naive, (sd_plus, sd_naive)
    # fixed c = −1 is k3 exactly
    torch.testing.assert_close(case["c=-1"], case["k3"][0][:200], rtol=1e-12, atol=1e-15)


def test_k3_and_cv_reduce_variance_where_they_should(repeats):
    # DESIGN §3 table: near equality k3/cv are >10x better than naive; at KL = 2 and
    # on the heavy tail k3 is several times worse than naive.
    sd = {n: {m: float(repeats[n][m][0].std()) for m in METHODS} for n in CASES}
    assert sd["N(0.1,1)"]["cv"] < 0.1 * sd["N(0.1,1)"]["naive"]
    assert sd["N(2,1)"]["k3"] > 2 * sd["N(2,1)"]["naive"]
    assert sd[HEAVY]["k3"] > 2 * sd[HEAVY]["naive"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("method", ["naive", "cv"])
def test_unbiased(repeats, name, method):
    case = repeats[name]
    values = case[method][0]
    bias = float(values.mean()) - case["truth"]
    se_of_mean = float(values.std()) / math.sqrt(len(values))
    # The first version's hard fallback made cv at N(1,1) biased by about −0.1 sd (the
    # per-batch choice correlated with the value). The coefficient and the weight of the
    # control variate now both come from the other fold: unbiased to Monte Carlo error.
    assert abs(bias) < 4 * se_of_mean, (bias, se_of_mean)


# --------------------------------------------------------------------------- calibration
@pytest.mark.parametrize("name", LIGHT)
@pytest.mark.parametrize("method", METHODS)
def test_stderr_coverage_light_tails(repeats, name, method):
    cov = coverage(repeats[name], method)
    assert 0.92 <= cov <= 0.98, cov


@pytest.mark.parametrize("method", ["naive", "cv"])
def test_stderr_coverage_heavy_tail(repeats, method):
    cov = coverage(repeats[HEAVY], method)
    assert 0.92 <= cov <= 0.98, cov
    if method == "cv":  # it stays honest by falling back to naive on the heavy tail
        assert repeats[HEAVY]["fallback"] > 0.9


def test_k3_interval_fails_on_heavy_tail(repeats):
    # Documented failure, not a bug to hide: with Q wider than P, w = q/p has infinite
    # variance under P, so k3's sample variance means nothing. DESIGN §3 measured ~80%
    # coverage; this fixture gives ~60%. If this starts passing at 95%, check the fixture.
    cov = coverage(repeats[HEAVY], "k3")
    assert cov < 0.9, cov


# --------------------------------------------------------------------------- merge
BATCH_SIZES = (1, 2, 7, 13, 100, 377)  # odd sizes, 500 in all


@pytest.fixture
def batches():
    gen = torch.Generator().manual_seed(31)
    x = torch.randn(sum(BATCH_SIZES), generator=gen, dtype=torch.float64)
    log_a, log_b = Normal(0.0, 1.0).log_prob(x), Normal(0.3, 1.0).log_prob(x)
    log_a[[5, 250]] = float("nan")  # non-finite samples are counted across merges too
    return list(zip(log_a.split(BATCH_SIZES), log_b.split(BATCH_SIZES), strict=True)), (
        log_a, log_b)


def _fields(stats: KLStats, method: str) -> dict:
    if method == "iw":
        est = stats.importance_weighted_reverse()
        names = ("value", "stderr", "ess", "n", "tail_index")
    else:
        est = stats.estimate(method)
        names = ("value", "stderr", "n", "c", "variance_reduction", "tail_index",
                 "method_used", "nonfinite", "support_violations", "clipped")
    return {k: getattr(est, k) for k in names}


def _assert_same(a: dict, b: dict) -> None:
    for k, va in a.items():
        vb = b[k]
        if isinstance(va, float) and math.isnan(va):
            assert math.isnan(vb), k
        elif isinstance(va, float):
            assert math.isclose(va, vb, rel_tol=1e-10, abs_tol=1e-10), (k, va, vb)
        else:
            assert va == vb, (k, va, vb)


@pytest.mark.parametrize("method", ["naive", "k3", "cv", "iw"])
def test_merge_equals_concatenation(batches, method):
    parts, (log_a, log_b) = batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN samples warn once
        whole = KLStats().update(log_a, log_b)
        singles = [KLStats().update(a, b) for a, b in parts]
        by_update = KLStats()
        for a, b in parts:
            assert by_update.update(a, b) is by_update
    by_merge = singles[0]
    for s in singles[1:]:
        by_merge = by_merge.merge(s)
    by_plus = sum(singles[1:], singles[0])
    tree = (singles[5] + singles[0]) + ((singles[3] + singles[1]) + (singles[4] + singles[2]))
    ref = _fields(whole, method)
    assert whole.n == 498
    if method == "cv":
        assert ref["method_used"] == "cv"  # the fixture exercises the control variate
    for other in (by_update, by_merge, by_plus, tree):
        assert other.n == whole.n
        _assert_same(ref, _fields(other, method))
    torch.testing.assert_close(tree.top_log_w, whole.top_log_w, rtol=0, atol=0)


def test_merge_does_not_change_its_inputs(batches):
    parts, _ = batches
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a, b = KLStats().update(*parts[4]), KLStats().update(*parts[5])
    sums_a, top_a, counts_a = a.sums.clone(), a.top_log_w.clone(), a.counts.clone()
    merged = a + b
    assert merged.n == a.n + b.n
    assert torch.equal(a.sums, sums_a) and torch.equal(a.top_log_w, top_a)
    assert torch.equal(a.counts, counts_a)


def test_merge_keeps_support_violations_and_clipping():
    a = KLStats().update(torch.zeros(10), torch.full((10,), -0.1))
    b = KLStats().update(torch.tensor([0.0, 0.0]), torch.tensor([-math.inf, 90.0]))
    with pytest.warns(UserWarning, match="clipped"):
        est = (a + b).estimate("cv")
    assert est.value == math.inf and est.support_violations == 1 and est.clipped == 1
    assert est.n == 11 and not math.isnan(est.stderr)
    # IW treats the violation as weight 0 and stays finite
    iw = (a + b).importance_weighted_reverse()
    assert iw.n == 12 and math.isfinite(iw.value)


def test_top_k_is_bounded_and_exact():
    gen = torch.Generator().manual_seed(0)
    ell = torch.randn(3000, generator=gen, dtype=torch.float64)
    stats = KLStats()
    for chunk in ell.split(700):
        stats.update(chunk, torch.zeros_like(chunk))
    assert stats.top_log_w.shape == (TOP_K,)
    torch.testing.assert_close(stats.top_log_w, torch.topk(-ell, TOP_K).values, rtol=0, atol=0)


# --------------------------------------------------------------------------- fallbacks, c
def test_cv_falls_back_when_mean_weight_is_not_one():
    # Q dropped 6 of 8 modes: samples of Q never see P's other modes, so mean(w) = 1/4
    # exactly and Var(w) is rounding noise. Regression: cv used to return ~500 nats
    # here (c fitted to rounding noise times mean(w − 1) = −0.75).
    ell = torch.full((5000,), math.log(4.0), dtype=torch.float64)
    ell = ell + torch.linspace(-1, 1, 5000, dtype=torch.float64) * 1e-15
    stats = KLStats().update(ell, torch.zeros_like(ell))
    assert stats.optimal_c() == 0.0  # Var(w − 1) = 0: c is undefined, not 1469
    est = stats.estimate("cv")
    assert est.method_used == "naive" and est.value == pytest.approx(math.log(4.0), abs=1e-12)


def test_cv_falls_back_for_unnormalised_b():
    # B = Q·e^{0.5}: E_A[w] = e^{0.5} ≠ 1, so (w − 1) is no zero-mean control variate.
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(5000, generator=gen, dtype=torch.float64)
    log_a, log_b = Normal(0.0, 1.0).log_prob(x), Normal(0.1, 1.0).log_prob(x) + 0.5
    est = mc_kl(log_a, log_b)
    naive = mc_kl(log_a, log_b, "naive")
    assert est.method_used == "naive" and est.value == naive.value
    assert est.value == pytest.approx(0.005 - 0.5, abs=4 * naive.stderr)


def test_cv_falls_back_on_heavy_tail_and_uses_cv_on_light():
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4000, generator=gen, dtype=torch.float64)
    lp = Normal(0.0, 1.0).log_prob(x)
    heavy = mc_kl(lp, Normal(0.0, 2.0).log_prob(x))
    assert heavy.tail_index > 0.5 and heavy.method_used == "naive" and heavy.c == 0.0
    light = mc_kl(lp, Normal(0.1, 1.0).log_prob(x))
    assert light.tail_index < 0.5 and light.method_used == "cv"
    assert light.variance_reduction > 50  # DESIGN §3: (0.0032 / 0.0002)² ≈ 250
    # a fixed c disables the fallback
    fixed = mc_kl(lp, Normal(0.0, 2.0).log_prob(x), c=-1.0)
    assert fixed.method_used == "cv" and fixed.c == -1.0


def test_columns_are_named_and_derive_the_layout():
    ell = torch.tensor([0.3, -1.2, 2.0, 1e-6], dtype=torch.float64)
    feats, fold, clipped = sample_features(ell)
    assert NCOL == len(COLUMNS) == feats.shape[-1] == KLStats().sums.shape[-1]
    u = torch.expm1(-ell)
    w2 = torch.exp(-2 * ell)
    k3 = ell + u
    expected = {
        "n": torch.ones_like(ell), "l": ell, "ll": ell**2, "u": u, "uu": u**2, "lu": ell * u,
        "ww": w2, "wwl": w2 * ell, "wwll": w2 * ell**2,
        "sss": k3**3, "ssu": k3**2 * u, "suu": k3 * u**2, "uuu": u**3,
    }
    assert set(expected) == set(COLUMNS)
    for name, ref in expected.items():
        torch.testing.assert_close(feats[:, COL[name]], ref, rtol=1e-14, atol=0)
    assert fold.tolist() == [int(f) for f in fold] and not clipped.any()


def test_cv_weight_moves_smoothly_from_k3_to_naive():
    # Same samples, Q = N(μ, 1) from near P to far: λ goes from 1 (the control variate
    # in full) to 0 (naive exactly) continuously, never by a jump.
    gen = torch.Generator().manual_seed(21)
    x = torch.randn(4000, generator=gen, dtype=torch.float64)
    lp = Normal(0.0, 1.0).log_prob(x)
    ests = [mc_kl(lp, Normal(float(mu), 1.0).log_prob(x)) for mu in torch.linspace(0.02, 1.0, 99)]
    lam = [e.cv_weight for e in ests]
    assert lam[0] == 1.0 and lam[-1] == 0.0
    assert max(abs(a - b) for a, b in zip(lam[:-1], lam[1:], strict=True)) < 0.25
    last = ests[-1]
    assert last.method_used == "naive" and last.c == 0.0
    assert last.value == mc_kl(lp, Normal(1.0, 1.0).log_prob(x), "naive").value
    # in between, the interval is widened to the naive/cv mixture's: never narrower than
    # the full control variate's, never far beyond naive's
    for e, mu in zip(ests, torch.linspace(0.02, 1.0, 99), strict=True):
        if 0 < e.cv_weight < 1:
            naive = mc_kl(lp, Normal(float(mu), 1.0).log_prob(x), "naive")
            assert e.stderr <= 1.5 * naive.stderr


def test_iw_reverse_flags_what_it_cannot_trust():
    gen = torch.Generator().manual_seed(22)
    x = torch.randn(5000, generator=gen, dtype=torch.float64)
    lp = Normal(0.0, 1.0).log_prob(x)
    light = iw_reverse_kl(lp, Normal(0.3, 1.0).log_prob(x))
    assert light.reliable and light.reason == "" and abs(light.mean_weight_z) < 3
    heavy = iw_reverse_kl(lp, Normal(0.0, 2.0).log_prob(x))  # w = q/p: ξ = 0.75
    assert not heavy.reliable and "heavy" in heavy.reason
    # Q has half its mass where P's samples never go: mean(w) = 1/2, far from 1
    far = torch.logsumexp(torch.stack((Normal(0.0, 1.0).log_prob(x),
                                       Normal(12.0, 1.0).log_prob(x))), 0) - math.log(2)
    missing = iw_reverse_kl(lp, far)
    assert not missing.reliable and missing.mean_weight_z < -3 and "mean(w)" in missing.reason


def test_pareto_tail_index():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, generator=gen, dtype=torch.float64)
    heavy = 3 * x**2 / 8 - math.log(2)  # log w for Q = N(0, 2²), P = N(0, 1): ξ = 0.75
    light = -x - 0.5  # lognormal weights: ξ = 0 asymptotically
    assert pareto_tail_index(heavy, 4000) > 0.5
    assert pareto_tail_index(light, 4000) < 0.5
    # order does not matter, -inf padding is ignored
    padded = torch.cat((torch.flip(heavy, (0,)), torch.full((50,), -math.inf)))
    assert pareto_tail_index(padded, 4000) == pytest.approx(pareto_tail_index(heavy, 4000))
    assert math.isnan(pareto_tail_index(heavy[:19], 19))
    assert math.isnan(pareto_tail_index(torch.zeros(100, dtype=torch.float64), 100))


def test_same_batch_optimal_c_matches_regression():
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3000, generator=gen, dtype=torch.float64)
    log_a, log_b = Normal(0.0, 1.0).log_prob(x), Normal(1.0, 1.0).log_prob(x)
    ell = log_a - log_b
    u = torch.expm1(-ell)
    c_ref = float(torch.cov(torch.stack((ell, u)))[0, 1] / u.var())
    stats = KLStats().update(log_a, log_b)
    assert stats.optimal_c() == pytest.approx(c_ref, rel=1e-9)
    est = stats.estimate("cv", c=c_ref)
    r = ell - c_ref * u
    assert est.value == pytest.approx(float(r.mean()), rel=1e-10)
    assert est.stderr == pytest.approx(float(r.std() / math.sqrt(3000)), rel=1e-9)
    assert est.variance_reduction == pytest.approx(float(ell.var() / r.var()), rel=1e-9)


def test_single_sample_has_no_nan():
    for method in METHODS:
        est = mc_kl(torch.tensor([0.3]), torch.tensor([0.0]), method)
        assert math.isfinite(est.value) and est.stderr == math.inf
        assert est.variance_reduction == 1.0 and est.n == 1


def test_stats_bad_input():
    with pytest.raises(ValueError, match="no finite samples"):
        KLStats().estimate()
    stats = KLStats().update(torch.zeros(5), torch.zeros(5))
    with pytest.raises(ValueError, match="method"):
        stats.estimate("k2")
    with pytest.raises(ValueError, match="only used by method='cv'"):
        stats.estimate("naive", c=1.0)
    with pytest.raises(ValueError, match=r"\(5,\).*\(4,\)"):
        stats.update(torch.zeros(5), torch.zeros(4))
    with pytest.raises(TypeError, match="log_b"):
        stats.update(torch.zeros(5), torch.zeros(5, dtype=torch.int64))
    with pytest.raises(ValueError, match="empty"):
        stats.update(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="NaN"):
        stats.update(torch.tensor([float("nan")]), torch.zeros(1), nonfinite="raise")
    assert stats.n == 5  # failed updates add nothing
    with pytest.raises(ValueError, match="no finite samples"):
        KLStats().importance_weighted_reverse()


def test_iw_reverse_from_stats_matches_functional():
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(2000, generator=gen, dtype=torch.float64)
    lp, lq = Normal(0.0, 1.0).log_prob(x), Normal(0.4, 1.0).log_prob(x)
    a = iw_reverse_kl(lp, lq)
    b = KLStats().update(lp[:900], lq[:900]).merge(
        KLStats().update(lp[900:], lq[900:])).importance_weighted_reverse()
    assert a.value == pytest.approx(b.value, rel=1e-10) and a.ess == pytest.approx(b.ess)
    # direct self-normalised reference
    w = torch.exp(lq - lp)
    wt = w / w.mean()
    assert a.value == pytest.approx(float((wt * torch.log(wt)).mean()), rel=1e-9)


if __name__ == "__main__":  # print the measured table quoted in reports
    torch.set_num_threads(1)
    data = gaussian_repeats()
    print(f"P = N(0,1), n = {N_PER_ESTIMATE} per estimate, {REPEATS} repeats, seed 2024")
    print(f"{'Q':9} {'true':>6} | {'bias naive':>10} {'bias k3':>9} {'bias cv':>9} | "
          f"{'sd naive':>8} {'sd k3':>8} {'sd cv':>8} | {'mean c':>6} {'λ=0':>6} | "
          "cover naive/k3/cv")
    for name, case in data.items():
        t = case["truth"]
        bias = {m: float(case[m][0].mean()) - t for m in METHODS}
        sd = {m: float(case[m][0].std()) for m in METHODS}
        cov = "/".join(f"{coverage(case, m):.3f}" for m in METHODS)
        print(f"{name:9} {t:6.4f} | {bias['naive']:10.5f} {bias['k3']:9.5f} {bias['cv']:9.5f} | "
              f"{sd['naive']:8.5f} {sd['k3']:8.5f} {sd['cv']:8.5f} | "
              f"{float(case['c'].mean()):6.3f} {case['fallback']:6.3f} | {cov}")
    near = data["N(0.1,1)"]
    print(f"N(0.1,1): sd with fixed c=+1 {float(near['c=+1'].std()):.5f}, "
          f"c=-1 (k3) {float(near['k3'][0].std()):.5f}")

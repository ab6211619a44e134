"""Tests of the functional core (kl_monitor.estimators) against independent references.

References: closed-form Gaussian KL computed with numpy (cross-checked against
``torch.distributions.kl_divergence``), ln(K/m) for mode dropping, the
over-dispersion formulas of DESIGN §8, ``torch.distributions.kl_divergence`` and
``scipy.stats.entropy`` for categoricals. Monte Carlo checks use fixed seeds and
tolerances derived from the reported standard error.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from torch.distributions import Categorical, MultivariateNormal, Normal, kl_divergence

from kl_monitor import categorical_kl, categorical_kl_rows, iw_reverse_kl, mc_kl
from kl_monitor.stats import MAX_LOG_WEIGHT

METHODS = ("naive", "k3", "cv")
INF = float("inf")
NAN = float("nan")


pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- helpers
def gaussian_kl_numpy(mu0, cov0, mu1, cov1) -> float:
    """D(N(mu0, cov0) ‖ N(mu1, cov1)) = ½[tr(Σ1⁻¹Σ0) + ΔμᵀΣ1⁻¹Δμ − d + ln(|Σ1|/|Σ0|)]."""
    mu0, mu1 = np.atleast_1d(np.asarray(mu0, float)), np.atleast_1d(np.asarray(mu1, float))
    cov0, cov1 = np.atleast_2d(np.asarray(cov0, float)), np.atleast_2d(np.asarray(cov1, float))
    d = mu0.size
    inv1 = np.linalg.inv(cov1)
    dm = mu1 - mu0
    _, logdet0 = np.linalg.slogdet(cov0)
    _, logdet1 = np.linalg.slogdet(cov1)
    return 0.5 * (np.trace(inv1 @ cov0) + dm @ inv1 @ dm - d + logdet1 - logdet0)


def assert_within_stderr(est, truth: float, k: float = 4.0) -> None:
    assert math.isfinite(est.value) and 0 < est.stderr < INF, est
    assert abs(est.value - truth) < k * est.stderr, (est, truth)


# A fixed, well-conditioned 3-D pair whose weights have finite variance both ways
# (2Σ_Q⁻¹ − Σ_P⁻¹ ≻ 0 and 2Σ_P⁻¹ − Σ_Q⁻¹ ≻ 0, checked in the test), so that every
# method's standard error means something.
MU_P3 = np.array([0.0, 0.0, 0.0])
COV_P3 = np.array([[1.0, 0.3, 0.1], [0.3, 0.8, -0.2], [0.1, -0.2, 1.2]])
MU_Q3 = np.array([0.3, -0.2, 0.25])
COV_Q3 = np.array([[1.2, 0.1, 0.0], [0.1, 0.9, 0.15], [0.0, 0.15, 1.0]])


def _pair(dim: int):
    if dim == 1:
        mu_p, cov_p, mu_q, cov_q = [0.0], [[1.0]], [0.5], [[1.2**2]]
    else:
        mu_p, cov_p, mu_q, cov_q = MU_P3, COV_P3, MU_Q3, COV_Q3
    p = MultivariateNormal(torch.tensor(mu_p, dtype=torch.float64),
                           torch.tensor(cov_p, dtype=torch.float64))
    q = MultivariateNormal(torch.tensor(mu_q, dtype=torch.float64),
                           torch.tensor(cov_q, dtype=torch.float64))
    return p, q, (mu_p, cov_p, mu_q, cov_q)


# --------------------------------------------------------------------------- Gaussians
def test_gaussian_closed_form_reference_agrees_with_torch():
    # the numpy reference is independent of torch; make sure both agree before using it
    for dim in (1, 3):
        p, q, (mu_p, cov_p, mu_q, cov_q) = _pair(dim)
        assert gaussian_kl_numpy(mu_p, cov_p, mu_q, cov_q) == pytest.approx(
            float(kl_divergence(p, q)), rel=1e-10)
        assert gaussian_kl_numpy(mu_q, cov_q, mu_p, cov_p) == pytest.approx(
            float(kl_divergence(q, p)), rel=1e-10)
    # 1-D textbook value: log(s1/s0) + (s0² + Δμ²)/(2 s1²) − ½
    assert gaussian_kl_numpy(0.0, 1.0, 0.5, 1.44) == pytest.approx(
        math.log(1.2) + (1 + 0.25) / (2 * 1.44) - 0.5, rel=1e-12)


@pytest.mark.parametrize("dim", [1, 3])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("method", METHODS)
def test_mc_kl_gaussian_closed_form(dim, direction, method):
    p, q, (mu_p, cov_p, mu_q, cov_q) = _pair(dim)
    if dim == 3:
        ip, iq = np.linalg.inv(COV_P3), np.linalg.inv(COV_Q3)
        assert np.linalg.eigvalsh(2 * iq - ip).min() > 0
        assert np.linalg.eigvalsh(2 * ip - iq).min() > 0
    torch.manual_seed(100 * dim + (direction == "forward"))
    n = 20_000
    if direction == "forward":  # D(P‖Q) = E_P[log p − log q]: samples of P
        x = p.sample((n,))
        est = mc_kl(p.log_prob(x), q.log_prob(x), method)
        truth = gaussian_kl_numpy(mu_p, cov_p, mu_q, cov_q)
    else:  # D(Q‖P) = E_Q[log q − log p]: samples of Q
        y = q.sample((n,))
        est = mc_kl(q.log_prob(y), p.log_prob(y), method)
        truth = gaussian_kl_numpy(mu_q, cov_q, mu_p, cov_p)
    assert est.n == n and est.method == method
    assert_within_stderr(est, truth)
    assert est.stderr < 0.01  # a loose bound on stderr would make the check above vacuous
    if method == "k3":
        assert est.c == -1.0
    if method == "naive":
        assert est.c == 0.0 and est.variance_reduction == 1.0


def test_mc_kl_float32_inputs_accumulate_in_float64():
    torch.manual_seed(3)
    p, q = Normal(0.0, 1.0), Normal(0.1, 1.0)
    x = p.sample((50_000,))  # float32
    lp, lq = p.log_prob(x), q.log_prob(x)
    assert lp.dtype == torch.float32
    for method in METHODS:
        est32 = mc_kl(lp, lq, method)
        # the same numbers in float64: k3 (ℓ + expm1(−ℓ) ≈ ℓ²/2) would lose ~1e-6 relative
        # accuracy to cancellation if it were computed in float32
        est64 = mc_kl(lp.double(), lq.double(), method)
        assert est32.value == pytest.approx(est64.value, rel=1e-12)
        assert est32.stderr == pytest.approx(est64.stderr, rel=1e-9)
        assert_within_stderr(est32, 0.005)


# --------------------------------------------------------------------------- mixtures
RING_K, RING_R, RING_SIGMA = 8, 10.0, 0.5
_ANGLES = torch.arange(RING_K, dtype=torch.float64) * 2 * math.pi / RING_K
RING_MU = torch.stack((RING_R * torch.cos(_ANGLES), RING_R * torch.sin(_ANGLES)), dim=-1)


def ring_log_density(x: torch.Tensor, modes: list[int], sigma: float) -> torch.Tensor:
    """log of the equal mixture of isotropic N(RING_MU[j], σ²I), j in modes (2-D)."""
    d2 = ((x[:, None, :] - RING_MU[modes][None]) ** 2).sum(-1)
    comp = -d2 / (2 * sigma**2) - math.log(2 * math.pi * sigma**2)
    return torch.logsumexp(comp, dim=-1) - math.log(len(modes))


def ring_sample(n: int, modes: list[int], sigma: float, gen: torch.Generator) -> torch.Tensor:
    j = torch.tensor(modes)[torch.randint(len(modes), (n,), generator=gen)]
    return RING_MU[j] + sigma * torch.randn(n, 2, generator=gen, dtype=torch.float64)


ALL_MODES = list(range(RING_K))
KEPT = [0, 3]


def test_ring_modes_are_well_separated():
    gap = float(torch.linalg.norm(RING_MU[0] - RING_MU[1]))
    assert gap / RING_SIGMA > 15  # cross-mode density ratios are < e^-100: negligible


def test_mode_dropping_reverse_is_log_k_over_m():
    gen = torch.Generator().manual_seed(11)
    y = ring_sample(20_000, KEPT, RING_SIGMA, gen)  # samples of the model Q
    log_q = ring_log_density(y, KEPT, RING_SIGMA)
    log_p = ring_log_density(y, ALL_MODES, RING_SIGMA)
    truth = math.log(RING_K / len(KEPT))
    for method in ("cv", "naive"):
        est = mc_kl(log_q, log_p, method)
        assert abs(est.value - truth) < 0.01, est
        # ℓ is ln 4 at every sample up to rounding, so the stderr is ~0: allow rounding
        assert abs(est.value - truth) <= max(4 * est.stderr, 1e-9), est
    # The default must not use the control variate here: E_Q[p/q] = 1 only through
    # P's mass on the 6 dropped modes, which Q never samples; the sample mean of w is
    # m/K = 0.25, and any c ≠ 0 biases the estimate by c·(m/K − 1).
    assert mc_kl(log_q, log_p).method_used == "naive"
    # k3 forces c = −1 and is therefore off by exactly m/K − 1 (documented trap).
    k3 = mc_kl(log_q, log_p, "k3")
    assert k3.value == pytest.approx(truth + len(KEPT) / RING_K - 1, abs=1e-6)


def test_mode_dropping_forward_is_huge():
    gen = torch.Generator().manual_seed(12)
    x = ring_sample(5_000, ALL_MODES, RING_SIGMA, gen)  # samples of the reference P
    log_p = ring_log_density(x, ALL_MODES, RING_SIGMA)
    log_q = ring_log_density(x, KEPT, RING_SIGMA)
    assert torch.isfinite(log_q).all()  # logsumexp keeps log q finite
    for method in METHODS:
        est = mc_kl(log_p, log_q, method)
        assert math.isfinite(est.value) and est.value > 10, est
        assert est.support_violations == 0
    # The same Q evaluated naively in float32: q underflows to 0 on the dropped modes.
    sq = ((x.float()[:, None, :] - RING_MU[KEPT].float()[None]) ** 2).sum(-1)
    q_dens = (torch.exp(-sq / (2 * RING_SIGMA**2)) / (2 * math.pi * RING_SIGMA**2)).mean(-1)
    log_q_underflow = torch.log(q_dens)
    assert torch.isinf(log_q_underflow).any()
    for method in METHODS:
        est = mc_kl(log_p.float(), log_q_underflow, method)
        assert est.value == INF and est.support_violations > 0, est
        assert est.support_violations == int(torch.isinf(log_q_underflow).sum())
        assert not math.isnan(est.stderr)


def test_over_dispersion_formulas_hold_per_component():
    # Independent check of DESIGN §8 for isotropic 2-D components: the d/2 factor
    # cancels the ½ of the per-dimension formula.
    for f in (0.7, 1.3, 2.0):
        s = RING_SIGMA
        cov_p, cov_q = s**2 * np.eye(2), (f * s) ** 2 * np.eye(2)
        assert gaussian_kl_numpy([0, 0], cov_q, [0, 0], cov_p) == pytest.approx(
            f**2 - 1 - 2 * math.log(f), rel=1e-12)
        assert gaussian_kl_numpy([0, 0], cov_p, [0, 0], cov_q) == pytest.approx(
            1 / f**2 - 1 + 2 * math.log(f), rel=1e-12)


@pytest.mark.parametrize("f", [1.3, 2.0])
def test_over_dispersion(f):
    gen = torch.Generator().manual_seed(int(100 * f))
    n = 20_000
    # reverse D(Q‖P) on samples of Q (σ_Q = f·σ_P): w = p/q is bounded, but at these
    # KLs (0.17, 1.6) the control variate's gain is too small to be worth its risk
    y = ring_sample(n, ALL_MODES, f * RING_SIGMA, gen)
    log_q_y, log_p_y = (ring_log_density(y, ALL_MODES, s * RING_SIGMA) for s in (f, 1.0))
    rev = mc_kl(log_q_y, log_p_y)
    assert_within_stderr(rev, f**2 - 1 - 2 * math.log(f))
    assert rev.cv_weight < 1
    if rev.cv_weight == 0:
        assert rev.method_used == "naive" and rev.value == mc_kl(log_q_y, log_p_y, "naive").value
    # forward D(P‖Q) on samples of P
    x = ring_sample(n, ALL_MODES, RING_SIGMA, gen)
    fwd = mc_kl(ring_log_density(x, ALL_MODES, RING_SIGMA),
                ring_log_density(x, ALL_MODES, f * RING_SIGMA))
    assert_within_stderr(fwd, 1 / f**2 - 1 + 2 * math.log(f))
    if f == 2.0:
        # w = q/p has tail index 1 − 1/f² = 0.75: Var(w) = ∞, cv must fall back
        assert fwd.method_used == "naive" and fwd.tail_index > 0.5
    assert rev.value > 0 and fwd.value > 0


# --------------------------------------------------------------------------- importance weighting
@pytest.mark.parametrize("dim", [1, 3])
def test_iw_reverse_kl_closed_form(dim):
    p, q, (mu_p, cov_p, mu_q, cov_q) = _pair(dim)
    torch.manual_seed(7 + dim)
    n = 40_000
    x = p.sample((n,))  # samples of P only
    est = iw_reverse_kl(p.log_prob(x), q.log_prob(x))
    truth = gaussian_kl_numpy(mu_q, cov_q, mu_p, cov_p)  # D(Q‖P)
    assert_within_stderr(est, truth)
    assert est.stderr < 0.03
    assert est.n == n
    assert 0 < est.ess < n  # mismatch: weights unequal
    # ESS matches its definition (Σw)²/Σw², computed independently
    w = torch.exp(q.log_prob(x) - p.log_prob(x))
    assert est.ess == pytest.approx(float(w.sum() ** 2 / (w**2).sum()), rel=1e-9)


def test_iw_reverse_kl_equal_distributions():
    torch.manual_seed(0)
    x = torch.randn(1000, dtype=torch.float64)
    lp = Normal(0.0, 1.0).log_prob(x)
    est = iw_reverse_kl(lp, lp.clone())
    assert est.value == pytest.approx(0.0, abs=1e-12)
    assert est.ess == pytest.approx(1000.0)


# --------------------------------------------------------------------------- categorical
def _softmax64(logits: torch.Tensor) -> np.ndarray:
    return torch.softmax(logits.double(), dim=-1).numpy()


def _scipy_rows(lp: torch.Tensor, lq: torch.Tensor):
    p, q = _softmax64(lp).reshape(-1, lp.shape[-1]), _softmax64(lq).reshape(-1, lq.shape[-1])
    fwd = np.array([scipy.stats.entropy(a, b) for a, b in zip(p, q, strict=True)])
    rev = np.array([scipy.stats.entropy(b, a) for a, b in zip(p, q, strict=True)])
    hp = np.array([scipy.stats.entropy(a) for a in p])
    hq = np.array([scipy.stats.entropy(b) for b in q])
    shape = lp.shape[:-1]
    return tuple(torch.from_numpy(v.reshape(shape)) for v in (fwd, rev, hp, hq))


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(5)
    lp = 2.0 * torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    lq = lp + 1.5 * torch.randn(3, 5, 11, generator=g, dtype=torch.float64)
    mask = torch.rand(3, 5, generator=g) > 0.3
    mask[0, 0] = False
    return lp, lq, mask


def test_categorical_matches_torch_and_scipy(logits):
    lp, lq, _ = logits
    out = categorical_kl(lp, lq, reduction="none")
    ref_f = kl_divergence(Categorical(logits=lp), Categorical(logits=lq))
    ref_r = kl_divergence(Categorical(logits=lq), Categorical(logits=lp))
    sf, sr, hp, hq = _scipy_rows(lp, lq)
    torch.testing.assert_close(out.forward, ref_f, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.reverse, ref_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.forward, sf, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.reverse, sr, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.entropy_reference, hp, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.entropy_model, hq, rtol=1e-10, atol=1e-12)
    assert out.forward.dtype == torch.float64  # float64 in, float64 out
    assert out.n == 15 and out.support_violations == 0 and out.nonfinite == 0
    assert not torch.allclose(out.forward, out.reverse)  # the two directions differ


def test_categorical_reductions_with_mask(logits):
    lp, lq, mask = logits
    sf, sr, hp, hq = _scipy_rows(lp, lq)
    zero = torch.zeros((), dtype=torch.float64)
    none = categorical_kl(lp, lq, mask, reduction="none")
    torch.testing.assert_close(none.forward, torch.where(mask, sf, zero))
    torch.testing.assert_close(none.reverse, torch.where(mask, sr, zero))
    torch.testing.assert_close(none.entropy_reference, torch.where(mask, hp, zero))
    torch.testing.assert_close(none.entropy_model, torch.where(mask, hq, zero))
    assert none.n == int(mask.sum())

    mean = categorical_kl(lp, lq, mask, reduction="mean")
    assert mean.forward.shape == () and mean.reduction == "mean"
    torch.testing.assert_close(mean.forward, sf[mask].mean())
    torch.testing.assert_close(mean.reverse, sr[mask].mean())

    total = categorical_kl(lp, lq, mask, reduction="sum")  # per-sequence sum over seq
    assert total.forward.shape == (3,)
    torch.testing.assert_close(total.forward, torch.where(mask, sf, zero).sum(-1))
    torch.testing.assert_close(total.reverse, torch.where(mask, sr, zero).sum(-1))

    # an all-True mask is the same as no mask
    full = categorical_kl(lp, lq, torch.ones_like(mask), reduction="mean")
    torch.testing.assert_close(full.forward, sf.mean())


def test_categorical_banned_tokens_and_support_violations():
    ninf = -INF
    lp = torch.tensor([
        [0.0, 1.0, ninf, 0.5],    # both ban class 2: finite both ways
        [0.0, 1.0, 0.3, 0.5],     # q bans class 2 where p has mass: forward = +inf
        [0.0, ninf, 0.3, 0.5],    # p bans class 1 where q has mass: reverse = +inf
        [2.0, ninf, ninf, ninf],  # p is a point mass, q allows more: reverse = +inf
    ], dtype=torch.float64)
    lq = torch.tensor([
        [0.5, 0.0, ninf, -1.0],
        [0.5, 0.0, ninf, -1.0],
        [0.5, 0.0, 0.3, -1.0],
        [0.0, 0.0, ninf, ninf],
    ], dtype=torch.float64)
    for dtype in (torch.float64, torch.float32):
        out = categorical_kl(lp.to(dtype), lq.to(dtype), reduction="none")
        for t in (out.forward, out.reverse, out.entropy_reference, out.entropy_model):
            assert not torch.isnan(t).any(), out
        sf, sr, hp, hq = _scipy_rows(lp, lq)
        ref_f = kl_divergence(Categorical(logits=lp), Categorical(logits=lq))
        assert torch.equal(torch.isinf(out.forward), torch.tensor([False, True, False, False]))
        assert torch.equal(torch.isinf(out.reverse), torch.tensor([False, False, True, True]))
        assert (out.forward[torch.isinf(out.forward)] > 0).all()
        tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else {}
        torch.testing.assert_close(out.forward.double(), sf, **tol)
        torch.testing.assert_close(out.forward.double(), ref_f, **tol)
        torch.testing.assert_close(out.reverse.double(), sr, **tol)
        torch.testing.assert_close(out.entropy_reference.double(), hp, **tol)
        torch.testing.assert_close(out.entropy_model.double(), hq, **tol)
        assert out.support_violations == 3 and out.nonfinite == 0 and out.n == 4
        mean = categorical_kl(lp.to(dtype), lq.to(dtype))
        assert mean.forward == INF and mean.reverse == INF
        # masking the violating rows gives finite means again
        keep = torch.tensor([True, False, False, False])
        masked = categorical_kl(lp.to(dtype), lq.to(dtype), keep)
        assert masked.support_violations == 0
        assert float(masked.forward) == pytest.approx(float(sf[0]), rel=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_categorical_half_precision_inputs(dtype, tol):
    g = torch.Generator().manual_seed(9)
    lp = 3.0 * torch.randn(4, 6, 50, generator=g, dtype=torch.float64)
    lq = lp + torch.randn(4, 6, 50, generator=g, dtype=torch.float64)
    lq[..., :3] = -INF  # banned tokens survive the cast
    lp[..., :3] = -INF
    out = categorical_kl(lp.to(dtype), lq.to(dtype), reduction="none")
    for t in (out.forward, out.reverse, out.entropy_reference, out.entropy_model):
        assert t.dtype == torch.float32
        assert torch.isfinite(t).all()
    # Computed in float32: against float64 math on the same (rounded) logits the
    # only error is float32 rounding, far below half precision.
    lp_r, lq_r = lp.to(dtype).double(), lq.to(dtype).double()
    ref_f = kl_divergence(Categorical(logits=lp_r), Categorical(logits=lq_r))
    ref_r = kl_divergence(Categorical(logits=lq_r), Categorical(logits=lp_r))
    torch.testing.assert_close(out.forward.double(), ref_f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.reverse.double(), ref_r, rtol=1e-5, atol=1e-5)
    # Against the exact float64 answer the error is that of rounding the logits.
    exact = categorical_kl(lp, lq, reduction="none")
    err = (out.forward.double() - exact.forward).abs().max()
    assert err < tol * (1 + exact.forward.abs().max()), err
    h_err = (out.entropy_reference.double() - exact.entropy_reference).abs().max()
    assert h_err < tol * (1 + exact.entropy_reference.abs().max())
    # the reductions keep float32 too
    assert categorical_kl(lp.to(dtype), lq.to(dtype)).forward.dtype == torch.float32


def test_categorical_chunking_does_not_change_results(logits):
    lp, lq, mask = logits
    lp32, lq32 = lp.float(), lq.float()
    lp32[1, 2, 4] = -INF
    lq32[2, 3, :] = NAN  # an invalid row inside some chunk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = categorical_kl(lp32, lq32, mask, reduction="none")
        for rows in (1, 7, 15, 1000):  # 15 rows: 7 leaves a remainder chunk
            out = categorical_kl(lp32, lq32, mask, reduction="none", chunk_rows=rows)
            for name in ("forward", "reverse", "entropy_reference", "entropy_model"):
                torch.testing.assert_close(getattr(out, name), getattr(ref, name))
            assert (out.n, out.nonfinite, out.support_violations) == (
                ref.n, ref.nonfinite, ref.support_violations)
    # wide rows: the default splits these into several chunks
    g = torch.Generator().manual_seed(1)
    wide_p = torch.randn(10, 1 << 16, generator=g)
    wide_q = torch.randn(10, 1 << 16, generator=g)
    one = categorical_kl(wide_p, wide_q, reduction="none", chunk_rows=10)
    default = categorical_kl(wide_p, wide_q, reduction="none")
    torch.testing.assert_close(default.forward, one.forward)
    torch.testing.assert_close(default.reverse, one.reverse)
    ref_f = kl_divergence(Categorical(logits=wide_p.double()), Categorical(logits=wide_q.double()))
    torch.testing.assert_close(default.forward.double(), ref_f, rtol=1e-4, atol=1e-5)


def test_categorical_nonfinite_rows():
    lp = torch.tensor([[0.0, 1.0], [NAN, 0.0], [INF, 0.0], [-INF, -INF], [0.3, 0.1]])
    lq = torch.zeros(5, 2)
    with pytest.warns(UserWarning, match="dropped"):
        out = categorical_kl(lp, lq, reduction="none")
    assert out.nonfinite == 3 and out.n == 2
    assert torch.isfinite(out.forward).all() and (out.forward[1:4] == 0).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time: no warning
        mean = categorical_kl(lp, lq)
    expected = (float(categorical_kl(lp[[0]], lq[[0]]).forward)
                + float(categorical_kl(lp[[4]], lq[[4]]).forward)) / 2
    assert float(mean.forward) == pytest.approx(expected, rel=1e-6)
    # masked-out bad rows are not counted
    mask = torch.tensor([True, False, False, False, True])
    assert categorical_kl(lp, lq, mask).nonfinite == 0
    with pytest.raises(ValueError, match="NaN"):
        categorical_kl(lp, lq, nonfinite="raise")


def _support_reference(lp: torch.Tensor, lq: torch.Tensor):
    """Shared-support KLs and outside masses per row, in float64 with numpy/scipy.

    S = {k: both logits finite}; p̃ = p[S] / p(S), q̃ = q[S] / q(S);
    forward_shared = D(p̃‖q̃), reverse_shared = D(q̃‖p̃) (+inf when S is empty);
    reference_mass_outside = p(k: q_k = 0), model_mass_outside = q(k: p_k = 0).
    """
    x, y = lp.double().numpy(), lq.double().numpy()
    out = {name: [] for name in ("fs", "rs", "mp", "mq")}
    for a, b in zip(x, y, strict=True):
        p, q = np.exp(a - a.max()), np.exp(b - b.max())
        p, q = p / p.sum(), q / q.sum()
        fin_a, fin_b = np.isfinite(a), np.isfinite(b)
        shared = fin_a & fin_b
        out["mp"].append(p[~fin_b].sum())
        out["mq"].append(q[~fin_a].sum())
        if shared.any():
            # scipy.stats.entropy renormalises its arguments: exactly p̃ and q̃
            out["fs"].append(scipy.stats.entropy(p[shared], q[shared]))
            out["rs"].append(scipy.stats.entropy(q[shared], p[shared]))
        else:
            out["fs"].append(INF)
            out["rs"].append(INF)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in out.items()}


def _support_case():
    g = torch.Generator().manual_seed(21)
    lp = 2.0 * torch.randn(7, 40, generator=g, dtype=torch.float64)
    lq = lp + torch.randn(7, 40, generator=g, dtype=torch.float64)
    lp[1, :5] = -INF             # the reference forbids 5 tokens; the model leaks there
    lq[2, 3:9] = -INF            # the model forbids tokens the reference allows
    lp[3, :4] = -INF
    lq[3, 2:10] = -INF           # both, overlapping
    lp[4, :3] = -INF
    lq[4, :3] = -INF             # both forbid the same tokens: no mismatch
    lp[5, :20] = -INF
    lq[5, 20:] = -INF            # disjoint supports: S is empty
    lp[6, 0] = 30.0              # the reference's top token is forbidden by the model,
    lq[6, 0] = -INF              # so P(S) is tiny: renormalising must not underflow
    return lp, lq


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_categorical_support_mismatch_against_float64(dtype):
    lp, lq = _support_case()
    lp, lq = lp.to(dtype), lq.to(dtype)
    ref = _support_reference(lp, lq)  # float64 on the same (rounded) values
    rows = categorical_kl_rows(lp, lq, support=True)
    tol = {} if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-6)
    for got, want in ((rows.forward_shared, ref["fs"]), (rows.reverse_shared, ref["rs"]),
                      (rows.reference_mass_outside, ref["mp"]),
                      (rows.model_mass_outside, ref["mq"])):
        assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(got.double(), want, **tol)
    # the mass outside the other side's support is exactly what makes a direction +inf
    assert torch.equal(torch.isinf(rows.forward), rows.reference_mass_outside > 0)
    assert torch.equal(torch.isinf(rows.reverse), rows.model_mass_outside > 0)
    assert bool(torch.isfinite(rows.forward_shared[:5]).all())
    assert rows.forward_shared[5] == INF and rows.reverse_shared[5] == INF
    # rows 0 and 4 share their whole support: the shared KL is the KL
    for i in (0, 4):
        assert rows.forward_shared[i] == rows.forward[i]
        assert rows.model_mass_outside[i] == 0 and rows.reference_mass_outside[i] == 0
    # the first five fields are the plain call's
    plain = categorical_kl_rows(lp, lq)
    for a, b in zip(plain, rows[:5], strict=True):
        assert torch.equal(a, b)


def test_categorical_support_fields_reduced_like_the_kl():
    lp, lq = _support_case()
    lp, lq = lp[:5].reshape(1, 5, 40), lq[:5].reshape(1, 5, 40)
    ref = {k: v.reshape(1, 5) for k, v in _support_reference(lp[0], lq[0]).items()}
    mask = torch.tensor([[True, True, False, True, True]])
    none = categorical_kl(lp, lq, mask, reduction="none")
    mean = categorical_kl(lp, lq, mask)
    total = categorical_kl(lp, lq, mask, reduction="sum")
    zero = torch.zeros((), dtype=torch.float64)
    for name, key in (("forward_shared", "fs"), ("reverse_shared", "rs"),
                      ("reference_mass_outside", "mp"), ("model_mass_outside", "mq")):
        want = torch.where(mask, ref[key], zero)
        torch.testing.assert_close(getattr(none, name), want)
        torch.testing.assert_close(getattr(mean, name), want.sum() / 4)
        torch.testing.assert_close(getattr(total, name), want.sum(-1))
    # the reference forbids tokens the model uses in row 1: reverse is +inf, the shared
    # reverse KL and the leaked mass say how much
    assert mean.reverse == INF and math.isfinite(float(mean.reverse_shared))
    assert float(mean.model_mass_outside) > 0


def test_categorical_without_minus_inf_support_fields_cost_nothing():
    g = torch.Generator().manual_seed(3)
    lp, lq = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    rows = categorical_kl_rows(lp, lq, support=True)
    assert torch.equal(rows.forward_shared, rows.forward)
    assert torch.equal(rows.reverse_shared, rows.reverse)
    assert not rows.reference_mass_outside.any() and not rows.model_mass_outside.any()


def test_categorical_all_rows_masked():
    lp, lq = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    nothing = torch.zeros(2, 3, dtype=torch.bool)
    # a mean over zero rows is no number: the same error as CategoricalKL.compute()
    with pytest.raises(ValueError, match="no rows were counted.*`mask`"):
        categorical_kl(lp, lq, nothing)
    # per row and per sequence, zero rows are well defined: zeros, n = 0
    rows = categorical_kl(lp, lq, nothing, reduction="none")
    seqs = categorical_kl(lp, lq, nothing, reduction="sum")
    for out in (rows, seqs):
        assert out.n == 0 and not out.forward.any() and not out.reverse.any()
    assert seqs.forward.shape == (2,)
    # every row dropped as non-finite: the same error, naming how many were dropped
    bad = torch.full((2, 5), NAN)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="2 non-finite rows dropped"):
            categorical_kl(bad, bad)
    # the kernel has no mask: it flags the rows invalid and gives zeros, never a mean
    fwd, rev, _, _, valid = categorical_kl_rows(bad, bad)
    assert not valid.any() and not fwd.any() and not rev.any()
    from kl_monitor.metrics import CategoricalKL

    metric = CategoricalKL()
    metric.update(lp, lq, nothing)
    with pytest.raises(ValueError, match="no rows were counted"):
        metric.compute()


def test_categorical_worker_threads_are_invisible():
    """Chunks run in worker threads: same bits for any thread count, the caller's
    thread count restored, and inference-mode inputs (Lightning's validation) work."""
    g = torch.Generator().manual_seed(8)
    lp = torch.randn(40, 3000, generator=g)
    lq = lp + torch.randn(40, 3000, generator=g)
    lp[3, :7] = -INF
    base = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(categorical_kl_rows(lp, lq, support=True))
            assert torch.get_num_threads() == threads
        for other in results[1:]:
            for a, b in zip(results[0], other, strict=True):
                assert torch.equal(a, b)
        with torch.inference_mode():
            x, y = lp.clone(), lq.clone()
            out = categorical_kl(x, y, reduction="none")
        assert torch.equal(out.forward, results[0].forward)
    finally:
        torch.set_num_threads(base)
    ref = kl_divergence(Categorical(logits=lp.double()), Categorical(logits=lq.double()))
    torch.testing.assert_close(results[0].forward.double(), ref, rtol=1e-5, atol=1e-6)


def test_categorical_fused_falls_back_to_eager(monkeypatch):
    import kl_monitor.categorical as cat

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(cat, "_COMPILED", {})
    monkeypatch.setattr(cat, "_FUSED_FAILED", set())
    monkeypatch.setattr("kl_monitor._utils._WARNED", set())
    lp, lq = torch.randn(4, 9), torch.randn(4, 9)
    with pytest.warns(UserWarning, match="could not be compiled.*no compiler here"):
        out = categorical_kl(lp, lq, reduction="none", fused=True)
    eager = categorical_kl(lp, lq, reduction="none")
    assert torch.equal(out.forward, eager.forward) and torch.equal(out.reverse, eager.reverse)
    with pytest.raises(TypeError, match="`fused`"):
        categorical_kl(lp, lq, fused="yes")


def test_categorical_fused_matches_float64():
    """The compiled kernel (one compilation, a few seconds to tens of seconds under load)
    against float64, with -inf, NaN and bf16 rows: the same numbers as the eager path."""
    g = torch.Generator().manual_seed(4)
    lp = 2.0 * torch.randn(6, 700, generator=g, dtype=torch.float64)
    lq = lp + 0.05 * torch.randn(6, 700, generator=g, dtype=torch.float64)
    lp[1, :10] = -INF
    lq[2, 5] = -INF
    lq[4, 0] = NAN
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the NaN row's drop warning
        for dtype in (torch.float32, torch.bfloat16):
            x, y = lp.to(dtype), lq.to(dtype)
            fused = categorical_kl_rows(x, y, fused=True, support=True)
            eager = categorical_kl_rows(x, y, support=True)
            ref = _scipy_rows(x.double()[[0, 3, 5]], y.double()[[0, 3, 5]])
            assert torch.equal(fused.valid, eager.valid) and not fused.valid[4]
            for a, b in zip(fused, eager, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
            for got, want in zip(fused[:4], ref, strict=True):
                torch.testing.assert_close(got[[0, 3, 5]].double(), want, rtol=1e-4, atol=1e-7)


# --------------------------------------------------------------------------- properties
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
moderate = st.floats(-30.0, 30.0, allow_nan=False)
PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def logit_pairs(draw, elements=moderate, allow_banned=True):
    rows, k = draw(st.integers(1, 5)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    a = draw(arrays(dtype, (rows, k), elements=elements))
    b = draw(arrays(dtype, (rows, k), elements=elements))
    if allow_banned and k > 1:  # ban a shared class in some rows (never a whole row)
        banned = draw(arrays(np.bool_, (rows,)))
        a[banned, 0] = -np.inf
        b[banned, 0] = -np.inf
    return torch.from_numpy(a), torch.from_numpy(b)


@PROPS
@given(logit_pairs())
def test_prop_categorical_self_kl_is_zero(pair):
    lp, _ = pair
    out = categorical_kl(lp, lp.clone(), reduction="none")
    assert out.forward.abs().max() <= 1e-6 and out.reverse.abs().max() <= 1e-6
    assert out.support_violations == 0


@PROPS
@given(logit_pairs(), st.floats(-100, 100), st.floats(-100, 100))
def test_prop_categorical_nonnegative_and_shift_invariant(pair, shift_p, shift_q):
    lp, lq = pair
    out = categorical_kl(lp, lq, reduction="none")
    assert (out.forward >= -1e-6).all() and (out.reverse >= -1e-6).all()
    assert torch.isfinite(out.forward).all() and torch.isfinite(out.reverse).all()
    shifted = categorical_kl(lp + shift_p, lq + shift_q, reduction="none")
    # float32 logits of size ~130 carry ~1e-5 absolute rounding
    atol = 1e-9 if lp.dtype == torch.float64 else 2e-4
    torch.testing.assert_close(shifted.forward, out.forward, rtol=1e-4, atol=atol)
    torch.testing.assert_close(shifted.reverse, out.reverse, rtol=1e-4, atol=atol)


@PROPS
@given(logit_pairs(elements=finite32, allow_banned=False))
def test_prop_categorical_no_nan_for_finite_logits(pair):
    lp, lq = pair
    out = categorical_kl(lp, lq, reduction="none")
    for t in (out.forward, out.reverse, out.entropy_reference, out.entropy_model):
        assert not torch.isnan(t).any()
    assert (out.entropy_reference >= -1e-4).all() and out.nonfinite == 0


@PROPS
@given(st.lists(moderate, min_size=1, max_size=50))
def test_prop_mc_kl_of_identical_densities_is_zero(values):
    log_a = torch.tensor(values, dtype=torch.float64)
    for method in METHODS:
        est = mc_kl(log_a, log_a.clone(), method)
        assert est.value == 0.0 and not math.isnan(est.stderr)
        if len(values) > 1:
            assert est.stderr == 0.0


@PROPS
@given(st.lists(st.floats(-50, 50), min_size=1, max_size=50))
def test_prop_k3_term_is_nonnegative(ells):
    ell = torch.tensor(ells, dtype=torch.float64)
    zero = torch.zeros_like(ell)
    for i in range(min(len(ells), 5)):  # one sample: the per-sample term ℓ + expm1(−ℓ)
        est = mc_kl(ell[i:i + 1], zero[i:i + 1], "k3")
        assert est.value >= 0.0
        ulps = 4 * 2.0**-52 * max(abs(ells[i]), abs(math.expm1(-ells[i])))
        assert est.value == pytest.approx(ells[i] + math.expm1(-ells[i]), rel=1e-12, abs=ulps)
    assert mc_kl(ell, zero, "k3").value >= 0.0


@PROPS
@given(st.lists(finite32, min_size=1, max_size=40), st.lists(finite32, min_size=1, max_size=40))
def test_prop_mc_kl_no_nan_for_finite_input(a, b):
    n = min(len(a), len(b))
    log_a, log_b = torch.tensor(a[:n]), torch.tensor(b[:n])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # clipping warnings for extreme ratios
        for method in METHODS:
            est = mc_kl(log_a, log_b, method)
            for field in ("value", "stderr", "c", "variance_reduction"):
                assert not math.isnan(getattr(est, field)), (field, est)
            assert est.nonfinite == 0 and est.n == n
        iw = iw_reverse_kl(log_a, log_b)
        assert not math.isnan(iw.value) and not math.isnan(iw.stderr)


# --------------------------------------------------------------------------- bad input
def test_mc_kl_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        mc_kl(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        iw_reverse_kl(torch.zeros(2, 3), torch.zeros(3, 2))


def test_mc_kl_integer_dtype_names_argument():
    with pytest.raises(TypeError, match="log_a"):
        mc_kl(torch.zeros(3, dtype=torch.int64), torch.zeros(3))
    with pytest.raises(TypeError, match="log_b"):
        mc_kl(torch.zeros(3), torch.zeros(3, dtype=torch.int32))
    with pytest.raises(TypeError, match="log_a"):
        mc_kl([0.0, 1.0], torch.zeros(2))


def test_mc_kl_empty_and_unknown_options():
    with pytest.raises(ValueError, match="empty"):
        mc_kl(torch.zeros(0), torch.zeros(0))
    with pytest.raises(ValueError, match="method"):
        mc_kl(torch.zeros(3), torch.zeros(3), "k2")
    with pytest.raises(ValueError, match="nonfinite"):
        mc_kl(torch.zeros(3), torch.zeros(3), nonfinite="ignore")
    with pytest.raises(ValueError, match="only used by method='cv'"):
        mc_kl(torch.zeros(3), torch.zeros(3), "k3", c=-1.0)


def test_mc_kl_nonfinite_skip_counts_excludes_and_warns_once():
    torch.manual_seed(0)
    x = torch.randn(200, dtype=torch.float64)
    log_a, log_b = Normal(0.0, 1.0).log_prob(x), Normal(0.5, 1.0).log_prob(x)
    bad_a, bad_b = log_a.clone(), log_b.clone()
    bad_a[[3, 50]] = NAN
    bad_a[7] = INF
    bad_a[8] = -INF
    bad_b[100] = NAN
    bad_b[101] = INF
    keep = torch.ones(200, dtype=torch.bool)
    keep[[3, 7, 8, 50, 100, 101]] = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [mc_kl(bad_a, bad_b, m) for m in METHODS]
        iw = iw_reverse_kl(bad_a, bad_b)
    ours = [w for w in caught if "NaN or infinite" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    for method, est in zip(METHODS, results, strict=True):
        assert est.nonfinite == 6 and est.n == 194 and est.support_violations == 0
        clean = mc_kl(log_a[keep], log_b[keep], method)
        assert est.value == pytest.approx(clean.value, rel=1e-12)
        assert est.stderr == pytest.approx(clean.stderr, rel=1e-12)
    assert iw.n == 194


def test_mc_kl_nonfinite_raise():
    log_a = torch.tensor([0.0, NAN, 1.0])
    with pytest.raises(ValueError, match="NaN or infinite"):
        mc_kl(log_a, torch.zeros(3), nonfinite="raise")
    with pytest.raises(ValueError, match="NaN or infinite"):
        mc_kl(torch.zeros(3), torch.tensor([0.0, INF, 0.0]), nonfinite="raise")
    # log b = −inf is a support violation, not bad input: reported as +inf, never NaN
    est = mc_kl(torch.zeros(3), torch.tensor([0.0, -INF, 0.0]), nonfinite="raise")
    assert est.value == INF and est.support_violations == 1 and est.nonfinite == 0


def test_mc_kl_all_nonfinite_is_an_error():
    with pytest.warns(UserWarning):
        with pytest.raises(ValueError, match="no finite samples"):
            mc_kl(torch.full((4,), NAN), torch.zeros(4))


def test_categorical_bad_input():
    lp, lq = torch.zeros(2, 3, 4), torch.zeros(2, 3, 4)
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 3, 5\)"):  # class counts differ
        categorical_kl(lp, torch.zeros(2, 3, 5))
    with pytest.raises(ValueError, match="mask"):
        categorical_kl(lp, lq, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        categorical_kl(lp, lq, torch.ones(2, 3))
    with pytest.raises(TypeError, match="mask"):
        categorical_kl(lp, lq, torch.ones(2, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="logits_q"):
        categorical_kl(lp, lq.long())
    with pytest.raises(ValueError, match="empty"):
        categorical_kl(torch.zeros(0, 4), torch.zeros(0, 4))
    with pytest.raises(ValueError, match="reduction"):
        categorical_kl(lp, lq, reduction="max")
    with pytest.raises(ValueError, match="seq"):
        categorical_kl(torch.zeros(3, 4), torch.zeros(3, 4), reduction="sum")


# --------------------------------------------------------------------------- weight overflow
def test_weight_overflow_is_clipped_and_counted():
    torch.manual_seed(4)
    x = torch.randn(500, dtype=torch.float64)
    log_a, log_b = Normal(0.0, 1.0).log_prob(x), Normal(0.3, 1.0).log_prob(x)
    log_b[[10, 20, 30]] = log_a[[10, 20, 30]] + torch.tensor([81.0, 120.0, 700.0])
    with pytest.warns(UserWarning, match="clipped"):
        first = mc_kl(log_a, log_b, "naive")
    results = [first] + [mc_kl(log_a, log_b, m) for m in ("k3", "cv")]
    for est in results:
        assert est.clipped == 3, est
        for field in ("value", "stderr", "c", "variance_reduction"):
            assert math.isfinite(getattr(est, field)), (field, est)
    # log w = 79 is not clipped
    log_b[[10, 20, 30]] = log_a[[10, 20, 30]] + MAX_LOG_WEIGHT - 1
    assert mc_kl(log_a, log_b, "k3").clipped == 0
    iw = iw_reverse_kl(log_a, log_b)
    # three equal weights of e^79 dominate all others: ESS = (3w)²/(3w²) = 3
    assert not math.isnan(iw.value) and iw.ess == pytest.approx(3.0, rel=1e-6)

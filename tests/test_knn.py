"""k-NN KL (``knn_kl``) against closed forms, a brute-force reference and its own jackknife.

Truth: Gaussians, D(N0‖N1) from ``torch.distributions.kl_divergence``; the 8-mode
mixture with 5 modes kept, where D(Q‖P) = ln(8/5) exactly. The brute-force reference
is scipy's ``cKDTree`` plus the formula; the jackknife is checked against actually
deleting each sample and re-estimating.
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.spatial import cKDTree

from kl_monitor import KNNKL, knn_kl
from kl_monitor.knn import group_means

# many small tensor ops: one intra-op thread (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")

MODES, KEPT = 8, (0, 1, 2, 4, 6)
DROPPED = {3, 5, 7}


def _gauss_kl(mu0: torch.Tensor, s0: float, mu1: torch.Tensor, s1: float) -> float:
    d = mu0.numel()
    n0 = torch.distributions.MultivariateNormal(mu0.double(), s0**2 * torch.eye(d).double())
    n1 = torch.distributions.MultivariateNormal(mu1.double(), s1**2 * torch.eye(d).double())
    return float(torch.distributions.kl_divergence(n0, n1))


def _shifted(d: int, n: int, shift: float, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    mu = torch.zeros(d)
    mu[0] = shift
    return torch.randn(n, d, generator=g), mu + torch.randn(n, d, generator=g), mu


def ring(n: int, modes: tuple[int, ...], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of an equal mixture of the given modes of 8 on a radius-4 ring, σ = 0.25."""
    ang = torch.arange(MODES) * 2 * math.pi / MODES
    means = 4 * torch.stack((ang.cos(), ang.sin()), 1)
    lab = torch.tensor(modes)[torch.randint(len(modes), (n,), generator=g)]
    return means[lab] + 0.25 * torch.randn(n, 2, generator=g), lab


def _brute(x: torch.Tensor, y: torch.Tensor, k: int) -> float:
    """D̂(P‖Q) by the Wang–Kulkarni–Verdú formula on scipy k-d tree distances."""
    xa, ya = x.double().numpy(), y.double().numpy()
    rho = cKDTree(xa).query(xa, k + 1)[0][:, k]  # the first neighbour is the point itself
    nu = cKDTree(ya).query(xa, k)[0]
    nu = nu[:, k - 1] if k > 1 else nu
    n, m, d = x.shape[0], y.shape[0], x.shape[1]
    terms = torch.tensor(nu).log() - torch.tensor(rho).log()
    return float(d * terms.mean() + math.log(m / (n - 1)))


@pytest.mark.parametrize("k", [1, 5])
def test_matches_brute_force_reference(k):
    g = torch.Generator().manual_seed(k)
    x, y, _ = _shifted(3, 400, 0.8, g)
    y = y[:350]
    out = knn_kl(x, y, k=k, dtype=torch.float64)
    assert out.forward == pytest.approx(_brute(x, y, k), rel=1e-9, abs=1e-9)
    assert out.reverse == pytest.approx(_brute(y, x, k), rel=1e-9, abs=1e-9)
    assert (out.n, out.m, out.d, out.k, out.ties, out.nonfinite) == (400, 350, 3, k, 0, 0)
    # float32 distances (the default) agree to float32 precision
    f32 = knn_kl(x, y, k=k)
    assert f32.forward == pytest.approx(out.forward, abs=1e-4)


def test_jackknife_equals_deleting_each_sample():
    """The closed-form delete-one jackknife is the one obtained by actually deleting."""
    g = torch.Generator().manual_seed(3)
    x, y, _ = _shifted(2, 40, 0.5, g)
    y = y[:33]
    k = 3
    out = knn_kl(x, y, k=k, dtype=torch.float64)
    for direction in ("forward", "reverse"):
        var = 0.0
        for a, b in ((x, y), (y, x)):
            size = a.shape[0]
            dels = []
            for i in range(size):
                kept = torch.cat((a[:i], a[i + 1:]))
                xi, yi = (kept, b) if a is x else (b, kept)
                dels.append(getattr(knn_kl(xi, yi, k=k, dtype=torch.float64), direction))
            dels = torch.tensor(dels, dtype=torch.float64)
            var += (size - 1) / size * float(((dels - dels.mean()) ** 2).sum())
        assert getattr(out, f"{direction}_stderr") == pytest.approx(math.sqrt(var), rel=1e-9)


@pytest.mark.parametrize("d", [1, 2, 5, 10])
def test_gaussian_estimate_within_its_interval(d):
    """At n = m = 2000, shift 0.5 (KL = 0.125 both ways): truth within 2.5 stderr."""
    g = torch.Generator().manual_seed(100 + d)
    x, y, mu = _shifted(d, 2000, 0.5, g)
    out = knn_kl(x, y)
    assert abs(out.forward - _gauss_kl(torch.zeros(d), 1.0, mu, 1.0)) < 2.5 * out.forward_stderr
    assert abs(out.reverse - _gauss_kl(mu, 1.0, torch.zeros(d), 1.0)) < 2.5 * out.reverse_stderr


@pytest.mark.parametrize("d", [1, 2, 5, 10])
def test_gaussian_coverage_over_200_repeats(d):
    """Nominal 95% intervals at n = m = 300 (shift 0.5, KL = 0.125, also a wider model in d
    ≤ 2) cover the truth in ≥ 90% of 200 repeats (binomial: a true 95% falls below 90%
    with probability < 0.1%), and the jackknife stderr is neither tiny nor absurdly
    conservative against the spread of the estimates (measured 1.2-1.6x)."""
    g = torch.Generator().manual_seed(d)
    mu = torch.zeros(d)
    mu[0] = 0.5
    scale = 1.1 if d <= 2 else 1.0
    truth = (_gauss_kl(torch.zeros(d), 1.0, mu, scale), _gauss_kl(mu, scale, torch.zeros(d), 1.0))
    est, se = [], []
    for _ in range(200):
        x = torch.randn(300, d, generator=g)
        y = mu + scale * torch.randn(300, d, generator=g)
        out = knn_kl(x, y)
        est.append((out.forward, out.reverse))
        se.append((out.forward_stderr, out.reverse_stderr))
    est, se = torch.tensor(est, dtype=torch.float64), torch.tensor(se, dtype=torch.float64)
    covered = ((est - torch.tensor(truth)).abs() < 1.96 * se).double().mean(0)
    assert (covered >= 0.90).all(), covered
    ratio = se.mean(0) / est.std(0)
    assert ((ratio > 0.9) & (ratio < 2.0)).all(), ratio


def test_mode_dropping_reverse_near_log_8_over_5_and_groups_name_the_dropped_modes():
    g = torch.Generator().manual_seed(0)
    x, lab = ring(4000, tuple(range(MODES)), g)
    y, _ = ring(4000, KEPT, g)
    out = knn_kl(x, y)
    assert abs(out.reverse - math.log(8 / 5)) < 3 * out.reverse_stderr + 0.03
    assert out.forward > 2.0  # D(P‖Q) is infinite: no model sample near 3 modes
    fwd_g, n_g, _ = group_means(out.forward_terms, out.forward_valid, lab, MODES)
    assert {g for g in range(MODES) if fwd_g[g] > 2.0} == DROPPED
    assert all(fwd_g[g] < 0.5 for g in KEPT)
    # the model's mass per mode, from each model sample's nearest reference sample
    mass = torch.bincount(lab[out.model_nearest], minlength=MODES) / out.m
    assert {g for g in range(MODES) if mass[g] == 0} == DROPPED
    assert float((n_g / n_g.sum() * fwd_g).sum()) == pytest.approx(out.forward, rel=1e-9)


def test_invariant_to_translation_scaling_and_permutation():
    g = torch.Generator().manual_seed(7)
    x, y, _ = _shifted(4, 600, 0.7, g)
    base = knn_kl(x, y)
    shift = torch.tensor([100.0, -50.0, 3.0, 1e3])
    for xx, yy, tol in (
        (x + shift, y + shift, 2e-3),  # float32 distances after centring
        (x * 1e3, y * 1e3, 1e-4),
        (x * 1e-3, y * 1e-3, 1e-4),
        (x[torch.randperm(600, generator=g)], y[torch.randperm(600, generator=g)], 1e-9),
    ):
        out = knn_kl(xx, yy)
        assert out.forward == pytest.approx(base.forward, abs=tol)
        assert out.reverse == pytest.approx(base.reverse, abs=tol)
        assert out.forward_stderr == pytest.approx(base.forward_stderr, rel=1e-3)


def test_chunks_do_not_change_the_result():
    g = torch.Generator().manual_seed(8)
    x, y, _ = _shifted(3, 300, 0.4, g)
    a, b = knn_kl(x, y), knn_kl(x, y, chunk_rows=7)
    assert (a.forward, a.reverse, a.forward_stderr) == (b.forward, b.reverse, b.forward_stderr)


def test_duplicates_are_counted_never_inf_or_nan():
    g = torch.Generator().manual_seed(9)
    x, y, _ = _shifted(2, 200, 0.5, g)
    x = torch.cat((x, x[:1].repeat(10, 1)))  # 11 identical rows: ρ_5 = 0 for each
    with pytest.warns(UserWarning, match="exact duplicates"):
        out = knn_kl(x, y)
    assert out.ties == 11 and math.isfinite(out.forward) and math.isfinite(out.reverse)
    assert int(out.forward_valid.sum()) == 199 and out.n == 210
    with pytest.raises(ValueError, match="exact duplicates"):
        knn_kl(torch.zeros(50, 2), y)  # a point mass: nothing left to estimate from


def test_nonfinite_rows_are_dropped_and_counted_or_rejected():
    g = torch.Generator().manual_seed(10)
    x, y, _ = _shifted(2, 200, 0.5, g)
    bad = x.clone()
    bad[[3, 17]] = torch.tensor([math.nan, 0.0])
    with pytest.warns(UserWarning, match="NaN"):
        out = knn_kl(bad, y)
    keep = torch.ones(200, dtype=torch.bool)
    keep[[3, 17]] = False
    ref = knn_kl(x[keep], y)
    assert out.nonfinite == 2 and out.n == 198
    assert out.forward == pytest.approx(ref.forward, abs=1e-6)
    assert not out.forward_valid[[3, 17]].any()
    with pytest.raises(ValueError, match="2 rows with NaN"):
        knn_kl(bad, y, nonfinite="raise")


def test_bad_inputs_get_clear_errors():
    x = torch.randn(50, 3)
    with pytest.raises(ValueError, match="d = 2 .* d = 3"):
        knn_kl(x, torch.randn(50, 2))
    with pytest.raises(ValueError, match="at least k \\+ 2 = 7"):
        knn_kl(x, torch.randn(6, 3))
    with pytest.raises(ValueError, match="at least k \\+ 2 = 4"):
        knn_kl(x[:3], torch.randn(50, 3), k=2)
    with pytest.raises(TypeError, match="floating dtype .* torch.int64"):
        knn_kl(torch.randint(5, (50, 3)), x)
    with pytest.raises(ValueError, match="shape \\(n, d\\)"):
        knn_kl(torch.randn(50), torch.randn(50))
    with pytest.raises(TypeError, match="torch.Tensor"):
        knn_kl(x.numpy(), x)
    with pytest.raises(ValueError, match="`k` must be a positive int"):
        knn_kl(x, x, k=0)


def test_metric_union_of_batches_equals_the_function():
    g = torch.Generator().manual_seed(11)
    x, lab = ring(1200, tuple(range(MODES)), g)
    y, _ = ring(900, KEPT, g)
    metric = KNNKL(num_groups=MODES)
    for i in range(3):
        rows = slice(i * 400, (i + 1) * 400)
        metric.update(x[rows], y[i * 300:(i + 1) * 300], lab[rows])
    out = metric.compute()
    ref = knn_kl(x, y)
    assert float(out["forward"]) == pytest.approx(ref.forward, rel=1e-6)
    assert float(out["reverse_stderr"]) == pytest.approx(ref.reverse_stderr, rel=1e-6)
    assert out.estimator == "knn" and out.group_kind == "group"
    for g_ in DROPPED:
        assert float(out[f"reverse_mass/group_{g_}"]) == 0.0
        assert f"reverse/group_{g_}" not in out and float(out[f"forward/group_{g_}"]) > 2.0
    assert sum(float(out[f"reverse_mass/group_{g_}"]) for g_ in KEPT) == pytest.approx(1.0)


def test_metric_automatic_cells_and_the_memory_bound():
    g = torch.Generator().manual_seed(12)
    x, _ = ring(2000, tuple(range(MODES)), g)
    y, _ = ring(2000, KEPT, g)
    metric = KNNKL(num_cells=16, max_samples=1500)
    with pytest.warns(UserWarning, match="max_samples=1500"):
        metric.update(x, y)
    out = metric.compute()
    assert int(out["n"]) == int(out["m"]) == 1500 and int(out["dropped"]) == 1000
    assert out.group_kind == "cell" and metric.centroids.shape == (16, 2)
    ang = torch.arange(MODES) * 2 * math.pi / MODES
    means = 4 * torch.stack((ang.cos(), ang.sin()), 1).double()
    cell_mode = torch.cdist(metric.centroids, means).argmin(1)
    lost = {c for c in range(16) if float(out.get(f"reverse_mass/group_{c}", 1.0)) == 0.0}
    assert {int(cell_mode[c]) for c in lost} == DROPPED
    assert {c for c in range(16) if int(cell_mode[c]) in DROPPED} == lost

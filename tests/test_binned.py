"""Binned KL over k-means cells: against scipy, simulated multinomials and the fixtures.

Truth: ``scipy.stats.entropy`` for the KL between the smoothed histograms; repeated
multinomial draws for the standard errors; the 8-mode ring with 5 modes kept for
the per-cell test; Gaussians for the lower bound (data processing).
"""

from __future__ import annotations

import math

import pytest
import torch
from scipy.stats import entropy
from test_knn import DROPPED, KEPT, MODES, _gauss_kl, ring

from kl_monitor import BinnedKL, binned_kl, fit_cells
from kl_monitor.binned import assign_cells, binned_kl_counts

# many small tensor ops: one intra-op thread (see conftest.single_thread)
pytestmark = pytest.mark.usefixtures("single_thread")


def _ring_means() -> torch.Tensor:
    ang = torch.arange(MODES) * 2 * math.pi / MODES
    return 4 * torch.stack((ang.cos(), ang.sin()), 1).double()


def test_counts_match_scipy_both_directions():
    nc = torch.tensor([10.0, 0.0, 30.0, 60.0])
    mc = torch.tensor([40.0, 5.0, 0.0, 55.0])
    out = binned_kl_counts(nc, mc, smoothing=0.5)
    p, q = (nc.double() + 0.5) / (100 + 2), (mc.double() + 0.5) / (100 + 2)
    assert out.forward == pytest.approx(float(entropy(p.numpy(), q.numpy())), rel=1e-12)
    assert out.reverse == pytest.approx(float(entropy(q.numpy(), p.numpy())), rel=1e-12)
    contrib = out.reference_probs * out.cell_log_ratio
    assert float(contrib.sum()) == pytest.approx(out.forward, rel=1e-12)


def test_stderr_matches_the_spread_of_repeated_multinomials():
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.3, 0.25, 0.2, 0.15, 0.1], dtype=torch.float64)
    q = torch.tensor([0.1, 0.2, 0.2, 0.2, 0.3], dtype=torch.float64)
    n, m, reps = 2000, 1500, 2000
    fw, rv, se_f, se_r = [], [], [], []
    for _ in range(reps):
        nc = torch.bincount(torch.multinomial(p, n, True, generator=g), minlength=5)
        mc = torch.bincount(torch.multinomial(q, m, True, generator=g), minlength=5)
        out = binned_kl_counts(nc, mc)
        fw.append(out.forward)
        rv.append(out.reverse)
        se_f.append(out.forward_stderr)
        se_r.append(out.reverse_stderr)
    # sd of an sd from 2000 draws: 1.6%; 8% is five of those
    for se, est in ((se_f, fw), (se_r, rv)):
        assert float(torch.tensor(se).mean()) == pytest.approx(
            float(torch.tensor(est).std()), rel=0.08
        )


def test_mode_dropping_forward_large_and_cells_name_exactly_the_dropped_modes():
    g = torch.Generator().manual_seed(1)
    x, _ = ring(4000, tuple(range(MODES)), g)
    y, _ = ring(4000, KEPT, g)
    cells = fit_cells(x[:2000], 16)  # held-out reference half
    out = binned_kl(x[2000:], y, cells)
    assert out.forward > 2.0
    assert abs(out.reverse - math.log(8 / 5)) < 3 * out.reverse_stderr + 0.02
    cell_mode = torch.cdist(cells, _ring_means()).argmin(1)
    under = {c for c in range(16) if out.different[c] and out.cell_z[c] < 0}
    assert {int(cell_mode[c]) for c in under} == DROPPED
    assert under == {c for c in range(16) if int(cell_mode[c]) in DROPPED}
    # the kept modes' cells are over-represented (by 8/5), the others, not different
    assert out.ndb == 16 - sum(int(out.cell_z[c].abs() < 1.96) for c in range(16))


def test_binned_is_a_lower_bound_on_gaussians():
    """D over cells ≤ D (data processing); at n = 4000, 16 cells, not above truth + 3 se."""
    g = torch.Generator().manual_seed(2)
    for d in (1, 2, 5):
        mu = torch.zeros(d)
        mu[0] = 1.0
        x = torch.randn(4000, d, generator=g)
        y = mu + torch.randn(4000, d, generator=g)
        out = binned_kl(x[2000:], y[2000:], fit_cells(x[:2000], 16))
        truth = _gauss_kl(torch.zeros(d), 1.0, mu, 1.0)
        assert out.forward < truth + 3 * out.forward_stderr, (d, out.forward, truth)
        assert out.reverse < truth + 3 * out.reverse_stderr, (d, out.reverse, truth)
        assert out.forward > 0.25 * truth  # a useful bound, not 0


def test_cells_are_seeded_and_move_with_translation_and_scaling():
    g = torch.Generator().manual_seed(3)
    x, _ = ring(1000, tuple(range(MODES)), g)
    y, _ = ring(1000, KEPT, g)
    a, b = fit_cells(x, 8, seed=5), fit_cells(x, 8, seed=5)
    assert torch.equal(a, b)
    base = binned_kl(x, y, a)
    shift = torch.tensor([30.0, -7.0])
    for f in (lambda t: t + shift, lambda t: 250.0 * t, lambda t: 1e-3 * t):
        cells = fit_cells(f(x), 8, seed=5)
        out = binned_kl(f(x), f(y), cells)
        assert out.forward == pytest.approx(base.forward, rel=1e-9)
        assert torch.equal(out.model_counts, base.model_counts)
    perm = torch.randperm(1000, generator=g)
    out = binned_kl(x[perm], y[torch.randperm(1000, generator=g)], a)
    assert out.forward == pytest.approx(base.forward, rel=1e-12)


def test_assign_cells_is_exact_and_chunked():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(500, 3, generator=g)
    cells = torch.randn(7, 3, generator=g).double()
    want = torch.cdist(x.double(), cells, compute_mode="donot_use_mm_for_euclid_dist").argmin(1)
    assert torch.equal(assign_cells(x, cells), want)
    assert torch.equal(assign_cells(x, cells, chunk_rows=13), want)


def test_bad_inputs_get_clear_errors():
    x, cells = torch.randn(100, 3), torch.randn(4, 3)
    with pytest.raises(ValueError, match="d = 2 .* d = 3"):
        binned_kl(x, torch.randn(10, 2), cells)
    with pytest.raises(TypeError, match="floating dtype"):
        binned_kl(x, torch.ones(10, 3, dtype=torch.int32), cells)
    with pytest.raises(ValueError, match="3 finite rows; 5 cells"):
        fit_cells(x[:3], 5)
    with pytest.raises(ValueError, match="num_cells"):
        fit_cells(x, 1)
    with pytest.raises(ValueError, match="smoothing"):
        binned_kl(x, x, cells, smoothing=0.0)
    bad = x.clone()
    bad[0, 1] = math.nan
    with pytest.warns(UserWarning, match="NaN"):
        assert binned_kl(bad, x, cells).nonfinite == 1
    with pytest.raises(ValueError, match="1 rows with NaN"):
        binned_kl(bad, x, cells, nonfinite="raise")


def test_metric_fits_cells_once_and_keeps_them_in_its_state_dict():
    g = torch.Generator().manual_seed(5)
    x, _ = ring(3000, tuple(range(MODES)), g)
    y, _ = ring(3000, KEPT, g)
    metric = BinnedKL(num_cells=16)
    metric.update(x, y)
    out = metric.compute()
    ref = binned_kl(x, y, fit_cells(x, 16))
    assert float(out["forward"]) == pytest.approx(ref.forward, rel=1e-12)
    assert int(out["ndb"]) == ref.ndb and out.group_kind == "cell"
    cells = metric.centroids.clone()
    metric.reset()  # the cells are kept across evaluations
    metric.update(x[:100] + 1.0, y[:100])
    metric.compute()
    assert torch.equal(metric.centroids, cells)
    fresh = BinnedKL(num_cells=16)
    fresh.load_state_dict(metric.state_dict())
    assert torch.equal(fresh.centroids, cells)
    with pytest.raises(ValueError, match="16 cells"):
        BinnedKL(num_cells=8).load_state_dict(metric.state_dict())
    for c in range(16):
        lost = float(out[f"reverse_mass/group_{c}"]) == 0.0
        near = int(torch.cdist(cells[c:c + 1], _ring_means()).argmin())
        assert lost == (near in DROPPED)

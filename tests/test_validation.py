"""Fast subset of benchmarks/validation.py: the default's interval covers the truth.

Three pairs from issue 10's table, where the first version's ``cv`` interval covered
0.71–0.87 (bimodal mixture ‖ N(0, 1.6²), Student-t(5) ‖ t(2), Weibull(1.5) ‖ Weibull(2)),
both directions, n = 256 and 1024, 200 repeats each, truths by ``scipy.integrate.quad``.
Tolerances are two Monte Carlo standard errors of a coverage from 200 repeats.
The monitor's path (``SampledKL`` over 8 batches of 512) must give the functional
call's numbers exactly.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import validation  # noqa: E402

from kl_monitor import SampledKL, iw_reverse_kl, mc_kl  # noqa: E402

REPS = 200
MC = 2 * math.sqrt(0.95 * 0.05 / REPS)

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def rows(single_thread):
    return validation.run_all(validation.FAST_PAIRS, (256, 1024), REPS, seed=10)


def _name(row) -> str:
    return f"{row.res.pair} {row.res.direction} n={row.res.n}"


def test_suite_covers_the_issue_pairs(rows):
    assert len(rows) == 12
    names = {r.res.pair for r in rows}
    assert "bimodal ±1.4, σ 0.6 ‖ N(0,1.6²)" in names
    assert "t(5) ‖ t(2)" in names and "Weibull(1.5) ‖ Weibull(2)" in names


def test_default_interval_covers(rows):
    for r in rows:
        cov, naive = r.cov["default"], r.cov["naive"]
        # at least 0.93, or naive's own coverage where the log-ratio's tails hold it lower
        assert cov >= min(0.93, naive) - MC, (_name(r), r.cov)
        assert cov <= 0.97 + MC, (_name(r), r.cov)


def test_default_no_more_biased_and_no_noisier(rows):
    # The default is unbiased by construction (coefficient and weight from the other
    # fold), but where w is heavy-tailed its error is skewed and 200 batches show a mean
    # error of up to 0.4 sd (bimodal ‖ N(0, 1.6²), n = 1024; the full suite lists such
    # rows). It is never more biased than the first version on the same batches.
    for r in rows:
        sd = r.sd["default"]
        tol = 3 * sd / math.sqrt(REPS)
        assert abs(r.bias["default"]) <= abs(r.bias["cv_old"]) + tol, (_name(r), r.bias)
        assert sd <= 1.1 * r.sd["naive"], (_name(r), r.sd)


def test_old_rule_is_what_failed(rows):
    # The benchmark's "cv old" column reproduces the first version's failure on
    # Weibull(1.5) ‖ Weibull(2) at n = 256 (issue 10: 0.87); the default does not share it.
    row = next(r for r in rows if r.res.pair == "Weibull(1.5) ‖ Weibull(2)" and r.res.n == 256)
    assert row.cov["cv_old"] < 0.93 - MC
    assert row.cov["default"] >= 0.93 - MC


def test_iw_reliable_flag_means_what_it_says(rows):
    for r in rows:
        cov_all, reliable, cov_reliable = r.iw
        if reliable >= 0.5:  # enough flagged batches to judge the flag
            assert cov_reliable >= 0.93 - 2 * MC, (_name(r), r.iw)


def test_sampled_path_equals_the_functional_call():
    _, a, b = validation.pairs()[validation.FAST_PAIRS[0]]
    rng = np.random.default_rng(3)
    x = a.sample(rng, (1, 4096))[0]
    la, lb = (torch.from_numpy(np.asarray(f(x), dtype=np.float64)) for f in (a.logpdf, b.logpdf))
    metric = SampledKL()
    for part_a, part_b in zip(la.split(512), lb.split(512), strict=True):
        metric.update(part_a, part_b)
    out = metric.compute()
    est, iw = mc_kl(la, lb), iw_reverse_kl(la, lb)
    assert math.isclose(float(out["forward"]), est.value, rel_tol=1e-12, abs_tol=1e-14)
    assert math.isclose(float(out["forward_stderr"]), est.stderr, rel_tol=1e-9)
    assert math.isclose(float(out["reverse"]), iw.value, rel_tol=1e-10)
    assert float(out["reverse_reliable"]) == float(iw.reliable)

"""Soak, reduced: ``benchmarks/soak.py --fast`` inside the test suite.

300 evaluations per input kind (after 30 warm-up evaluations) in a real training run
with the monitor evaluating every step and logging to TensorBoard and CSV. RSS must not
grow by more than 5% between the first and the last 10% of the evaluations, the live
tensors must not grow after the first third of the run, and the evaluation's CPU time
must not grow. The full soak (5,000 evaluations
per kind) is ``python benchmarks/soak.py``; its figures are in docs/reliability.md.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The CI machine is shared: the thread's CPU time per evaluation moves with the load of
#: other processes (caches, SMT siblings), and a 30-evaluation decile's median moved by
#: up to +66% in one CI run with no trend at all (deciles here, idle: 4.5 to 7.9 ms). A leak
#: that makes evaluations slower (a list scanned every evaluation, a growing state) grows
#: steadily: a robust line fit over the whole run (``SoakResult.cpu_trend``) reads it as its
#: growth, and it shows again in a second run, which a burst of other processes does not.
#: This bound catches growth by half over the run; the benchmark reports the real drift.
TIME_GROWTH = 0.5
#: groups of the soak's sampled input (benchmarks/soak.py: num_groups=8)
GROUPS = 8


def _soak_module():
    if "kl_soak" not in sys.modules:
        path = os.path.join(ROOT, "benchmarks", "soak.py")
        spec = importlib.util.spec_from_file_location("kl_soak", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["kl_soak"] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["kl_soak"]


@pytest.mark.parametrize("kind", ["logits", "samples"])
def test_soak_fast_memory_and_time_stay_flat(kind):
    soak = _soak_module()
    r = soak.soak(kind, evals=300, warmup=30, sample_every=30)  # 11 tensor counts
    print("\n" + soak.table([r]))
    assert r.failures == 0
    # a leak grows; RSS may fall (the allocator returns what earlier tests freed)
    assert r.rss_drift <= 0.05, (r.rss_first, r.rss_last)
    # No tensor may accumulate. The alert engine's paired baselines are bounded, not
    # constant: besides the current evaluation's per-row streams (8) and the baseline
    # rows, one model-sample baseline (2 tensors) per group baseline evaluation still
    # in use, at most groups + 1 of them (tests/test_pairing.py checks the bound); they
    # split off whenever a group improves alone (+4 tensors at evaluation 30-150 here,
    # flat over 1,200 evaluations). A leak of one tensor per evaluation adds 300.
    bound = 8 + 2 * (GROUPS + 1)
    assert max(r.tensor_series) <= r.tensor_series[0] + bound, r.tensor_series
    trend = r.cpu_trend
    if trend > TIME_GROWTH:  # a leak reproduces; another process's burst does not
        trend = min(trend, soak.soak(kind, evals=300, warmup=30, sample_every=30).cpu_trend)
    assert trend <= TIME_GROWTH, (trend, r.ms_deciles)

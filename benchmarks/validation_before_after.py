"""Issue 10's six rows: the first version's cv (before) against the default (after), same batches.

Needs the first version's package importable as ``kl_monitor_main``. From the repository
root:

    mkdir -p /tmp/kl_v1 && git archive 5e4290b kl_monitor | tar -x -C /tmp/kl_v1 \
      && mv /tmp/kl_v1/kl_monitor /tmp/kl_v1/kl_monitor_main
    PYTHONPATH=$PWD:/tmp/kl_v1 python -W ignore benchmarks/validation_before_after.py

The table is quoted in the issue-10 closing note; the whole suite is
``benchmarks/validation.py``.
"""
import math
import sys

import numpy as np
import torch
from scipy import stats

sys.path.insert(0, "benchmarks")
import kl_monitor_main  # noqa: E402
import validation as V  # noqa: E402

import kl_monitor  # noqa: E402

torch.set_num_threads(1)
Z = 1.959963984540054
mix = V.Mix((0.5, 0.5), (-1.4, 1.4), (0.6, 0.6), "bimodal ±1.4, σ 0.6")
wide = V.Sci(stats.norm(0, 1.6), "N(0,1.6²)")
w15 = V.Sci(stats.weibull_min(1.5), "Weibull(1.5)", lo=0.0)
w2 = V.Sci(stats.weibull_min(2), "Weibull(2)", lo=0.0)
t5, t2 = V.Sci(stats.t(5), "t(5)"), V.Sci(stats.t(2), "t(2)")
ROWS = [(mix, wide, 4096, 400, 1), (mix, wide, 16384, 200, 1), (mix, wide, 4096, 200, 8),
        (w15, w2, 64, 600, 1), (w15, w2, 256, 600, 1), (t5, t2, 64, 600, 1)]


def estimates(pkg, la, lb, batches):
    if batches == 1:
        out = {m: pkg.mc_kl(la, lb, m) for m in ("naive", "k3", "cv")}
        return {m: (e.value, e.stderr) for m, e in out.items()}
    metric = pkg.SampledKL()
    for a, b in zip(la.chunk(batches), lb.chunk(batches), strict=True):
        metric.update(a, b)
    r = metric.compute()
    return {"cv": (float(r["forward"]), float(r["forward_stderr"]))}


print("| pair | n | path | cov before (cv) | cov after (default) | cov naive | cov k3 | "
      "sd before | sd after | sd naive | sd k3 |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for a, b, n, reps, batches in ROWS:
    truth, _ = V.truth_kl(a, b)
    x = a.sample(np.random.default_rng(2024 + n + batches), (reps, n))
    la = torch.from_numpy(np.asarray(a.logpdf(x), dtype=np.float64))
    lb = torch.from_numpy(np.asarray(b.logpdf(x), dtype=np.float64))
    res = {"before": [], "after": []}
    for r in range(reps):
        res["before"].append(estimates(kl_monitor_main, la[r], lb[r], batches))
        res["after"].append(estimates(kl_monitor, la[r], lb[r], batches))

    def col(tag, m, res=res, truth=truth):
        v = np.array([e[m][0] for e in res[tag]])
        s = np.array([e[m][1] for e in res[tag]])
        return float(np.mean(np.abs(v - truth) <= Z * s)), float(v.std(ddof=1))

    cb, sb = col("before", "cv")
    ca, sa = col("after", "cv")
    if batches == 1:
        (cn, sn), (ck, sk) = col("after", "naive"), col("after", "k3")
    else:
        cn = sn = ck = sk = math.nan
    path = "mc_kl" if batches == 1 else f"SampledKL {batches} × {n // batches}"
    print(f"| {a.label} ‖ {b.label} | {n} | {path} | {cb:.3f} | {ca:.3f} | {cn:.3f} | {ck:.3f} | "
          f"{sb:.4f} | {sa:.4f} | {sn:.4f} | {sk:.4f} |", flush=True)

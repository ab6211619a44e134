"""Data, scenarios and the per-rank worker for tests/test_metrics_ddp.py.

Kept in its own module so ``torch.multiprocessing.spawn`` can import the worker in the
child processes. Every process rebuilds the same data from fixed seeds; each rank then
feeds only its (deliberately uneven) shard, in batches.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from kl_monitor.metrics import CategoricalKL, MonteCarloKL, SampledKL

WORLD_SIZE = 2


@dataclass
class Scenario:
    """A metric factory, the full data, and how it is cut into per-rank batches.

    ``feed(metric, sl, fwd)`` adds the rows ``sl`` (a slice of the full data) by
    ``update`` or, with ``fwd``, by ``forward`` (returning the batch value);
    ``shards[rank]`` lists the slices that rank feeds, in order. ``make(**kwargs)``
    passes torchmetrics options such as ``sync_on_compute``.
    """

    name: str
    make: Callable[..., Any]
    feed: Callable[[Any, slice, bool], Any]
    total: int
    shards: list[list[slice]]
    use_forward: bool = False


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mixture_logpdf(x: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
    comps = torch.distributions.Normal(means, torch.ones_like(means))
    return torch.logsumexp(comps.log_prob(x[:, None]), dim=-1) - math.log(means.numel())


def scenarios() -> list[Scenario]:
    """All DDP scenarios; identical in every process."""
    out: list[Scenario] = []

    # 1. MonteCarloKL (cv) with groups and a few non-finite samples; uneven shards.
    g = _gen(1)
    n = 1001
    x = torch.randn(n, generator=g, dtype=torch.float64)
    p, q = torch.distributions.Normal(0.0, 1.0), torch.distributions.Normal(0.7, 0.9)
    log_p, log_q = p.log_prob(x), q.log_prob(x)
    log_q[[5, 777]] = math.nan
    groups = torch.randint(0, 4, (n,), generator=g)

    def feed_mc(m: Any, sl: slice, fwd: bool) -> Any:
        return (m if fwd else m.update)(log_p[sl], log_q[sl], groups[sl])

    def make_mc(method: str = "cv") -> Callable[..., Any]:
        return lambda **kw: MonteCarloKL(method=method, num_groups=4, **kw)

    uneven = [[slice(0, 200), slice(200, 613)], [slice(613, 1001)]]
    out.append(Scenario("mc_cv_groups", make_mc(), feed_mc, n, uneven))
    # 2. the same through forward() (batch value + accumulation) on each rank
    out.append(Scenario("mc_forward", make_mc(), feed_mc, n, uneven, True))
    # 3. one rank sees no data at all
    empty = [[slice(0, 400), slice(400, 1001)], []]
    out.append(Scenario("mc_k3_empty_rank", make_mc(method="k3"), feed_mc, n, empty))

    # 4. CategoricalKL token_mean, float32 logits, padding mask, per-row groups.
    g = _gen(2)
    b, s, k = 13, 7, 11
    lp = torch.randn(b, s, k, generator=g) * 2.0
    lq = lp + torch.randn(b, s, k, generator=g)
    mask = torch.rand(b, s, generator=g) > 0.2
    rows_g = torch.randint(0, 3, (b, s), generator=g)
    seq_g = torch.randint(0, 2, (b,), generator=g)

    def feed_tok(m: Any, sl: slice, fwd: bool) -> Any:
        return (m if fwd else m.update)(lp[sl], lq[sl], mask[sl], rows_g[sl])

    def feed_seq(m: Any, sl: slice, fwd: bool) -> Any:
        return (m if fwd else m.update)(lp[sl], lq[sl], mask[sl], seq_g[sl])

    cat_shards = [[slice(0, 5), slice(5, 9)], [slice(9, 13)]]
    def make_tok(**kw: Any) -> CategoricalKL:
        return CategoricalKL(num_groups=3, **kw)

    def make_seq(**kw: Any) -> CategoricalKL:
        return CategoricalKL(reduction="sequence_sum", num_groups=2, **kw)

    out.append(Scenario("categorical_token_mean", make_tok, feed_tok, b, cat_shards))
    out.append(Scenario("categorical_sequence_sum", make_seq, feed_seq, b, cat_shards))

    # 5. SampledKL on a mode-dropping mixture: with model samples, and importance-weighted.
    g = _gen(3)
    means = torch.arange(8, dtype=torch.float64) * 6.0
    kept = means[:2]
    n = 1500
    comp = torch.randint(0, 8, (n,), generator=g)
    xs = means[comp] + torch.randn(n, generator=g, dtype=torch.float64)
    comp_y = torch.randint(0, 2, (n,), generator=g)
    ys = kept[comp_y] + torch.randn(n, generator=g, dtype=torch.float64)
    ref_lp, ref_lq = _mixture_logpdf(xs, means), _mixture_logpdf(xs, kept)
    mod_lq, mod_lp = _mixture_logpdf(ys, kept), _mixture_logpdf(ys, means)

    def feed_sampled(m: Any, sl: slice, fwd: bool) -> Any:
        return (m if fwd else m.update)(
            ref_lp[sl], ref_lq[sl], mod_lq[sl], mod_lp[sl], comp[sl], comp_y[sl]
        )

    def feed_iw(m: Any, sl: slice, fwd: bool) -> Any:
        return (m if fwd else m.update)(ref_lp[sl], ref_lq[sl], groups=comp[sl])

    s_shards = [[slice(0, 100), slice(100, 1100)], [slice(1100, 1300), slice(1300, 1500)]]
    def make_sampled(**kw: Any) -> SampledKL:
        return SampledKL(num_groups=8, **kw)

    out.append(Scenario("sampled_model", make_sampled, feed_sampled, n, s_shards))
    out.append(Scenario("sampled_iw", make_sampled, feed_iw, n, s_shards))
    return out


def floats(result: Any) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()}


def single_process_results() -> dict[str, dict[str, float]]:
    """Each scenario on one process, the whole data in one update."""
    res = {}
    for sc in scenarios():
        m = sc.make()
        sc.feed(m, slice(0, sc.total), False)
        res[sc.name] = floats(m.compute())
    return res


def run_rank(rank: int, world_size: int, port: int, outdir: str) -> None:
    """Worker: join the gloo group, feed this rank's shards, compute, save the results."""
    # expected here: dropped NaN samples, and compute() on the rank that saw no data
    warnings.filterwarnings("ignore", message="kl_monitor:")
    warnings.filterwarnings("ignore", message=".*was called before the ``update``")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        results: dict[str, Any] = {}
        for sc in scenarios():
            m = sc.make()
            batch_values = [floats(sc.feed(m, sl, True)) if sc.use_forward
                            else sc.feed(m, sl, False) for sl in sc.shards[rank]]
            results[sc.name] = floats(m.compute())
            if sc.use_forward:
                # forward() returns the value of the local batch alone (no sync on step);
                # the reference is a metric that never syncs, fed that batch only.
                local = []
                for sl in sc.shards[rank]:
                    lone = sc.make(sync_on_compute=False)
                    sc.feed(lone, sl, False)
                    local.append(floats(lone.compute()))
                results[sc.name + "/batch_values"] = batch_values
                results[sc.name + "/batch_expected"] = local
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()

"""Per-rank worker for tests/test_sample_metrics_ddp.py (importable by spawned children).

Every process rebuilds the same ring samples from fixed seeds; rank r feeds its
(uneven) shard in batches, one rank a batch with NaN rows. ``compute()`` gathers the
union in rank order, so one process fed the shards in rank order must match exactly.
"""

from __future__ import annotations

import math
import os
import warnings
from datetime import timedelta
from typing import Any

import torch

from kl_monitor import KNNKL, BinnedKL

WORLD_SIZE = 2
MODES, KEPT = 8, (0, 1, 2, 4, 6)
#: per rank, slices of the reference (and model) rows it feeds, batch by batch
SHARDS = [[slice(0, 300), slice(300, 700)], [slice(700, 1200)]]


def data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ang = torch.arange(MODES) * 2 * math.pi / MODES
    means = 4 * torch.stack((ang.cos(), ang.sin()), 1)
    lab = torch.randint(MODES, (1200,), generator=g)
    x = means[lab] + 0.25 * torch.randn(1200, 2, generator=g)
    keep = torch.tensor(KEPT)[torch.randint(len(KEPT), (1200,), generator=g)]
    y = means[keep] + 0.25 * torch.randn(1200, 2, generator=g)
    y[[710, 1000]] = math.nan  # on rank 1: dropped and counted
    return x, y, lab


def metrics() -> dict[str, Any]:
    return {
        "knn_groups": KNNKL(num_groups=MODES),
        "knn_cells": KNNKL(num_cells=12),
        "binned": BinnedKL(num_cells=12),
    }


def feed(metric: Any, sl: slice, name: str) -> None:
    x, y, lab = data()
    metric.update(x[sl], y[sl], lab[sl] if name == "knn_groups" else None)


def floats(result: Any) -> dict[str, float]:
    return {k: float(v) for k, v in result.items()}


def single_process() -> dict[str, dict[str, float]]:
    out = {}
    for name, metric in metrics().items():
        for sl in [s for shard in SHARDS for s in shard]:
            feed(metric, sl, name)
        out[name] = floats(metric.compute())
        out[name + "/centroids"] = metric.centroids
    return out


def run_rank(rank: int, world_size: int, port: int, outdir: str) -> None:
    warnings.filterwarnings("ignore", message="kl_monitor:")
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=timedelta(seconds=60)
    )
    try:
        results: dict[str, Any] = {}
        for name, metric in metrics().items():
            for sl in SHARDS[rank]:
                feed(metric, sl, name)
            results[name] = floats(metric.compute())
            results[name + "/centroids"] = metric.centroids
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()

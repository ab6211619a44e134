"""KNNKL and BinnedKL under real DDP (2 gloo processes) equal one process.

Each rank keeps its own samples; ``compute()`` gathers them in rank order and every
rank estimates on the union, so both ranks must return exactly the single-process
result on the shards fed in rank order, cells (k-means on the gathered reference)
included.
"""

from __future__ import annotations

import socket
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ddp_samples  # noqa: E402

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp_samples")
    ctx = mp.start_processes(
        _ddp_samples.run_rank,
        args=(_ddp_samples.WORLD_SIZE, _free_port(), str(out)),
        nprocs=_ddp_samples.WORLD_SIZE,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.terminate()
    return [torch.load(out / f"rank{r}.pt") for r in range(_ddp_samples.WORLD_SIZE)]


@pytest.fixture(scope="module")
def single() -> dict:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="kl_monitor:")  # the NaN rows, on purpose
        return _ddp_samples.single_process()


@pytest.mark.parametrize("name", ["knn_groups", "knn_cells", "binned"])
def test_ddp_equals_one_process(ddp_results: list[dict], single: dict, name: str) -> None:
    for res in ddp_results:
        assert res[name] == single[name]
        cells, want_cells = res[name + "/centroids"], single[name + "/centroids"]
        assert (cells is None) == (want_cells is None) == (name == "knn_groups")
        assert cells is None or torch.equal(cells, want_cells)
    want = single[name]
    assert want["n"] == 1200 and want["m"] == 1198 and want["nonfinite"] == 2
    assert want["forward"] > 1.0  # three modes dropped
    if name == "knn_groups":
        assert {g for g in range(8) if want[f"reverse_mass/group_{g}"] == 0} == {3, 5, 7}

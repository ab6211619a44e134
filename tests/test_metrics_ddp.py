"""The metrics under real DDP: 2 CPU processes, gloo backend, uneven shards.

Each rank feeds its own shard (uneven sizes, one scenario with an empty rank) and
calls ``compute()``, which syncs the states across ranks. Every rank must then get
the single-process result on the concatenated data, within 1e-6 relative (the states
are float64 sums, so in practice the difference is float64 rounding).
"""

from __future__ import annotations

import math
import socket
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _ddp_helpers  # noqa: E402

RTOL = 1e-6
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rel_diff(a: float, b: float) -> float:
    """|a − b| relative to the larger magnitude; 0 for equal infinities or two NaNs."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if math.isinf(a) or math.isinf(b):
        return 0.0 if a == b else math.inf
    scale = max(abs(a), abs(b))
    return 0.0 if scale == 0 else abs(a - b) / scale


def _estimate_key(stderr_key: str) -> str:
    """The value a standard error belongs to: ``forward_stderr/group_0`` -> ``forward/group_0``."""
    if stderr_key.startswith("stderr"):  # MonteCarloKL: stderr, stderr/group_g
        return "kl" + stderr_key[len("stderr"):]
    return stderr_key.replace("_stderr", "")


def _compare(got: dict[str, float], want: dict[str, float], where: str) -> float:
    """Assert ``got`` equals ``want`` within RTOL; return the largest relative difference
    among the values that are not standard errors nor (nearly) zero.

    Values that are zero up to rounding get an absolute floor: 1e-12 in general, and
    1e-7·|estimate| for standard errors. A one-pass variance (Σx² − (Σx)²/n)/(n − 1)
    from float64 sums cannot resolve a spread below √eps·|mean| ≈ 1.5e-8·|mean|, so
    when the true spread is 0 (a constant log-ratio on a kept mode) the standard error
    is rounding noise of that size, whatever the split.
    """
    assert set(got) == set(want), f"{where}: keys differ: {set(got) ^ set(want)}"
    worst = 0.0
    for key, w in want.items():
        g = got[key]
        d = _rel_diff(g, w)
        floor = 1e-12
        if "stderr" in key:
            floor = max(floor, 1e-7 * abs(want.get(_estimate_key(key), 0.0)))
        assert d <= RTOL or abs(g - w) <= floor, f"{where}[{key}]: {g!r} != {w!r} (rel {d:.2e})"
        if "stderr" not in key and max(abs(g), abs(w)) > 1e-6:
            worst = max(worst, d)
    return worst


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Run every scenario on 2 gloo processes once; return each rank's results."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(
        _ddp_helpers.run_rank,
        args=(_ddp_helpers.WORLD_SIZE, _free_port(), str(out)),
        nprocs=_ddp_helpers.WORLD_SIZE,
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
    return [torch.load(out / f"rank{r}.pt") for r in range(_ddp_helpers.WORLD_SIZE)]


@pytest.fixture(scope="module")
def single_results() -> dict[str, dict[str, float]]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="kl_monitor:")  # the NaN samples, on purpose
        return _ddp_helpers.single_process_results()


SCENARIOS = [sc.name for sc in _ddp_helpers.scenarios()]


@pytest.mark.parametrize("name", SCENARIOS)
def test_ddp_equals_single_process(
    ddp_results: list[dict], single_results: dict, name: str
) -> None:
    worst = 0.0
    for rank, res in enumerate(ddp_results):
        worst = max(worst, _compare(res[name], single_results[name], f"{name} rank {rank}"))
    # after the sync both ranks hold identical states, so identical results
    assert ddp_results[0][name] == ddp_results[1][name] or all(
        _rel_diff(ddp_results[0][name][k], ddp_results[1][name][k]) == 0
        for k in ddp_results[0][name]
    )
    print(f"{name}: max relative difference DDP vs single process = {worst:.3e}")


def test_ddp_forward_returns_local_batch_value(ddp_results: list[dict]) -> None:
    for rank, res in enumerate(ddp_results):
        got, want = res["mc_forward/batch_values"], res["mc_forward/batch_expected"]
        assert len(got) == len(want) == len(_ddp_helpers.scenarios()[1].shards[rank])
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _compare(g, w, f"forward batch {i} rank {rank}")


def test_ddp_groups_present(ddp_results: list[dict]) -> None:
    """The per-group keys survive the sync (states of the same shape on every rank)."""
    res = ddp_results[1]
    assert {f"n/group_{g}" for g in range(4)} <= set(res["mc_cv_groups"])
    assert "forward/group_7" in res["sampled_model"]
    assert "reverse/group_7" not in res["sampled_model"]  # Q dropped that mode

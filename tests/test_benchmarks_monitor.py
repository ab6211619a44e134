"""The monitor benchmarks (overhead, detection) keep working: their ``--fast`` modes.

Each script is loaded from its file and its ``main(["--fast"])`` run in this process
(the heavy imports are shared with the rest of the suite), checking the exit code and
that the tables and the verdict are printed. The figures of ``--fast`` mean nothing.
"""

from __future__ import annotations

import logging
import runpy
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def restore_globals():
    """The scripts set torch threads and logger levels; put them back."""
    threads = torch.get_num_threads()
    names = ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning")
    levels = {name: logging.getLogger(name).level for name in names}
    yield
    torch.set_num_threads(threads)
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def run_fast(script: str, capsys) -> str:
    namespace = runpy.run_path(str(BENCHMARKS / script), run_name="benchmark_under_test")
    assert namespace["main"](["--fast"]) == 0
    return capsys.readouterr().out


def test_overhead_fast(capsys, restore_globals):
    out = run_fast("overhead.py", capsys)
    assert "| round | order | A: no monitor (s) | B: KLMonitor (s) |" in out
    assert out.count("\n| 1 | ABR |") == 1 and "\n| 2 | BRA |" in out  # rotated order
    assert "one evaluation in the loop (KLMonitor.evaluate" in out
    assert "| KLMonitor.evaluate, total |" in out
    assert "A and B final weights bitwise identical in every round: True" in out
    assert "## Verdict" in out and "median wall ratio" in out
    assert "PASS" in out or "FAIL" in out


def test_detection_fast(capsys, restore_globals):
    out = run_fast("detection.py", capsys)
    assert "| seed | dropped modes | detector delay |" in out
    assert "## Summary" in out and "| KLMonitor AlertRules (defaults) |" in out
    assert "| fixed τ on naive forward" in out
    assert "## Verdict" in out
    assert "median delay" in out and "false alarms:" in out
    # the scripted collapse is detected in every fast run, naming only dropped modes
    assert "misses" in out
    assert "Detector alerts at or after onset: 3/3" in out
    assert "names only dropped modes in 3/3 runs" in out

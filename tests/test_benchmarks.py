"""The estimator benchmarks keep working: each script's ``--fast`` mode, run as a script.

``benchmarks/estimators.py`` and ``benchmarks/categorical.py`` are run exactly as the
README says (``python benchmarks/<name>.py --fast`` from the repository root), in a
subprocess, checking the exit code and that the tables are printed. The timings and
the statistical figures of ``--fast`` mean nothing (a few repeats, small inputs); what
is checked beyond "it runs" does not depend on them: the accuracy columns against the
float64 reference and the memory ratio of the categorical benchmark.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_fast(script: str) -> str:
    proc = subprocess.run(
        [sys.executable, f"benchmarks/{script}", "--fast"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout


def table_rows(out: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header line starts with ``header_start``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_estimators_fast():
    out = run_fast("estimators.py")
    assert "FAST MODE" in out
    rows = table_rows(out, "| case | dir | true KL |")
    cases = {(r[0], r[1]) for r in rows}
    for kl in ("0.1", "0.316", "0.632", "1", "1.41", "2"):
        assert (f"N(0,1) vs N({kl},1)", "fwd") in cases
        assert (f"N(0,1) vs N({kl},1)", "rev") in cases
    mixtures = ("heavy tail: N(0,1) vs N(0,2²)", "mode drop 8→2", "mild: 8 modes, unequal weights")
    for name in mixtures:
        assert {(name, "fwd"), (name, "rev")} <= cases, name
    # every row has the three methods, c, the fallback rate and three target flags
    assert all(len(r) == 17 for r in rows)
    assert all(r[-3] in ("PASS", "FAIL", "n/a") for r in rows)
    # q underflowing in float32: support violations, +inf, reported as such
    underflow = next(r for r in rows if r[0] == "mode drop 8→2, q as fp32 density")
    assert underflow[3:5] == ["inf", "inf"] and underflow[-1] == "n/a"
    assert "support violations" in out
    assert "| ring radius | adjacent modes (σ) |" in out
    cat = table_rows(out, "| rows | setting | dir |")
    assert len(cat) == 8
    fixed = [r for r in cat if r[1] == "fixed rows"]
    assert all(r[5] == "0" and r[-1] == "PASS" for r in fixed)  # exact: zero variance
    assert "Wall time" in out
    assert "All targets met." in out or "TARGETS MISSED" in out


def test_categorical_fast():
    out = run_fast("categorical.py")
    assert "FAST MODE" in out
    rows = table_rows(out, "| dtype | K | rows |")
    cases = {(r[0], r[1], r[4]) for r in rows}
    assert cases == {(d, k, c) for d in ("float32", "bfloat16")
                     for k in ("1,000", "32,768", "152,064") for c in ("quiet", "load")}
    for r in rows:
        assert int(r[1].replace(",", "")) * int(r[2].replace(",", "")) >= 1 << 22
        pair, ours, floor = float(r[5]), float(r[6]), float(r[8])
        assert pair > 0 and ours > 0 and floor > 0
        assert float(r[7]) == pytest.approx(ours / pair, rel=0.01, abs=1e-3)
    # the competing load really ran (two processes), and was stopped by PID at the end
    assert "busy processes alive: 2" in out
    pids = [int(x) for x in out.split("busy processes stopped: PIDs ")[1].split("\n")[0].split(",")]
    assert len(pids) == 2
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    memory = table_rows(out, "| dtype | K | pair peak extra MiB |")
    assert len(memory) == 6
    for r in memory:
        if r[4] != "n/a":
            assert float(r[4]) <= 0.5, r  # chunked: bounded by a chunk, not rows × K
    accuracy = table_rows(out, "| case | dtype | rows × K |")
    assert [r[1] for r in accuracy] == ["float32", "bfloat16"]
    assert "accuracy," not in out  # no accuracy target missed (load-independent)
    assert "All targets met." in out or "TARGETS MISSED" in out


def test_cuda_check_dry_run_on_cpu():
    """The GPU script's code paths, on tiny CPU inputs (no GPU here): it must keep working."""
    proc = subprocess.run(
        [sys.executable, "benchmarks/cuda_check.py", "--device", "cpu", "--smoke"],
        cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    accuracy = table_rows(out, "| case | dtype | path |")
    assert len(accuracy) == 3
    assert all(r[5] == "True" for r in accuracy)  # +inf rows agree with float64
    assert accuracy[2][6] == "True"  # the NaN row is flagged invalid
    assert "correctness," not in out  # float32 error < 1e-5, bf16 relative error < 1%
    assert len(table_rows(out, "| dtype | K | rows | pair s |")) == 4

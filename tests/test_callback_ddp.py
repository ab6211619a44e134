"""KLMonitor under DDP (2 CPU processes, gloo) logs what a single process logs."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("_ddp_callback_script.py")


def _logged(path: Path) -> dict[tuple[int, str], float]:
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    out = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("kl_") and v not in ("", None):
                out[(int(r["step"]), k)] = float(v)
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The script once as a single process and once under 2-process DDP."""
    out = tmp_path_factory.mktemp("ddp_callback")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    for mode in ("single", "ddp"):
        proc = subprocess.run(
            [sys.executable, str(SCRIPT), mode, str(out)],
            capture_output=True, text=True, timeout=240, env=env, cwd=out,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_ddp_logged_values_equal_single_process(launched):
    tmp_path = launched
    single = _logged(tmp_path / "single" / "metrics.csv")
    ddp = _logged(tmp_path / "ddp" / "metrics.csv")
    keys = {k for k in single if not k[1].endswith("failures")}
    assert keys == {k for k in ddp if not k[1].endswith("failures")}
    steps = sorted({s for s, _ in keys})
    assert steps == [0, 2, 4, 6]
    tags = {t for _, t in keys}
    for needed in ("kl_logits/forward", "kl_logits/reverse", "kl_logits/forward/group_5",
                   "kl_samples/forward", "kl_samples/reverse", "kl_samples/reverse_ess"):
        assert needed in tags
    worst = 0.0
    for key in keys:
        a, b = single[key], ddp[key]
        if math.isnan(a) and math.isnan(b):
            continue
        scale = max(abs(a), 1e-12)
        worst = max(worst, abs(a - b) / scale if abs(a - b) > 1e-12 else 0.0)
    assert worst < 1e-6, worst


def test_ddp_alerts_equal_single_process(launched):
    """The alert engine's paired evidence is reduced across ranks: every rank raises
    the alerts a single process raises, with the same numbers in the message."""
    tmp_path = launched
    single = json.loads((tmp_path / "single_alerts_rank0.json").read_text())
    for prefix in ("kl_logits", "kl_samples"):
        assert single[prefix], single  # the scripted fault at step 3 is caught
        assert all(a["step"] >= 4 for a in single[prefix]), single[prefix]
    for rank in (0, 1):
        ddp = json.loads((tmp_path / f"ddp_alerts_rank{rank}.json").read_text())
        for prefix, alerts in single.items():
            got = [(a["kind"], a["step"], a["groups"], a["message"]) for a in ddp[prefix]]
            want = [(a["kind"], a["step"], a["groups"], a["message"]) for a in alerts]
            assert got == want, (rank, prefix)

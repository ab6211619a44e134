"""Smoke test of the demo: with a tiny budget, KLMonitor still catches the collapse.

The demo trains a Gaussian mixture on an 8-mode ring twice: by forward KL (maximum
likelihood, covers every mode) and by reverse KL (mode-seeking, drops modes). With
``--steps 120 --every 10`` (the default is 600 steps, every 20) the reverse run has
already dropped modes 3, 4 and 7 by step 50 and the monitor fires there, while the
forward run stays quiet. Runs in about 10-20 s on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import warnings
from pathlib import Path

import pytest
from conftest import global_state_restored

from demo_project import run as demo
from kl_monitor import KLAlertWarning
from kl_monitor.report import load_runs

STEPS, EVERY = 120, 10
MODES = 8
#: a mode is dropped when the model's share of its samples nearest to it is below this
#: (an equal share is 1/8 = 0.125)
DROPPED_SHARE = 0.02


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Run the demo once (both objectives); return its out dir, stdout and warnings."""
    out = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with (
        global_state_restored(),
        warnings.catch_warnings(record=True) as caught,
        contextlib.redirect_stdout(stdout),
    ):
        warnings.simplefilter("always")
        # no --no-progress: stdout is not a terminal here, which hides the bars;
        # the GAN runs have their own test: tests/test_gan_demo.py
        rc = demo.main(
            ["--out", str(out), "--steps", str(STEPS), "--every", str(EVERY), "--gan", "none"]
        )
    assert rc == 0
    return out, stdout.getvalue(), caught


def _runs(out: Path) -> dict:
    return {run.name: run for run in load_runs(out)}


def _final_mass(run) -> dict[int, float]:
    """The model's share of samples nearest to each mode at the last evaluation.

    The metric leaves a group out when no model sample is near it, so a mode missing
    at the last step has share 0.
    """
    last = max(run.series("kl/forward")[0])
    mass = {g: 0.0 for g in range(MODES)}
    for g in range(MODES):
        steps, values = run.series(f"kl/reverse_mass/group_{g}")
        if steps and steps[-1] == last:
            mass[g] = values[-1]
    return mass


def _table_row(stdout: str, objective: str) -> str:
    rows = [line for line in stdout.splitlines() if line.startswith(f"{objective} ")]
    assert len(rows) == 1, stdout
    return rows[0]


def test_outputs_exist(demo_run):
    out, stdout, _ = demo_run
    for objective in ("forward", "reverse"):
        events = list((out / f"{objective}_kl_training").glob("events.out.tfevents.*"))
        assert len(events) == 1 and events[0].stat().st_size > 1000, events
    png = out / "demo.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000
    assert (out / "alerts.json").is_file()
    assert f"figure:     {png}" in stdout


def test_reverse_run_alerts_and_names_a_dropped_mode(demo_run):
    out, stdout, caught = demo_run
    alerts = json.loads((out / "alerts.json").read_text())["reverse"]
    assert len(alerts) >= 1, stdout
    alert = alerts[0]
    assert alert["kind"] == "collapse", alert["message"]
    assert alert["step"] < STEPS
    named = set(alert["groups"])
    assert named and named <= set(range(MODES)), alert
    # the mass each named mode lost, in the message
    assert alert["details"]["signature"] == "mode_dropping", alert
    lost = re.findall(r"(\d+) lost (\d+)%", alert["message"])
    assert {int(g) for g, _ in lost} == named and all(int(p) > 0 for _, p in lost), alert

    # compare with what the final model actually left uncovered
    mass = _final_mass(_runs(out)["reverse_kl_training"])
    dropped = {g for g, m in mass.items() if m < DROPPED_SHARE}
    assert dropped, mass  # the reverse run did collapse
    assert named & dropped, (named, dropped, mass)
    # the demo's own table agrees: fewer than 8 of 8 modes covered, alert listed
    row = _table_row(stdout, "reverse")
    covered = int(row.split("/8")[0].split()[-1])
    assert covered < MODES, row
    assert f"collapse @ step {alert['step']}" in row, row
    # the alert went out as a warning (rank zero), with the same message
    messages = [str(w.message) for w in caught if issubclass(w.category, KLAlertWarning)]
    assert alert["message"] in messages


def test_forward_run_has_no_alert(demo_run):
    out, stdout, _ = demo_run
    assert json.loads((out / "alerts.json").read_text())["forward"] == []
    run = _runs(out)["forward_kl_training"]
    assert run.alerts == []
    for kind in ("collapse", "coverage_gap", "over_dispersion"):
        _, flags = run.series(f"kl/alert/{kind}")
        assert flags and max(flags) == 0.0, kind
    row = _table_row(stdout, "forward")
    assert row.rstrip().endswith("none") and " 8/8 " in row, row
    # it keeps every mode
    mass = _final_mass(run)
    assert min(mass.values()) >= DROPPED_SHARE, mass


def test_logs_carry_both_directions_with_stderr(demo_run):
    out, _, _ = demo_run
    for run in _runs(out).values():
        steps, _ = run.series("kl/forward")
        assert steps[0] == 0 and steps[-1] == STEPS
        assert len(steps) == STEPS // EVERY + 1  # sanity evaluation + every EVERY steps
        for tag in ("kl/reverse", "kl/forward_stderr", "kl/reverse_stderr", "kl/asymmetry"):
            assert run.series(tag)[0] == steps, tag


def test_piped_output_has_one_line_per_run_and_no_progress_bar(demo_run):
    _, stdout, _ = demo_run
    runs = [line for line in stdout.splitlines() if line.startswith("=== ")]
    assert len(runs) == 2, stdout
    assert "forward KL training" in runs[0] and "reverse KL training" in runs[1]
    assert "evaluations" in runs[1] and "alert" in runs[1]
    assert "\r" not in stdout and "it/s" not in stdout
    assert len(stdout.splitlines()) < 30, stdout

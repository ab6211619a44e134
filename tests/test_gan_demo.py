"""The demo's GAN: KLMonitor, from samples alone, catches the induced collapse naming
exactly the modes lost, and stays silent on the healthy run.

Both runs use the demo's defaults (400 batches, collapse induced at batch 250, an
evaluation every 50 optimizer steps). "Lost" is judged independently of the monitor:
a mode is lost when under 2% of 4000 generator samples (drawn with their own RNG at
the alert) are nearest to it.
"""

from __future__ import annotations

import warnings

import pytest
from conftest import global_state_restored

from demo_project import gan

BATCHES, COLLAPSE_AT, EVERY = 400, 250, 50


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("gan")
    with global_state_restored(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {
            name: gan.train(name, at, out, BATCHES, EVERY, 0, False)
            for name, at in (("healthy", None), ("collapse", COLLAPSE_AT))
        }
    gan.figure(list(results.values()), out / "gan.png")
    return out, results


def test_collapse_is_caught_naming_exactly_the_lost_modes(runs):
    _, results = runs
    r = results["collapse"]
    assert len(r["alerts"]) >= 1
    alert = r["alerts"][0]
    assert alert["kind"] == "collapse", alert["message"]
    # after the induced collapse (2 optimizer steps per batch before it)
    assert alert["step"] > 2 * COLLAPSE_AT
    assert r["lost_at_alert"], r  # it did collapse by then
    assert set(alert["groups"]) == set(r["lost_at_alert"]), (alert["message"], r["lost_at_alert"])
    assert "modes dropped:" in alert["message"]
    assert r["modes_covered"] < 8


def test_healthy_run_is_silent_and_covers_every_mode(runs):
    _, results = runs
    r = results["healthy"]
    assert r["alerts"] == []
    assert r["lost_at_end"] == [] and r["modes_covered"] == 8


def test_figure_and_logs(runs):
    out, _ = runs
    png = out / "gan.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    for name in ("healthy", "collapse"):
        assert list((out / f"gan_{name}").glob("events.out.tfevents.*"))

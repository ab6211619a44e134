"""Smoke test of the language-model demo: one prompt type collapses and is named.

With a small budget (160 steps, fine-tuning from step 100, an evaluation every 10
steps) the reward-filtered fine-tuning makes prompt type 2 answer with one continuation;
the monitor must call it a collapse naming type 2 within three evaluations, and never
alert before fine-tuning starts.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import warnings

from conftest import global_state_restored

from demo_project import lm
from kl_monitor.report import load_runs

STEPS, SWITCH, EVERY = 160, 100, 10


def test_lm_demo_names_the_collapsed_prompt_type(tmp_path):
    stdout = io.StringIO()
    with global_state_restored(), warnings.catch_warnings(), contextlib.redirect_stdout(stdout):
        warnings.simplefilter("ignore")
        rc = lm.main(["--out", str(tmp_path), "--steps", str(STEPS), "--finetune-at",
                      str(SWITCH), "--every", str(EVERY), "--no-progress"])
    assert rc == 0
    alerts = json.loads((tmp_path / "alerts.json").read_text())
    assert alerts, stdout.getvalue()
    first = alerts[0]
    assert first["kind"] == "collapse" and first["groups"] == [lm.COLLAPSED], first
    assert SWITCH < first["step"] <= SWITCH + 3 * EVERY
    run = next(r for r in load_runs(tmp_path) if r.name == "lm")
    # both sequence-level directions, the labelled diagnostics, and no bare inf
    for tag in ("kl/forward", "kl/reverse", "kl/asymmetry", "kl/forward_on_model_samples",
                "kl/reverse_on_reference_samples", f"kl/reverse/group_{lm.COLLAPSED}"):
        assert run.series(tag)[1], tag
    assert all(math.isfinite(v) for pts in run.scalars.values() for _, v in pts)
    # before fine-tuning the model has learned the source: per-sequence KL well below 1
    steps, rev = run.series("kl/reverse")
    before = [v for s, v in zip(steps, rev, strict=True) if s == SWITCH]
    assert before and before[0] < 1.0
    assert "ALERT collapse" in stdout.getvalue()

"""Kill and resume: SIGKILL a monitored training run mid-run, resume it from
``ckpt_path="last"``, and compare everything with an uninterrupted run.

Three subprocesses run ``tests/_kill_resume_script.py`` (a scripted mixture that
collapses at step 8, recovers at 14 and collapses again at 28):

1. the reference: 36 steps, uninterrupted;
2. the victim: the same run with checkpoints every step, slowed down a little, which
   gets SIGKILL at a random moment once a checkpoint two steps past its first alert
   exists;
3. the resume: the victim's configuration with ``fit(..., ckpt_path="last")``.

Then, over every TensorBoard event file the victim and the resume wrote:

* no step is logged twice with different values (any ``kl/*`` tag), and the logged
  series is continuous from step 0 to the end;
* every logged value equals the reference run's at that step;
* the final alerts (``monitor.alerts``) equal the reference's: the pre-kill alert exactly
  once, nothing duplicated, nothing lost; the ``on_alert`` hook fired it once, before
  the kill;
* the final detector state (baselines, noise, CUSUM statistics, episodes) equals the
  reference's exactly.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "_kill_resume_script.py")
STEPS = 36
TIMEOUT = 120


def _launch(root, *extra: str) -> subprocess.Popen:
    os.makedirs(root, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), HERE]))
    return subprocess.Popen(
        [sys.executable, SCRIPT, str(root), "--steps", str(STEPS), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _summary(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _alerts_file(root) -> list[dict]:
    path = os.path.join(root, "alerts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _checkpoint_steps(root) -> list[int]:
    folder = os.path.join(root, "ckpt")
    if not os.path.isdir(folder):
        return []
    return sorted(
        int(m.group(1)) for f in os.listdir(folder) if (m := re.search(r"step=(\d+)\.ckpt$", f))
    )


def _scalars(root) -> dict[str, dict[int, list[float]]]:
    """tag -> step -> every value logged at that step, over all event files."""
    from tensorboard.backend.event_processing import event_accumulator as ea

    out: dict[str, dict[int, list[float]]] = {}
    files = sorted(
        os.path.join(r, f) for r, _, fs in os.walk(root) for f in fs if "tfevents" in f
    )
    for f in files:
        acc = ea.EventAccumulator(f, size_guidance={ea.SCALARS: 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            if tag.startswith("kl/"):
                for e in acc.Scalars(tag):
                    out.setdefault(tag, {}).setdefault(e.step, []).append(e.value)
    return out, len(files)


def _csv_scalars(root) -> dict[str, dict[int, list[float]]]:
    """tag -> step -> every value logged at that step, over all CSV versions."""
    out: dict[str, dict[int, list[float]]] = {}
    folder = os.path.join(root, "csv")
    for version in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        path = os.path.join(folder, version, "metrics.csv")
        if not os.path.exists(path):
            continue
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                for tag, value in row.items():
                    if tag.startswith("kl/") and value not in ("", None):
                        out.setdefault(tag, {}).setdefault(int(row["step"]), []).append(
                            float(value)
                        )
    return out


def _same(a: float, b: float) -> bool:
    return a == b or (a != a and b != b)  # NaN-aware (asymmetry of inf − inf)


def test_sigkill_and_resume_continue_the_series_and_alerts(tmp_path):
    ref_root, root = tmp_path / "reference", tmp_path / "victim"
    reference = _launch(ref_root, "--no-ckpt")
    victim = _launch(root, "--step-sleep", "0.05")
    killed_at = None
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and victim.poll() is None:
            alerts = _alerts_file(root)
            steps = _checkpoint_steps(root)
            if alerts and steps and steps[-1] >= alerts[0]["step"] + 2:
                time.sleep(random.uniform(0.0, 0.05))  # land anywhere in the step
                victim.send_signal(signal.SIGKILL)
                killed_at = _checkpoint_steps(root)[-1]
                break
            time.sleep(0.01)
    finally:
        if victim.poll() is None and killed_at is None:
            victim.kill()
    victim.communicate(timeout=TIMEOUT)
    assert killed_at is not None, "the run ended (or timed out) before it could be killed"
    assert victim.returncode == -signal.SIGKILL
    assert killed_at < STEPS - 2, "killed too late to leave a second half"
    pre_kill = _alerts_file(root)
    assert len(pre_kill) == 1, pre_kill  # the first collapse, before the kill

    resumed = _summary(_launch(root, "--resume"))
    ref = _summary(reference)
    print(
        f"\nSIGKILL after checkpoint step {killed_at} (first alert at step "
        f"{pre_kill[0]['step']}); resumed to step {resumed['global_step']}; "
        f"alerts {[(a['kind'], a['step']) for a in resumed['alerts']]}"
    )

    # the scenario itself: several alerts, the first before the kill, later ones after
    assert len(ref["alerts"]) >= 2
    assert ref["alerts"][0]["step"] <= killed_at < ref["alerts"][1]["step"]

    # final monitor state equals the uninterrupted run's
    assert resumed["global_step"] == ref["global_step"] == STEPS
    assert resumed["n_evals"] == ref["n_evals"] == STEPS + 1
    assert resumed["alerts"] == ref["alerts"]  # pre-kill alert once, none lost or doubled
    assert [a["step"] for a in resumed["alerts"]].count(pre_kill[0]["step"]) == 1
    assert resumed["rules"] == ref["rules"]  # baselines, noise, statistics, episodes

    # the hook: each alert fired exactly once over both processes, in order
    fired = _alerts_file(root)
    assert [(a["kind"], a["step"]) for a in fired] == [
        (a["kind"], a["step"]) for a in ref["alerts"]
    ]
    assert len({a["pid"] for a in fired}) == 2  # before the kill, and after the resume

    # the logged series: continuous, never two different values for a step, = reference
    logged, n_files = _scalars(root)
    expected, _ = _scalars(ref_root)
    assert n_files >= 2  # one event file per process
    assert sorted(logged["kl/forward"]) == list(range(0, STEPS + 1))
    for tag, per_step in logged.items():
        for step, values in per_step.items():
            assert all(_same(v, values[0]) for v in values), (tag, step, values)
            assert _same(values[0], expected[tag][step][0]), (tag, step)
    assert set(logged) == set(expected)
    for tag in expected:
        assert sorted(logged[tag]) == sorted(expected[tag]), tag

    # the same through the CSV logger (one version per process), to float64 precision
    logged, expected = _csv_scalars(root), _csv_scalars(ref_root)
    assert sorted(logged["kl/forward"]) == list(range(0, STEPS + 1)), "CSV rows lost"
    for tag, per_step in logged.items():
        for step, values in per_step.items():
            assert all(_same(v, values[0]) for v in values), (tag, step, values)
            assert _same(values[0], expected[tag][step][0]), (tag, step)
    for tag in expected:
        assert sorted(logged[tag]) == sorted(expected[tag]), tag

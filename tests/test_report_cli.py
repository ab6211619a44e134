"""`kl-monitor report LOGDIR`: on the demo's logs, and on logs it cannot read.

The logs come from one tiny run of the demo (both objectives) per module. Error cases
must exit non-zero with one line on stderr that says what is wrong, and no traceback.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import random
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import global_state_restored

from demo_project import run as demo
from kl_monitor import cli

STEPS, EVERY = 80, 10
RUNS = ("forward_kl_training", "reverse_kl_training")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    """The demo's logs: a forward run without alert, a reverse run with a collapse alert."""
    out = tmp_path_factory.mktemp("demo_logs")
    with (
        global_state_restored(),
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        rc = demo.main(
            ["--out", str(out), "--steps", str(STEPS), "--every", str(EVERY), "--no-progress",
             "--gan", "none"]  # the two mixture runs; the GAN has tests/test_gan_demo.py
        )
    assert rc == 0
    return out


# --------------------------------------------------------------------- out of process
class Invocations:
    """The out-of-process CLI runs, started together: each spends seconds importing
    torch and Lightning, and side by side they share that wait."""

    def __init__(self, logdir: Path, tmp: Path) -> None:
        self.tmp = tmp
        self.empty = tmp / "empty"
        self.empty.mkdir()
        self.corrupt = tmp / "corrupt"
        (self.corrupt / "run").mkdir(parents=True)
        garbage = random.Random(0).randbytes(4096)
        (self.corrupt / "run" / "events.out.tfevents.123.host").write_bytes(garbage)
        module = [sys.executable, "-m", "kl_monitor.cli"]
        jobs = {
            "module": [*module, "report", str(logdir), "--png", str(self.png("module"))],
            "empty": [*module, "report", str(self.empty)],
            "corrupt": [*module, "report", str(self.corrupt)],
        }
        exe = shutil.which("kl-monitor")
        if exe is not None:
            jobs["entry_point"] = [exe, "report", str(logdir), "--png", str(self.png("entry"))]
        env = {**os.environ, "PYTHONWARNINGS": "ignore"}
        pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs = {name: subprocess.Popen(cmd, **pipes) for name, cmd in jobs.items()}
        self.result: dict[str, subprocess.CompletedProcess] = {}
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            self.result[name] = subprocess.CompletedProcess(jobs[name], proc.returncode, out, err)

    def png(self, name: str) -> Path:
        return self.tmp / f"{name}.png"


@pytest.fixture(scope="module")
def runs(logdir, tmp_path_factory) -> Invocations:
    return Invocations(logdir, tmp_path_factory.mktemp("cli"))


def _assert_clean_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("kl-monitor report: "), lines[0]
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _check_table(stdout: str) -> None:
    """Both runs, both directions with stderr; the reverse run's alert; none for forward."""
    lines = stdout.splitlines()
    assert lines[0].split()[:2] == ["run", "direction"], stdout
    for run in RUNS:
        rows = [ln for ln in lines if ln.startswith(run)]
        assert [r.split()[1] for r in rows] == ["forward", "reverse"], stdout
        for row in rows:
            assert "±" in row and f"({STEPS})" in row, row  # last value, its stderr, step
    split = lines.index(next(ln for ln in lines if ln.startswith(RUNS[1])))
    forward_block, reverse_block = lines[:split], lines[split:]
    alerts = [ln for ln in reverse_block if ln.split()[:1] == ["ALERT"]]
    assert alerts and "collapse at step" in alerts[0] and "groups: -" not in alerts[0], stdout
    assert not any(ln.split()[:1] == ["ALERT"] for ln in forward_block), stdout
    assert any(ln.split() == ["alerts", "none"] for ln in forward_block), stdout


def test_report_on_demo_logs(runs):
    proc, png = runs.result["module"], runs.png("module")
    assert proc.returncode == 0, proc.stderr
    _check_table(proc.stdout)
    assert f"wrote {png}" in proc.stdout
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000


def test_installed_entry_point(runs):
    if "entry_point" not in runs.result:
        pytest.skip("the kl-monitor console script is not on PATH (package not installed)")
    proc = runs.result["entry_point"]
    assert proc.returncode == 0, proc.stderr
    _check_table(proc.stdout)
    assert runs.png("entry").read_bytes()[:8] == PNG_MAGIC


def test_empty_directory(runs):
    line = _assert_clean_error(runs.result["empty"], "no TensorBoard event files")
    assert str(runs.empty) in line


def test_corrupt_event_file(runs):
    line = _assert_clean_error(runs.result["corrupt"], "no readable KLMonitor runs")
    assert str(runs.corrupt) in line


# --------------------------------------------------------------------- in process
# The remaining cases call the CLI's main() in-process: the same code path without the
# interpreter start-up; an exception escaping main() fails the test.
def _main(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(args))
    return rc, out.getvalue(), err.getvalue()


def test_missing_directory(tmp_path):
    rc, out, err = _main("report", str(tmp_path / "nope"))
    assert rc == 2 and out == ""
    assert err.strip() == f"kl-monitor report: {tmp_path / 'nope'} is not a directory."


def test_truncated_event_file_reports_what_is_readable(logdir, tmp_path):
    """A run cut off mid-write (a crash, a copy in progress): report its readable prefix."""
    (src,) = (logdir / RUNS[1]).glob("events.out.tfevents.*")
    data = src.read_bytes()
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / src.name).write_bytes(data[: len(data) // 2])
    rc, out, err = _main("report", str(tmp_path))
    assert rc == 0, err
    rows = [ln for ln in out.splitlines() if ln.startswith("crashed")]
    assert [r.split()[1] for r in rows] == ["forward", "reverse"], out
    last_step = int(rows[0].rsplit("(", 2)[1].split(")")[0])
    assert 0 < last_step < STEPS  # only the first half of the run survived


def test_event_file_truncated_inside_its_first_record(tmp_path):
    (tmp_path / "run").mkdir()
    # a record header announcing 1000 bytes, then the file ends
    header = (1000).to_bytes(8, "little") + b"\0" * 4
    (tmp_path / "run" / "events.out.tfevents.1.host").write_bytes(header)
    rc, out, err = _main("report", str(tmp_path))
    assert rc == 2 and out == ""
    assert err.startswith("kl-monitor report: no readable KLMonitor runs"), err
    assert len(err.strip().splitlines()) == 1


def test_event_files_without_kl_monitor_scalars(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_scalar("train/loss", 1.0, 0)
    rc, out, err = _main("report", str(tmp_path))
    assert rc == 2 and out == ""
    assert "no 'kl/forward' scalars found" in err
    # a custom prefix is looked up as given
    rc, _, err = _main("report", str(tmp_path), "--prefix", "train")
    assert rc == 2 and "no 'train/forward' scalars found" in err


def test_unwritable_png(logdir, tmp_path):
    png = tmp_path / "no_such_dir" / "report.png"
    rc, out, err = _main("report", str(logdir), "--png", str(png))
    assert rc == 1
    assert RUNS[1] in out  # the table is printed before the plot
    assert err.startswith(f"kl-monitor report: cannot write {png}: "), err
    assert len(err.strip().splitlines()) == 1


# --------------------------------------------------------------------- alerts as data
def _log_run(root: Path, alerts: list, text_only: bool = False) -> None:
    """One run's event file: two evaluations' scalars and ``alerts`` as the monitor
    writes them (or only as the human text, as kl_monitor 0.1.0 did)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from kl_monitor import tensorboard as tb

    logger = TensorBoardLogger(str(root), name="run", version="")
    for step in (10, 20):
        logger.log_metrics({"kl/forward": 0.5, "kl/reverse": 0.2}, step=step)
    if text_only:
        for alert in alerts:
            logger.experiment.add_text("kl/alerts", tb.alert_text(alert), global_step=20)
    else:
        tb.write_extras([logger], "kl", 20, None, alerts)
    logger.experiment.flush()


def _report(root: Path) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["report", str(root)]) == 0
    return out.getvalue()


def test_report_reads_the_alert_records_not_the_wording(tmp_path, monkeypatch):
    from kl_monitor import Alert
    from kl_monitor import tensorboard as tb

    alerts = [Alert("collapse", 20, 7.25, (3, 1), "collapse at step 20: …", {"x": math.inf})]
    _log_run(tmp_path / "plain", alerts)
    # a different human wording (or none at all) must not change what the report reads
    monkeypatch.setattr(tb, "alert_text", lambda alert: f"Alarm! {alert.kind} ({alert.step})")
    _log_run(tmp_path / "reworded", alerts)
    plain, reworded = _report(tmp_path / "plain"), _report(tmp_path / "reworded")
    line = "ALERT     collapse at step 20 (statistic 7.25; groups: 3, 1)"
    assert line in plain and line in reworded
    assert plain == reworded


def test_report_reads_text_only_alerts_of_old_logs(tmp_path):
    from kl_monitor import Alert

    _log_run(tmp_path, [Alert("coverage_gap", 20, 6.5, (), "…")], text_only=True)
    assert "ALERT     coverage_gap at step 20 (statistic 6.50; groups: -)" in _report(tmp_path)

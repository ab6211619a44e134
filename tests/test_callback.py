"""KLMonitor inside real Trainer.fit runs on CPU."""

from __future__ import annotations

import csv
import gc
import os
import warnings

import pytest
import torch
from lit_models import (
    namespace,
    ring_data,
    scripted_mixture_module,
    scripted_schedule,
    student_module,
    train_data,
)

from kl_monitor import AlertRules, KLInputs, KLMonitor
from kl_monitor.callback import KLAlertWarning, KLMonitorWarning

NAMESPACES = ("lightning.pytorch", "pytorch_lightning")


def trainer(ns: str = "lightning.pytorch", **kw):
    pl = namespace(ns)
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    defaults.update(kw)
    return pl.Trainer(**defaults)


def read_events(path: str) -> tuple[dict[str, list[tuple[int, float]]], dict, list[str]]:
    from tensorboard.backend.event_processing import event_accumulator as ea

    files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if "tfevents" in f]
    scalars: dict[str, list[tuple[int, float]]] = {}
    tags: dict[str, list[str]] = {}
    texts: list[str] = []
    for f in files:
        acc = ea.EventAccumulator(f, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0, ea.HISTOGRAMS: 0})
        acc.Reload()
        for kind, names in acc.Tags().items():
            if isinstance(names, list):
                tags.setdefault(kind, []).extend(names)
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        for tag in acc.Tags()["tensors"]:
            if tag.startswith("kl/alerts"):
                texts += [s.decode() for e in acc.Tensors(tag) for s in e.tensor_proto.string_val]
    return scalars, tags, texts


# ---------------------------------------------------------------- logging
def test_fit_logs_tags_to_tensorboard_and_csv(tmp_path):
    pl = namespace()
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version="")
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version="")
    every = 5
    monitor = KLMonitor(
        ring_data(1024, seed=1),
        every_n_train_steps=1,
        max_batches=2,
        num_groups=8,
        rules=AlertRules(warmup=3),
    )
    model = scripted_mixture_module("lightning.pytorch", scripted_schedule(onset=8), every=1)
    t = trainer(max_steps=12, logger=[tb, csv_logger], callbacks=[monitor], log_every_n_steps=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, train_data(512, dim=2, batch_size=32))
    del every
    scalars, tags, texts = read_events(str(tmp_path / "tb"))
    required = [
        "kl/forward",
        "kl/reverse",
        "kl/asymmetry",
        "kl/forward_stderr",
        "kl/reverse_stderr",
        "kl/forward_c",
        "kl/forward_variance_reduction",
        "kl/reverse_c",
        "kl/reverse_variance_reduction",
        "kl/forward/group_0",
        "kl/forward/group_7",
        "kl/forward_lower",
        "kl/forward_upper",
        "kl/alert/collapse",
        "kl/alert/coverage_gap",
        "kl/alert/over_dispersion",
        "kl/failures",
    ]
    for tag in required:
        assert tag in scalars, tag
    # the sanity evaluation logs step 0, then every step
    assert [s for s, _ in sorted(scalars["kl/forward"])] == list(range(0, 13))
    # lower/upper are the ±2 stderr band around the value
    f = dict(scalars["kl/forward"])
    se = dict(scalars["kl/forward_stderr"])
    lo = dict(scalars["kl/forward_lower"])
    assert lo[5] == pytest.approx(f[5] - 2 * se[5], rel=1e-5, abs=1e-6)
    assert "kl/log_ratio" in tags["histograms"]
    # custom-scalars layout written once
    assert any(t.endswith("custom_scalars__config__") for t in tags["tensors"])
    # an alert fired (collapse onset at evaluation 8) and was written as text
    assert any(v == 1.0 for _, v in scalars["kl/alert/collapse"] + scalars["kl/alert/coverage_gap"])
    assert texts and "step" in texts[0]
    # the CSV logger got the same scalars
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {"kl/forward", "kl/reverse", "kl/forward/group_3"} <= set(rows[0])
    csv_forward = {int(r["step"]): float(r["kl/forward"]) for r in rows if r.get("kl/forward")}
    assert csv_forward[5] == pytest.approx(f[5], rel=1e-6)


def test_logits_inputs_log_entropies(tmp_path):
    pl = namespace()
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version="")
    monitor = KLMonitor(train_data(256, dim=4, seed=9), every_n_train_steps=5, max_batches=2)
    t = trainer(max_steps=10, logger=[tb], callbacks=[monitor])
    t.fit(student_module("lightning.pytorch"), train_data(256, dim=4))
    scalars, _, _ = read_events(str(tmp_path / "tb"))
    for tag in ("kl/entropy_model", "kl/entropy_reference", "kl/forward", "kl/reverse"):
        assert [s for s, _ in sorted(scalars[tag])] == [0, 5, 10]
    # exact KL of a linear student shrinks under distillation
    fwd = dict(scalars["kl/forward"])
    assert fwd[10] < fwd[0]


# ---------------------------------------------------------------- alerts
def _run_scripted(
    onset, seed, *, every=1, steps=24, stop_on=(), on_alert=None, ns="lightning.pytorch"
):
    monitor = KLMonitor(
        ring_data(1024, seed=seed),
        every_n_train_steps=every,
        max_batches=2,
        num_groups=8,
        stop_on=stop_on,
        on_alert=on_alert,
        seed=seed,
    )
    model = scripted_mixture_module(ns, scripted_schedule(onset=onset), every=every)
    t = trainer(ns, max_steps=steps * every, callbacks=[monitor])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, train_data(4096, dim=2, batch_size=8))
    return monitor, t


def test_scripted_collapse_alert_names_dropped_groups():
    onset, dropped = 12, {1, 2, 5, 6}
    monitor, _ = _run_scripted(onset=onset, seed=0)
    assert monitor.alerts, "no alert for a collapse"
    first = monitor.alerts[0]
    assert first.kind in ("collapse", "coverage_gap")
    delay = first.step - onset  # every=1: one evaluation per step
    assert 0 <= delay < 5, f"alert {delay} evaluations after onset"
    assert first.groups and set(first.groups) <= dropped
    # the model's per-group mass reaches the detector: the dropped modes lose it
    assert first.kind == "collapse"
    assert set(first.details["groups_losing_mass"]) <= dropped
    assert first.details["groups_losing_mass"]


def test_healthy_runs_raise_no_alert():
    for seed in range(10):
        monitor, _ = _run_scripted(onset=None, seed=seed)
        assert monitor.alerts == [], (seed, [a.message for a in monitor.alerts])


def test_stop_on_stops_and_on_alert_receives_alert():
    received = []
    monitor, t = _run_scripted(
        onset=12, seed=0, stop_on=("collapse", "coverage_gap"), on_alert=received.append
    )
    assert received and received[0] is monitor.alerts[0]
    assert t.global_step < 24
    assert t.global_step == received[0].step


def test_alert_warning_on_rank_zero():
    with pytest.warns(KLAlertWarning, match="step"):
        monitor = KLMonitor(
            ring_data(1024, seed=0), every_n_train_steps=1, max_batches=2, num_groups=8
        )
        model = scripted_mixture_module("lightning.pytorch", scripted_schedule(onset=12), every=1)
        trainer(max_steps=20, callbacks=[monitor]).fit(model, train_data(4096, dim=2, batch_size=8))


# ---------------------------------------------------------------- namespaces
@pytest.mark.parametrize("ns", NAMESPACES)
def test_both_namespaces(ns):
    monitor = KLMonitor(train_data(64, dim=4, seed=3), every_n_train_steps=2, max_batches=1)
    t = trainer(ns, max_steps=4, callbacks=[monitor])
    t.fit(student_module(ns), train_data(64, dim=4))
    assert monitor.n_evals == 3 and monitor.last_eval_step == 4


# ---------------------------------------------------------------- isolation
def _final_weights(with_monitor: bool, ns: str = "lightning.pytorch") -> dict[str, torch.Tensor]:
    pl = namespace(ns)
    pl.seed_everything(7, verbose=False)
    model = student_module(ns, dropout=0.3, sample=True)
    held_out = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(128, 4)), batch_size=16, shuffle=True
    )
    callbacks = [KLMonitor(held_out, every_n_train_steps=3, max_batches=2)] if with_monitor else []
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(256, 4)), batch_size=16, shuffle=True
    )
    trainer(ns, max_steps=20, callbacks=callbacks).fit(model, loader)
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_bitwise_identical_with_and_without_monitor():
    a, b = _final_weights(False), _final_weights(True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_eval_mode_and_per_module_flags_restored():
    pl = namespace()
    seen = {}

    class Spy(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen[batch_idx] = (pl_module.training, pl_module.teacher.training)

    model = student_module("lightning.pytorch", dropout=0.5)
    model.teacher.eval()  # a frozen submodule the user keeps in eval mode
    flags = []
    orig = model.kl_inputs

    def spy_inputs(batch):
        flags.append(model.training or torch.is_grad_enabled())
        return orig(batch)

    model.kl_inputs = spy_inputs
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=1, max_batches=1)
    trainer(max_steps=3, callbacks=[monitor, Spy()]).fit(model, train_data(64, dim=4))
    assert flags and not any(flags)  # eval mode, no grad during evaluation
    assert all(v == (True, False) for v in seen.values())


# ---------------------------------------------------------------- failures
def test_broken_kl_inputs_fails_at_sanity_with_clear_error():
    pl = namespace()

    class Broken(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def training_step(self, batch, i):
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def kl_inputs(self, batch):
            return {"logits": self.lin(batch[0])}  # not KLInputs

    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=1)
    with pytest.raises(RuntimeError, match="sanity evaluation failed.*must return KLInputs"):
        trainer(max_steps=3, callbacks=[monitor]).fit(Broken(), train_data(32, dim=4))


def test_missing_kl_inputs_is_a_clear_setup_error():
    pl = namespace()

    class NoInputs(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def training_step(self, batch, i):
            return self.lin(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(TypeError, match="define `kl_inputs"):
        trainer(max_steps=1, callbacks=[KLMonitor(train_data(32, dim=4))]).fit(
            NoInputs(), train_data(32, dim=4)
        )


def test_transient_failure_warns_skips_and_counts(tmp_path):
    pl = namespace()
    model = student_module("lightning.pytorch")
    model.fail_at = {3}  # call 1: sanity; calls 2.. are evaluations with max_batches=1
    csv_logger = pl.loggers.CSVLogger(str(tmp_path), name="csv", version="")
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=1, max_batches=1)
    t = trainer(max_steps=5, callbacks=[monitor], logger=[csv_logger])
    with pytest.warns(KLMonitorWarning, match="injected failure"):
        t.fit(model, train_data(64, dim=4))
    assert monitor.failures == 1
    assert t.global_step == 5
    assert monitor.n_evals == 5  # sanity + 4 of the 5 steps
    with open(tmp_path / "csv" / "metrics.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert max(float(r["kl/failures"]) for r in rows if r.get("kl/failures")) == 1.0


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="every_n_train_steps"):
        KLMonitor(every_n_train_steps=0)
    with pytest.raises(ValueError, match="max_batches"):
        KLMonitor(max_batches=-1)
    with pytest.raises(ValueError, match="stop_on.*'colapse'"):
        KLMonitor(stop_on=("colapse",))
    with pytest.raises(ValueError, match="method"):
        KLMonitor(method="k4")
    with pytest.raises(TypeError, match="rules"):
        KLMonitor(rules={"h": 5})


# ---------------------------------------------------------------- checkpoints
def test_resume_continues_series_and_alert_state(tmp_path):
    pl = namespace()
    onset, every = 10, 1
    schedule = scripted_schedule(onset=onset)

    def run(max_steps, ckpt_path=None):
        ckpt = pl.callbacks.ModelCheckpoint(
            dirpath=str(tmp_path / "ckpt"), save_last=True, every_n_train_steps=1, save_top_k=-1
        )
        tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version="")
        monitor = KLMonitor(
            ring_data(1024, seed=0), every_n_train_steps=every, max_batches=2, num_groups=8
        )
        model = scripted_mixture_module("lightning.pytorch", schedule, every=every)
        t = trainer(
            max_steps=max_steps, callbacks=[monitor, ckpt], logger=[tb], enable_checkpointing=True
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t.fit(model, train_data(4096, dim=2, batch_size=8), ckpt_path=ckpt_path)
        return monitor

    first = run(14)  # collapse begins at 10: alert fires before the stop
    assert first.alerts
    alert_steps = [a.step for a in first.alerts]
    second = run(24, ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=14.ckpt"))
    assert [a.step for a in second.alerts][: len(alert_steps)] == alert_steps  # kept, not re-fired
    assert second.n_evals == first.n_evals + 10
    scalars, _, _ = read_events(str(tmp_path / "tb"))
    steps = sorted(s for s, _ in scalars["kl/forward"])
    assert steps == list(range(0, 25))  # continuous, no step logged twice


def test_state_key_and_state_dict_roundtrip():
    monitor = KLMonitor(prefix="kl_teacher")
    assert monitor.state_key == "KLMonitor{'prefix': 'kl_teacher'}"
    state = monitor.state_dict()
    other = KLMonitor(prefix="kl_teacher")
    other.load_state_dict(state)
    assert other.state_dict() == state


# ---------------------------------------------------------------- memory
def test_500_evaluations_keep_memory_flat():
    import resource  # noqa: F401  (POSIX only, like the CI machines)

    pl = namespace()
    samples: dict[int, tuple[int, float]] = {}

    def rss_mb() -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step in (100, 500):
                samples[trainer.global_step] = (tensors(), rss_mb())

    monitor = KLMonitor(train_data(64, dim=4, seed=5), every_n_train_steps=1, max_batches=1)
    trainer(max_steps=500, callbacks=[monitor, Probe()]).fit(
        student_module("lightning.pytorch"), train_data(500 * 4, dim=4, batch_size=4)
    )
    assert monitor.n_evals == 501
    (t0, r0), (t1, r1) = samples[100], samples[500]
    assert t1 <= t0 * 1.05, (t0, t1)
    assert r1 <= r0 * 1.05, (r0, r1)


def test_inputs_fn_is_used_instead_of_method():
    model = student_module("lightning.pytorch")
    used = []

    def fn(module, batch):
        used.append(True)
        (x,) = batch
        return KLInputs.from_logits(module.teacher(x), module(x))

    monitor = KLMonitor(train_data(32, dim=4), inputs_fn=fn, every_n_train_steps=1, max_batches=1)
    trainer(max_steps=2, callbacks=[monitor]).fit(model, train_data(32, dim=4))
    assert len(used) == 3 and model.calls == 0


# ---------------------------------------------------------------- cadence
def _clocked_run(budget: float, steps: int = 300):
    """A run on a simulated clock: a training step takes 10 ms, an evaluation 200 ms."""
    clock = [0.0]
    pl = namespace()

    class Tick(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock[0] += 0.010

    def slow(module, batch):
        clock[0] += 0.100  # two batches per evaluation
        (x,) = batch
        return KLInputs.from_logits(module.teacher(x), module(x))

    model = student_module("lightning.pytorch")
    monitor = KLMonitor(
        train_data(64, dim=4), inputs_fn=slow, max_batches=2, overhead_budget=budget
    )
    monitor.cadence.clock = lambda: clock[0]
    trainer(max_steps=steps, callbacks=[Tick(), monitor]).fit(
        model, train_data(steps * 4, dim=4, batch_size=4)
    )
    return monitor


def test_default_cadence_keeps_evaluation_within_the_overhead_budget():
    # 2% budget, paid in advance: the 0.2 s sanity evaluation and the next one are paid
    # off after 20 s of training (2000 steps), so nothing more runs in 300 steps; the
    # first 10 steps only timed a step.
    tight = _clocked_run(0.02)
    assert tight.n_evals == 1 and tight.next_eval_step == 2000
    assert tight.cadence.seconds_evaluating == pytest.approx(0.2)
    # 50% budget: an evaluation every 40 steps (0.2 s = 0.5 × 40 × 10 ms), the first
    # at step 80 (0.8 s of training pays for the sanity evaluation and that one).
    loose = _clocked_run(0.5)
    assert loose.n_evals == 1 + len(range(80, 301, 40))
    budget = 0.5 * loose.cadence.seconds_training + 1e-9
    assert loose.cadence.seconds_evaluating <= budget


def test_fixed_cadence_and_budget_validation():
    assert KLMonitor(every_n_train_steps=7).every_n_train_steps == 7
    with pytest.raises(ValueError, match="overhead_budget"):
        KLMonitor(overhead_budget=1.5)


# ---------------------------------------------------------------- checkpoints
def test_state_written_by_version_0_1_0_still_loads():
    """tests/data/monitor_state_v1.json: ``KLMonitor.state_dict()`` of kl_monitor 0.1.0
    (commit 5e4290b) after a scripted collapse, saved as JSON."""
    import json
    from pathlib import Path

    from kl_monitor import Evaluation

    text = (Path(__file__).parent / "data" / "monitor_state_v1.json").read_text()
    old = json.loads(text)
    monitor = KLMonitor(every_n_train_steps=1, num_groups=8)
    monitor.load_state_dict(old)
    assert monitor.n_evals == old["n_evals"] and monitor.alerts[0].kind == "collapse"
    # the same state comes back out, in the same form
    again = json.loads(json.dumps(monitor.state_dict(), allow_nan=True))
    assert json.dumps(again, sort_keys=True) == json.dumps(old, sort_keys=True)
    # and the restored detectors carry on
    last = old["last_result"]
    monitor.rules.update(Evaluation(old["last_eval_step"] + 1, last["kl/forward"], 0.01,
                                    last["kl/reverse"], 0.01))  # fmt: skip
    with pytest.raises(ValueError, match="version 2"):
        KLMonitor().load_state_dict(dict(old, version=2))

"""Everyday Lightning workflows through a real ``Trainer.fit`` (issue 13).

Each test is one user's ordinary day: resuming a checkpoint saved without the
monitor, reusing a monitor in a second Trainer, every CPU precision setting, several
validation dataloaders, ``limit_val_batches``, two monitors, a changed input kind,
tensors on the wrong device, and the adaptive cadence's budget.
"""

from __future__ import annotations

import logging
import math
import warnings

import pytest
import torch
from lit_models import namespace, student_module, train_data
from test_callback import read_events, trainer

from kl_monitor import KLInputs, KLMonitor
from kl_monitor.callback import KLMonitorWarning

pl = namespace()


class Recorder(pl.loggers.Logger):
    """A logger that keeps every ``log_metrics`` call: (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.calls.append((step, dict(metrics)))

    def steps(self, tag: str = "kl/forward") -> list[int]:
        return [s for s, m in self.calls if tag in m]


def quiet_fit(t, model, *loaders, **kw) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(model, *loaders, **kw)


def checkpoint_without_monitor(tmp_path, steps: int) -> str:
    """A plain run of ``steps`` steps, saved the way a project saved it before the monitor."""
    model = student_module("lightning.pytorch")
    t = trainer(max_steps=steps)
    quiet_fit(t, model, train_data(steps * 16, dim=4))
    path = str(tmp_path / "plain.ckpt")
    t.save_checkpoint(path)
    return path


# ---------------------------------------------------------------- 1. resume without state
def test_resume_without_monitor_state_fixed_cadence_evaluates_at_the_resumed_step(tmp_path):
    ckpt = checkpoint_without_monitor(tmp_path, 12)
    rec = Recorder()
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=5, max_batches=1)
    t = trainer(max_steps=31, logger=rec, callbacks=[monitor])
    quiet_fit(t, student_module("lightning.pytorch"), train_data(64 * 16, dim=4), ckpt_path=ckpt)
    assert rec.steps() == [12, 15, 20, 25, 30]  # no step 0, no off-schedule step


def _clocked():
    """A simulated clock: a training step takes 10 ms, a held-out batch 100 ms.

    Returns the ticking callback, an ``inputs_fn`` and the clock for the cadence.
    """
    clock = [0.0]

    class Tick(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock[0] += 0.010

    def slow(module, batch):
        clock[0] += 0.100
        (x,) = batch
        return KLInputs.from_logits(module.teacher(x), module(x))

    return Tick(), slow, lambda: clock[0]


def test_resume_without_monitor_state_adaptive_cadence_matches_a_fresh_run(tmp_path):
    def run(steps, start, ckpt_path=None):
        tick, slow, clock = _clocked()  # each run's clock starts at 0
        rec = Recorder()
        monitor = KLMonitor(
            train_data(64, dim=4), inputs_fn=slow, max_batches=2, overhead_budget=0.5
        )
        monitor.cadence.clock = clock
        t = trainer(max_steps=start + steps, logger=rec, callbacks=[tick, monitor])
        quiet_fit(
            t,
            student_module("lightning.pytorch"),
            train_data((start + steps) * 4, dim=4, batch_size=4),
            ckpt_path=ckpt_path,
        )
        return [s - start for s in rec.steps()]

    fresh = run(200, 0)
    resumed = run(200, 100, checkpoint_without_monitor(tmp_path, 100))
    # 0.2 s per evaluation, 10 ms per step, 50% budget: the sanity evaluation and the
    # next are paid after 80 steps, then one evaluation per 40 steps
    assert fresh == [0, 80, 120, 160]
    assert resumed == fresh  # evaluated at the resumed step, then the fresh run's cadence


# ---------------------------------------------------------------- 2. reuse
def test_monitor_reused_in_a_second_trainer_restarts_its_series():
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=3, max_batches=1)
    runs = []
    for _ in range(2):
        rec = Recorder()
        t = trainer(max_steps=10, logger=rec, callbacks=[monitor])
        quiet_fit(t, student_module("lightning.pytorch"), train_data(320, dim=4))
        runs.append((rec.steps(), monitor.n_evals, monitor.failures))
    assert runs[0] == ([0, 3, 6, 9], 4, 0)
    assert runs[1] == runs[0]  # a new Trainer: the series restarts, as documented


def test_second_fit_on_the_same_trainer_continues_the_series():
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=3, max_batches=1)
    rec = Recorder()
    t = trainer(max_steps=7, logger=rec, callbacks=[monitor])
    model = student_module("lightning.pytorch")
    quiet_fit(t, model, train_data(320, dim=4))
    t.fit_loop.epoch_loop.max_steps = 13
    quiet_fit(t, model, train_data(320, dim=4))
    assert rec.steps() == [0, 3, 6, 9, 12]
    assert monitor.n_evals == 5


# ---------------------------------------------------------------- 3. precision
PRECISIONS = ("32-true", "64-true", "bf16-true", "bf16-mixed", "16-mixed", "16-true")
EXPECTED_DTYPE = {
    "32-true": torch.float32,
    "64-true": torch.float64,
    "bf16-true": torch.bfloat16,
    "16-true": torch.float16,
    "bf16-mixed": torch.float32,
    "16-mixed": torch.float32,  # on CPU, Lightning runs bf16-mixed instead (it warns)
}


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_cpu_precision_setting_converts_held_out_batches(precision):
    model = student_module("lightning.pytorch")
    seen: list[torch.dtype] = []
    original = model.kl_inputs

    def spy(batch):
        seen.append(batch[0].dtype)
        return original(batch)

    model.kl_inputs = spy
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=2, max_batches=1)
    quiet_fit(trainer(max_steps=4, precision=precision, callbacks=[monitor]), model,
              train_data(64, dim=4))
    assert monitor.n_evals == 3 and monitor.failures == 0
    assert set(seen) == {EXPECTED_DTYPE[precision]}  # what validation_step would get
    assert math.isfinite(monitor.last_result["kl/forward"])


def test_batch_hooks_and_validation_eval_hook_are_applied():
    model = student_module("lightning.pytorch", dropout=0.5)
    calls: list[str] = []

    def before(batch, dataloader_idx):
        calls.append(f"before:{dataloader_idx}")
        return {"x": batch[0]}  # the user's own batch format from here on

    def after(batch, dataloader_idx):
        calls.append("after")
        return (batch["x"],)

    def model_eval():
        calls.append("eval")
        model.eval()
        model.net[0].train()  # MC dropout: the user keeps dropout on for validation

    model.on_before_batch_transfer = before
    model.on_after_batch_transfer = after
    model.on_validation_model_eval = model_eval
    dropout_on: list[bool] = []
    original = model.kl_inputs
    model.kl_inputs = lambda batch: (dropout_on.append(model.net[0].training), original(batch))[1]
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=2, max_batches=1)
    quiet_fit(trainer(max_steps=2, callbacks=[monitor], limit_val_batches=0), model,
              train_data(64, dim=4))
    assert monitor.n_evals == 2 and monitor.failures == 0
    assert calls.count("eval") == 2 and calls.count("after") >= 2
    assert "before:0" in calls and all(dropout_on)
    assert model.training and model.net[0].training  # flags restored for training


# ---------------------------------------------------------------- 4. several loaders
def _marked(value: float, n: int = 32) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.full((n, 4), value)), batch_size=16
    )


def _loader_run(val, caplog, **kw):
    model = student_module("lightning.pytorch")
    seen: list[float] = []
    original = model.kl_inputs
    model.kl_inputs = lambda batch: (seen.append(float(batch[0][0, 0])), original(batch))[1]
    monitor = KLMonitor(every_n_train_steps=2, max_batches=1, **kw)
    quiet_fit(trainer(max_steps=2, callbacks=[monitor]), model, train_data(64, dim=4), val)
    return seen, monitor


class Lines(logging.Handler):
    """The monitor's log lines, which go through Lightning's own (non-propagating) logger."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def caplog():
    """Replaces pytest's caplog: Lightning's logger does not propagate to the root."""
    handler = Lines()
    log = logging.getLogger("lightning.pytorch.kl_monitor")
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)


def _first_monitor_line(caplog) -> str:
    return next(line for line in caplog.lines if "KLMonitor(prefix=" in line)


@pytest.mark.parametrize(
    "kind", ["dict", "list", "combined"],
)
def test_several_validation_loaders_need_a_choice_and_the_choice_is_named(kind, caplog):
    from lightning.pytorch.utilities import CombinedLoader

    loaders = {"clean": _marked(1.0), "noisy": _marked(2.0)}
    val = {
        "dict": loaders,
        "list": list(loaders.values()),
        "combined": CombinedLoader(loaders, mode="sequential"),
    }[kind]
    with pytest.raises(RuntimeError, match=r"2 validation dataloaders .*val_loader="):
        _loader_run(val, caplog)
    key = 1 if kind == "list" else "noisy"
    seen, monitor = _loader_run(val, caplog, val_loader=key)
    assert seen == [2.0, 2.0] and monitor.n_evals == 2  # only the chosen loader
    assert f"validation dataloader {key!r} (index 1 of 2)" in _first_monitor_line(caplog)
    with pytest.raises(RuntimeError, match=r"val_loader='nope'.* is not one of"):
        _loader_run(val, caplog, val_loader="nope")


def test_single_validation_loader_is_named_in_the_first_log_line(caplog):
    seen, monitor = _loader_run(_marked(3.0), caplog)
    assert seen == [3.0, 3.0]
    assert "held-out data from the validation dataloader;" in _first_monitor_line(caplog)


# ---------------------------------------------------------------- 5. limit_val_batches
@pytest.mark.parametrize(("limit", "taken"), [(2, 2), (0.5, 2), (1.0, 4), (10, 4)])
def test_limit_val_batches_caps_the_monitor_and_warns_once(limit, taken, caplog):
    model = student_module("lightning.pytorch")
    original = model.kl_inputs
    calls: list[int] = []
    model.kl_inputs = lambda batch: (calls.append(1), original(batch))[1]
    monitor = KLMonitor(every_n_train_steps=1, max_batches=4)
    held_out = train_data(64, dim=4, batch_size=16)  # 4 batches
    t = trainer(max_steps=2, callbacks=[monitor], limit_val_batches=limit)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(model, train_data(64, dim=4), held_out)
    assert len(calls) == 3 * taken  # sanity evaluation and two steps
    capped = [w for w in caught if "limit_val_batches" in str(w.message)]
    assert len(capped) == (1 if taken < 4 else 0)
    if capped:
        assert f"{taken} batches, not max_batches=4" in str(capped[0].message)
        assert "limit_val_batches" in _first_monitor_line(caplog)


def test_limit_val_batches_zero_is_a_clear_error_before_training():
    monitor = KLMonitor(every_n_train_steps=1, max_batches=4)
    t = trainer(max_steps=2, callbacks=[monitor], limit_val_batches=0)
    with pytest.raises(RuntimeError, match=r"limit_val_batches=0\) leaves no validation batch"):
        t.fit(student_module("lightning.pytorch"), train_data(64, dim=4), train_data(64, dim=4))
    assert t.global_step == 0


def test_limit_val_batches_does_not_apply_to_the_monitors_own_dataloader():
    model = student_module("lightning.pytorch")
    monitor = KLMonitor(train_data(128, dim=4), every_n_train_steps=1, max_batches=4)
    quiet_fit(trainer(max_steps=2, callbacks=[monitor], limit_val_batches=0), model,
              train_data(64, dim=4))
    assert model.calls == 3 * 4


# ---------------------------------------------------------------- 7. two monitors
def _layout_categories(path: str) -> list[str]:
    import os

    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.plugins.custom_scalar import layout_pb2

    files = [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs if "tfevents" in f]
    layouts = []
    for f in files:
        acc = ea.EventAccumulator(f, size_guidance={ea.TENSORS: 0})
        acc.Reload()
        if "custom_scalars__config__" in acc.Tags()["tensors"]:
            events = acc.Tensors("custom_scalars__config__")
            layouts.append(layout_pb2.Layout.FromString(events[-1].tensor_proto.string_val[0]))
    assert len(layouts) == 1  # the plugin reads the last layout of the run
    return [c.title for c in layouts[0].category]


def test_two_monitors_with_different_prefixes_both_have_a_dashboard(tmp_path):
    tb = pl.loggers.TensorBoardLogger(str(tmp_path), name="tb", version="")
    monitors = [
        KLMonitor(train_data(32, dim=4), every_n_train_steps=2, max_batches=1, prefix=p)
        for p in ("kl_teacher", "kl_data")
    ]
    quiet_fit(trainer(max_steps=2, logger=tb, callbacks=monitors),
              student_module("lightning.pytorch"), train_data(64, dim=4))
    titles = _layout_categories(str(tmp_path / "tb"))
    assert sorted(titles) == ["KL monitor (kl_data)", "KL monitor (kl_teacher)"]
    scalars, _, _ = read_events(str(tmp_path / "tb"))
    assert {"kl_teacher/forward", "kl_data/forward"} <= set(scalars)


# ---------------------------------------------------------------- 8. input kind changed
def test_resume_after_the_input_kind_changed_restarts_with_a_clear_message(tmp_path):
    ckpt_dir = tmp_path / "ckpt"
    rec = Recorder()

    def run(model, steps, ckpt_path=None):
        monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=4, max_batches=1)
        ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(ckpt_dir), save_last=True)
        t = trainer(max_steps=steps, logger=rec, callbacks=[monitor, ckpt],
                    enable_checkpointing=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.fit(model, train_data(steps * 16, dim=4), ckpt_path=ckpt_path)
        return monitor, [str(w.message) for w in caught if w.category is KLMonitorWarning]

    first, _ = run(student_module("lightning.pytorch"), 9)
    assert first.n_evals == 3 and first.state_dict()["kind"] == "logits"
    rec.calls.clear()
    model = student_module("lightning.pytorch")

    def log_probs(batch):
        (x,) = batch
        return KLInputs.from_log_probs(
            model.teacher(x).log_softmax(-1)[:, 0], model(x).log_softmax(-1)[:, 0]
        )

    model.kl_inputs = log_probs
    second, messages = run(model, 17, ckpt_path=str(ckpt_dir / "last.ckpt"))
    assert len(messages) == 1
    assert "'logits' inputs" in messages[0] and "'log_probs' inputs" in messages[0]
    assert "restarts at step 9" in messages[0]
    assert rec.steps() == [9, 12, 16]  # evaluated at the resumed step, then the cadence
    assert second.n_evals == 3 and second.state_dict()["kind"] == "log_probs"


# ---------------------------------------------------------------- 9. devices
@pytest.mark.parametrize("device", ["meta"])
def test_inputs_on_another_device_name_both_devices(device):
    model = student_module("lightning.pytorch")
    original = model.kl_inputs
    model.kl_inputs = lambda batch: KLInputs.from_logits(
        *(t.to(device) for t in (original(batch).reference, original(batch).model))
    )
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=1, max_batches=1)
    t = trainer(max_steps=2, callbacks=[monitor])
    with pytest.raises(RuntimeError, match=rf"`reference` on device {device}, but the module "
                       r"is on cpu.*never materialised"):
        quiet_fit(t, model, train_data(64, dim=4))
    assert t.global_step == 0


def test_inputs_moving_to_another_device_mid_run_skip_with_the_devices_named():
    model = student_module("lightning.pytorch")
    original = model.kl_inputs

    def later_on_meta(batch):
        inputs = original(batch)
        if model.calls > 1:
            return KLInputs.from_logits(inputs.reference, inputs.model.to("meta"))
        return inputs

    model.kl_inputs = later_on_meta
    monitor = KLMonitor(train_data(32, dim=4), every_n_train_steps=1, max_batches=1)
    with pytest.warns(KLMonitorWarning, match=r"`model` on device meta, but the module is on cpu"):
        trainer(max_steps=2, callbacks=[monitor]).fit(model, train_data(64, dim=4))
    assert monitor.failures == 2 and monitor.n_evals == 1


# ---------------------------------------------------------------- 10. the budget
def test_adaptive_cadence_stays_within_its_budget_right_after_every_evaluation():
    tick, slow, clock = _clocked()
    budget, ratios = 0.25, []

    class AfterEachEvaluation(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if monitor.last_eval_step == trainer.global_step > 0:
                c = monitor.cadence
                ratios.append(c.seconds_evaluating / c.seconds_training)

    monitor = KLMonitor(
        train_data(64, dim=4), inputs_fn=slow, max_batches=2, overhead_budget=budget
    )
    monitor.cadence.clock = clock
    t = trainer(max_steps=500, callbacks=[tick, monitor, AfterEachEvaluation()])
    t.fit(student_module("lightning.pytorch"), train_data(2000, dim=4, batch_size=4))
    # 0.2 s per evaluation, 10 ms per step: one evaluation per 80 steps, from step 160
    assert len(ratios) == 5
    assert max(ratios) <= budget * (1 + 1e-9), ratios

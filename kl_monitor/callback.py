"""`KLMonitor`: the Lightning callback.

The callback only wires Lightning's hooks to three parts that know nothing of each
other: the ``Cadence`` (when to evaluate), the ``Evaluator`` (held-out batches to a
typed result) and the actions (log, warn, hook, stop). One evaluation, from a
held-out batch to a logged scalar and an alert:

1. ``Evaluator.accumulate``: ``kl_inputs(batch)`` -> ``KLInputs`` -> ``metric.update_from``;
2. ``Evaluator.compute``: ``metric.compute()`` -> a typed result (one host transfer);
3. ``PairedRows.evidence`` (each series' change against its baseline rows, paired
   row by row) -> ``AlertEngine.update`` -> ``Alert`` objects (sample-only inputs,
   or ``rules=AlertRules()``: ``Evaluation.from_result`` -> ``AlertRules.update``);
4. ``actions.evaluation_scalars`` (``tensorboard.scalars``) -> ``logger.log_metrics``;
5. ``tensorboard.write_extras``: the alert as text and as a JSON record;
6. ``actions.act_on_alerts``: warning, ``on_alert``, ``should_stop``.

``_KLMonitorLogic`` imports no Lightning namespace. The public ``KLMonitor`` derives
from the ``Callback`` class of every installed namespace (``lightning.pytorch`` and
``pytorch_lightning``), so one class passes the ``isinstance`` check of either Trainer.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from . import _lightning_compat as compat
from . import actions, sample_metrics
from . import tensorboard as tb
from ._utils import warn_once
from .actions import KLAlertWarning, KLMonitorWarning
from .alerting import AlertEngine, AlertThresholds
from .cadence import Cadence
from .detectors import ALERT_KINDS, Alert, AlertRules, Evaluation
from .evaluator import Evaluator, MetricConfig
from .inputs import KLInputs
from .pairing import PairedRows
from .results import KLResult, SamplesResult
from .stats import METHODS
from .support import LeakedMassRule

__all__ = ["KLMonitor", "KLAlertWarning", "KLMonitorWarning"]

_REDUCTIONS = ("token_mean", "sequence_sum")
_UNIT = {"token_mean": "nats per token", "sequence_sum": "nats per sequence"}
#: Version of ``state_dict``; version 1 (kl_monitor 0.1.0) has the same keys.
_STATE_VERSION = 1


def _check_config(
    every_n_train_steps: Any, overhead_budget: Any, max_batches: Any, method: Any,
    reduction: Any, prefix: Any, rules: Any, inputs_fn: Any, on_alert: Any,
    stop_on: Sequence[str],
) -> None:  # fmt: skip
    """Reject a bad configuration with a message naming the argument."""
    if every_n_train_steps is not None and (
        not isinstance(every_n_train_steps, int) or every_n_train_steps < 1
    ):
        raise ValueError(
            "`every_n_train_steps` must be an int ≥ 1, or None for a cadence set by "
            f"`overhead_budget`, got {every_n_train_steps!r}."
        )
    if not isinstance(overhead_budget, (int, float)) or not 0 < overhead_budget < 1:
        raise ValueError(
            "`overhead_budget` must be a fraction of training time in (0, 1), "
            f"got {overhead_budget!r}."
        )
    if not isinstance(max_batches, int) or max_batches < 1:
        raise ValueError(f"`max_batches` must be an int ≥ 1, got {max_batches!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be 'cv', 'k3' or 'naive', got {method!r}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"`reduction` must be 'token_mean' or 'sequence_sum', got {reduction!r}."
        )
    if not isinstance(prefix, str) or not prefix:
        raise ValueError(f"`prefix` must be a non-empty string, got {prefix!r}.")
    unknown = sorted(set(stop_on) - set(ALERT_KINDS))
    if unknown:
        raise ValueError(f"`stop_on` has unknown alert kinds {unknown}; expected {ALERT_KINDS}.")
    if rules is not None and not isinstance(rules, (AlertThresholds, AlertEngine, AlertRules)):
        raise TypeError(
            "`rules` must be an AlertThresholds (or an AlertEngine; AlertRules for the "
            f"legacy level detectors), got {type(rules).__name__}."
        )
    for name, fn in (("inputs_fn", inputs_fn), ("on_alert", on_alert)):
        if fn is not None and not callable(fn):
            raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}.")


class _KLMonitorLogic:
    """Namespace-free implementation of ``KLMonitor`` (see its docstring)."""

    def __init__(
        self,
        dataloader: Iterable | None = None,
        *,
        val_loader: int | str | None = None,
        inputs_fn: Callable[[Any, Any], KLInputs] | None = None,
        every_n_train_steps: int | None = None,
        overhead_budget: float = 0.02,
        max_batches: int = 8,
        method: str = "cv",
        reduction: str = "token_mean",
        num_groups: int | None = None,
        prefix: str = "kl",
        rules: AlertThresholds | AlertEngine | AlertRules | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        stop_on: Sequence[str] = (),
        log_histograms: bool = True,
        prog_bar: bool = False,
        seed: int = 0,
        sample_estimator: str = "knn",
        num_cells: int = 16,
        max_samples: int = 8192,
    ) -> None:
        stop_on = (stop_on,) if isinstance(stop_on, str) else tuple(stop_on)
        _check_config(every_n_train_steps, overhead_budget, max_batches, method, reduction,
                      prefix, rules, inputs_fn, on_alert, stop_on)  # fmt: skip
        compat.check_val_loader(val_loader)
        sample_metrics.check_monitor_config(sample_estimator, num_cells, max_samples, num_groups)
        self.every_n_train_steps = every_n_train_steps
        self.overhead_budget = float(overhead_budget)
        self.max_batches = max_batches
        self.method, self.reduction = method, reduction
        self.prefix = prefix
        if rules is None or isinstance(rules, AlertThresholds):
            rules = AlertEngine(rules)
        #: the alert logic: an ``AlertEngine`` on paired evidence (default, or given
        #: ``AlertThresholds``), or 0.1.0's level detectors when given ``AlertRules``
        self.rules: AlertEngine | AlertRules = rules
        # the model's mass outside the reference's support (logits), its own series
        # (a level CUSUM with the legacy rules' settings when given them)
        legacy = rules if isinstance(rules, AlertRules) else AlertRules()
        self.leak_rule = LeakedMassRule(k=legacy.k, h=legacy.h, warmup=legacy.warmup)
        self.on_alert = on_alert
        self.stop_on = stop_on
        self.prog_bar = prog_bar
        self.seed = seed
        self.cadence = Cadence(every_n_train_steps, overhead_budget)
        config = MetricConfig(method, reduction, num_groups, sample_estimator, num_cells,
                              max_samples, seed)  # fmt: skip
        self.evaluator = Evaluator(dataloader, inputs_fn, config, log_histograms, val_loader)
        self._fresh_rules_type = type(self.rules)
        self._fresh_rules = copy.deepcopy(self.rules.state_dict())
        self._reset_run()
        self._layout_written = False
        self._layout: tuple[str, list[int] | None] = ("nats", None)
        self._trainer_ref: Callable[[], Any] | None = None
        self._continuing, self._sanity_seconds = False, 0.0

    def _reset_run(self) -> None:
        """Forget every evaluation, as a new monitor would (reuse, a changed input kind)."""
        self.cadence = Cadence(self.every_n_train_steps, self.overhead_budget, self.cadence.clock)
        self.failures = 0
        self.alerts: list[Alert] = []
        #: the scalars logged at the last evaluation, and its typed result
        self.last_result: dict[str, float] = {}
        self.last_evaluation: KLResult | None = None
        if not isinstance(self.rules, self._fresh_rules_type):  # a 0.1.0 checkpoint switched
            self.rules = self._fresh_rules_type()
        self.rules.load_state_dict(copy.deepcopy(self._fresh_rules))
        engine = isinstance(self.rules, AlertEngine)
        self.evaluator.pairing = PairedRows() if engine else None
        #: sample-only results (k-NN, binned) have no per-row values to pair: with the
        #: engine, their alerts come from the level detectors
        self.sample_rules = AlertRules() if engine else None
        # the checkpoint's input kind, compared with the inputs' at on_train_start
        self._restored_kind: str | None = None
        self._cells_logged = False

    @property
    def num_groups(self) -> int | None:
        """Groups of the labels: as given, or inferred from the first evaluation."""
        return self.evaluator.config.num_groups

    # the checkpointed schedule lives in the cadence
    n_evals = property(lambda self: self.cadence.n_evals)
    last_eval_step = property(lambda self: self.cadence.last_eval_step)
    next_eval_step = property(lambda self: self.cadence.next_eval_step)

    # ---------------------------------------------------------------- Lightning
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)  # type: ignore[attr-defined]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.evaluator.inputs_fn is None and not callable(
            getattr(pl_module, "kl_inputs", None)
        ):
            raise TypeError(
                f"KLMonitor needs the inputs of each held-out batch: define "
                f"`kl_inputs(self, batch) -> KLInputs` on {type(pl_module).__name__}, "
                "or pass `inputs_fn=lambda module, batch: KLInputs...` to KLMonitor."
            )
        # Before the checkpoint is restored. Another Trainer: a new run (documented
        # reuse); a checkpoint, if any, restores the monitor's state after this.
        if self._trainer_ref is not None and self._trainer_ref() is not trainer:
            self._reset_run()
            self.evaluator.kind, self.evaluator.metric = None, None
            self._layout_written = False
        self._layout: tuple[str, list[int] | None] = ("nats", None)
        self._trainer_ref = weakref.ref(trainer)
        self.evaluator.held = None

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # The loop's step (and, with some strategies, this callback's state) is restored
        # only after this hook: validate here; on_train_start logs at the restored step.
        self._continuing = compat.continuing(trainer, self.cadence.resumed)
        started = self.cadence.clock()
        self._sanity(trainer, pl_module, 1 if self._continuing else self.max_batches)
        if trainer.is_global_zero:
            compat.log_line(trainer, self.prefix, self.evaluator.held, self.cadence,
                            self.evaluator.inferred_groups)  # fmt: skip
        if trainer.is_global_zero and not self._layout_written:
            logits = self.evaluator.kind == "logits"
            unit = _UNIT[self.reduction] if logits else "nats"
            self._layout_written = tb.write_layout(trainer.loggers, self.prefix, unit,
                                                   logits=logits)  # fmt: skip
            self._layout = (unit, None)  # the unit, and the groups the charts show
        self._sanity_seconds = self.cadence.clock() - started  # all of it is budgeted

    def _sanity(self, trainer: Any, pl_module: Any, limit: int) -> None:
        """Evaluate before training; any error stops ``fit`` now, with a clear message."""
        try:
            compat.check_module_device(pl_module)
            self._accumulate(trainer, pl_module, limit)
        except Exception as err:
            raise RuntimeError(
                "KLMonitor sanity evaluation failed before training started "
                f"({type(err).__name__}: {err}). Check `kl_inputs`/`inputs_fn` and the "
                "held-out dataloader: they must return KLInputs for one batch."
            ) from err

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        step = trainer.global_step
        if self.cadence.resumed and self._restored_kind not in (None, self.evaluator.kind):
            compat.warn_kind_changed(trainer, self.prefix, self._restored_kind,
                                     self.evaluator.kind, self.n_evals, step)  # fmt: skip
            self._reset_run()
            self._continuing = True
        if self.cadence.resumed:  # the checkpoint's series goes on
            self.evaluator.reset()
            self.cadence.after_resume()
            return
        started = self.cadence.clock()
        if self._continuing:  # resumed without monitor state: evaluate at this step
            self._sanity(trainer, pl_module, self.max_batches)
        self._finish(trainer, pl_module, step=step, in_step=False)
        seconds = self._sanity_seconds + self.cadence.clock() - started
        self.cadence.after_sanity(step, seconds)

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self.cadence.due(step):
            self.cadence.run(
                step,
                lambda: self.evaluate(trainer, pl_module),
                lambda interval: int(trainer.strategy.broadcast(interval, src=0)),
            )

    def state_dict(self) -> dict[str, Any]:
        return _monitor_state(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _restore_monitor_state(self, state_dict)

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, trainer: Any, pl_module: Any) -> dict[str, float] | None:
        """Evaluate now and log; returns the logged scalars (``None`` if skipped).

        A failure warns, counts in ``<prefix>/failures`` and skips this evaluation;
        ranks agree on skipping, so a failure on one rank never hangs the others.
        """
        error: BaseException | None = None
        try:
            self._accumulate(trainer, pl_module, self.max_batches)
        except Exception as err:  # the monitor must never stop training
            error = err
        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            self._skip(trainer, error)
            return None
        return self._finish(trainer, pl_module, step=trainer.global_step, in_step=True)

    def _accumulate(self, trainer: Any, pl_module: Any, limit: int) -> None:
        if self.evaluator.held is None:
            held = self.evaluator.held_out(trainer, self.max_batches)
            if held.note:
                warn_once(f"limit_val_batches/{self.prefix}",
                          f"KLMonitor(prefix={self.prefix!r}) evaluates {held.note}.",
                          KLMonitorWarning)  # fmt: skip
        # The same seed at every evaluation: model samples drawn with common random
        # numbers pair with the baseline's (legacy rules keep a seed per evaluation).
        paired = self.evaluator.pairing is not None
        seed = self.seed if paired else self.seed + self.cadence.n_evals
        self.evaluator.accumulate(trainer, pl_module, limit, seed)

    def _skip(self, trainer: Any, error: BaseException | None) -> None:
        self.failures += 1
        self.evaluator.reset()
        actions.report_skip(trainer, self.prefix, self.failures, self.max_batches, error)

    def _finish(
        self, trainer: Any, pl_module: Any, step: int, in_step: bool
    ) -> dict[str, float] | None:
        """Sync and compute (a collective), run the detectors, log, act on alerts."""
        try:
            result = self.evaluator.compute()
        except ValueError as err:
            # Nothing usable on any rank (every row NaN or masked). The synced state is
            # the same on every rank, so all of them skip together.
            self._skip(trainer, err)
            return None
        self.cadence.record(step)
        fired = _alerts_of(self, trainer, step, result)
        self.alerts.extend(fired)
        engine = self.rules if isinstance(self.rules, AlertEngine) else None
        open_kind = engine.kind if engine is not None and engine.open else None
        scalars = actions.evaluation_scalars(self.prefix, result, self.failures, fired, open_kind)
        self.last_result, self.last_evaluation = scalars, result
        actions.log_scalars(trainer, scalars, step)
        if trainer.is_global_zero:
            tb.write_extras(trainer.loggers, self.prefix, step, self.evaluator.histogram, fired)
            _show_top_groups(self, trainer, result)
        if in_step and self.prog_bar:
            actions.show_in_progress_bar(pl_module, self.prefix, result)
        actions.act_on_alerts(trainer, fired, self.on_alert, self.stop_on)
        return scalars


def _monitor_state(monitor: _KLMonitorLogic) -> dict[str, Any]:
    """The monitor's checkpoint state: schedule, alerts, detectors and what they need."""
    state = {
        "version": _STATE_VERSION,
        **monitor.cadence.state_dict(),
        "failures": monitor.failures,
        "alerts": [a.to_dict() for a in monitor.alerts],
        "rules": monitor.rules.state_dict(),
        "kind": monitor.evaluator.kind or monitor._restored_kind,
        "last_result": dict(monitor.last_result),
        # only once the leaked-mass series has started, so a state without it (a
        # monitor of samples, or one written by 0.1.0) round-trips unchanged
        **({"leak_rule": monitor.leak_rule.state_dict()} if monitor.leak_rule.n_values else {}),
    }
    # the cells of sample-only inputs: an optional key, so other states keep the
    # exact form of version 1
    cells = sample_metrics.cells_of(monitor.evaluator.metric)
    if cells is not None:
        state["cells"] = cells
    if monitor.evaluator.pairing is not None:
        state["pairing"] = monitor.evaluator.pairing.state_dict()
    if monitor.sample_rules is not None and monitor.sample_rules.n_evaluations:
        state["sample_rules"] = monitor.sample_rules.state_dict()
    return state


def _restore_monitor_state(monitor: _KLMonitorLogic, state_dict: dict[str, Any]) -> None:
    """Inverse of ``_monitor_state`` (a version-1 state from 0.1.0 included)."""
    version = state_dict.get("version")
    if version != _STATE_VERSION:
        raise ValueError(
            f"KLMonitor checkpoint state has version {version!r}; this kl_monitor reads "
            f"version {_STATE_VERSION} (written by kl_monitor 0.1.0 and later)."
        )
    monitor.cadence.load_state_dict(state_dict)
    monitor.failures = int(state_dict["failures"])
    monitor.alerts = [Alert(**a) for a in state_dict["alerts"]]
    rules = state_dict["rules"]
    if "thresholds" in rules:
        monitor.rules = AlertEngine()
        monitor.evaluator.pairing = monitor.evaluator.pairing or PairedRows()
        monitor.sample_rules = monitor.sample_rules or AlertRules()
    elif not isinstance(monitor.rules, AlertRules):
        # a checkpoint of the level detectors (0.1.0): they carry on where they were
        monitor.rules, monitor.evaluator.pairing, monitor.sample_rules = AlertRules(), None, None
    monitor.rules.load_state_dict(rules)
    if monitor.evaluator.pairing is not None and "pairing" in state_dict:
        monitor.evaluator.pairing.load_state_dict(state_dict["pairing"])
    if monitor.sample_rules is not None and "sample_rules" in state_dict:
        monitor.sample_rules.load_state_dict(state_dict["sample_rules"])
    if "leak_rule" in state_dict:  # checkpoints from before the leaked-mass series
        monitor.leak_rule.load_state_dict(state_dict["leak_rule"])
    monitor._restored_kind = state_dict.get("kind")
    monitor.last_result = dict(state_dict.get("last_result", {}))
    cells = state_dict.get("cells")
    if cells is not None:
        monitor.evaluator.cells = torch.tensor(cells, dtype=torch.float64)
        if monitor.evaluator.metric is not None:
            monitor.evaluator.metric.centroids = monitor.evaluator.cells


def _alerts_of(
    monitor: _KLMonitorLogic, trainer: Any, step: int, result: KLResult
) -> list[Alert]:
    """This evaluation's alerts: the engine's (paired), or the level detectors' for
    sample-only inputs and ``rules=AlertRules()``, plus the leaked-mass series'."""
    fired = _engine_alerts(monitor, trainer, step)
    levels = monitor.rules if isinstance(monitor.rules, AlertRules) else None
    if levels is None and isinstance(result, SamplesResult):
        levels = monitor.sample_rules
    if levels is not None:
        fired = levels.update(Evaluation.from_result(step, result))
    # the leaked-mass series always learns; its alert is one more over-dispersion
    # explanation, reported unless the KL rules reported that kind at this evaluation
    leaks = monitor.leak_rule.update(step, result)
    kinds = getattr(monitor.rules, "kinds", ALERT_KINDS)
    if "over_dispersion" in kinds and not any(a.kind == "over_dispersion" for a in fired):
        fired += leaks
    cells = sample_metrics.cells_as_groups(result)
    if cells is not None:
        fired = [sample_metrics.with_cells(alert, cells) for alert in fired]
        if trainer.is_global_zero and not monitor._cells_logged:
            monitor._cells_logged = tb.write_cells(trainer.loggers, monitor.prefix, step, cells)
    return fired


def _show_top_groups(monitor: _KLMonitorLogic, trainer: Any, result: KLResult) -> None:
    """With many groups, point the per-group charts at the top groups (and the alerted)."""
    if not monitor._layout_written:
        return
    unit, shown = monitor._layout
    engine = monitor.rules if isinstance(monitor.rules, AlertEngine) else None
    alerted = engine.groups if engine is not None and engine.open else ()
    top = tb.top_groups(result, alerted)
    if top is not None and top != shown:
        logits = monitor.evaluator.kind == "logits"
        tb.write_layout(trainer.loggers, monitor.prefix, unit, top, logits)
        monitor._layout = (unit, top)


def _engine_alerts(monitor: _KLMonitorLogic, trainer: Any, step: int) -> list[Alert]:
    """The engine's alerts from this evaluation's paired evidence (a collective)."""
    pairing = monitor.evaluator.pairing
    if pairing is None or not isinstance(monitor.rules, AlertEngine) or not pairing.has_rows:
        return []

    def reduce(t: Any) -> Any:
        if trainer.world_size == 1:
            return t
        device = trainer.strategy.root_device
        return trainer.strategy.reduce(t.to(device), reduce_op="sum").cpu()

    decision = monitor.rules.update(pairing.evidence(step, monitor.num_groups, reduce))
    pairing.rebase(decision)
    return decision.alerts


def _callback_bases() -> tuple[type, ...]:
    bases: list[type] = []
    for name in ("lightning.pytorch", "pytorch_lightning"):
        try:
            module = __import__(name, fromlist=["Callback"])
        except ImportError:
            continue
        bases.append(module.Callback)
    if not bases:
        raise ImportError("kl_monitor needs `pytorch_lightning` or `lightning` installed.")
    return tuple(bases)


class KLMonitor(_KLMonitorLogic, *_callback_bases()):  # type: ignore[misc]
    """Watch forward and reverse KL between the model and a reference during training.

    Once before training (a sanity check that fails fast on a broken ``kl_inputs``),
    then every ``every_n_train_steps`` optimizer steps, or by default as often as an
    ``overhead_budget`` of the training time allows (2%: the cadence adapts to the
    measured cost of an evaluation and of a training step), it runs up to
    ``max_batches`` held-out batches through the model's
    ``kl_inputs(self, batch) -> KLInputs`` (or ``inputs_fn(module, batch)``) under
    ``torch.no_grad()`` in eval mode on the module's device, with its own RNG, so the
    training run is bitwise unchanged. It logs, through every logger of the Trainer:

    - ``<prefix>/forward``, ``/reverse``, ``/asymmetry`` (forward − reverse), their
      ``_stderr`` and ``_lower``/``_upper`` (value ∓ 2 stderr);
    - for sampled inputs, ``/forward_c``, ``/forward_variance_reduction`` and the same
      for reverse, plus ``/reverse_ess`` when reverse is importance-weighted;
    - ``/entropy_model`` and ``/entropy_reference`` for logits;
    - for sample-only inputs (``KLInputs.from_samples``), ``/n``, ``/m``, ``/d``, ``/k``
      (k-NN) or ``/num_cells`` and ``/ndb`` (binned), ``/ties``, ``/dropped``, and per
      group (your labels, or k-means cells of the reference, whose centres go once to
      the ``<prefix>/cells`` text) ``/reverse_mass/group_<g>``;
    - ``/forward/group_<g>``, ``/reverse/group_<g>`` and ``/mass/group_<g>`` with groups;
    - ``/alert/<kind>`` (0 or 1) and ``/failures``.

    With a TensorBoard logger it adds a custom-scalars layout (margin charts with
    ±2 stderr bands, forward and reverse on one chart), histograms of the per-sample
    log ratio and the alert text. Alerts (see ``kl_monitor.alerting``)
    warn on rank zero, go to ``on_alert(alert)`` on rank zero, and stop training
    when their kind is in ``stop_on`` (agreed across ranks).

    Held-out batches take the path of Lightning's own validation batches: the
    precision plugin's input conversion (``"64-true"``, ``"bf16-true"``...), the
    ``on_before_batch_transfer``/``transfer_batch_to_device``/``on_after_batch_transfer``
    hooks, the precision plugin's validation-step context and
    ``on_validation_model_eval``. The first log line names the loader used.

    Resuming and reuse: a checkpoint with the monitor's state continues its series,
    baselines and alerts. A checkpoint saved without it (the monitor added mid-project)
    starts them at the resumed step: an evaluation there, then the normal cadence. If
    ``kl_inputs`` now returns another input kind than the checkpoint's series, a
    ``KLMonitorWarning`` names both and the monitor restarts at the resumed step. The
    same instance in a new ``Trainer`` restarts as a new monitor would (series,
    baselines, alerts, cadence); a second ``fit`` on the same ``Trainer`` continues.

    Args:
        dataloader: held-out data (default: the Trainer's validation dataloader). It
            is sharded across DDP ranks by batch index.
        val_loader: which of several Trainer validation dataloaders to use: a
            position (list) or a key (dict, ``CombinedLoader`` of a dict); required
            when there are several. ``Trainer(limit_val_batches=...)`` caps the
            batches taken from it (a warning says so when it is below
            ``max_batches``); it does not apply to ``dataloader``.
        inputs_fn: ``(module, batch) -> KLInputs``, instead of ``module.kl_inputs``.
        every_n_train_steps: fixed evaluation cadence in optimizer steps; ``None``
            (default) adapts the cadence to ``overhead_budget``.
        overhead_budget: with the adaptive cadence, the fraction of training wall time
            the monitor may spend evaluating (default 0.02), sanity evaluation
            included, and everything an evaluation does counts (held-out loading,
            ``kl_inputs``, the metric, logging, histograms): the next evaluation
            comes once training time has reached (evaluation time so far + the last
            evaluation's time) / budget, so the budget holds right after each
            evaluation too, as long as an evaluation costs what the last one did
            (a slower one overshoots by the difference). Only a run shorter than
            sanity evaluation / budget spends more. The first 10 steps only time a
            training step; intervals are at most 10,000 steps.
        max_batches: held-out batches per evaluation, per rank.
        method: estimator for sampled inputs: ``"cv"`` (default), ``"k3"``, ``"naive"``.
        reduction: for logits of shape (batch, seq, K): ``"token_mean"`` or
            ``"sequence_sum"``.
        num_groups: number of group labels (0..G−1) when ``KLInputs`` carries
            ``groups``; ``None``: inferred at the sanity evaluation as 1 + the largest
            label on any rank (logged). A later label ≥ G is an error naming
            ``num_groups``, and that evaluation is skipped with a warning.
        prefix: tag prefix (default ``"kl"``).
        rules: ``None`` (default) or ``AlertThresholds`` / an ``AlertEngine``: alerts
            from paired evidence (``kl_monitor.alerting``; sample-only inputs fall
            back to the level detectors), or ``AlertRules`` for 0.1.0's level
            detectors on every input.
        on_alert: called with each ``Alert``.
        stop_on: alert kinds that stop training, e.g. ``("collapse",)``.
        log_histograms: log per-sample log-ratio histograms to TensorBoard.
        prog_bar: show forward and reverse KL in the progress bar.
        seed: base seed of the monitor's own RNG (and of the k-means cells).
        sample_estimator: for ``KLInputs.from_samples``: ``"knn"`` (``KNNKL``, default)
            or ``"binned"`` (``BinnedKL``).
        num_cells: k-means cells of the reference used as groups for sample inputs
            without ``groups`` (default 16); kept in the checkpoint.
        max_samples: sample inputs: rows kept per side per rank and evaluation (memory
            bound; default 8192).

    Examples:
        >>> from kl_monitor import KLMonitor
        >>> monitor = KLMonitor(every_n_train_steps=100, max_batches=4, stop_on=("collapse",))
        >>> monitor.state_key
        "KLMonitor{'prefix': 'kl'}"
    """

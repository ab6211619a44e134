"""`KLMonitor`: the Lightning callback.

The logic lives in ``_KLMonitorLogic``, which imports no Lightning namespace.
The public ``KLMonitor`` derives from the ``Callback`` class of every installed
namespace (``lightning.pytorch`` and ``pytorch_lightning``), so one class passes the
``isinstance`` check of either Trainer.
"""

from __future__ import annotations

import gc
import math
import random
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from . import tensorboard as tb
from .detectors import Alert, AlertRules, Evaluation
from .estimators import categorical_kl_rows
from .inputs import KLInputs
from .metrics import CategoricalKL, SampledKL

__all__ = ["KLMonitor", "KLAlertWarning", "KLMonitorWarning"]

ALERT_KINDS = ("collapse", "coverage_gap", "over_dispersion")
# Adaptive cadence: the clock (a module attribute, so tests can drive it), steps before
# the first timed interval, and the longest interval.
_now = time.perf_counter
_FIRST_INTERVAL = 10
_MAX_INTERVAL = 10_000
_HIST_VALUES = 4096


class KLAlertWarning(UserWarning):
    """Raised (as a warning, on rank zero) when a KL alert fires."""


class KLMonitorWarning(UserWarning):
    """The monitor skipped an evaluation or met input it could not use."""


@contextmanager
def _isolated_rng(device: torch.device, seed: int) -> Iterator[None]:
    """Run with seeded RNGs, then restore torch (CPU and the device), numpy and random.

    Training must be bitwise identical with and without the monitor, even when
    ``kl_inputs`` samples from the model or the held-out loader shuffles.
    """
    # the user's code may draw from numpy's legacy global RNG: save and restore it
    py_state, np_state = random.getstate(), np.random.get_state()  # noqa: NPY002
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)  # noqa: NPY002
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)  # noqa: NPY002


@contextmanager
def _eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the evaluation; every submodule's own flag restored afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


class _KLMonitorLogic:
    """Namespace-free implementation of ``KLMonitor`` (see its docstring)."""

    def __init__(
        self,
        dataloader: Iterable | None = None,
        *,
        inputs_fn: Callable[[Any, Any], KLInputs] | None = None,
        every_n_train_steps: int | None = None,
        overhead_budget: float = 0.02,
        max_batches: int = 8,
        method: str = "cv",
        reduction: str = "token_mean",
        num_groups: int | None = None,
        prefix: str = "kl",
        rules: AlertRules | None = None,
        on_alert: Callable[[Alert], None] | None = None,
        stop_on: Sequence[str] = (),
        log_histograms: bool = True,
        prog_bar: bool = False,
        seed: int = 0,
    ) -> None:
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
        if method not in ("naive", "k3", "cv"):
            raise ValueError(f"`method` must be 'cv', 'k3' or 'naive', got {method!r}.")
        if reduction not in ("token_mean", "sequence_sum"):
            raise ValueError(
                f"`reduction` must be 'token_mean' or 'sequence_sum', got {reduction!r}."
            )
        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"`prefix` must be a non-empty string, got {prefix!r}.")
        if isinstance(stop_on, str):
            stop_on = (stop_on,)
        unknown = sorted(set(stop_on) - set(ALERT_KINDS))
        if unknown:
            raise ValueError(
                f"`stop_on` has unknown alert kinds {unknown}; expected {ALERT_KINDS}."
            )
        if rules is not None and not isinstance(rules, AlertRules):
            raise TypeError(f"`rules` must be an AlertRules, got {type(rules).__name__}.")
        if inputs_fn is not None and not callable(inputs_fn):
            raise TypeError(f"`inputs_fn` must be callable, got {type(inputs_fn).__name__}.")
        if on_alert is not None and not callable(on_alert):
            raise TypeError(f"`on_alert` must be callable, got {type(on_alert).__name__}.")
        self.dataloader = dataloader
        self.inputs_fn = inputs_fn
        self.every_n_train_steps = every_n_train_steps
        self.overhead_budget = float(overhead_budget)
        self.max_batches = max_batches
        self.method = method
        self.reduction = reduction
        self.num_groups = num_groups
        self.prefix = prefix
        self.rules = rules if rules is not None else AlertRules()
        self.on_alert = on_alert
        self.stop_on = tuple(stop_on)
        self.log_histograms = log_histograms
        self.prog_bar = prog_bar
        self.seed = seed
        # state that survives checkpoints
        self.n_evals = 0
        self.last_eval_step = -1
        self.next_eval_step = 0
        # wall clock and step at the end of the last evaluation (adaptive cadence)
        self._clock: float | None = None
        self._clock_step = 0
        # seconds spent evaluating and training so far (adaptive cadence's budget)
        self._eval_total = 0.0
        self._train_total = 0.0
        self._timing_only = False
        self.failures = 0
        self.alerts: list[Alert] = []
        self.last_result: dict[str, float] = {}
        self._kind: str | None = None
        self._metric: CategoricalKL | SampledKL | None = None
        self._loader: Iterable | None = None
        self._layout_written = False

    # ---------------------------------------------------------------- Lightning
    @property
    def state_key(self) -> str:
        return self._generate_state_key(prefix=self.prefix)  # type: ignore[attr-defined]

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        if self.inputs_fn is None and not callable(getattr(pl_module, "kl_inputs", None)):
            raise TypeError(
                f"KLMonitor needs the inputs of each held-out batch: define "
                f"`kl_inputs(self, batch) -> KLInputs` on {type(pl_module).__name__}, "
                "or pass `inputs_fn=lambda module, batch: KLInputs...` to KLMonitor."
            )

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        # A resumed run already evaluated at its checkpoint step: only validate.
        resumed = self.n_evals > 0
        started = _now()
        try:
            self._run_evaluation(trainer, pl_module, 1 if resumed else self.max_batches)
        except Exception as err:
            raise RuntimeError(
                "KLMonitor sanity evaluation failed before training started "
                f"({type(err).__name__}: {err}). Check `kl_inputs`/`inputs_fn` and the "
                "held-out dataloader: they must return KLInputs for one batch."
            ) from err
        if trainer.is_global_zero and not self._layout_written:
            unit = {"token_mean": "nats per token", "sequence_sum": "nats per sequence"}
            self._layout_written = tb.write_layout(
                trainer.loggers,
                self.prefix,
                unit[self.reduction] if self._kind == "logits" else "nats",
            )
        if resumed:
            self._metric.reset()
            # the loops' step is restored only after this hook: start timing at the
            # first training step
            self._clock = None
            return
        self._finish_evaluation(trainer, pl_module, step=trainer.global_step, in_step=False)
        self._eval_total += _now() - started
        step = trainer.global_step
        if self.every_n_train_steps is None:
            # the first interval only times the training steps; the sanity evaluation
            # has timed an evaluation
            self._timing_only = True
            self.next_eval_step = step + _FIRST_INTERVAL
        else:
            self.next_eval_step = self._next_step(trainer, step, None)
        self._clock, self._clock_step = _now(), step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if self._clock is None:
            self._clock, self._clock_step = _now(), step
        if step < self.next_eval_step or step == self.last_eval_step:
            return
        trained_until = _now()
        self._train_total += trained_until - self._clock
        # no step timed yet (an evaluation due right after a resume): start over
        steps = step - self._clock_step
        per_step = (trained_until - self._clock) / steps if steps > 0 else None
        if self._timing_only:
            self._timing_only = False
        else:
            self.evaluate(trainer, pl_module)
            self._eval_total += _now() - trained_until
        self.next_eval_step = self._next_step(trainer, step, per_step)
        self._clock, self._clock_step = _now(), step

    def _next_step(self, trainer: Any, step: int, per_step: float | None) -> int:
        """The step of the next evaluation.

        Fixed cadence: the next multiple of ``every_n_train_steps``. Adaptive cadence
        (``every_n_train_steps=None``): the first step at which the time spent
        evaluating so far, sanity evaluation included, is at most ``overhead_budget``
        of the time spent training, predicted from the mean duration of the steps
        since the last evaluation. Rank 0 decides and broadcasts, so every rank
        evaluates (a collective) at the same step.
        """
        if self.every_n_train_steps is not None:
            return (step // self.every_n_train_steps + 1) * self.every_n_train_steps
        interval = _FIRST_INTERVAL
        if per_step is not None:
            owed = self._eval_total / self.overhead_budget - self._train_total
            interval = min(max(math.ceil(owed / max(per_step, 1e-9)), 1), _MAX_INTERVAL)
        return step + int(trainer.strategy.broadcast(interval, src=0))

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 1,
            "n_evals": self.n_evals,
            "last_eval_step": self.last_eval_step,
            "next_eval_step": self.next_eval_step,
            "seconds_evaluating": self._eval_total,
            "seconds_training": self._train_total,
            "failures": self.failures,
            "alerts": [a.to_dict() for a in self.alerts],
            "rules": self.rules.state_dict(),
            "kind": self._kind,
            "last_result": dict(self.last_result),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.n_evals = int(state_dict["n_evals"])
        self.last_eval_step = int(state_dict["last_eval_step"])
        self.next_eval_step = int(state_dict.get("next_eval_step", self.last_eval_step + 1))
        self._eval_total = float(state_dict.get("seconds_evaluating", 0.0))
        self._train_total = float(state_dict.get("seconds_training", 0.0))
        self.failures = int(state_dict["failures"])
        self.alerts = [Alert(**a) for a in state_dict["alerts"]]
        self.rules.load_state_dict(state_dict["rules"])
        self._kind = state_dict.get("kind")
        self.last_result = dict(state_dict.get("last_result", {}))

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, trainer: Any, pl_module: Any) -> dict[str, float] | None:
        """Evaluate now and log; returns the logged scalars (``None`` if skipped).

        A failure warns, counts in ``<prefix>/failures`` and skips this evaluation;
        ranks agree on skipping, so a failure on one rank never hangs the others.
        """
        error: BaseException | None = None
        try:
            self._run_evaluation(trainer, pl_module, self.max_batches)
        except Exception as err:  # the monitor must never stop training
            error = err
        if trainer.strategy.reduce_boolean_decision(error is not None, all=False):
            self._skip(trainer, error)
            return None
        return self._finish_evaluation(trainer, pl_module, step=trainer.global_step, in_step=True)

    def _skip(self, trainer: Any, error: BaseException | None) -> None:
        self.failures += 1
        if self._metric is not None:
            self._metric.reset()
        hint = ""
        # A traceback holds the failed evaluation's frames and their tensors (a cycle
        # through this frame): drop it, so they are freed now, not at the next gc run.
        chained, seen = error, set()
        while chained is not None and id(chained) not in seen:
            seen.add(id(chained))
            chained.__traceback__ = None
            chained = chained.__cause__ or chained.__context__
        if error is not None and _is_oom(error):
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            smaller = (
                f"max_batches={self.max_batches // 2}"
                if self.max_batches > 1
                else "a smaller held-out batch size (max_batches is already 1)"
            )
            hint = f" Out of memory: try {smaller}."
        reason = f"{type(error).__name__}: {error}" if error is not None else "on another rank"
        if trainer.is_global_zero:
            warnings.warn(
                f"KLMonitor skipped the evaluation at step {trainer.global_step} "
                f"({reason}).{hint} Training goes on; skips are counted in "
                f"'{self.prefix}/failures'.",
                KLMonitorWarning,
                stacklevel=2,
            )
        for logger in trainer.loggers:
            logger.log_metrics(
                {f"{self.prefix}/failures": float(self.failures)}, step=trainer.global_step
            )
            logger.save()

    def _held_out(self, trainer: Any) -> Iterable:
        if self.dataloader is not None:
            return self.dataloader
        if self._loader is None:
            # The raw validation source (module hook, datamodule or the loader given to
            # fit), before Lightning adds a DistributedSampler: we shard it ourselves.
            source = trainer.fit_loop.epoch_loop.val_loop._data_source
            loader = source.dataloader() if source.is_defined() else None
            if isinstance(loader, (list, tuple)):
                loader = loader[0] if loader else None
            if loader is None:
                raise ValueError(
                    "KLMonitor has no held-out data: pass `dataloader=` or give the "
                    "Trainer a validation dataloader."
                )
            self._loader = loader
        return self._loader

    def _batches(self, trainer: Any, limit: int) -> Iterator[Any]:
        """This rank's share of the first ``limit × world_size`` held-out batches."""
        world, rank = trainer.world_size, trainer.global_rank
        taken = 0
        for index, batch in enumerate(self._held_out(trainer)):
            if index % world == rank:
                taken += 1
                yield batch
                if taken >= limit:  # stop before fetching a batch that would go unused
                    break

    def _inputs(self, pl_module: Any, batch: Any) -> KLInputs:
        inputs = (
            self.inputs_fn(pl_module, batch)
            if self.inputs_fn is not None
            else pl_module.kl_inputs(batch)
        )
        if not isinstance(inputs, KLInputs):
            raise TypeError(
                "`kl_inputs`/`inputs_fn` must return KLInputs (KLInputs.from_logits or "
                f"KLInputs.from_log_probs), got {type(inputs).__name__}."
            )
        if self._kind is not None and inputs.kind != self._kind:
            raise ValueError(
                f"`kl_inputs` returned {inputs.kind!r} inputs, but earlier batches were "
                f"{self._kind!r}; one monitor takes one kind."
            )
        return inputs

    def _metric_for(self, inputs: KLInputs, device: torch.device) -> CategoricalKL | SampledKL:
        if self._metric is None:
            self._kind = inputs.kind
            if inputs.kind == "logits":
                metric = CategoricalKL(reduction=self.reduction, num_groups=self.num_groups)
            else:
                metric = SampledKL(method=self.method, num_groups=self.num_groups)
            self._metric = metric
        return self._metric.to(device)

    def _run_evaluation(self, trainer: Any, pl_module: Any, limit: int) -> None:
        """Accumulate this rank's held-out batches into the metric (no collectives)."""
        device = pl_module.device
        self._hist: torch.Tensor | None = None
        if self._metric is not None:
            self._metric.reset()
        with (
            _isolated_rng(device, self.seed + self.n_evals),
            torch.no_grad(),
            _eval_mode(pl_module),
        ):
            seen = 0
            for batch in self._batches(trainer, limit):
                seen += 1
                batch = pl_module.transfer_batch_to_device(batch, device, 0)
                inputs = self._inputs(pl_module, batch)
                metric = self._metric_for(inputs, device)
                if inputs.kind == "logits":
                    metric.update(
                        inputs.reference, inputs.model, mask=inputs.mask, groups=inputs.groups
                    )
                else:
                    metric.update(
                        inputs.reference,
                        inputs.model,
                        model_log_q=inputs.model_samples_log_q,
                        model_log_p=inputs.model_samples_log_p,
                        groups=inputs.groups,
                        model_groups=inputs.model_samples_groups,
                    )
                if self.log_histograms and self._hist is None and trainer.is_global_zero:
                    self._hist = self._histogram_values(inputs)
        if self._metric is None or not seen:  # e.g. a one-shot iterator, exhausted
            raise ValueError("the held-out dataloader yielded no batch on this rank.")

    @staticmethod
    def _histogram_values(inputs: KLInputs) -> torch.Tensor:
        """Per-sample log ratios ℓ (or per-row exact forward KL for logits), bounded."""
        if inputs.kind == "logits":
            fwd = categorical_kl_rows(inputs.reference, inputs.model)[0]
            values = fwd.reshape(-1)
        else:
            values = (inputs.reference.double() - inputs.model.double()).reshape(-1)
        values = values[torch.isfinite(values)][:_HIST_VALUES]
        return values.detach().float().cpu()

    def _finish_evaluation(
        self, trainer: Any, pl_module: Any, step: int, in_step: bool
    ) -> dict[str, float] | None:
        """Sync and compute (a collective), run the detectors, log, act on alerts."""
        try:
            result = {k: float(v) for k, v in self._metric.compute().items()}
        except ValueError as err:
            # Nothing usable on any rank (every row NaN or masked). The synced state is
            # the same on every rank, so all of them skip together.
            self._skip(trainer, err)
            return None
        self._metric.reset()
        self.n_evals += 1
        self.last_eval_step = step
        evaluation = _evaluation(step, result)
        fired = self.rules.update(evaluation)
        scalars = tb.scalars(self.prefix, result)
        scalars[f"{self.prefix}/failures"] = float(self.failures)
        for kind in ALERT_KINDS:
            scalars[f"{self.prefix}/alert/{kind}"] = float(any(a.kind == kind for a in fired))
        self.last_result = scalars
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            # as Lightning does after its own log_metrics: a buffering logger (CSVLogger
            # writes every 100 steps) would otherwise lose the series up to a crash
            logger.save()
        if trainer.is_global_zero:
            tb.write_extras(trainer.loggers, self.prefix, step, self._hist, fired)
        if in_step and self.prog_bar:
            for key in ("forward", "reverse"):
                value = scalars.get(f"{self.prefix}/{key}")
                if value is not None and math.isfinite(value):
                    pl_module.log(f"{self.prefix}/{key}", value, prog_bar=True, logger=False)
        stop = False
        for alert in fired:
            self.alerts.append(alert)
            if trainer.is_global_zero:
                warnings.warn(alert.message, KLAlertWarning, stacklevel=2)
                if self.on_alert is not None:
                    self.on_alert(alert)
            stop = stop or alert.kind in self.stop_on
        if self.stop_on:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
            if stop:
                trainer.should_stop = True
        return scalars


def _groups(result: dict[str, float], key: str) -> dict[int, float]:
    head = f"{key}/group_"
    return {int(k[len(head) :]): v for k, v in result.items() if k.startswith(head)}


def _evaluation(step: int, result: dict[str, float]) -> Evaluation:
    """The detectors' view of a metric result (categorical or sampled)."""
    group_forward = _groups(result, "forward")
    count = _groups(result, "n")  # categorical: rows per group
    if not count:
        # sampled: the model's share of mass per group (0 where it has none)
        mass = _groups(result, "reverse_mass")
        count = {g: mass.get(g, 0.0) for g in group_forward}
    return Evaluation(
        step=step,
        forward=result.get("forward"),
        forward_stderr=result.get("forward_stderr"),
        reverse=result.get("reverse"),
        reverse_stderr=result.get("reverse_stderr"),
        entropy_model=result.get("entropy_model"),
        entropy_reference=result.get("entropy_reference"),
        group_forward=group_forward or None,
        group_reverse=_groups(result, "reverse") or None,
        group_count=count or None,
    )


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
    - ``/forward/group_<g>``, ``/reverse/group_<g>`` and ``/mass/group_<g>`` with groups;
    - ``/alert/<kind>`` (0 or 1) and ``/failures``.

    With a TensorBoard logger it adds a custom-scalars layout (margin charts with
    ±2 stderr bands, forward and reverse on one chart), histograms of the per-sample
    log ratio and the alert text. Alerts (see ``AlertRules``)
    warn on rank zero, go to ``on_alert(alert)`` on rank zero, and stop training
    when their kind is in ``stop_on`` (agreed across ranks).

    Args:
        dataloader: held-out data (default: the Trainer's validation dataloader). It
            is sharded across DDP ranks by batch index.
        inputs_fn: ``(module, batch) -> KLInputs``, instead of ``module.kl_inputs``.
        every_n_train_steps: fixed evaluation cadence in optimizer steps; ``None``
            (default) adapts the cadence to ``overhead_budget``.
        overhead_budget: with the adaptive cadence, the fraction of training wall time
            the monitor may spend evaluating (default 0.02), sanity evaluation
            included: the next evaluation comes once training time has reached
            evaluation time / budget. The first 10 steps only time a training step;
            intervals are at most 10,000 steps.
        max_batches: held-out batches per evaluation, per rank.
        method: estimator for sampled inputs: ``"cv"`` (default), ``"k3"``, ``"naive"``.
        reduction: for logits of shape (batch, seq, K): ``"token_mean"`` or
            ``"sequence_sum"``.
        num_groups: number of group labels when ``KLInputs`` carries ``groups``.
        prefix: tag prefix (default ``"kl"``).
        rules: ``AlertRules`` (thresholds); default rules
            when ``None``.
        on_alert: called with each ``Alert``.
        stop_on: alert kinds that stop training, e.g. ``("collapse",)``.
        log_histograms: log per-sample log-ratio histograms to TensorBoard.
        prog_bar: show forward and reverse KL in the progress bar.
        seed: base seed of the monitor's own RNG.

    Examples:
        >>> from kl_monitor import KLMonitor
        >>> monitor = KLMonitor(every_n_train_steps=100, max_batches=4, stop_on=("collapse",))
        >>> monitor.state_key
        "KLMonitor{'prefix': 'kl'}"
    """

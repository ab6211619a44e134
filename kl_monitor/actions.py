"""What the monitor does with an evaluation: log, warn, call the hook, stop.

Each function takes the Trainer only for its loggers, its rank and its strategy;
the numbers come in typed (a result, ``Alert`` objects) and are flattened here, at
the edge, by ``tensorboard.scalars``.
"""

from __future__ import annotations

import gc
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import tensorboard as tb
from .detectors import ALERT_KINDS, Alert

__all__ = ["KLAlertWarning", "KLMonitorWarning"]


class KLAlertWarning(UserWarning):
    """Raised (as a warning, on rank zero) when a KL alert fires."""


class KLMonitorWarning(UserWarning):
    """The monitor skipped an evaluation or met input it could not use."""


def evaluation_scalars(
    prefix: str, result: Any, failures: int, fired: Sequence[Alert], open_kind: str | None = None
) -> dict[str, float]:
    """Every scalar of one evaluation: the result's tags, failures and alert flags.

    ``<prefix>/alert/<kind>`` is 1 at an evaluation where an alert of that kind fired
    and, with the paired engine, at every evaluation of its open episode
    (``open_kind``): a plateau of 1s from the alert until the episode closes, that
    TensorBoard's smoothing cannot flatten into a spike of 2e-3.
    """
    scalars = tb.scalars(prefix, result)
    scalars[f"{prefix}/failures"] = float(failures)
    for kind in ALERT_KINDS:
        flag = kind == open_kind or any(a.kind == kind for a in fired)
        scalars[f"{prefix}/alert/{kind}"] = float(flag)
    return scalars


def log_scalars(trainer: Any, scalars: dict[str, float], step: int) -> None:
    """To every logger of the Trainer, saved at once."""
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=step)
        # as Lightning does after its own log_metrics: a buffering logger (CSVLogger
        # writes every 100 steps) would otherwise lose the series up to a crash
        logger.save()


def show_in_progress_bar(pl_module: Any, prefix: str, result: Any) -> None:
    for name in ("forward", "reverse"):
        est = getattr(result, name)
        if est is not None and math.isfinite(est.value):
            value = est.value
            pl_module.log(f"{prefix}/{name}", value, prog_bar=True, logger=False)


def act_on_alerts(
    trainer: Any,
    fired: Sequence[Alert],
    on_alert: Callable[[Alert], None] | None,
    stop_on: Sequence[str],
) -> None:
    """Warn and call the hook on rank zero; stop when a kind in ``stop_on`` fired on
    any rank (agreed across ranks, like ``EarlyStopping``)."""
    stop = False
    for alert in fired:
        if trainer.is_global_zero:
            warnings.warn(alert.message, KLAlertWarning, stacklevel=3)
            if on_alert is not None:
                on_alert(alert)
        stop = stop or alert.kind in stop_on
    if stop_on and trainer.strategy.reduce_boolean_decision(stop, all=False):
        trainer.should_stop = True


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower()
    )


def _release(error: BaseException) -> None:
    """Drop the tracebacks of ``error`` and its chain.

    A traceback holds the failed evaluation's frames and their tensors (a cycle through
    the frame that caught it): without this they are freed at the next gc run, not now.
    """
    chained: BaseException | None = error
    seen: set[int] = set()
    while chained is not None and id(chained) not in seen:
        seen.add(id(chained))
        chained.__traceback__ = None
        chained = chained.__cause__ or chained.__context__


def report_skip(
    trainer: Any, prefix: str, failures: int, max_batches: int, error: BaseException | None
) -> None:
    """Warn (rank zero) that an evaluation was skipped, and log the failure count."""
    hint = ""
    if error is not None:
        _release(error)
    if error is not None and _is_oom(error):
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        smaller = (
            f"max_batches={max_batches // 2}"
            if max_batches > 1
            else "a smaller held-out batch size (max_batches is already 1)"
        )
        hint = f" Out of memory: try {smaller}."
    reason = f"{type(error).__name__}: {error}" if error is not None else "on another rank"
    if trainer.is_global_zero:
        warnings.warn(
            f"KLMonitor skipped the evaluation at step {trainer.global_step} "
            f"({reason}).{hint} Training goes on; skips are counted in '{prefix}/failures'.",
            KLMonitorWarning,
            stacklevel=3,
        )
    log_scalars(trainer, {f"{prefix}/failures": float(failures)}, trainer.global_step)

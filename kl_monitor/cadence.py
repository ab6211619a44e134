"""When to evaluate: the monitor's cadence, a pure class on an injectable clock.

No Lightning here: the callback passes the training step and a function that makes
every rank agree on a number (rank 0's, broadcast), and this class decides. It is
tested on a plain list-backed clock.

Fixed cadence: every ``every_n_train_steps`` optimizer steps. Adaptive cadence
(``every_n_train_steps=None``): the next evaluation is the first step at which the
seconds spent evaluating so far (the sanity evaluation included) *plus the next
evaluation's* (predicted: the last one's) are at most ``overhead_budget`` of the
seconds spent training, predicted from the mean duration of the training steps since
the last evaluation: T ≥ (E + e) / budget. Paying in advance keeps the monitor
within its budget right after each evaluation, not only right before it (paying
after, a run ending just after an evaluation has spent up to budget × (k + 1) / k,
with k evaluations in the loop). The time to agree on the next
step counts as evaluation time too.

Examples:
    >>> now = [0.0]
    >>> cadence = Cadence(None, 0.5, clock=lambda: now[0])
    >>> cadence.after_sanity(step=0, seconds=0.2)
    >>> cadence.next_eval_step  # the first interval only times training steps
    10
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

__all__ = ["Cadence", "FIRST_INTERVAL", "MAX_INTERVAL"]

#: Steps before the first timed interval, and the longest interval.
FIRST_INTERVAL = 10
MAX_INTERVAL = 10_000
_KEYS = ("n_evals", "last_eval_step", "next_eval_step", "seconds_evaluating", "seconds_training")


def _same(value: int) -> int:
    return value


class Cadence:
    """The evaluation schedule and its time budget (see the module docstring).

    Args:
        every_n_train_steps: fixed interval, or ``None`` for the adaptive cadence.
        overhead_budget: adaptive cadence: evaluation seconds / training seconds.
        clock: seconds, monotonic (default ``time.perf_counter``).

    Attributes:
        n_evals: evaluations recorded (``record``).
        last_eval_step: step of the last recorded evaluation (−1 before any).
        next_eval_step: step at which the next evaluation is due.
        seconds_evaluating: evaluation time so far, sanity evaluation included.
        seconds_training: training time so far (between evaluations).
    """

    def __init__(
        self,
        every_n_train_steps: int | None = None,
        overhead_budget: float = 0.02,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.every_n_train_steps = every_n_train_steps
        self.overhead_budget = float(overhead_budget)
        self.clock = clock
        self.n_evals = 0
        self.last_eval_step = -1
        self.next_eval_step = 0
        self.seconds_evaluating = 0.0
        self.seconds_training = 0.0
        # wall clock and step where the current training interval started
        self._start: float | None = None
        self._start_step = 0
        self._timing_only = False
        # seconds of the last evaluation: the prediction of the next one's
        self._last_seconds: float | None = None

    @property
    def resumed(self) -> bool:
        """Whether this state has evaluated before (restored from a checkpoint)."""
        return self.n_evals > 0

    def record(self, step: int) -> None:
        """An evaluation at ``step`` completed (logged)."""
        self.n_evals += 1
        self.last_eval_step = step

    def after_sanity(self, step: int, seconds: float) -> None:
        """The sanity evaluation of a fresh run took ``seconds``: schedule the first one."""
        self.seconds_evaluating += seconds
        self._last_seconds = seconds
        if self.every_n_train_steps is None:
            # the first interval only times training steps: the sanity run timed an evaluation
            self._timing_only = True
            self.next_eval_step = step + FIRST_INTERVAL
        else:
            self.next_eval_step = self._next_step(step, None, _same)
        self._restart(step)

    def after_resume(self) -> None:
        """Resumed: the loop's step is restored later, so time from the next step on."""
        self._start = None

    def due(self, step: int) -> bool:
        """Whether an evaluation (or the first timing point) is due after ``step``."""
        if self._start is None:
            self._restart(step)
        return step >= self.next_eval_step and step != self.last_eval_step

    def run(self, step: int, evaluate: Callable[[], Any], agree: Callable[[int], int]) -> None:
        """At a due ``step``: account training time, ``evaluate()`` (unless this point
        only times steps), account its time and schedule the next one.

        ``agree(interval)`` returns rank 0's interval on every rank, so that every rank
        evaluates (a collective) at the same step.
        """
        assert self._start is not None
        trained_until = self.clock()
        self.seconds_training += trained_until - self._start
        # no step timed yet (an evaluation due right after a resume): start over
        steps = step - self._start_step
        per_step = (trained_until - self._start) / steps if steps > 0 else None
        if self._timing_only:
            self._timing_only = False
        else:
            evaluate()
            self._last_seconds = self.clock() - trained_until
            self.seconds_evaluating += self._last_seconds
        agreeing = self.clock()
        self.next_eval_step = self._next_step(step, per_step, agree)
        self._restart(step)
        self.seconds_evaluating += self._start - agreeing  # a collective under DDP

    def _restart(self, step: int) -> None:
        self._start, self._start_step = self.clock(), step

    def _next_step(self, step: int, per_step: float | None, agree: Callable[[int], int]) -> int:
        if self.every_n_train_steps is not None:
            return (step // self.every_n_train_steps + 1) * self.every_n_train_steps
        interval = FIRST_INTERVAL
        if per_step is not None:
            upcoming = self._last_seconds
            if upcoming is None:  # resumed: no evaluation timed yet in this process
                upcoming = self.seconds_evaluating / max(self.n_evals, 1)
            owed = (self.seconds_evaluating + upcoming) / self.overhead_budget
            owed -= self.seconds_training
            interval = min(max(math.ceil(owed / max(per_step, 1e-9)), 1), MAX_INTERVAL)
        return step + int(agree(interval))

    def state_dict(self) -> dict[str, Any]:
        """The checkpointed part (the keys of the monitor's version-1 state)."""
        return {key: getattr(self, key) for key in _KEYS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.n_evals = int(state["n_evals"])
        self.last_eval_step = int(state["last_eval_step"])
        self.next_eval_step = int(state.get("next_eval_step", self.last_eval_step + 1))
        self.seconds_evaluating = float(state.get("seconds_evaluating", 0.0))
        self.seconds_training = float(state.get("seconds_training", 0.0))

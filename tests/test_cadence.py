"""The monitor's cadence on a plain clock: no Trainer, no Lightning."""

from __future__ import annotations

import pytest

from kl_monitor.cadence import FIRST_INTERVAL, MAX_INTERVAL, Cadence


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _drive(cadence: Cadence, clock: Clock, steps: int, step_s: float, eval_s: float) -> list[int]:
    """Train ``steps`` steps of ``step_s`` seconds; an evaluation takes ``eval_s``."""
    evaluated: list[int] = []

    def evaluate(step: int) -> None:
        clock.now += eval_s
        evaluated.append(step)
        cadence.record(step)

    for step in range(1, steps + 1):
        clock.now += step_s
        if cadence.due(step):
            cadence.run(step, lambda step=step: evaluate(step), lambda interval: interval)
    return evaluated


def test_fixed_cadence_evaluates_on_multiples():
    clock = Clock()
    cadence = Cadence(every_n_train_steps=7, clock=clock)
    cadence.after_sanity(step=0, seconds=1.0)
    assert cadence.next_eval_step == 7
    assert _drive(cadence, clock, 30, 0.01, 0.5) == [7, 14, 21, 28]


@pytest.mark.parametrize(("budget", "first", "every"), [(0.5, 128, 64), (0.25, 256, 128)])
def test_adaptive_cadence_spends_the_budget_exactly(budget, first, every):
    # a step takes 2^-7 s and an evaluation 1/4 s (binary fractions: no rounding); the
    # interval is 0.25 / (budget × 2^-7) steps, and the first evaluation comes once the
    # 1/4 s sanity evaluation and that evaluation itself are paid for (paid in advance)
    step_s, eval_s = 2.0**-7, 0.25
    clock = Clock()
    cadence = Cadence(None, budget, clock=clock)
    cadence.after_sanity(step=0, seconds=eval_s)
    assert cadence.next_eval_step == FIRST_INTERVAL  # the first interval only times
    evaluated = _drive(cadence, clock, 300, step_s, eval_s)
    assert evaluated == list(range(first, 301, every))
    assert cadence.seconds_evaluating == eval_s * (1 + len(evaluated))
    assert cadence.seconds_evaluating <= budget * cadence.seconds_training


def test_adaptive_interval_is_capped():
    clock = Clock()
    cadence = Cadence(None, 0.5, clock=clock)
    cadence.after_sanity(step=0, seconds=1e-12)
    _drive(cadence, clock, FIRST_INTERVAL, 1.0, 0.0)
    assert cadence.next_eval_step == FIRST_INTERVAL + 1  # owes nothing: the next step
    cadence = Cadence(None, 0.5, clock=clock)
    cadence.after_sanity(step=0, seconds=1e9)
    _drive(cadence, clock, FIRST_INTERVAL, 1.0, 0.0)
    assert cadence.next_eval_step == FIRST_INTERVAL + MAX_INTERVAL


def test_adaptive_interval_right_after_resume_is_not_stretched():
    clock = Clock()
    clock.now = 100.0
    cadence = Cadence()
    cadence.clock = clock
    state = dict(cadence.state_dict(), n_evals=3, last_eval_step=40, next_eval_step=41)
    cadence.load_state_dict(state)
    assert cadence.resumed
    cadence.after_resume()  # the clock starts at the first step seen
    assert cadence.due(41)
    cadence.run(41, lambda: None, lambda interval: interval)
    # no training step was timed since the resume: the first interval again, not the
    # 10,000-step maximum a zero step time would give
    assert cadence.next_eval_step == 41 + FIRST_INTERVAL


def test_state_dict_round_trip_and_old_keys():
    clock = Clock()
    cadence = Cadence(None, 0.5, clock=clock)
    cadence.after_sanity(step=0, seconds=0.2)
    _drive(cadence, clock, 100, 0.01, 0.2)
    state = cadence.state_dict()
    assert set(state) == {"n_evals", "last_eval_step", "next_eval_step",
                          "seconds_evaluating", "seconds_training"}  # fmt: skip
    twin = Cadence(None, 0.5, clock=clock)
    twin.load_state_dict(state)
    assert twin.state_dict() == state
    # a state without the timing keys (the first 0.1.0 checkpoints) still loads
    twin.load_state_dict({"n_evals": 2, "last_eval_step": 9})
    assert twin.next_eval_step == 10 and twin.seconds_training == 0.0


def test_an_evaluated_step_is_not_due_again():
    clock = Clock()
    cadence = Cadence(every_n_train_steps=1, clock=clock)
    cadence.after_sanity(step=0, seconds=0.0)
    cadence.record(0)
    assert not cadence.due(0) and cadence.due(1)

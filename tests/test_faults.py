"""Fault injection: a failing monitor must never change or stop the training run.

Each test injects one fault into a real ``Trainer.fit`` (a linear student distilled
from a frozen teacher, dropout on, shuffled loaders, ``kl_inputs`` drawing from the
global RNG) and checks that

* the run completes every step,
* the final weights are bitwise equal to those of the same run without the fault
  (the monitor isolates its RNG, so CPU training is deterministic),
* a ``KLMonitorWarning`` says what happened,
* ``monitor.failures`` counts the skipped evaluations, and
* the evaluations after the fault succeed.

Faults: ``kl_inputs`` raises at a random step; returns NaN for one batch; returns
wrong shapes (or the wrong kind, or not ``KLInputs``) after the sanity check; the
held-out loader raises mid-iteration or is exhausted early; a simulated CUDA
out-of-memory error during an evaluation (skipped, memory freed, a smaller
``max_batches`` suggested).
"""

from __future__ import annotations

import gc
import random
import warnings
import weakref
from collections.abc import Callable, Iterator

import pytest
import torch
from lit_models import namespace, student_module
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs, KLMonitor
from kl_monitor.callback import KLMonitorWarning

STEPS = 12
BATCH = 16
#: steps at which `kl_inputs` raises, drawn once (seeded, so a rerun is reproducible)
RANDOM_STEPS = sorted(random.Random(20240611).sample(range(1, STEPS), 3))


class Loader:
    """A held-out iterable over a real DataLoader, with an optional fault per pass."""

    def __init__(self, loader: DataLoader, fault: Callable[[int, int], None] | None = None):
        self.loader = loader
        self.fault = fault  # fault(pass_index, batch_index): may raise or return "stop"
        self.passes = 0

    def __iter__(self) -> Iterator:
        index = self.passes
        self.passes += 1
        for i, batch in enumerate(self.loader):
            if self.fault is not None and self.fault(index, i) == "stop":
                return
            yield batch


def _fit(
    inputs_fault: Callable | None = None,
    loader_fault: Callable | None = None,
    *,
    max_batches: int = 2,
    probe: Callable | None = None,
    held_out_rows: int = 128,
) -> tuple[dict[str, torch.Tensor], KLMonitor, object, list[int], list[warnings.WarningMessage]]:
    """One seeded run; returns weights, monitor, trainer, evaluated steps and warnings."""
    pl = namespace()
    pl.seed_everything(7, verbose=False)
    model = student_module("lightning.pytorch", dropout=0.3, sample=True)
    held_out = Loader(
        DataLoader(TensorDataset(torch.randn(held_out_rows, 4)), batch_size=BATCH, shuffle=True),
        loader_fault,
    )
    train = DataLoader(TensorDataset(torch.randn(256, 4)), batch_size=BATCH, shuffle=True)
    if inputs_fault is not None:
        original = model.kl_inputs

        def kl_inputs(batch):
            out = inputs_fault(model, batch)
            return original(batch) if out is None else out

        model.kl_inputs = kl_inputs
    monitor = KLMonitor(held_out, every_n_train_steps=1, max_batches=max_batches)
    evaluated: list[int] = []

    class Spy(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if monitor.last_eval_step == trainer.global_step:
                evaluated.append(trainer.global_step)
            if probe is not None:
                probe(trainer, monitor)

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=STEPS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor, Spy()],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return weights, monitor, trainer, evaluated, caught


@pytest.fixture(scope="module")
def baseline() -> dict[str, torch.Tensor]:
    weights, monitor, trainer, evaluated, _ = _fit()
    assert monitor.failures == 0 and evaluated == list(range(1, STEPS + 1))
    return weights


def _monitor_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, KLMonitorWarning)]


def _assert_unaffected(baseline, result, *, failed_steps: list[int], match: str) -> list[str]:
    weights, monitor, trainer, evaluated, caught = result
    assert trainer.global_step == STEPS, "the run did not complete"
    assert weights.keys() == baseline.keys()
    for k in weights:
        assert torch.equal(weights[k], baseline[k]), f"weights differ: {k}"
    messages = _monitor_warnings(caught)
    assert len(messages) == len(failed_steps), messages
    for step, msg in zip(failed_steps, messages, strict=True):
        assert f"at step {step} " in msg and match in msg, msg
    assert monitor.failures == len(failed_steps)
    # every other evaluation ran, including all those after the fault
    assert evaluated == [s for s in range(1, STEPS + 1) if s not in failed_steps]
    assert monitor.n_evals == 1 + STEPS - len(failed_steps)
    assert monitor.last_eval_step == STEPS
    assert torch.isfinite(torch.tensor(monitor.last_result["kl/forward"]))
    assert monitor.last_result["kl/failures"] == len(failed_steps)
    return messages


def _at_step(step: int, action: Callable) -> Callable:
    """A kl_inputs fault that acts on the first batch evaluated at ``step``."""
    fired = []

    def fault(model, batch):
        if model.trainer.global_step == step and not fired:
            fired.append(True)
            return action(model, batch)
        return None

    return fault


# --------------------------------------------------------------------------- kl_inputs
def test_fault_free_run_matches_a_run_without_the_monitor(baseline):
    pl = namespace()
    pl.seed_everything(7, verbose=False)
    model = student_module("lightning.pytorch", dropout=0.3, sample=True)
    torch.randn(128, 4)  # the held-out data the monitored runs draw
    train = DataLoader(TensorDataset(torch.randn(256, 4)), batch_size=BATCH, shuffle=True)
    pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    ).fit(model, train)
    for k, v in model.state_dict().items():
        assert torch.equal(v, baseline[k]), k


@pytest.mark.parametrize("step", RANDOM_STEPS)
def test_kl_inputs_raises_at_a_random_step(baseline, step):
    def boom(model, batch):
        raise KeyError(f"injected failure at step {step}")

    result = _fit(_at_step(step, boom))
    _assert_unaffected(baseline, result, failed_steps=[step], match="KeyError")


def test_kl_inputs_returns_nan_for_one_batch_of_two(baseline):
    """One NaN batch of two: its rows are dropped and counted, the evaluation stands."""
    step = 5

    def nan_batch(model, batch):
        (x,) = batch
        return KLInputs.from_logits(model.teacher(x), torch.full_like(model(x), float("nan")))

    nonfinite = {}
    result = _fit(
        _at_step(step, nan_batch),
        probe=lambda trainer, monitor: nonfinite.setdefault(
            trainer.global_step, monitor.last_result["kl/nonfinite"]
        ),
    )
    _assert_unaffected(baseline, result, failed_steps=[], match="")
    assert nonfinite[step] == BATCH  # the NaN rows, counted and excluded
    assert all(v == 0 for s, v in nonfinite.items() if s != step)


def test_kl_inputs_returns_nan_for_the_only_batch(baseline):
    """All rows of an evaluation NaN: nothing to report, so the evaluation is skipped."""
    step = 4

    def nan_batch(model, batch):
        (x,) = batch
        return KLInputs.from_logits(torch.full_like(model.teacher(x), float("nan")), model(x))

    result = _fit(_at_step(step, nan_batch), max_batches=1)
    _assert_unaffected(baseline, result, failed_steps=[step], match="no rows")


WRONG = {
    "model_logits_extra_class": lambda m, x: KLInputs.from_logits(
        m.teacher(x), torch.cat((m(x), m(x)[:, :1]), -1)
    ),
    "mask_wrong_shape": lambda m, x: KLInputs.from_logits(
        m.teacher(x), m(x), mask=torch.ones(x.shape[0] + 1, dtype=torch.bool)
    ),
    "scalar_logits": lambda m, x: KLInputs.from_logits(m.teacher(x)[0, 0], m(x)[0, 0]),
    "other_kind": lambda m, x: KLInputs.from_log_probs(
        m.teacher(x).log_softmax(-1)[:, 0], m(x).log_softmax(-1)[:, 0]
    ),
    "not_kl_inputs": lambda m, x: (m.teacher(x), m(x)),
}
MATCH = {
    "model_logits_extra_class": "same shape",
    "mask_wrong_shape": "mask",
    "scalar_logits": "(..., K)",
    "other_kind": "one monitor takes one kind",
    "not_kl_inputs": "must return KLInputs",
}


@pytest.mark.parametrize("kind", sorted(WRONG))
def test_kl_inputs_returns_wrong_shapes_after_sanity(baseline, kind):
    step = 6
    result = _fit(_at_step(step, lambda m, batch: WRONG[kind](m, batch[0])))
    _assert_unaffected(baseline, result, failed_steps=[step], match=MATCH[kind])


def test_kl_inputs_returns_wrong_shapes_for_the_rest_of_the_run(baseline):
    def wrong(model, batch):
        if model.trainer.global_step > 0:  # fine at the sanity check, broken afterwards
            (x,) = batch
            return KLInputs.from_logits(model.teacher(x), model(x)[:, :-1])
        return None

    weights, monitor, trainer, evaluated, caught = _fit(wrong)
    assert trainer.global_step == STEPS
    for k in weights:
        assert torch.equal(weights[k], baseline[k]), k
    assert monitor.failures == STEPS and evaluated == [] and monitor.n_evals == 1
    assert len(_monitor_warnings(caught)) == STEPS


# --------------------------------------------------------------------------- loader
def test_held_out_loader_raises_mid_iteration(baseline):
    step = 7  # pass 0 is the sanity check, pass s the evaluation at step s

    def fault(pass_index, batch_index):
        if pass_index == step and batch_index == 1:
            raise OSError("injected: held-out shard unreadable")

    result = _fit(loader_fault=fault)
    _assert_unaffected(baseline, result, failed_steps=[step], match="OSError")


def test_held_out_loader_exhausted_early_once(baseline):
    step = 3

    def fault(pass_index, batch_index):
        return "stop" if pass_index == step else None

    result = _fit(loader_fault=fault)
    _assert_unaffected(baseline, result, failed_steps=[step], match="yielded no batch")


def test_held_out_loader_exhausted_mid_evaluation(baseline):
    """Fewer batches than max_batches in one pass: the evaluation uses what it got."""
    step = 8

    def fault(pass_index, batch_index):
        return "stop" if pass_index == step and batch_index == 1 else None

    result = _fit(loader_fault=fault)
    _assert_unaffected(baseline, result, failed_steps=[], match="")


def test_one_shot_held_out_iterator(baseline):
    """A generator passed as the loader is exhausted after one pass: every later
    evaluation is skipped with a warning, and training is untouched."""
    pl = namespace()
    pl.seed_everything(7, verbose=False)
    model = student_module("lightning.pytorch", dropout=0.3, sample=True)
    data = torch.randn(128, 4)
    train = DataLoader(TensorDataset(torch.randn(256, 4)), batch_size=BATCH, shuffle=True)
    monitor = KLMonitor((data[i : i + BATCH] for i in range(0, 128, BATCH)), max_batches=2,
                        every_n_train_steps=1)  # fmt: skip
    model_inputs = model.kl_inputs
    model.kl_inputs = lambda x: model_inputs((x,))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train)
    assert trainer.global_step == STEPS
    for k, v in model.state_dict().items():
        assert torch.equal(v, baseline[k]), k
    # 128 rows = 8 batches: sanity takes 2, steps 1-3 take 2 each, then nothing is left
    assert monitor.n_evals == 4 and monitor.failures == STEPS - 3
    assert all("yielded no batch" in m for m in _monitor_warnings(caught))


# --------------------------------------------------------------------------- OOM
def test_out_of_memory_is_skipped_freed_and_suggests_fewer_batches(baseline, monkeypatch):
    step = 5
    big: list[weakref.ref] = []
    seen_after: dict[int, bool] = {}
    collected = []
    real_collect = gc.collect

    def spy_collect(*args):
        collected.append(True)
        return real_collect(*args)

    def oom(model, batch):
        activations = torch.empty(4_000_000)  # what a real OOM leaves half-built
        big.append(weakref.ref(activations))
        raise RuntimeError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total "
            "capacity; 77.90 GiB already allocated)"
        )

    def probe(trainer, monitor):
        if big:  # right after the monitor's hook at the failing step: is it freed?
            seen_after.setdefault(trainer.global_step, big[0]() is None)

    monkeypatch.setattr(gc, "collect", spy_collect)
    gc.disable()  # only the monitor's own clean-up may free it
    try:
        result = _fit(_at_step(step, oom), max_batches=4, probe=probe)
    finally:
        gc.enable()
    messages = _assert_unaffected(baseline, result, failed_steps=[step], match="out of memory")
    assert "max_batches=2" in messages[0], messages[0]
    assert collected, "gc.collect was not called after the out-of-memory error"
    assert seen_after[step], "the failed evaluation's tensors were still alive after the skip"


def test_out_of_memory_with_one_batch_suggests_a_smaller_batch(baseline):
    def oom(model, batch):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    result = _fit(_at_step(2, oom), max_batches=1)
    messages = _assert_unaffected(baseline, result, failed_steps=[2], match="out of memory")
    assert "max_batches=1" not in messages[0]
    assert "smaller held-out batch" in messages[0], messages[0]

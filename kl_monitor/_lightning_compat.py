"""Lightning's own validation path, applied to the monitor's held-out batches.

Plain Lightning validation does four things to a batch and the module that the
monitor must do too, or it measures something else than the user validates (or
crashes where validation works):

1. ``precision_plugin.convert_input``: ``"64-true"``, ``"bf16-true"`` and
   ``"16-true"`` cast the float tensors of a batch to the module's dtype;
2. the batch hooks ``on_before_batch_transfer``, ``transfer_batch_to_device`` and
   ``on_after_batch_transfer`` (the datamodule's when it overrides them), with the
   index of the dataloader the batch came from;
3. ``precision_plugin.val_step_context()`` around the forward (autocast for the
   mixed settings, the default dtype for the true ones);
4. ``on_validation_model_eval`` to enter eval mode.

It also chooses one loader among several validation dataloaders and applies
``Trainer(limit_val_batches=...)``. This module imports no Lightning namespace:
it works with ``lightning.pytorch`` and ``pytorch_lightning`` alike.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from .actions import KLMonitorWarning
from .inputs import KLInputs

__all__: list[str] = []

_TENSOR_FIELDS = (
    "reference",
    "model",
    "mask",
    "groups",
    "model_samples_log_q",
    "model_samples_log_p",
    "model_samples_groups",
)


@dataclass(frozen=True)
class HeldOut:
    """The held-out loader the monitor evaluates, and how it was chosen.

    Attributes:
        loader: the iterable of batches.
        index: its ``dataloader_idx`` for the batch hooks (0 for a single loader).
        name: how the first log line names it, e.g. ``"validation dataloader 'b'"``.
        limit: batches per evaluation per rank: ``max_batches``, or fewer when
            ``limit_val_batches`` allows fewer.
        note: why ``limit`` differs from ``max_batches`` (empty when it does not).
    """

    loader: Iterable
    index: int
    name: str
    limit: int
    note: str = ""


def _children(source: Any) -> tuple[list[Any], list[Any]] | None:
    """(keys, loaders) of several validation loaders; ``None`` for a single one."""
    if type(source).__name__ == "CombinedLoader" and hasattr(source, "iterables"):
        source = source.iterables
    if isinstance(source, Mapping):
        return list(source.keys()), list(source.values())
    if isinstance(source, (list, tuple)):
        return list(range(len(source))), list(source)
    return None


def choose_loader(source: Any, key: int | str | None) -> tuple[Iterable, int, str]:
    """One loader out of the Trainer's validation dataloaders.

    A single loader (or a list, dict or ``CombinedLoader`` of one) needs no key.
    With several, ``key`` picks one: a position (list, tuple) or a key (dict,
    ``CombinedLoader`` of a dict). Anything else is a ``ValueError`` that lists the
    choices.

    Returns:
        ``(loader, dataloader_idx, name)``; the index is the loader's position, as
        Lightning numbers ``dataloader_idx`` in validation.

    Example:
        >>> choose_loader({"clean": [1], "noisy": [2]}, "noisy")[1:]
        (1, "validation dataloader 'noisy' (index 1 of 2)")
    """
    children = _children(source)
    if children is None:
        if key not in (None, 0):
            raise ValueError(
                f"KLMonitor(val_loader={key!r}) but the Trainer has a single validation "
                "dataloader: leave `val_loader` unset."
            )
        return source, 0, "validation dataloader"
    keys, loaders = children
    if not loaders:
        raise ValueError("KLMonitor has no held-out data: the validation dataloaders are empty.")
    if key is None:
        if len(loaders) > 1:
            raise ValueError(
                f"The Trainer has {len(loaders)} validation dataloaders {keys}: choose the "
                f"one KLMonitor evaluates with `KLMonitor(val_loader={keys[0]!r})` "
                "(a position for a list, a key for a dict), or pass `dataloader=`."
            )
        key = keys[0]
    if key not in keys or isinstance(key, bool):
        raise ValueError(
            f"KLMonitor(val_loader={key!r}) is not one of the validation dataloaders {keys}."
        )
    index = keys.index(key)
    return loaders[index], index, (
        f"validation dataloader {key!r} (index {index} of {len(loaders)})"
    )


def batch_limit(limit_val_batches: Any, loader: Iterable, max_batches: int, world: int) -> int:
    """Batches per evaluation and rank: ``max_batches``, capped by ``limit_val_batches``.

    As Lightning reads it: an int is a number of batches, a float a fraction of the
    loader's length per rank (``int(length × fraction)``), ``1.0`` no limit.

    Example:
        >>> batch_limit(2, range(10), 8, world=1), batch_limit(0.5, range(10), 8, world=1)
        (2, 5)
    """
    if isinstance(limit_val_batches, bool) or limit_val_batches is None:
        return max_batches
    if isinstance(limit_val_batches, int):
        return min(max_batches, limit_val_batches)
    if float(limit_val_batches) == 1.0:
        return max_batches
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        return max_batches  # Lightning itself rejects a fraction for an unsized loader
    per_rank = -(-length // max(world, 1))
    return min(max_batches, int(per_rank * float(limit_val_batches)))


def resolve(
    trainer: Any, dataloader: Iterable | None, key: int | str | None, max_batches: int
) -> HeldOut:
    """The held-out loader, its hook index, its name and the batches per evaluation.

    ``dataloader=`` given to the monitor wins, and then ``limit_val_batches`` (which
    is about the Trainer's own validation) does not apply. Otherwise the Trainer's
    raw validation source (module hook, datamodule or the loaders given to ``fit``),
    before Lightning adds a ``DistributedSampler``: the monitor shards it itself.
    """
    if dataloader is not None:
        return HeldOut(dataloader, 0, "dataloader given to KLMonitor", max_batches)
    source = trainer.fit_loop.epoch_loop.val_loop._data_source
    raw = source.dataloader() if source.is_defined() else None
    if raw is None:
        raise ValueError(
            "KLMonitor has no held-out data: pass `dataloader=` or give the Trainer a "
            "validation dataloader."
        )
    loader, index, name = choose_loader(raw, key)
    setting = getattr(trainer, "limit_val_batches", None)
    limit = batch_limit(setting, loader, max_batches, trainer.world_size)
    if limit < 1:
        raise ValueError(
            f"Trainer(limit_val_batches={setting!r}) leaves no validation batch, and "
            "KLMonitor evaluates the validation dataloader: pass `dataloader=` to "
            "KLMonitor for its own held-out data, or allow at least one batch."
        )
    note = (
        f"{limit} batches, not max_batches={max_batches}: Trainer(limit_val_batches="
        f"{setting!r}) applies to the monitor too"
        if limit < max_batches
        else ""
    )
    return HeldOut(loader, index, name, limit, note)


def check_val_loader(val_loader: Any) -> None:
    """``val_loader`` is a position (int), a key (str) or ``None``."""
    if val_loader is not None and (
        isinstance(val_loader, bool) or not isinstance(val_loader, (int, str))
    ):
        raise TypeError(
            "`val_loader` must be a position (int) or a key (str) of the Trainer's "
            f"validation dataloaders, got {type(val_loader).__name__}."
        )


def continuing(trainer: Any, restored: bool) -> bool:
    """Whether this fit may continue a series (so the sanity evaluation only validates).

    True when the monitor's state was restored or the run continues on the same
    Trainer, and when a strategy restores the checkpoint only after ``on_fit_start``
    (the state is not known yet). A checkpoint restored before it without the
    monitor's state is a new series, started at the resumed step.
    """
    late = bool(getattr(trainer.strategy, "restore_checkpoint_after_setup", False))
    return restored or (trainer.ckpt_path is not None and late)


def warn_kind_changed(
    trainer: Any, prefix: str, before: str | None, now: str | None, n_evals: int, step: int
) -> None:
    """Say, on rank zero, that the checkpoint's series used another input kind."""
    if trainer.is_global_zero:
        warnings.warn(
            f"KLMonitor(prefix={prefix!r}): the checkpoint's {n_evals} evaluations were "
            f"computed from {before!r} inputs, and `kl_inputs` now returns {now!r} "
            "inputs. Estimates of two kinds are not one series: the monitor restarts at "
            f"step {step} (series, baselines, alerts and cadence), as a new KLMonitor "
            "would; the earlier evaluations stay in the logs. To keep them apart in the "
            "dashboards, use a new `prefix`.",
            KLMonitorWarning,
            stacklevel=3,
        )


def log_line(
    trainer: Any, prefix: str, held: HeldOut | None, cadence: Any, inferred: int | None = None
) -> None:
    """The monitor's first line, through Lightning's own logger (shown like its lines)."""
    if held is None:
        return
    namespace = type(trainer).__module__.split(".trainer")[0]
    batches = "batch" if held.limit == 1 else "batches"
    limit = held.note or f"at most {held.limit} {batches} per evaluation and rank"
    every = cadence.every_n_train_steps
    schedule = (
        f"every {every} steps"
        if every is not None
        else f"adaptive cadence within {cadence.overhead_budget:.0%} of training time"
    )
    groups = (
        f"; num_groups={inferred} inferred from the labels of the sanity evaluation"
        if inferred else ""
    )
    logging.getLogger(f"{namespace}.kl_monitor").info(
        f"KLMonitor(prefix={prefix!r}): held-out data from the {held.name}; {limit}; "
        f"{schedule}{groups}."
    )


def prepare_batch(trainer: Any, pl_module: Any, batch: Any, dataloader_idx: int) -> Any:
    """What Lightning's evaluation loop does to a batch before ``validation_step``.

    ``precision_plugin.convert_input``, then ``on_before_batch_transfer``,
    ``transfer_batch_to_device`` and ``on_after_batch_transfer`` (the datamodule's
    when it overrides them) through the strategy, with ``dataloader_idx``.
    """
    plugin = getattr(trainer, "precision_plugin", None)
    if plugin is not None:
        batch = plugin.convert_input(batch)
    before = getattr(pl_module, "_on_before_batch_transfer", None)
    if callable(before):
        batch = before(batch, dataloader_idx=dataloader_idx)
    else:
        batch = pl_module.on_before_batch_transfer(batch, dataloader_idx)
    strategy = getattr(trainer, "strategy", None)
    if strategy is not None and callable(getattr(strategy, "batch_to_device", None)):
        return strategy.batch_to_device(batch, dataloader_idx=dataloader_idx)
    return pl_module.transfer_batch_to_device(batch, pl_module.device, dataloader_idx)


def step_context(trainer: Any) -> Any:
    """``precision_plugin.val_step_context()``: autocast or the default dtype of the setting."""
    plugin = getattr(trainer, "precision_plugin", None)
    return plugin.val_step_context() if plugin is not None else nullcontext()


@contextmanager
def validation_mode(pl_module: Any) -> Iterator[None]:
    """``on_validation_model_eval`` (a user override included), then every flag restored.

    Lightning calls the hook to enter eval mode for validation; the monitor does the
    same, and afterwards puts every submodule's own ``training`` flag back, so
    training resumes exactly as it was.
    """
    flags = [(m, m.training) for m in pl_module.modules()]
    hook = getattr(pl_module, "on_validation_model_eval", None)
    if callable(hook) and getattr(pl_module, "_trainer", None) is not None:
        hook()
    else:
        pl_module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def check_module_device(pl_module: Any) -> None:
    """A module with parameters or buffers on the meta device holds no data: say so."""
    meta = [
        name
        for name, t in (*pl_module.named_parameters(), *pl_module.named_buffers())
        if t.device.type == "meta"
    ]
    if meta:
        shown = ", ".join(meta[:3]) + (f" and {len(meta) - 3} more" if len(meta) > 3 else "")
        raise ValueError(
            f"{type(pl_module).__name__} has tensors on the meta device ({shown}): they "
            "hold no data, so KL cannot be computed. Materialise them (`to_empty()` and "
            "load the weights) before training."
        )


def check_inputs_device(inputs: KLInputs, device: torch.device) -> None:
    """Every tensor of ``inputs`` on ``device`` (the module's), or a clear error."""
    for field in _TENSOR_FIELDS:
        value = getattr(inputs, field, None)
        if not isinstance(value, torch.Tensor) or _same_device(value.device, device):
            continue
        hint = (
            " Meta tensors hold no data: a model or reference on the meta device was "
            "never materialised (`to_empty()` and load its weights)."
            if value.device.type == "meta"
            else f" Move them to {device} in `kl_inputs` (e.g. a reference model that "
            "is not a submodule is not moved by Lightning)."
        )
        raise ValueError(
            f"`kl_inputs`/`inputs_fn` returned `{field}` on device {value.device}, but the "
            f"module is on {device}: KLMonitor computes on the module's device.{hint}"
        )


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    # cuda vs cuda:0: an unset index means the current device
    return a.index is None or b.index is None or a.index == b.index

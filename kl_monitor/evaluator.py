"""Held-out batches to one typed result and the histogram values, computed once.

``Evaluator.accumulate`` runs this rank's share of the held-out batches through the
user's ``kl_inputs`` under ``torch.no_grad()``, in eval mode and with the monitor's
own RNG, along the path of Lightning's own validation batches (precision plugin,
batch hooks: ``_lightning_compat``), and feeds each ``KLInputs`` to the metric of its
kind (``METRIC_FOR_KIND``: adding an input kind is one entry there and one constructor
on ``KLInputs``). The metric's ``update_from`` returns the per-unit log ratios it
computed anyway, so the histogram costs no second pass. ``Evaluator.compute`` syncs
the metric across ranks (a collective) and returns its typed result.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import _lightning_compat as compat
from .inputs import KLInputs
from .metrics import CategoricalKL, SampledKL, _KLMetric
from .results import KLResult
from .sample_metrics import KNNKL, BinnedKL

__all__ = ["Evaluator", "METRIC_FOR_KIND", "MetricConfig"]

#: Values kept for the histogram of log ratios (from the first batch on rank zero).
HIST_VALUES = 4096


@dataclass(frozen=True)
class MetricConfig:
    """What the metric factories of ``METRIC_FOR_KIND`` may read."""

    method: str = "cv"
    reduction: str = "token_mean"
    num_groups: int | None = None
    sample_estimator: str = "knn"
    num_cells: int = 16
    max_samples: int = 8192
    seed: int = 0


def _sample_metric(c: MetricConfig) -> _KLMetric:
    """``KNNKL`` (labelled groups, else cells) or ``BinnedKL`` (cells) for samples."""
    common = dict(max_samples=c.max_samples, seed=c.seed)
    if c.sample_estimator == "binned":
        if c.num_groups is not None:
            raise ValueError(
                "sample_estimator='binned' uses its cells as groups; drop `num_groups` "
                "(and `groups=`) or use sample_estimator='knn'."
            )
        return BinnedKL(num_cells=c.num_cells, **common)
    return KNNKL(num_groups=c.num_groups, num_cells=c.num_cells, **common)


#: Input kind (``KLInputs.kind``) -> the metric that accumulates it.
METRIC_FOR_KIND: dict[str, Callable[[MetricConfig], _KLMetric]] = {
    "logits": lambda c: CategoricalKL(reduction=c.reduction, num_groups=c.num_groups),
    "log_probs": lambda c: SampledKL(method=c.method, num_groups=c.num_groups),
    "samples": _sample_metric,
}


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


class Evaluator:
    """Accumulates held-out batches into the metric of their input kind.

    Args:
        dataloader: held-out data, or ``None`` for the Trainer's validation loader.
        inputs_fn: ``(module, batch) -> KLInputs``, or ``None`` for ``module.kl_inputs``.
        config: what the metric factories read.
        log_histograms: keep the histogram values of the first batch (rank zero).
        val_loader: which of several Trainer validation dataloaders (position or key).

    Attributes:
        kind: the input kind seen first (``None`` before any batch).
        metric: the metric of that kind.
        histogram: log ratios of the last evaluation's first batch, or ``None``.
    """

    def __init__(
        self,
        dataloader: Iterable | None,
        inputs_fn: Callable[[Any, Any], KLInputs] | None,
        config: MetricConfig,
        log_histograms: bool = True,
        val_loader: int | str | None = None,
    ) -> None:
        self.dataloader = dataloader
        self.inputs_fn = inputs_fn
        self.config = config
        self.log_histograms = log_histograms
        self.kind: str | None = None
        self.metric: _KLMetric | None = None
        self.histogram: torch.Tensor | None = None
        self.val_loader = val_loader
        self.held: compat.HeldOut | None = None
        #: cells of sample-only inputs from a checkpoint, for the metric once it exists
        self.cells: torch.Tensor | None = None
        #: per-row values for paired evidence (``PairedRows``), or ``None``
        self.pairing: Any = None
        #: num_groups inferred from the first evaluation's labels (``None``: given, or
        #: no labels)
        self.inferred_groups: int | None = None

    def reset(self) -> None:
        if self.metric is not None:
            self.metric.reset()

    def accumulate(self, trainer: Any, pl_module: Any, limit: int, seed: int) -> None:
        """Feed this rank's held-out batches (at most ``limit``) to the metric.

        No collective, except at the first evaluation without ``num_groups``: the
        ranks agree on the number of groups (1 + the largest label on any rank).
        """
        device = pl_module.device
        self.histogram = None
        self.reset()
        keep_hist = self.log_histograms and trainer.is_global_zero
        if self.pairing is not None:
            self.pairing.start()
        held = self.held_out(trainer, limit)
        # without num_groups, the first evaluation's labels (agreed across ranks) set it
        infer = self.metric is None and self.config.num_groups is None
        pending: list[KLInputs] = []
        error: Exception | None = None
        with _isolated_rng(device, seed), torch.no_grad(), compat.validation_mode(pl_module):
            seen = 0
            try:
                for batch in self._batches(trainer, min(limit, held.limit)):
                    seen += 1
                    # as Lightning's own validation: precision, batch hooks, step context
                    batch = compat.prepare_batch(trainer, pl_module, batch, held.index)
                    with compat.step_context(trainer):
                        items = self._inputs(pl_module, batch)
                    for inputs in items:
                        compat.check_inputs_device(inputs, device)
                        if infer:
                            pending.append(inputs)
                        else:
                            self._feed(inputs, device, keep_hist)
            except Exception as err:  # every rank must reach the agreement below
                error = err
            if infer:
                self._infer_num_groups(trainer, pending, device, failed=error is not None)
            if error is not None:
                raise error
            for inputs in pending:
                self._feed(inputs, device, keep_hist)
        if self.metric is None or not seen:  # e.g. a one-shot iterator, exhausted
            raise ValueError("the held-out dataloader yielded no batch on this rank.")

    def _feed(self, inputs: KLInputs, device: torch.device, keep_hist: bool) -> None:
        """One ``KLInputs`` into the metric, the pairing and the histogram."""
        try:
            values = self._metric_for(inputs, device).update_from(inputs)
        except ValueError as err:
            if self.inferred_groups is None or "outside [0," not in str(err):
                raise
            raise ValueError(
                f"{err} `num_groups` was inferred as {self.inferred_groups} from the labels "
                "of the first evaluation (KLMonitor(num_groups=None)); pass "
                "KLMonitor(num_groups=G) with the number of distinct labels 0..G-1."
            ) from err
        if self.pairing is not None:
            self.pairing.add(inputs, self.metric)
        if keep_hist and self.histogram is None:
            values = values.reshape(-1)
            values = values[torch.isfinite(values)][:HIST_VALUES]
            self.histogram = values.detach().float().cpu()

    def _infer_num_groups(
        self, trainer: Any, pending: list[KLInputs], device: torch.device, failed: bool
    ) -> None:
        """num_groups = 1 + the largest label on any rank (a collective), if any."""
        local = -1
        for inputs in pending:
            for labels in (inputs.groups, inputs.model_samples_groups):
                if labels is not None and labels.numel() and not labels.is_floating_point():
                    local = max(local, int(labels.max()))
        mine = torch.tensor([local + 1, int(failed)], dtype=torch.int64, device=device)
        every = trainer.strategy.all_gather(mine).reshape(-1, 2)
        if failed or bool(every[:, 1].any()):
            if not failed:
                raise RuntimeError("another rank failed in the first evaluation.")
            return
        found = int(every[:, 0].max())
        if found > 0:
            self.config = dataclasses.replace(self.config, num_groups=found)
            self.inferred_groups = found

    def compute(self) -> KLResult:
        """The typed result over every rank's batches (a collective), then reset."""
        assert self.metric is not None
        result = self.metric.compute()
        self.metric.reset()
        return result

    def held_out(self, trainer: Any, max_batches: int) -> compat.HeldOut:
        """The held-out loader, chosen once per fit (``held = None`` to choose again)."""
        if self.held is None:
            self.held = compat.resolve(trainer, self.dataloader, self.val_loader, max_batches)
        return self.held

    def _batches(self, trainer: Any, limit: int) -> Iterator[Any]:
        """This rank's share of the first ``limit × world_size`` held-out batches."""
        world, rank = trainer.world_size, trainer.global_rank
        taken = 0
        assert self.held is not None
        for index, batch in enumerate(self.held.loader):
            if index % world == rank:
                taken += 1
                yield batch
                if taken >= limit:  # stop before fetching a batch that would go unused
                    break

    def _inputs(self, pl_module: Any, batch: Any) -> list[KLInputs]:
        """The batch's ``KLInputs``: one, or a list (logits rows from the reference *and*
        from the model, e.g. reference continuations and generations of the same prompts)."""
        fn = self.inputs_fn
        out = fn(pl_module, batch) if fn is not None else pl_module.kl_inputs(batch)
        items = list(out) if isinstance(out, (list, tuple)) else [out]
        for inputs in items:
            if not isinstance(inputs, KLInputs):
                raise TypeError(
                    "`kl_inputs`/`inputs_fn` must return KLInputs (KLInputs.from_logits, "
                    "from_log_probs or from_samples), or a list of them, got "
                    f"{type(inputs).__name__}."
                )
            if self.kind is not None and inputs.kind != self.kind:
                raise ValueError(
                    f"`kl_inputs` returned {inputs.kind!r} inputs, but earlier batches were "
                    f"{self.kind!r}; one monitor takes one kind."
                )
        if not items or (len(items) > 1 and any(i.kind != "logits" for i in items)):
            raise ValueError(
                "`kl_inputs` may return several KLInputs only for logits (rows from the "
                f"reference and from the model), got kinds {[i.kind for i in items]}."
                if items else "`kl_inputs` returned an empty list of KLInputs."
            )
        return items

    def _metric_for(self, inputs: KLInputs, device: torch.device) -> _KLMetric:
        if self.metric is None:
            self.kind = inputs.kind
            self.metric = METRIC_FOR_KIND[inputs.kind](self.config)
            if self.cells is not None and hasattr(self.metric, "centroids"):
                self.metric.centroids = self.cells  # restored from a checkpoint
        return self.metric.to(device)

"""torchmetrics ``Metric`` classes for KL in both directions, exact across batches and ranks.

Every metric here is a thin layer over the functional core: its states are the
sufficient statistics of ``KLStats`` (or, for logits, sums of
exact per-row values from ``categorical_kl_rows``), kept in
float64 and summed with ``dist_reduce_fx="sum"``; the bounded top-k of log-weights is
merged by union-then-top-k. The result over a held-out set is therefore the same however
it was split into batches and DDP ranks, up to float64 rounding.

- ``MonteCarloKL``: D(A‖B) from samples x ~ A (one direction).
- ``CategoricalKL``: exact D(P‖Q) and D(Q‖P) from logits, per token or per sequence.
- ``SampledKL``: both directions from samples: forward from reference samples,
  reverse from model samples or, without them, by importance weighting.

``compute()`` returns a typed result (``kl_monitor.results``): a frozen dataclass
with per-direction estimates, per-group estimates and counters, which is also a
read-only ``Mapping`` of scalar tensors, so ``self.log_dict(metric.compute())`` works
in a ``LightningModule``. With ``num_groups`` set, per-group values are flat keys such
as ``"forward/group_3"``; groups that received no rows are left out of the result
(never reported as NaN). ``compute()`` reads the states to the host in one transfer.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from . import results
from ._utils import check_floating, check_logits, check_nonfinite_mode
from .estimators import categorical_kl_rows, kept_rows
from .results import DirectionEstimate, GroupEstimate, KLResult
from .sequences import valid_direction
from .stats import _COLUMNS, LU, METHODS, NONFINITE, SUPPORT, TOP_K, WW, WWL, WWLL, KLStats, U
from .stats import L as _L
from .stats import N as _N

if TYPE_CHECKING:
    from .inputs import KLInputs

__all__ = ["KLResult", "MonteCarloKL", "CategoricalKL", "SampledKL"]

_F64 = torch.float64
_NCOL = len(_COLUMNS)  # columns of KLStats sums
REDUCTIONS = ("token_mean", "sequence_sum")
#: A group's estimated model mass Σw below this fraction of its sample count is treated
#: as zero: n + Σ(w − 1) cannot resolve it in float64, so its reverse KL is meaningless.
_MIN_GROUP_MASS = 1e-10


# --------------------------------------------------------------------------- helpers
class _Box:
    """Carries a typed result through torchmetrics' compute wrapper untouched."""

    __slots__ = ("result",)

    def __init__(self, result: KLResult) -> None:
        self.result = result


def _to_host(tensors: Sequence[Tensor]) -> list[Tensor]:
    """The tensors as float64 on the CPU, in one device-to-host transfer."""
    flat = torch.cat([t.detach().reshape(-1).to(_F64) for t in tensors]).cpu()
    sizes = [t.numel() for t in tensors]
    return [part.reshape(t.shape) for part, t in zip(flat.split(sizes), tensors, strict=True)]


def _direction(est: Any) -> DirectionEstimate:
    """A ``KLEstimate`` of ``KLStats.estimate`` as one direction of a result."""
    return DirectionEstimate(
        est.value, est.stderr, float(est.n), est.method_used, c=est.c,
        variance_reduction=est.variance_reduction, tail_index=est.tail_index,
    )


def _merge_top_stacked(stacked: Tensor) -> Tensor:
    """``dist_reduce_fx`` of the top-k state: torchmetrics stacks the gathered (or the
    global and batch) buffers along dim 0; fold them with ``KLStats.merge_top``."""
    return functools.reduce(KLStats.merge_top, stacked.to(_F64).unbind(0))


def _check_groups(
    groups: object,
    shapes: Sequence[tuple[int, ...]],
    num_groups: int | None,
    counted: Tensor | None,
    validate: bool,
    name: str = "groups",
) -> Tensor:
    """Validate integer group labels against the allowed ``shapes`` and, when ``validate``,
    the range [0, num_groups) where ``counted`` (if given) is True. Returns them as int64,
    on ``counted``'s device; broadcasting to rows is the caller's."""
    if num_groups is None:
        raise ValueError(
            f"`{name}` was given but the metric was created without `num_groups`; pass "
            "`num_groups=G` (the number of distinct labels, 0..G-1) when creating it, so "
            "that every rank holds per-group states of the same shape."
        )
    if not isinstance(groups, Tensor):
        raise TypeError(
            f"`{name}` must be a torch.Tensor of integer labels, got {type(groups).__name__}."
        )
    if groups.is_floating_point() or groups.is_complex() or groups.dtype == torch.bool:
        raise TypeError(
            f"`{name}` must have an integer dtype (int64, int32, ...), got {groups.dtype}; "
            "convert labels with `.long()`."
        )
    if tuple(groups.shape) not in [tuple(s) for s in shapes]:
        expected = " or ".join(str(tuple(s)) for s in shapes)
        raise ValueError(
            f"`{name}` must have shape {expected} (one label per row), got {tuple(groups.shape)}."
        )
    labels = groups.to(torch.int64)
    if counted is not None:
        labels = labels.to(counted.device)
    if validate:
        seen = labels
        if counted is not None and counted.shape == labels.shape:
            seen = labels[counted]
        bad = seen[(seen < 0) | (seen >= num_groups)]
        if bad.numel():
            raise ValueError(
                f"`{name}` holds label {int(bad[0])}, outside [0, {num_groups}) "
                f"(num_groups={num_groups}); {bad.numel()} labels are out of range."
            )
    return labels


def _require_groups(num_groups: int | None, groups: object, name: str = "groups") -> None:
    if num_groups is not None and groups is None:
        raise ValueError(
            f"the metric was created with num_groups={num_groups}, so every update needs "
            f"`{name}` (the per-group results must cover every row)."
        )


def _check_num_groups(num_groups: object) -> int | None:
    if num_groups is None:
        return None
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1:
        raise ValueError(f"`num_groups` must be a positive int or None, got {num_groups!r}.")
    return num_groups


def _mean_stderr(n: float, s: float, s2: float, n_inf: float) -> tuple[float, float]:
    """Mean of n values (``n_inf`` of them +inf) and sd/√n from their finite sums."""
    if n_inf > 0:
        return math.inf, math.inf
    mean = s / n
    if n < 2:
        return mean, math.inf
    var = max(s2 - s * s / n, 0.0) / (n - 1)
    return mean, math.sqrt(var / n)


class _KLMetric(Metric):
    """Shared plumbing: float64 states, result metadata, plotting, state-shape checks."""

    is_differentiable: bool = False
    higher_is_better: bool = False
    full_state_update: bool = False
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = None
    #: keys drawn by ``plot`` (counts and diagnostics would swamp the axis).
    _plot_keys: tuple[str, ...] = ()

    def __init__(
        self, nonfinite: str, num_groups: int | None, validate_args: bool, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        check_nonfinite_mode(nonfinite)
        self.nonfinite = nonfinite
        self.num_groups = _check_num_groups(num_groups)
        self.validate_args = validate_args
        self.update_from = self._counted(self.update_from)

    def _counted(self, update_from: Callable[[KLInputs], Tensor]) -> Callable:
        """``update_from`` with torchmetrics' own update bookkeeping.

        torchmetrics wraps ``update`` to drop a cached ``compute`` and count updates;
        ``update_from`` bypasses ``update`` (its inputs are validated once, in
        ``KLInputs``), so without this every ``compute`` warned that it came before any
        update, and a cached result could outlive new data.
        """

        def wrapped(inputs: KLInputs) -> Tensor:
            self._computed = None
            self._update_count += 1
            return update_from(inputs)

        return wrapped

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("update_from", None)  # a closure: rebuilt on unpickling, like ``update``
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.update_from = self._counted(self.update_from)

    def update_from(self, inputs: KLInputs) -> Tensor:
        """Add one batch of ``KLInputs`` (validated when built: not checked again).

        Returns:
            Per-unit log ratios of the batch (per-row forward KL for logits), for the
            monitor's histogram.
        """
        raise NotImplementedError

    # -- sample statistics (MonteCarloKL, SampledKL) ---------------------------------
    def _add_sample_states(self, prefix: str, num_groups: int | None) -> None:
        self.add_state(f"{prefix}sums", torch.zeros(2, _NCOL, dtype=_F64), dist_reduce_fx="sum")
        self.add_state(
            f"{prefix}top_log_w",
            torch.full((TOP_K,), -math.inf, dtype=_F64),
            dist_reduce_fx=_merge_top_stacked,
        )
        self.add_state(f"{prefix}counts", torch.zeros(3, dtype=_F64), dist_reduce_fx="sum")
        if num_groups is not None:
            self.add_state(
                f"{prefix}group_sums",
                torch.zeros(num_groups, 2, _NCOL, dtype=_F64),
                dist_reduce_fx="sum",
            )
            self.add_state(
                f"{prefix}group_counts",
                torch.zeros(num_groups, 3, dtype=_F64),
                dist_reduce_fx="sum",
            )

    def _sample_batch(
        self,
        log_a: Tensor,
        log_b: Tensor,
        labels: Tensor | None,
        names: tuple[str, str] = ("log_a", "log_b"),
    ) -> dict[str, Any]:
        """One batch's statistics (validated, nothing stored yet), keyed by state suffix."""
        sums, top, counts, group_sums, group_counts = KLStats.grouped_batch_tensors(
            log_a, log_b, labels, self.num_groups or 0, self.nonfinite, names
        )
        batch = {"sums": sums, "top_log_w": top, "counts": counts}
        if labels is not None:
            batch["group_sums"], batch["group_counts"] = group_sums, group_counts
        return batch

    def _add_sample_batch(self, prefix: str, batch: dict[str, Any]) -> None:
        """Add a batch from ``_sample_batch`` to the states named ``prefix*``."""
        for key in ("sums", "counts"):
            name = prefix + key
            setattr(self, name, getattr(self, name).to(_F64) + batch[key])
        name = prefix + "top_log_w"
        setattr(self, name, KLStats.merge_top(getattr(self, name).to(_F64), batch["top_log_w"]))
        for key in ("group_sums", "group_counts"):
            if key not in batch:
                continue
            name = prefix + key
            setattr(self, name, getattr(self, name).to(_F64) + batch[key])

    def _host_stats(self, *prefixes: str) -> list[tuple[KLStats, list[KLStats]]]:
        """Per prefix, the statistics named ``prefix*`` and one per group, all read to
        the host in one transfer."""
        keys = ["sums", "top_log_w", "counts"]
        grouped = self.num_groups is not None
        if grouped:
            keys += ["group_sums", "group_counts"]
        host = _to_host([getattr(self, prefix + key) for prefix in prefixes for key in keys])
        # no per-group tail buffer: the per-group values are naive (k1) means
        empty_top = torch.full((TOP_K,), -math.inf, dtype=_F64)
        out = []
        for i in range(0, len(host), len(keys)):
            part = host[i : i + len(keys)]
            groups = zip(part[3], part[4], strict=True) if grouped else ()
            out.append((KLStats(*part[:3]), [KLStats(s, empty_top, c) for s, c in groups]))
        return out

    @staticmethod
    def _seen(stats: KLStats) -> int:
        """Samples passed in, whatever became of them (used, support violation, dropped)."""
        return stats.n + int(stats.counts[NONFINITE]) + int(stats.counts[SUPPORT])

    @staticmethod
    def _usable(stats: KLStats) -> bool:
        return stats.n + int(stats.counts[SUPPORT]) > 0

    def _wrap_compute(self, compute: Callable) -> Callable:
        # torchmetrics rebuilds a returned Mapping and clones its tensors; the typed
        # result is immutable, so it passes through in a box that it leaves alone.
        @functools.wraps(compute)
        def boxed(*args: Any, **kwargs: Any) -> _Box:
            return _Box(compute(*args, **kwargs))

        inner = super()._wrap_compute(boxed)

        @functools.wraps(compute)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            value = inner(*args, **kwargs)
            return value.result if isinstance(value, _Box) else value

        return wrapped

    # -- housekeeping ----------------------------------------------------------------
    def _apply(self, fn: Callable, exclude_state: Sequence[str] = "") -> Any:
        # Accumulators stay float64 whatever `.to(dtype)`/precision plugins do to the module.
        this = super()._apply(fn, exclude_state)
        for key, default in this._defaults.items():
            if isinstance(default, Tensor) and default.is_floating_point():
                this._defaults[key] = default.to(_F64)
                setattr(this, key, getattr(this, key).to(_F64))
        return this

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        for key, default in self._defaults.items():
            value = state_dict.get(prefix + key)
            if isinstance(value, Tensor) and value.shape != default.shape:
                raise ValueError(
                    f"checkpoint state `{prefix + key}` has shape {tuple(value.shape)}, but this "
                    f"{type(self).__name__} expects {tuple(default.shape)} "
                    "(was it saved with a different `num_groups`?)."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def plot(
        self,
        val: Mapping[str, Tensor] | Sequence[Mapping[str, Tensor]] | None = None,
        ax: _AX_TYPE | None = None,
    ) -> _PLOT_OUT_TYPE:
        """Plot the headline value(s) of one result, or of a sequence of results over steps.

        Args:
            val: a result of ``compute()``/``forward()`` or a list of them. If omitted,
                ``compute()`` is called. Only the KL values are drawn, not the counters.
            ax: a matplotlib axis to draw into.

        Returns:
            ``(figure, axis)`` from ``torchmetrics.utilities.plot.plot_single_or_multi_val``.
        """
        val = val if val is not None else self.compute()
        if isinstance(val, Mapping):
            val = {k: val[k] for k in self._plot_keys if k in val}
        elif isinstance(val, Sequence) and val and isinstance(val[0], Mapping):
            val = [{k: v[k] for k in self._plot_keys if k in v} for v in val]
        return self._plot(val, ax)


# --------------------------------------------------------------------------- MonteCarloKL
class _SampleMetric(_KLMetric):
    """Configuration shared by the Monte Carlo metrics; states per name in ``_sample_sets``."""

    _sample_sets: tuple[str, ...] = ("",)

    def __init__(
        self,
        method: str = "cv",
        nonfinite: str = "skip",
        num_groups: int | None = None,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        super().__init__(nonfinite, num_groups, validate_args, **kwargs)
        self.method = method
        for prefix in self._sample_sets:
            self._add_sample_states(prefix, self.num_groups)

    def _labels(
        self, groups: Tensor | None, like: Tensor, name: str, like_name: str
    ) -> Tensor | None:
        """Validated labels for samples shaped like ``like`` (None without groups)."""
        _require_groups(self.num_groups, groups, name)
        if groups is None:
            return None
        check_floating(like_name, like)
        return _check_groups(
            groups, [tuple(like.shape)], self.num_groups, None, self.validate_args, name=name
        )


class MonteCarloKL(_SampleMetric):
    r"""Monte Carlo D(A‖B) from samples x ~ A, exact across batches and ranks.

    With ℓ = log a(x) − log b(x) and w = b(x)/a(x), the per-sample terms are ℓ (``naive``),
    ℓ + (w − 1) (``k3``) or ℓ − λ·c·(w − 1) with the cross-fitted c = Cov(ℓ, w)/Var(w)
    and a weight λ ∈ [0, 1] that is 1 only where the control variate's interval can be
    trusted (``cv``, the default; naive when λ = 0). See ``mc_kl``. The states are the float64 sums
    of ``KLStats`` (n, Σℓ, Σℓ², Σu, Σu², Σℓu, ... per fold), a
    top-k of log w and counters, all summed (top-k: merged) across batches and ranks,
    so the result on a held-out set does not depend on how it was split.

    Forward KL D(P‖Q): ``update(log_p, log_q)`` on samples of P. Reverse KL D(Q‖P):
    ``update(log_q, log_p)`` on samples of Q.

    ``compute()`` returns a ``KLResult`` of scalar float64 tensors:

    - ``kl``: the estimate (nats; ``+inf`` with support violations), ``stderr``, ``n``
      (finite samples used), ``c`` (coefficient applied in ℓ − c(w − 1)),
      ``variance_reduction`` (naive variance / variance of the method used),
      ``tail_index`` (Pareto k̂ of w; ``nan`` below 20 samples), ``nonfinite`` (samples
      dropped), ``support_violations`` (b = 0 < a).
    - with ``num_groups``: ``kl/group_g``, ``stderr/group_g`` and ``n/group_g`` for every
      group that received samples. Per-group values are naive means of ℓ (the control
      variate has zero mean over A, not within a group), so
      Σ_g n_g·kl_g / Σ_g n_g is the naive estimate over all samples.
    - attributes ``method`` and ``method_used`` (``"naive"`` when ``cv`` gave the control
      variate weight 0).

    Args:
        method: ``"cv"``, ``"k3"`` or ``"naive"``.
        nonfinite: ``"skip"`` drops NaN/±inf samples with one warning and counts them;
            ``"raise"`` rejects them.
        num_groups: number of group labels (0..G−1) accepted by ``update(..., groups=)``.
        validate_args: check group labels are in range (one device sync per update); with
            False, labels are trusted and an out-of-range one corrupts or breaks the update.
        kwargs: torchmetrics ``Metric`` options (``sync_on_compute``, ``process_group``, ...).

    Raises:
        ValueError: from ``compute()`` when no usable sample was seen.

    Examples:
        >>> import torch
        >>> from kl_monitor.metrics import MonteCarloKL
        >>> _ = torch.manual_seed(0)
        >>> p, q = torch.distributions.Normal(0., 1.), torch.distributions.Normal(1., 1.)
        >>> metric = MonteCarloKL()
        >>> for _ in range(4):
        ...     x = p.sample((1000,))
        ...     metric.update(p.log_prob(x), q.log_prob(x))
        >>> out = metric.compute()  # true D(P‖Q) = 0.5
        >>> abs(float(out["kl"]) - 0.5) < 3 * float(out["stderr"]), int(out["n"])
        (True, 4000)
    """

    _plot_keys = ("kl",)

    def update(self, log_a: Tensor, log_b: Tensor, groups: Tensor | None = None) -> None:
        """Add samples x ~ A given log a(x) and log b(x) (same shape) and optional labels."""
        labels = self._labels(groups, log_a, "groups", "log_a")
        self._add_sample_batch("", self._sample_batch(log_a, log_b, labels))

    def update_from(self, inputs: KLInputs) -> Tensor:
        labels = self._labels(inputs.groups, inputs.reference, "groups", "reference")
        self._add_sample_batch("", self._sample_batch(inputs.reference, inputs.model, labels))
        return inputs.reference.detach().double() - inputs.model.detach().double()

    def compute(self) -> results.MonteCarloResult:
        """The estimate over everything seen since the last reset (all ranks)."""
        ((stats, groups),) = self._host_stats("")
        if not self._usable(stats):
            raise ValueError(
                f"{type(self).__name__}.compute(): no usable samples "
                f"({int(stats.counts[NONFINITE])} non-finite samples dropped); call update() first."
            )
        est = stats.estimate(self.method)
        return results.MonteCarloResult(
            estimate=_direction(est),
            method=self.method,
            nonfinite=float(est.nonfinite),
            support_violations=float(est.support_violations),
            groups=_naive_groups(groups),
            device=self.device,
        )


def _naive_groups(groups: Sequence[KLStats]) -> dict[int, GroupEstimate]:
    """Naive per-group means of the groups that received samples."""
    out = {}
    for g, gs in enumerate(groups):
        if gs.n + int(gs.counts[SUPPORT]):
            ge = gs.estimate("naive")
            out[g] = GroupEstimate(ge.value, ge.stderr, float(ge.n))
    return out


# --------------------------------------------------------------------------- CategoricalKL
#: Columns of CategoricalKL's states, by name: per unit, units, Σf, Σf², #(f = ∞), Σr,
#: Σr², #(r = ∞), ΣH(P), ΣH(Q); per batch, support violations, non-finite and counted
#: rows. The first ``_C_GROUP`` (units … #(r = ∞)) are also kept per group.
_UNIT_COLUMNS = ("n", "f", "ff", "f_inf", "r", "rr", "r_inf", "h_p", "h_q")
_COUNT_COLUMNS = ("support", "nonfinite", "rows")
# Support-mismatch companions (``kl_monitor.support``) per unit: the shared-support KLs
# (sums, squares and infinite units, like f and r) and the masses outside the other's
# support summed over the unit's rows; ``unit_rows`` counts those rows.
_SUPPORT_COLUMNS = ("fs", "fsfs", "fs_inf", "rs", "rsrs", "rs_inf", "p_out", "q_out",
                    "unit_rows")  # fmt: skip
# `labelled`: updates that said where their rows came from (``sampled_from``)
_CAT_COLUMNS = _UNIT_COLUMNS + _COUNT_COLUMNS + _SUPPORT_COLUMNS + ("labelled",)
_C = {name: i for i, name in enumerate(_CAT_COLUMNS)}
_C_GROUP = _C["r_inf"] + 1
#: per-group columns: the first _C_GROUP, then the masses outside and the rows
_GROUP_COLUMNS = _CAT_COLUMNS[:_C_GROUP] + ("p_out", "q_out", "unit_rows")
#: where rows may come from (``update(..., sampled_from=)``): their row of the states
#: (rows of unstated origin go with the reference's)
_SOURCES = {"reference": 0, "model": 1}


class CategoricalKL(_KLMetric):
    r"""Exact D(P‖Q) and D(Q‖P) between categoricals given by logits, over many rows.

    Per row (token position), with p = softmax(logits_p) (reference) and
    q = softmax(logits_q) (model), both directions are exact sums over the K classes:

        f = Σ_k p_k (log p_k − log q_k),    r = Σ_k q_k (log q_k − log p_k).

    The only Monte Carlo part is the average over units, reported with its standard
    error sd/√n. The **reduction** decides what a unit is, and it is stated in the
    result (``result.reduction``) because the two are easily confused:

    - ``"token_mean"`` (default): a unit is a row; ``forward`` is the mean per-token KL
      over unmasked rows. Logits ``(..., K)``.
    - ``"sequence_sum"``: a unit is a sequence; ``forward`` is the KL summed over the
      (unmasked) positions of a sequence, averaged over sequences that have at least
      one counted position. Logits ``(..., S, K)``, the sequence axis second to last.
      Entropies are summed per sequence the same way. A dropped (non-finite) row
      adds 0 to its sequence's sum, as in ``categorical_kl(..., reduction="sum")``.

    States (float64, summed across batches and ranks): n, Σf, Σf², #(f = ∞), Σr, Σr², #(r = ∞),
    ΣH(P), ΣH(Q), support violations, non-finite rows and counted rows; and
    with ``num_groups`` the first seven per group.

    ``compute()`` returns a ``KLResult`` of scalar float64 tensors: ``forward``,
    ``reverse``, ``asymmetry`` (forward − reverse; ``nan`` only when both are ``+inf``),
    ``forward_stderr``, ``reverse_stderr``, ``entropy_reference`` (H(P)),
    ``entropy_model`` (H(Q)), ``support_violations`` (rows where q = 0 < p or
    p = 0 < q: they make that direction ``+inf``, never NaN), ``nonfinite`` (rows
    dropped for NaN/+inf logits or all −inf), ``n`` (units averaged: rows or
    sequences) and ``n_rows`` (rows counted). With ``num_groups``:
    ``forward/group_g``, ``reverse/group_g``, ``forward_stderr/group_g``,
    ``reverse_stderr/group_g`` and ``n/group_g`` for each group with at least one unit;
    Σ_g n_g·forward_g / n = forward exactly.

    Args:
        reduction: ``"token_mean"`` or ``"sequence_sum"``.
        nonfinite: ``"skip"`` (drop bad rows, one warning) or ``"raise"``.
        num_groups: number of group labels 0..G−1 accepted by ``update(..., groups=)``.
            Labels are per unit: shape ``(...)`` for ``token_mean`` (or one per sequence,
            ``(..., S)`` without ``S``, broadcast over positions); ``(...)`` without ``S``
            for ``sequence_sum``. Labels of masked rows are ignored (padding may carry
            any value, e.g. −100).
        validate_args: check group labels are in range (one device sync per update).
        kwargs: torchmetrics ``Metric`` options.

    Examples:
        >>> import torch
        >>> from kl_monitor.metrics import CategoricalKL
        >>> metric = CategoricalKL()
        >>> lp = torch.tensor([[0.0, 0.0], [0.0, -float("inf")]])
        >>> lq = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
        >>> out = metric(lp, lq)  # forward() returns the batch value and accumulates
        >>> out.reduction, round(float(out["forward"]), 4), float(out["reverse"])
        ('token_mean', 0.4066, inf)
        >>> int(out["support_violations"]), int(out["n"])
        (1, 2)
    """

    _plot_keys = ("forward", "reverse")

    def __init__(
        self,
        reduction: str = "token_mean",
        nonfinite: str = "skip",
        num_groups: int | None = None,
        validate_args: bool = True,
        **kwargs: Any,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"`reduction` must be 'token_mean' (mean over unmasked rows) or 'sequence_sum' "
                f"(sum over positions, mean over sequences), got {reduction!r}."
            )
        super().__init__(nonfinite, num_groups, validate_args, **kwargs)
        self.reduction = reduction
        # one row per source (_SOURCES): the reference's rows (or of unstated origin),
        # then the rows the model generated
        sources = len(_SOURCES)
        self.add_state(
            "stats", torch.zeros(sources, len(_CAT_COLUMNS), dtype=_F64), dist_reduce_fx="sum"
        )
        if self.num_groups is not None:
            self.add_state(
                "group_stats",
                torch.zeros(sources, self.num_groups, len(_GROUP_COLUMNS), dtype=_F64),
                dist_reduce_fx="sum",
            )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, num_groups={self.num_groups}"

    def update(
        self,
        logits_p: Tensor,
        logits_q: Tensor,
        mask: Tensor | None = None,
        groups: Tensor | None = None,
        sampled_from: str | None = None,
    ) -> None:
        """Add rows of reference logits ``(..., K)``, model logits (same shape), an
        optional bool ``mask`` ``(...)`` (False = padding) and optional integer ``groups``.

        ``sampled_from`` says where the rows (prefixes) came from: ``"reference"``
        (held-out data, a teacher), ``"model"`` (the model's own generations) or
        ``None`` (unstated: both directions keep their plain keys)."""
        if sampled_from is not None:
            valid_direction(sampled_from)
        check_logits("logits_p", logits_p, "logits_q", logits_q, mask)
        self._add_rows(logits_p, logits_q, mask, groups, sampled_from)

    def update_from(self, inputs: KLInputs) -> Tensor:
        return self._add_rows(
            inputs.reference, inputs.model, inputs.mask, inputs.groups, inputs.sampled_from
        )

    def _labels(
        self, groups: Tensor | None, lead: tuple[int, ...], counted: Tensor
    ) -> Tensor | None:
        """Per-unit labels (sequence labels broadcast over positions for token_mean)."""
        _require_groups(self.num_groups, groups)
        if groups is None:
            return None
        seq = self.reduction == "sequence_sum"
        per_row = not seq and tuple(getattr(groups, "shape", ())) == lead
        shapes = [lead[:-1]] if seq else ([lead, lead[:-1]] if len(lead) >= 2 else [lead])
        g_counted = counted if per_row else counted.any(-1)
        labels = _check_groups(groups, shapes, self.num_groups, g_counted, self.validate_args)
        labels = labels.to(counted.device)
        if not seq and not per_row:  # one label per sequence, broadcast over positions
            labels = labels.unsqueeze(-1).expand(lead)
        return labels

    def _add_rows(
        self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None, groups: Tensor | None,
        sampled_from: str | None = None,
    ) -> Tensor:
        """Accumulate validated logits; returns the kept rows' forward KL (histogram)."""
        lead = tuple(logits_p.shape[:-1])
        if self.reduction == "sequence_sum" and len(lead) < 2:
            raise ValueError(
                "reduction='sequence_sum' sums over the sequence axis and needs logits of "
                f"shape (batch, seq, K), got {tuple(logits_p.shape)}."
            )
        out = categorical_kl_rows(logits_p, logits_q, support=True)
        # the batch's per-row values, for the alert engine's pairing (no second pass
        # over the logits); keyed by the logits' storage, so a different batch misses
        self.last_rows = ((logits_p.data_ptr(), tuple(logits_p.shape)), out)
        valid = out.valid
        counted = torch.ones_like(valid) if mask is None else mask.to(valid.device)
        labels = self._labels(groups, lead, counted)
        keep, n_bad = kept_rows(valid, counted, self.nonfinite)
        rows = (out.forward, out.reverse, out.entropy_reference, out.entropy_model,
                out.forward_shared, out.reverse_shared,
                out.reference_mass_outside, out.model_mass_outside)
        feats, totals, unit, hist = self._unit_features(rows, keep, n_bad)
        source = _SOURCES["model"] if sampled_from == "model" else 0
        totals[_C["labelled"]] = float(sampled_from is not None)
        index = torch.tensor([source], device=totals.device)
        self.stats = self.stats.to(_F64).index_add(0, index, totals[None])
        if labels is not None:
            per_group = feats[:, [_C[c] for c in _GROUP_COLUMNS]]
            group_stats = self.group_stats.to(_F64)
            group_stats[source] = group_stats[source].index_add(0, labels[unit], per_group)
            self.group_stats = group_stats
        return hist

    def _unit_features(
        self, rows: tuple[Tensor, ...], keep: Tensor, n_bad: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-unit columns (``_CAT_COLUMNS``, counters 0), the batch's totals (counters
        included), the unit mask, and the kept rows' forward KL."""
        zero = torch.zeros((), dtype=_F64, device=keep.device)
        f, r, h_p, h_q, f_s, r_s, p_out, q_out = (
            torch.where(keep, x.to(_F64), zero) for x in rows
        )
        support = keep & (torch.isinf(f) | torch.isinf(r))
        hist = f[keep]
        n_rows, unit = keep.to(_F64), keep
        if self.reduction == "sequence_sum":
            f, r, h_p, h_q, f_s, r_s, p_out, q_out, n_rows = (
                x.sum(-1) for x in (f, r, h_p, h_q, f_s, r_s, p_out, q_out, n_rows)
            )
            unit = keep.any(-1)
        cols = {"n": unit.to(_F64), "h_p": h_p, "h_q": h_q, "p_out": p_out, "q_out": q_out,
                "unit_rows": n_rows, "labelled": torch.zeros_like(n_rows)}  # fmt: skip
        for name, x in (("f", f), ("r", r), ("fs", f_s), ("rs", r_s)):
            inf = torch.isinf(x) & unit
            fin = torch.where(inf, zero, x)
            cols.update({name: fin, name * 2: fin * fin, f"{name}_inf": inf.to(_F64)})
        counts = {"support": support.sum(), "nonfinite": torch.tensor(n_bad), "rows": keep.sum()}
        totals = torch.zeros(len(_CAT_COLUMNS), dtype=_F64, device=keep.device)
        for name in _COUNT_COLUMNS:
            cols[name] = torch.zeros_like(f)  # batch counters, not per unit: in `totals`
            totals[_C[name]] = counts[name].to(keep.device, _F64)
        feats = torch.stack([cols[name] for name in _CAT_COLUMNS], dim=-1)[unit]
        return feats, totals + feats.sum(0), unit, hist

    def compute(self) -> results.CategoricalResult:
        """Forward and reverse KL over everything seen since the last reset (all ranks)."""
        grouped = self.num_groups is not None
        host = _to_host([self.stats, self.group_stats] if grouped else [self.stats])
        s, m = (dict(zip(_CAT_COLUMNS, h, strict=True)) for h in host[0].tolist())
        if s["n"] == 0 and m["n"] == 0:
            bad = int(s["nonfinite"] + m["nonfinite"])
            raise ValueError(
                f"{type(self).__name__}.compute(): no rows were counted ({bad} "
                "non-finite rows dropped, masked rows are not counted); call update() first."
            )
        group_rows = host[1].tolist() if grouped else ([], [])
        if s["labelled"] + m["labelled"] == 0:  # no update said where its rows came from
            return self._unlabelled(s, group_rows[0])
        sources = {
            name: _row_source(name, cols, rows)
            for name, cols, rows in (("reference", s, group_rows[0]), ("model", m, group_rows[1]))
            if cols["n"]
        }
        ref, mod = sources.get("reference"), sources.get("model")
        both_plain = mod is None and self.reduction == "token_mean"
        plain_rev = mod if mod is not None else (ref if both_plain else None)
        return results.CategoricalResult(
            forward=ref.forward if ref else None,
            reverse=plain_rev.reverse if plain_rev else None,
            nonfinite=s["nonfinite"] + m["nonfinite"],
            support_violations=s["support"] + m["support"],
            group_forward=ref.group_forward if ref else {},
            group_reverse=plain_rev.group_reverse if plain_rev else {},
            device=self.device,
            entropy_reference=(ref or mod).entropy_reference,
            entropy_model=(mod or ref).entropy_model,
            n_rows=s["rows"] + m["rows"], reduction=self.reduction, sources=sources,
        )

    def _unlabelled(self, s: dict[str, float], group_rows: list) -> results.CategoricalResult:
        """The result of rows of unstated origin: both directions under plain keys."""
        n = s["n"]
        group_forward, group_reverse = {}, {}
        for g, row in enumerate(group_rows):
            c = dict(zip(_GROUP_COLUMNS, row, strict=True))
            if c["n"]:
                group_forward[g] = _unit_mean(c, "f", mass=c["n"] / n)
                group_reverse[g] = _unit_mean(c, "r", mass=c["n"] / n)
        return results.CategoricalResult(
            forward=_unit_mean(s, "f"), reverse=_unit_mean(s, "r"),
            nonfinite=s["nonfinite"], support_violations=s["support"],
            group_forward=group_forward, group_reverse=group_reverse, device=self.device,
            entropy_reference=s["h_p"] / n, entropy_model=s["h_q"] / n,
            n_rows=s["rows"], reduction=self.reduction,
        )  # fmt: skip


def _row_source(name: str, s: dict[str, float], group_rows: list) -> results.RowSource:
    """One source's summary: both directions, companions, entropies, groups."""
    n, rows = s["n"], max(s["unit_rows"], 1.0)
    group_forward, group_reverse, group_mass = {}, {}, {}
    for g, row in enumerate(group_rows):
        c = dict(zip(_GROUP_COLUMNS, row, strict=True))
        if c["n"]:
            group_forward[g] = _unit_mean(c, "f", mass=c["n"] / n)
            group_reverse[g] = _unit_mean(c, "r", mass=c["n"] / n)
            g_rows = max(c["unit_rows"], 1.0)
            group_mass[g] = (c["p_out"] / g_rows, c["q_out"] / g_rows)
    return results.RowSource(
        sampled_from=name, forward=_unit_mean(s, "f"), reverse=_unit_mean(s, "r"),
        forward_shared=_unit_mean(s, "fs"), reverse_shared=_unit_mean(s, "rs"),
        entropy_reference=s["h_p"] / n, entropy_model=s["h_q"] / n,
        reference_mass_outside=s["p_out"] / rows, model_mass_outside=s["q_out"] / rows,
        group_forward=group_forward, group_reverse=group_reverse,
        group_mass_outside=group_mass, n_rows=s["rows"],
        support_violations=s["support"], nonfinite=s["nonfinite"],
    )


def _unit_mean(cols: Mapping[str, float], name: str, mass: float | None = None) -> Any:
    """Mean and stderr of column ``name`` (f or r) over the units, as an estimate."""
    value, stderr = _mean_stderr(cols["n"], cols[name], cols[name * 2], cols[f"{name}_inf"])
    if mass is None:
        return DirectionEstimate(value, stderr, cols["n"], results.EXACT)
    return GroupEstimate(value, stderr, cols["n"], mass)


# --------------------------------------------------------------------------- SampledKL
class SampledKL(_SampleMetric):
    r"""Forward and reverse KL from samples, exact across batches and ranks.

    - **forward** D(P‖Q) from reference samples x ~ P with log p(x), log q(x): the
      Monte Carlo estimator of ``MonteCarloKL`` (``method``), terms ℓ = log p − log q.
    - **reverse** D(Q‖P) from model samples y ~ Q with log q(y), log p(y), by the same
      estimator, as soon as any update (on any rank) has passed model samples.
    - Without model samples, reverse is importance-weighted from the reference samples:
      with w = q/p and w̃ = w/mean(w), D(Q‖P) ≈ mean(w̃ log w̃), reported with its
      effective sample size (Σw)²/Σw², which is far below n when it cannot be trusted.

    ``compute()`` returns a ``KLResult`` of scalar float64 tensors:

    - ``forward``, ``forward_stderr``, ``forward_n``, ``forward_c``,
      ``forward_variance_reduction``, ``forward_tail_index``;
    - ``reverse``, ``reverse_stderr``, ``reverse_n``, ``reverse_ess`` (= ``reverse_n``
      with model samples), ``reverse_tail_index``, ``reverse_importance_weighted``
      (1.0 or 0.0); with model samples also ``reverse_c`` and
      ``reverse_variance_reduction``;
    - ``asymmetry`` (forward − reverse), ``nonfinite`` and ``support_violations`` (both
      sample sets together);
    - with ``num_groups``, per group g that received samples: ``forward/group_g``,
      ``forward_stderr/group_g``, ``forward_n/group_g`` (reference samples), and where the
      model has mass there ``reverse/group_g``, ``reverse_stderr/group_g``,
      ``reverse_n/group_g`` (model samples, or reference samples when importance
      weighted) and ``reverse_mass/group_g`` (the model's share of mass: model samples'
      share, or Σ_g w / Σ w).

    Per-group values are conditional means: forward_g = E_P[log p − log q | g] and
    reverse_g = E_Q[log q − log p | g], estimated naively (the control variate has zero
    mean only over the whole distribution), so Σ_g forward_n_g·forward_g / forward_n is
    the naive forward estimate and Σ_g reverse_mass_g·reverse_g the naive (or the
    importance-weighted) reverse estimate. A group where Q has no mass (a dropped mode)
    has a large forward_g and no reverse keys. Importance-weighted per-group values are
    R_g − log b with R_g = Σ_g w·log w / Σ_g w and b = mean(w) over all samples; their
    standard error is the delta method's.

    Args:
        method: ``"cv"``, ``"k3"`` or ``"naive"`` for the Monte Carlo directions.
        nonfinite: ``"skip"`` or ``"raise"``, as in ``MonteCarloKL``.
        num_groups: number of group labels 0..G−1; then every update needs ``groups``
            (and ``model_groups`` whenever it passes model samples).
        validate_args: check group labels are in range.
        kwargs: torchmetrics ``Metric`` options.

    Examples:
        >>> import torch
        >>> from kl_monitor.metrics import SampledKL
        >>> _ = torch.manual_seed(0)
        >>> p, q = torch.distributions.Normal(0., 1.), torch.distributions.Normal(0.5, 1.)
        >>> x, y = p.sample((4000,)), q.sample((4000,))
        >>> metric = SampledKL()
        >>> metric.update(p.log_prob(x), q.log_prob(x), q.log_prob(y), p.log_prob(y))
        >>> out = metric.compute()  # both directions are 0.125
        >>> for k in ("forward", "reverse"):
        ...     print(k, abs(float(out[k]) - 0.125) < 4 * float(out[f"{k}_stderr"]))
        forward True
        reverse True
        >>> out.reverse_estimator
        'model_samples'
    """

    _plot_keys = ("forward", "reverse")
    _sample_sets = ("ref_", "model_")

    def update(
        self,
        log_p: Tensor,
        log_q: Tensor,
        model_log_q: Tensor | None = None,
        model_log_p: Tensor | None = None,
        groups: Tensor | None = None,
        model_groups: Tensor | None = None,
    ) -> None:
        """Add reference samples x ~ P (``log_p``, ``log_q`` at x) and, optionally, model
        samples y ~ Q (``model_log_q``, ``model_log_p`` at y), with optional labels."""
        if (model_log_q is None) != (model_log_p is None):
            raise ValueError(
                "pass both `model_log_q` and `model_log_p` (log q(y) and log p(y) at model "
                "samples y ~ Q), or neither."
            )
        if model_groups is not None and model_log_q is None:
            raise ValueError("`model_groups` labels model samples, but none were passed.")
        self._add(log_p, log_q, model_log_q, model_log_p, groups, model_groups)

    def update_from(self, inputs: KLInputs) -> Tensor:
        i = inputs
        self._add(i.reference, i.model, i.model_samples_log_q, i.model_samples_log_p,
                  i.groups, i.model_samples_groups)  # fmt: skip
        return inputs.reference.detach().double() - inputs.model.detach().double()

    def _add(
        self,
        log_p: Tensor,
        log_q: Tensor,
        model_log_q: Tensor | None,
        model_log_p: Tensor | None,
        groups: Tensor | None,
        model_groups: Tensor | None,
    ) -> None:
        has_model = model_log_q is not None
        labels = self._labels(groups, log_p, "groups", "log_p")
        # Unlabelled model samples still give the global reverse KL; per-group reverse
        # KL and mass need `model_groups` and are simply not reported without them.
        model_labels = (
            self._labels(model_groups, model_log_q, "model_groups", "model_log_q")
            if has_model and model_groups is not None else None
        )
        # compute both batches before storing either: a rejected batch adds nothing
        ref_batch = self._sample_batch(log_p, log_q, labels, ("log_p", "log_q"))
        model_batch = (
            self._sample_batch(
                model_log_q, model_log_p, model_labels, ("model_log_q", "model_log_p"),
            )
            if has_model else None
        )
        self._add_sample_batch("ref_", ref_batch)
        if model_batch is not None:
            self._add_sample_batch("model_", model_batch)

    def compute(self) -> results.SampledResult:
        """Both directions over everything seen since the last reset (all ranks)."""
        (ref, ref_groups), (model, model_groups) = self._host_stats("ref_", "model_")
        if not self._usable(ref):
            raise ValueError(
                f"{type(self).__name__}.compute(): no usable reference samples "
                f"({int(ref.counts[NONFINITE])} non-finite samples dropped); call update() first."
            )
        with_model = self._seen(model) > 0
        if with_model and not self._usable(model):
            raise ValueError(
                f"{type(self).__name__}.compute(): all {int(model.counts[NONFINITE])} model "
                "samples were non-finite; reverse KL cannot be estimated."
            )
        if with_model:
            reverse = _direction(model.estimate(self.method))
            group_reverse = _naive_groups(model_groups)
            total = model.n + int(model.counts[SUPPORT])
            group_reverse = {
                g: dataclasses.replace(ge, mass=(ge.n + float(model_groups[g].counts[SUPPORT]))
                                       / total)
                for g, ge in group_reverse.items()
            }  # fmt: skip
        else:
            iw = ref.importance_weighted_reverse()
            reverse = DirectionEstimate(
                iw.value, iw.stderr, float(iw.n), results.IMPORTANCE_WEIGHTED,
                tail_index=iw.tail_index, ess=iw.ess, reliable=iw.reliable,
            )  # fmt: skip
            group_reverse = _iw_groups(ref_groups, ref)
        return results.SampledResult(
            forward=_direction(ref.estimate(self.method)), reverse=reverse,
            nonfinite=float(ref.counts[NONFINITE] + model.counts[NONFINITE]),
            support_violations=float(ref.counts[SUPPORT] + model.counts[SUPPORT]),
            group_forward=_naive_groups(ref_groups), group_reverse=group_reverse,
            device=self.device, method=self.method,
        )  # fmt: skip


def _iw_groups(groups: Sequence[KLStats], whole: KLStats) -> dict[int, GroupEstimate]:
    """Importance-weighted per-group reverse KL where the model has mass."""
    out = {}
    for g, gs in enumerate(groups):
        n_g = gs.n + int(gs.counts[SUPPORT])
        iw = _iw_group_reverse(gs, whole) if n_g else None
        if iw is not None:
            out[g] = GroupEstimate(iw[0], iw[1], float(n_g), iw[2])
    return out


def _iw_group_reverse(group: KLStats, whole: KLStats) -> tuple[float, float, float] | None:
    """E_Q[log q − log p | g] from samples of P by self-normalised importance weighting.

    With w = q/p, m = log w, b = Σw/n over all samples and R_g = Σ_g w·m / Σ_g w, the
    estimate is R_g − log b, so Σ_g (W_g/W)·estimate_g equals the importance-weighted
    reverse KL of ``KLStats.importance_weighted_reverse`` exactly. The standard
    error is the delta method's, with influence n·[1_g·w(m − R_g)/W_g − (w − b)/(n·b)].
    Returns ``(value, stderr, mass share W_g/W)``, or ``None`` when the group's model
    mass is (numerically) zero. Support violations enter as w = 0.
    """
    t = whole.sums.detach().to("cpu", _F64).sum(0).tolist()
    tg = group.sums.detach().to("cpu", _F64).sum(0).tolist()
    n = t[_N] + float(whole.counts[SUPPORT])
    n_g = tg[_N] + float(group.counts[SUPPORT])
    w_tot, w_g = t[_N] + t[U], tg[_N] + tg[U]
    if w_tot <= 0 or w_g <= _MIN_GROUP_MASS * n_g:
        return None
    b = w_tot / n
    r_g = -(tg[_L] + tg[LU]) / w_g  # Σ_g w·m / Σ_g w, with m = −ℓ
    value = r_g - math.log(b)
    # Σψ² / n² with ψ_i = n·1_g·w(m − R_g)/W_g − (w − b)/b (both parts sum to zero)
    own = tg[WWLL] + 2 * r_g * tg[WWL] + r_g * r_g * tg[WW]  # Σ_g w²(m − R_g)²
    cross = -tg[WWL] - r_g * tg[WW]  # Σ_g w²(m − R_g)
    spread = t[WW] / (b * b) - n  # Σ (w − b)²/b²
    ss = (n / w_g) ** 2 * own - 2 * (n / w_g) * cross / b + spread
    var = max(ss, 0.0) / (n * n) * n / max(n - 1, 1)
    return value, math.sqrt(var), w_g / w_tot

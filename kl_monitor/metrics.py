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

``compute()`` returns a ``KLResult``: a ``dict`` of scalar tensors, so
``self.log_dict(metric.compute())`` works in a ``LightningModule``, with metadata
(reduction, method actually used) as attributes that are not logged. With
``num_groups`` set, per-group values are flat keys such as ``"forward/group_3"``;
groups that received no rows are left out of the result (never reported as NaN).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.plot import _AX_TYPE, _PLOT_OUT_TYPE

from ._utils import check_floating, check_nonfinite_mode, check_same_shape
from .estimators import categorical_kl_rows, kept_rows
from .stats import LU, METHODS, NONFINITE, SUPPORT, TOP_K, WW, WWL, WWLL, KLEstimate, KLStats, U
from .stats import L as _L
from .stats import N as _N

__all__ = ["KLResult", "MonteCarloKL", "CategoricalKL", "SampledKL"]

_F64 = torch.float64
_NCOL = 9  # columns of KLStats sums
REDUCTIONS = ("token_mean", "sequence_sum")
#: A group's estimated model mass Σw below this fraction of its sample count is treated
#: as zero: n + Σ(w − 1) cannot resolve it in float64, so its reverse KL is meaningless.
_MIN_GROUP_MASS = 1e-10


class KLResult(dict):
    """The output of ``compute()``/``forward()``: a ``dict`` of scalar tensors.

    Every value is a 0-dim tensor, so the whole result can go to ``self.log_dict``.
    Metadata that is not a number is carried as attributes and is not logged:

    - ``reduction`` (``CategoricalKL``): ``"token_mean"`` or ``"sequence_sum"``.
    - ``method`` / ``method_used`` (``MonteCarloKL``); ``forward_method_used``,
      ``reverse_method_used`` and ``reverse_estimator`` (``SampledKL``).

    Examples:
        >>> r = KLResult({"kl": torch.tensor(0.5)}, reduction="token_mean")
        >>> r.reduction, float(r["kl"])
        ('token_mean', 0.5)
    """

    def __init__(self, values: Mapping[str, Tensor] | None = None, **meta: Any) -> None:
        super().__init__(values or {})
        self.__dict__.update(meta)

    def to_floats(self) -> dict[str, float]:
        """The values as plain Python floats."""
        return {k: float(v) for k, v in self.items()}


# --------------------------------------------------------------------------- helpers
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


def _asymmetry(forward: float, reverse: float) -> float:
    # inf − inf (support violations both ways) is undefined: reported as nan.
    return forward - reverse


class _KLMetric(Metric):
    """Shared plumbing: float64 states, result metadata, plotting, state-shape checks."""

    is_differentiable: bool = False
    higher_is_better: bool = False
    full_state_update: bool = False
    plot_lower_bound: float | None = 0.0
    plot_upper_bound: float | None = None
    #: keys drawn by ``plot`` (counts and diagnostics would swamp the axis).
    _plot_keys: tuple[str, ...] = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._result_meta: dict[str, Any] = {}

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

    def _stats(self, prefix: str) -> KLStats:
        return KLStats(
            getattr(self, f"{prefix}sums"),
            getattr(self, f"{prefix}top_log_w"),
            getattr(self, f"{prefix}counts"),
        )

    def _group_stats(self, prefix: str, g: int) -> KLStats:
        sums = getattr(self, f"{prefix}group_sums")
        # no per-group tail buffer: the per-group values are naive (k1) means
        empty_top = torch.full((TOP_K,), -math.inf, dtype=_F64, device=sums.device)
        return KLStats(sums[g], empty_top, getattr(self, f"{prefix}group_counts")[g])

    @staticmethod
    def _seen(stats: KLStats) -> int:
        """Samples passed in, whatever became of them (used, support violation, dropped)."""
        return stats.n + int(stats.counts[NONFINITE]) + int(stats.counts[SUPPORT])

    # -- results ---------------------------------------------------------------------
    def _result(self, values: Mapping[str, float], **meta: Any) -> KLResult:
        self._result_meta = meta
        return KLResult(
            {k: torch.tensor(float(v), dtype=_F64, device=self.device) for k, v in values.items()},
            **meta,
        )

    def _wrap_compute(self, compute: Callable) -> Callable:
        # torchmetrics rebuilds the returned mapping (dropping attributes); re-attach them.
        inner = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            value = inner(*args, **kwargs)
            if isinstance(value, Mapping):
                return KLResult(value, **self.__dict__.get("_result_meta", {}))
            return value

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
        super().__init__(**kwargs)
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        check_nonfinite_mode(nonfinite)
        self.method = method
        self.nonfinite = nonfinite
        self.num_groups = _check_num_groups(num_groups)
        self.validate_args = validate_args
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
    ℓ + (w − 1) (``k3``) or ℓ − c·(w − 1) with the cross-fitted c = Cov(ℓ, w)/Var(w)
    (``cv``, the default; it falls back to naive when the Pareto tail index of w may
    be ≥ 0.5). See ``mc_kl``. The states are the float64 sums
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
    - attributes ``method`` and ``method_used`` (``"naive"`` when ``cv`` fell back).

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

    def compute(self) -> KLResult:
        """The estimate over everything seen since the last reset (all ranks)."""
        stats = self._stats("")
        if stats.n == 0 and int(stats.counts[SUPPORT]) == 0:
            raise ValueError(
                f"{type(self).__name__}.compute(): no usable samples "
                f"({int(stats.counts[NONFINITE])} non-finite samples dropped); call update() first."
            )
        est = stats.estimate(self.method)
        values = {
            "kl": est.value,
            "stderr": est.stderr,
            "n": est.n,
            "c": est.c,
            "variance_reduction": est.variance_reduction,
            "tail_index": est.tail_index,
            "nonfinite": est.nonfinite,
            "support_violations": est.support_violations,
        }
        if self.num_groups is not None:
            for g in range(self.num_groups):
                gs = self._group_stats("", g)
                if gs.n + int(gs.counts[SUPPORT]) == 0:
                    continue
                ge = gs.estimate("naive")
                values[f"kl/group_{g}"] = ge.value
                values[f"stderr/group_{g}"] = ge.stderr
                values[f"n/group_{g}"] = ge.n
        return self._result(values, method=self.method, method_used=est.method_used)


# --------------------------------------------------------------------------- CategoricalKL
# Per-unit feature columns of CategoricalKL's states.
_C_N, _C_F, _C_FF, _C_FINF, _C_R, _C_RR, _C_RINF, _C_HP, _C_HQ, _C_SUP, _C_BAD, _C_ROWS = range(12)
_C_GROUP = 7  # the first 7 columns are also kept per group


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
        super().__init__(**kwargs)
        if reduction not in REDUCTIONS:
            raise ValueError(
                f"`reduction` must be 'token_mean' (mean over unmasked rows) or 'sequence_sum' "
                f"(sum over positions, mean over sequences), got {reduction!r}."
            )
        check_nonfinite_mode(nonfinite)
        self.reduction = reduction
        self.nonfinite = nonfinite
        self.num_groups = _check_num_groups(num_groups)
        self.validate_args = validate_args
        self.add_state("stats", torch.zeros(12, dtype=_F64), dist_reduce_fx="sum")
        if self.num_groups is not None:
            self.add_state(
                "group_stats", torch.zeros(self.num_groups, _C_GROUP, dtype=_F64),
                dist_reduce_fx="sum",
            )

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, num_groups={self.num_groups}"

    def _check_inputs(
        self, logits_p: Tensor, logits_q: Tensor, mask: Tensor | None
    ) -> tuple[int, ...]:
        check_floating("logits_p", logits_p)
        check_floating("logits_q", logits_q)
        if logits_p.dim() == 0 or logits_q.dim() == 0:
            raise ValueError(
                "logits must have shape (..., K) with the K classes last, got scalars "
                f"{tuple(logits_p.shape)} and {tuple(logits_q.shape)}."
            )
        if logits_p.shape[-1] != logits_q.shape[-1]:
            raise ValueError(
                f"`logits_p` has {logits_p.shape[-1]} classes and `logits_q` has "
                f"{logits_q.shape[-1]} (shapes {tuple(logits_p.shape)} and "
                f"{tuple(logits_q.shape)}); both must be over the same K classes, last axis."
            )
        check_same_shape("logits_p", logits_p, "logits_q", logits_q)
        if logits_p.numel() == 0:
            raise ValueError(f"logits are empty (shape {tuple(logits_p.shape)}).")
        if self.reduction == "sequence_sum" and logits_p.dim() < 3:
            raise ValueError(
                "reduction='sequence_sum' sums over the sequence axis and needs logits of "
                f"shape (batch, seq, K), got {tuple(logits_p.shape)}."
            )
        lead = tuple(logits_p.shape[:-1])
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(
                    "`mask` must be a bool tensor (True = counted row), got "
                    f"{getattr(mask, 'dtype', type(mask).__name__)}."
                )
            if tuple(mask.shape) != lead:
                raise ValueError(
                    f"`mask` must have the logits' shape without the class axis, {lead}, "
                    f"got {tuple(mask.shape)}."
                )
        return lead

    def update(
        self,
        logits_p: Tensor,
        logits_q: Tensor,
        mask: Tensor | None = None,
        groups: Tensor | None = None,
    ) -> None:
        """Add rows of reference logits ``(..., K)``, model logits (same shape), an
        optional bool ``mask`` ``(...)`` (False = padding) and optional integer ``groups``."""
        lead = self._check_inputs(logits_p, logits_q, mask)
        _require_groups(self.num_groups, groups)
        fwd, rev, hp, hq, valid = categorical_kl_rows(logits_p, logits_q)
        counted = (
            torch.ones_like(valid) if mask is None else mask.to(valid.device)
        )
        labels = None
        if groups is not None:
            seq = self.reduction == "sequence_sum"
            per_row = not seq and tuple(getattr(groups, "shape", ())) == lead
            shapes = [lead[:-1]] if seq else ([lead, lead[:-1]] if len(lead) >= 2 else [lead])
            g_counted = counted if per_row else counted.any(-1)
            labels = _check_groups(groups, shapes, self.num_groups, g_counted, self.validate_args)
            labels = labels.to(valid.device)
            if not seq and not per_row:  # one label per sequence, broadcast over positions
                labels = labels.unsqueeze(-1).expand(lead)
        keep, n_bad = kept_rows(valid, counted, self.nonfinite)
        zero = torch.zeros((), dtype=_F64, device=valid.device)
        f = torch.where(keep, fwd.to(_F64), zero)
        r = torch.where(keep, rev.to(_F64), zero)
        h_p = torch.where(keep, hp.to(_F64), zero)
        h_q = torch.where(keep, hq.to(_F64), zero)
        support = keep & (torch.isinf(f) | torch.isinf(r))
        if self.reduction == "sequence_sum":
            f, r, h_p, h_q = f.sum(-1), r.sum(-1), h_p.sum(-1), h_q.sum(-1)
            unit = keep.any(-1)
        else:
            unit = keep
        f_inf, r_inf = torch.isinf(f) & unit, torch.isinf(r) & unit
        f_fin = torch.where(f_inf, zero, f)
        r_fin = torch.where(r_inf, zero, r)
        feats = torch.stack(
            (unit.to(_F64), f_fin, f_fin * f_fin, f_inf.to(_F64),
             r_fin, r_fin * r_fin, r_inf.to(_F64), h_p, h_q),
            dim=-1,
        )
        feats = feats[unit]
        extra = torch.stack(
            (support.sum(), torch.tensor(n_bad, device=keep.device), keep.sum())
        ).to(_F64)
        self.stats = self.stats.to(_F64) + torch.cat((feats.sum(0), extra))
        if labels is not None:
            self.group_stats = self.group_stats.to(_F64).index_add(
                0, labels[unit], feats[:, :_C_GROUP]
            )

    def compute(self) -> KLResult:
        """Forward and reverse KL over everything seen since the last reset (all ranks)."""
        s = self.stats.detach().to("cpu", _F64).tolist()
        n = s[_C_N]
        if n == 0:
            raise ValueError(
                f"{type(self).__name__}.compute(): no rows were counted ({int(s[_C_BAD])} "
                "non-finite rows dropped, masked rows are not counted); call update() first."
            )
        fwd, fwd_se = _mean_stderr(n, s[_C_F], s[_C_FF], s[_C_FINF])
        rev, rev_se = _mean_stderr(n, s[_C_R], s[_C_RR], s[_C_RINF])
        values = {
            "forward": fwd,
            "reverse": rev,
            "asymmetry": _asymmetry(fwd, rev),
            "forward_stderr": fwd_se,
            "reverse_stderr": rev_se,
            "entropy_reference": s[_C_HP] / n,
            "entropy_model": s[_C_HQ] / n,
            "support_violations": s[_C_SUP],
            "nonfinite": s[_C_BAD],
            "n": n,
            "n_rows": s[_C_ROWS],
        }
        if self.num_groups is not None:
            for g, row in enumerate(self.group_stats.detach().to("cpu", _F64).tolist()):
                ng = row[_C_N]
                if ng == 0:
                    continue
                gf, gf_se = _mean_stderr(ng, row[_C_F], row[_C_FF], row[_C_FINF])
                gr, gr_se = _mean_stderr(ng, row[_C_R], row[_C_RR], row[_C_RINF])
                values[f"forward/group_{g}"] = gf
                values[f"reverse/group_{g}"] = gr
                values[f"forward_stderr/group_{g}"] = gf_se
                values[f"reverse_stderr/group_{g}"] = gr_se
                values[f"n/group_{g}"] = ng
        return self._result(values, reduction=self.reduction)


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
        has_model = model_log_q is not None
        if model_groups is not None and not has_model:
            raise ValueError("`model_groups` labels model samples, but none were passed.")
        labels = self._labels(groups, log_p, "groups", "log_p")
        model_labels = (
            self._labels(model_groups, model_log_q, "model_groups", "model_log_q")
            if has_model else None
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

    def compute(self) -> KLResult:
        """Both directions over everything seen since the last reset (all ranks)."""
        ref = self._stats("ref_")
        if ref.n == 0 and int(ref.counts[SUPPORT]) == 0:
            raise ValueError(
                f"{type(self).__name__}.compute(): no usable reference samples "
                f"({int(ref.counts[NONFINITE])} non-finite samples dropped); call update() first."
            )
        model = self._stats("model_")
        with_model = self._seen(model) > 0
        if with_model and model.n == 0 and int(model.counts[SUPPORT]) == 0:
            raise ValueError(
                f"{type(self).__name__}.compute(): all {int(model.counts[NONFINITE])} model "
                "samples were non-finite; reverse KL cannot be estimated."
            )
        fwd: KLEstimate = ref.estimate(self.method)
        values: dict[str, float] = {
            "forward": fwd.value,
            "forward_stderr": fwd.stderr,
            "forward_n": fwd.n,
            "forward_c": fwd.c,
            "forward_variance_reduction": fwd.variance_reduction,
            "forward_tail_index": fwd.tail_index,
        }
        if with_model:
            rev = model.estimate(self.method)
            values.update(
                reverse=rev.value, reverse_stderr=rev.stderr, reverse_n=rev.n,
                reverse_ess=rev.n, reverse_tail_index=rev.tail_index,
                reverse_importance_weighted=0.0, reverse_c=rev.c,
                reverse_variance_reduction=rev.variance_reduction,
            )
            meta = dict(reverse_estimator="model_samples", reverse_method_used=rev.method_used)
            rev_value = rev.value
        else:
            iw = ref.importance_weighted_reverse()
            values.update(
                reverse=iw.value, reverse_stderr=iw.stderr, reverse_n=iw.n,
                reverse_ess=iw.ess, reverse_tail_index=iw.tail_index,
                reverse_importance_weighted=1.0,
            )
            meta = dict(reverse_estimator="importance_weighted", reverse_method_used="iw")
            rev_value = iw.value
        values["asymmetry"] = _asymmetry(fwd.value, rev_value)
        values["nonfinite"] = float(ref.counts[NONFINITE] + model.counts[NONFINITE])
        values["support_violations"] = float(ref.counts[SUPPORT] + model.counts[SUPPORT])
        if self.num_groups is not None:
            self._group_values(values, ref, model if with_model else None)
        return self._result(
            values, method=self.method, forward_method_used=fwd.method_used, **meta
        )

    def _group_values(
        self, values: dict[str, float], ref: KLStats, model: KLStats | None
    ) -> None:
        assert self.num_groups is not None
        for g in range(self.num_groups):
            gs = self._group_stats("ref_", g)
            if gs.n + int(gs.counts[SUPPORT]) == 0:
                continue
            ge = gs.estimate("naive")
            values[f"forward/group_{g}"] = ge.value
            values[f"forward_stderr/group_{g}"] = ge.stderr
            values[f"forward_n/group_{g}"] = ge.n
            if model is None:
                iw = _iw_group_reverse(gs, ref)
                if iw is not None:
                    values[f"reverse/group_{g}"] = iw[0]
                    values[f"reverse_stderr/group_{g}"] = iw[1]
                    values[f"reverse_n/group_{g}"] = gs.n + int(gs.counts[SUPPORT])
                    values[f"reverse_mass/group_{g}"] = iw[2]
        if model is None:
            return
        for g in range(self.num_groups):
            gm = self._group_stats("model_", g)
            if gm.n + int(gm.counts[SUPPORT]) == 0:
                continue
            ge = gm.estimate("naive")
            values[f"reverse/group_{g}"] = ge.value
            values[f"reverse_stderr/group_{g}"] = ge.stderr
            values[f"reverse_n/group_{g}"] = ge.n
            values[f"reverse_mass/group_{g}"] = (ge.n + ge.support_violations) / (
                model.n + int(model.counts[SUPPORT])
            )


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

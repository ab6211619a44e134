"""Metrics for generators without a density: KL from reference and model samples only.

- ``KNNKL``: k-nearest-neighbour forward and reverse KL (``knn_kl``).
- ``BinnedKL``: exact KL between histograms over k-means cells of the reference
  (``binned_kl``), with the per-cell test.

Not to be confused with ``SampledKL``, which takes log-densities at samples. These
take the samples (points or features) themselves.

k-NN and cell statistics are not sums over batches: both metrics keep the samples.
Each rank keeps at most ``max_samples`` reference and ``max_samples`` model rows
(later rows are dropped with one warning and counted in ``dropped``), stored in
float64: at most 2 × max_samples × (d + 1) × 8 bytes per rank (4 MiB for the
default 8192 rows of d = 31). ``compute()`` gathers every rank's rows in rank order
(at most world size × that) and estimates on the union, identically on every rank.

Cells (``BinnedKL``, and ``KNNKL``'s automatic groups) are fitted by seeded k-means on
the reference rows of the first ``compute()`` (or by ``fit_cells``), then kept: they
are in the metric's ``state_dict`` (key ``centroids``), so a checkpoint restores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torchmetrics.utilities import dim_zero_cat

from ._utils import warn_once
from .binned import assign_cells, binned_kl_counts, fit_cells
from .detectors import Alert
from .knn import check_samples, group_means, knn_kl
from .metrics import _KLMetric
from .results import DirectionEstimate, GroupEstimate, SamplesResult

if TYPE_CHECKING:
    from .inputs import KLInputs

__all__ = ["BinnedKL", "KNNKL"]

_F64 = torch.float64


class _SampleSetMetric(_KLMetric):
    """Keeps reference rows (with a group label) and model rows; fits and keeps cells."""

    _plot_keys = ("forward", "reverse")

    def __init__(
        self,
        *,
        num_groups: int | None = None,
        num_cells: int | None = 16,
        max_samples: int = 8192,
        seed: int = 0,
        nonfinite: str = "skip",
        **kwargs: Any,
    ) -> None:
        super().__init__(nonfinite, num_groups, True, **kwargs)
        for name, value in (("max_samples", max_samples), ("num_cells", num_cells)):
            if value is None and name == "num_cells":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 2:
                raise ValueError(f"`{name}` must be an int ≥ 2, got {value!r}.")
        self.num_cells, self.max_samples, self.seed = num_cells, max_samples, int(seed)
        self.centroids: Tensor | None = None
        # rows flattened to 1-D (label, features...), so an empty rank gathers cleanly
        self.add_state("reference", default=[], dist_reduce_fx="cat")
        self.add_state("model", default=[], dist_reduce_fx="cat")
        self.add_state("dim", default=torch.zeros((), dtype=_F64), dist_reduce_fx="max")
        self.add_state("kept", default=torch.zeros(2, dtype=_F64), dist_reduce_fx="sum")
        self.add_state("dropped", default=torch.zeros((), dtype=_F64), dist_reduce_fx="sum")
        self.add_state("wide", default=torch.zeros((), dtype=_F64), dist_reduce_fx="max")

    # ---------------------------------------------------------------- update
    def update_from(self, inputs: KLInputs) -> Tensor:
        """Add a ``KLInputs.from_samples`` batch; no per-sample histogram (the k-NN terms
        need the union), so an empty tensor."""
        self.update(inputs.reference, inputs.model, inputs.groups)
        return torch.empty(0)

    def update(
        self,
        reference_samples: Tensor,
        model_samples: Tensor,
        groups: Tensor | None = None,
    ) -> None:
        """Add ``(n, d)`` reference rows, ``(m, d)`` model rows and optional labels ``(n,)``."""
        x = check_samples("reference_samples", reference_samples)
        y = check_samples("model_samples", model_samples, d=x.shape[1])
        dim = int(self.dim)
        if dim and x.shape[1] != dim:
            raise ValueError(
                f"`reference_samples` has d = {x.shape[1]}, earlier batches had d = {dim}."
            )
        labels = self._labels(groups, x)
        if self.nonfinite == "raise":
            for name, t in (("reference_samples", x), ("model_samples", y)):
                bad = int((~torch.isfinite(t).all(1)).sum())
                if bad:
                    raise ValueError(f"`{name}` has {bad} rows with NaN or ±inf.")
        rows_x = torch.cat((labels[:, None], x.detach().to(_F64)), 1)
        rows_y = torch.cat((torch.full_like(y[:, :1], -1, dtype=_F64), y.detach().to(_F64)), 1)
        self._append("reference", rows_x, 0)
        self._append("model", rows_y, 1)
        self.dim = torch.tensor(float(x.shape[1]), dtype=_F64, device=self.dim.device)
        if x.dtype == torch.float64:
            self.wide = torch.ones((), dtype=_F64, device=self.wide.device)

    def _labels(self, groups: Tensor | None, x: Tensor) -> Tensor:
        if groups is None:
            if self.num_groups is not None:
                raise ValueError(
                    f"the metric was created with num_groups={self.num_groups}: every update "
                    "needs `groups` (one label per reference row)."
                )
            return torch.full((x.shape[0],), -1.0, dtype=_F64, device=x.device)
        if self.num_groups is None:
            raise ValueError("`groups` was given but the metric was created without `num_groups`.")
        integer = isinstance(groups, Tensor) and not groups.is_floating_point()
        if not integer or groups.dtype == torch.bool:
            raise TypeError(
                "`groups` must be an integer tensor (one label per reference row), got "
                f"{getattr(groups, 'dtype', type(groups).__name__)}."
            )
        if tuple(groups.shape) != (x.shape[0],):
            raise ValueError(
                f"`groups` must have shape ({x.shape[0]},), one label per reference row, "
                f"got {tuple(groups.shape)}."
            )
        bad = groups[(groups < 0) | (groups >= self.num_groups)]
        if bad.numel():
            raise ValueError(
                f"`groups` holds label {int(bad[0])}, outside [0, {self.num_groups})."
            )
        return groups.to(x.device, _F64)

    def _append(self, name: str, rows: Tensor, side: int) -> None:
        room = self.max_samples - int(self.kept[side])
        if rows.shape[0] > room:
            self.dropped = self.dropped + (rows.shape[0] - max(room, 0))
            warn_once(
                f"{type(self).__name__}_max_samples",
                f"kl_monitor: {type(self).__name__} keeps at most max_samples="
                f"{self.max_samples} rows per side per rank; later rows were dropped "
                "(counted in `dropped`). This warning is shown once.",
            )
            rows = rows[: max(room, 0)]
        if rows.shape[0]:
            getattr(self, name).append(rows.reshape(-1))
            self.kept[side] += rows.shape[0]

    # ---------------------------------------------------------------- union
    def _union(self) -> tuple[Tensor, Tensor, Tensor]:
        """The gathered reference rows, their labels (−1: none) and the model rows."""
        d = int(self.dim)
        if d == 0:
            raise ValueError(f"{type(self).__name__}.compute(): no samples; call update() first.")
        ref = _rows(self.reference, d)
        mod = _rows(self.model, d)
        if ref.shape[0] == 0 or mod.shape[0] == 0:
            raise ValueError(
                f"{type(self).__name__}.compute(): {ref.shape[0]} reference and "
                f"{mod.shape[0]} model rows; both are needed."
            )
        return ref[:, 1:], ref[:, 0].to(torch.long), mod[:, 1:]

    def fit_cells(self, reference_samples: Tensor) -> Tensor:
        """Fit (or refit) the cells on held-out reference samples and keep them."""
        assert self.num_cells is not None
        self.centroids = fit_cells(reference_samples, self.num_cells, seed=self.seed)
        return self.centroids

    def _cells(self, x: Tensor) -> Tensor:
        if self.centroids is None:
            self.fit_cells(x[torch.isfinite(x).all(1)])
        return self.centroids.to(x.device)

    # ---------------------------------------------------------------- state
    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.centroids is not None:
            destination[prefix + "centroids"] = self.centroids.detach().cpu()

    def _load_from_state_dict(self, state_dict: Mapping, prefix: str, *args: Any) -> None:
        cells = state_dict.get(prefix + "centroids") if isinstance(state_dict, Mapping) else None
        if cells is not None:
            if self.num_cells is not None and cells.shape[0] != self.num_cells:
                raise ValueError(
                    f"checkpoint has {cells.shape[0]} cells, this metric num_cells="
                    f"{self.num_cells}."
                )
            self.centroids = cells.to(_F64)
        rest = {k: v for k, v in state_dict.items() if k != prefix + "centroids"}
        super()._load_from_state_dict(rest, prefix, *args)

    def _counters(self) -> dict[str, float]:
        return {"dropped": float(self.dropped)}


def _rows(chunks: list[Tensor] | Tensor, d: int) -> Tensor:
    flat = dim_zero_cat(chunks) if isinstance(chunks, list) and chunks else chunks
    if isinstance(flat, list):  # nothing on any rank
        return torch.zeros(0, d + 1, dtype=_F64)
    return flat.to(_F64).reshape(-1, d + 1)


class KNNKL(_SampleSetMetric):
    r"""k-nearest-neighbour D(P‖Q) and D(Q‖P) from reference and model samples.

    The estimator of ``knn_kl`` (Wang, Kulkarni & Verdú 2009) on the union of the
    samples seen since the last reset, on all ranks:
    D̂(P‖Q) = (d/n) Σ log(ν_k/ρ_k) + log(m/(n−1)), reverse by swapping roles, with
    jackknife standard errors.

    Per-group values are means of the per-row terms: ``forward/group_g`` over the
    reference rows of group g (large when the model has no samples near them: that
    mode is being dropped), ``reverse/group_g`` over the model rows labelled g, and
    ``reverse_mass/group_g`` the model's share of rows in g. Model rows take the label
    of their nearest reference row. Without ``num_groups``, the groups are cells
    (``num_cells`` k-means cells of the reference, fitted once and kept; model rows go
    to the nearest centre); ``num_cells=None`` turns them off.

    ``compute()`` returns a ``KLResult``: ``forward``, ``reverse``, ``forward_stderr``,
    ``reverse_stderr``, ``asymmetry``, ``n``, ``m``, ``d``, ``k``, ``ties``,
    ``nonfinite``, ``dropped`` and the per-group keys; attributes ``estimator``
    (``"knn"``), ``group_kind`` (``"group"``, ``"cell"`` or ``None``), ``centroids``
    and ``details`` (the ``KNNKLResult``).

    Args:
        k: neighbours.
        num_groups: labels 0..G−1 given with every ``update(..., groups=)``.
        num_cells: cells used as groups when ``num_groups`` is None.
        max_samples: rows kept per side per rank (memory bound, see module doc).
        seed: seed of the k-means cells.
        nonfinite: ``"skip"`` (drop NaN/±inf rows, counted) or ``"raise"``.
        kwargs: torchmetrics ``Metric`` options.

    Examples:
        >>> import torch
        >>> from kl_monitor import KNNKL
        >>> g = torch.Generator().manual_seed(0)
        >>> metric = KNNKL(num_cells=None)
        >>> for _ in range(2):
        ...     x = torch.randn(1000, 2, generator=g)
        ...     metric.update(x, torch.randn(1000, 2, generator=g) + torch.tensor([1.0, 0.0]))
        >>> out = metric.compute()  # both directions are 0.5
        >>> abs(float(out["forward"]) - 0.5) < 3 * float(out["forward_stderr"]), int(out["n"])
        (True, 2000)
    """

    def __init__(
        self,
        k: int = 5,
        num_groups: int | None = None,
        num_cells: int | None = 16,
        max_samples: int = 8192,
        seed: int = 0,
        nonfinite: str = "skip",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            num_groups=num_groups, num_cells=num_cells, max_samples=max_samples, seed=seed,
            nonfinite=nonfinite, **kwargs,
        )
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be a positive int, got {k!r}.")
        self.k = k

    def compute(self) -> SamplesResult:
        """Both directions over the gathered samples, with per-group (or per-cell) terms."""
        x, labels, y = self._union()
        dtype = _F64 if float(self.wide) else torch.float32
        r = knn_kl(x, y, k=self.k, dtype=dtype)
        kind, n_groups, model_labels = None, 0, None
        if self.num_groups is not None:
            kind, n_groups = "group", self.num_groups
            near = r.model_nearest
            model_labels = torch.where(near >= 0, labels[near.clamp(min=0)], -1)
        elif self.num_cells is not None:
            kind, n_groups = "cell", self.num_cells
            cells = self._cells(x)
            labels, model_labels = _cell_labels(x, cells), _cell_labels(y, cells)
        fwd_g: dict[int, GroupEstimate] = {}
        rev_g: dict[int, GroupEstimate] = {}
        if kind is not None:
            f = group_means(r.forward_terms, r.forward_valid, labels, n_groups)
            b = group_means(r.reverse_terms, r.reverse_valid, model_labels, n_groups)
            fwd_g, rev_g = _groups(f, b, _shares(model_labels, n_groups))
        return SamplesResult(
            forward=DirectionEstimate(r.forward, r.forward_stderr, float(r.n), "knn"),
            reverse=DirectionEstimate(r.reverse, r.reverse_stderr, float(r.m), "knn"),
            nonfinite=float(r.nonfinite), group_forward=fwd_g, group_reverse=rev_g,
            device=self.device, d=float(r.d), k=float(r.k), ties=float(r.ties),
            dropped=float(self.dropped), group_kind=kind,
            centroids=self.centroids if kind == "cell" else None, details=r,
        )


class BinnedKL(_SampleSetMetric):
    r"""Exact KL between histograms of reference and model samples over learned cells.

    Cells: ``num_cells`` k-means cells fitted (seeded) on the reference rows of the
    first ``compute()``, or by ``fit_cells``, and kept across resets and checkpoints.
    Then ``binned_kl_counts``: D(p̂‖q̂) and D(q̂‖p̂) between the smoothed cell
    probabilities with multinomial standard errors, and the per-cell two-proportion
    test (``ndb``: number of statistically different bins, Richardson & Weiss 2018).
    A lower bound of the true KL (data processing), up to smoothing and noise.

    ``compute()`` returns a ``KLResult``: ``forward``, ``reverse``, their stderr,
    ``asymmetry``, ``n``, ``m``, ``num_cells``, ``ndb``, ``nonfinite``, ``dropped``; per
    cell c: ``forward/group_c`` = log(p̂_c/q̂_c), ``reverse/group_c`` = log(q̂_c/p̂_c)
    (cells holding model rows), ``forward_n/group_c`` (reference rows) and
    ``reverse_mass/group_c`` (model share). Attributes ``estimator`` (``"binned"``),
    ``group_kind`` (``"cell"``), ``centroids`` and ``details`` (``BinnedKLResult``).

    Args:
        num_cells: K.
        smoothing: pseudo-count per cell.
        alpha: level of the per-cell test.
        max_samples: rows kept per side per rank (memory bound, see module doc).
        seed: seed of the k-means cells.
        nonfinite: ``"skip"`` (drop NaN/±inf rows, counted) or ``"raise"``.
        kwargs: torchmetrics ``Metric`` options.

    Examples:
        >>> import torch
        >>> from kl_monitor import BinnedKL
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat((torch.randn(500, 2, generator=g), 8 + torch.randn(500, 2, generator=g)))
        >>> metric = BinnedKL(num_cells=4)
        >>> metric.update(x, torch.randn(1000, 2, generator=g))  # one of two modes kept
        >>> out = metric.compute()
        >>> float(out["forward"]) > 3, int(out["ndb"]), metric.centroids.shape
        (True, 4, torch.Size([4, 2]))
    """

    def __init__(
        self,
        num_cells: int = 16,
        smoothing: float = 0.5,
        alpha: float = 0.05,
        max_samples: int = 8192,
        seed: int = 0,
        nonfinite: str = "skip",
        **kwargs: Any,
    ) -> None:
        if kwargs.get("num_groups") is not None:
            raise ValueError("BinnedKL's groups are its cells; use KNNKL for labelled groups.")
        super().__init__(
            num_cells=num_cells, max_samples=max_samples, seed=seed, nonfinite=nonfinite,
            **kwargs,
        )
        binned_kl_counts(torch.ones(2), torch.ones(2), smoothing=smoothing, alpha=alpha)
        self.smoothing, self.alpha = float(smoothing), float(alpha)

    def compute(self) -> SamplesResult:
        """Both directions between the cell histograms of the gathered samples."""
        x, _, y = self._union()
        cells = self._cells(x)
        lx, ly = _cell_labels(x, cells), _cell_labels(y, cells)
        k = cells.shape[0]
        nc = torch.bincount(lx[lx >= 0], minlength=k)
        mc = torch.bincount(ly[ly >= 0], minlength=k)
        r = binned_kl_counts(nc, mc, smoothing=self.smoothing, alpha=self.alpha)
        p, q = r.reference_probs, r.model_probs
        # delta method: Var log p̂_c ≈ (1 − p)/(n p), Var log q̂_c ≈ (1 − q)/(m q)
        se = ((1 - p) / (r.n * p) + (1 - q) / (r.m * q)).sqrt()
        f = (r.cell_log_ratio, r.reference_counts, se)
        b = (-r.cell_log_ratio, r.model_counts, se)
        fwd_g, rev_g = _groups(f, b, r.model_counts / max(r.m, 1))
        return SamplesResult(
            forward=DirectionEstimate(r.forward, r.forward_stderr, float(r.n), "binned"),
            reverse=DirectionEstimate(r.reverse, r.reverse_stderr, float(r.m), "binned"),
            nonfinite=float((lx < 0).sum() + (ly < 0).sum()), group_forward=fwd_g,
            group_reverse=rev_g, device=self.device, d=float(x.shape[1]),
            num_cells=float(k), ndb=float(r.ndb), dropped=float(self.dropped),
            group_kind="cell", centroids=self.centroids, details=r,
        )


def _cell_labels(samples: Tensor, centroids: Tensor) -> Tensor:
    """Nearest cell of every finite row; −1 for rows with NaN/±inf."""
    finite = torch.isfinite(samples).all(1)
    out = torch.full((samples.shape[0],), -1, dtype=torch.long, device=samples.device)
    out[finite] = assign_cells(samples[finite], centroids)
    return out


def _shares(labels: Tensor, n_groups: int) -> Tensor:
    lab = labels[labels >= 0]
    return torch.bincount(lab, minlength=n_groups).to(_F64) / max(labels.numel(), 1)


def _groups(
    fwd: tuple[Tensor, Tensor, Tensor], rev: tuple[Tensor, Tensor, Tensor], mass: Tensor
) -> tuple[dict[int, GroupEstimate], dict[int, GroupEstimate]]:
    """Per-group estimates from (mean, count, stderr) per direction and the model's share.

    A group without reference rows is left out; without model rows it has no reverse
    estimate, and its model mass, 0, is the evidence of a dropped mode.
    """
    f_mean, f_n, f_se = (t.tolist() for t in fwd)
    r_mean, r_n, r_se = (t.tolist() for t in rev)
    shares = mass.tolist()
    out_f, out_r = {}, {}
    for g in range(len(f_mean)):
        if f_n[g] > 0:
            out_f[g] = GroupEstimate(f_mean[g], f_se[g], f_n[g])
        if r_n[g] > 0:
            out_r[g] = GroupEstimate(r_mean[g], r_se[g], r_n[g], mass=shares[g])
    return out_f, out_r


def check_monitor_config(
    sample_estimator: object, num_cells: object, max_samples: object, num_groups: object
) -> None:
    """The monitor's options for sample inputs, checked when it is created."""
    if sample_estimator not in ("knn", "binned"):
        raise ValueError(
            f"`sample_estimator` must be 'knn' or 'binned', got {sample_estimator!r}."
        )
    if sample_estimator == "binned" and num_groups is not None:
        raise ValueError(
            "sample_estimator='binned' uses its cells as groups; drop `num_groups` "
            "(and `groups=`) or use sample_estimator='knn'."
        )
    for name, value in (("num_cells", num_cells), ("max_samples", max_samples)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise ValueError(f"`{name}` must be an int ≥ 2, got {value!r}.")


def cells_of(metric: object) -> list | None:
    """The metric's cell centres as nested lists (for the checkpoint), or None."""
    cells = getattr(metric, "centroids", None)
    return None if cells is None else cells.detach().cpu().tolist()


def cells_as_groups(result: object) -> Tensor | None:
    """The centres when the result's groups are cells, else None."""
    if isinstance(result, SamplesResult) and result.group_kind == "cell":
        return result.centroids
    return None


def with_cells(alert: Alert, centroids: Tensor) -> Alert:
    """The alert with each named cell's lost mass and centre (cells are groups here)."""
    if not alert.groups:
        return alert
    ratio = dict(alert.details.get("group_mass_ratio", {}))  # AlertRules' details
    for g, d in alert.details.get("groups", {}).items():  # AlertEngine's details
        if isinstance(d, dict) and d.get("mass_ratio") is not None:
            ratio.setdefault(int(g), d["mass_ratio"])
    where = []
    for g in alert.groups:
        centre = centroids[g].tolist()
        coords = ", ".join(f"{v:.2f}" for v in centre[:4]) + (", …" if len(centre) > 4 else "")
        lost = f" lost {1 - ratio[g]:.0%} of its mass," if g in ratio else ""
        where.append(f"cell {g}{lost} centre ({coords})")
    details = {**alert.details, "cell_centroids": {g: centroids[g].tolist() for g in alert.groups}}
    message = alert.message + "; groups are k-means cells of the reference: " + "; ".join(where)
    return dataclasses.replace(alert, message=message, details=details)

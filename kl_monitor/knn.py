"""k-nearest-neighbour KL between two sets of samples (no density needed).

For generators without a density (GANs, diffusion samplers, implicit models), forward
and reverse KL follow from distances alone (Wang, Kulkarni & Verdú 2009). Distances
are computed in chunks of query rows (one matrix product + ``topk``) on the samples'
device, so the extra memory is one chunk, not n × m.

**``knn_kl``.** The estimate is consistent as n, m → ∞ for fixed k; the bias at finite
n grows with d (use low-dimensional features: see docs/generators.md). Larger k: less
variance, more bias. Standard errors are two-sample delete-one jackknife estimates,
exact from the (k+1)-th neighbours, so they account for the dependence between per-row
terms.

Distances are Euclidean, computed in chunks of rows on the samples' device (extra
memory: one chunk of about 2^22 distances on CPU), in float32 (float64 for float64
input), after centring both sets on the reference mean. Estimates are invariant to a
common translation, a common scaling and the order of the samples.

A row with a k-th neighbour at distance 0 (k exact duplicates) would give log 0: it is
left out of the mean and counted in ``ties``. Rows with NaN/±inf are dropped
(``nonfinite="skip"``, one warning, counted) or rejected (``"raise"``). The per-row
terms of the result give per-group contributions (``group_means``).

``knn_kl`` raises ``TypeError`` for non-tensor or non-floating input, and
``ValueError`` for samples not ``(n, d)``, different d, fewer than k + 2 finite samples
on a side, a bad ``k``/``nonfinite``/``chunk_rows``, or every row tied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._utils import check_nonfinite_mode, compute_dtype, warn_once

__all__ = ["KNNKLResult", "knn_kl", "check_samples", "group_means"]

# Elements of one chunk of the distance matrix: 2^22 float32 = 16 MiB on CPU (smaller
# chunks made the matrix products slower, measured in benchmarks/samples.py);
# accelerators get 16x larger chunks to keep kernel launches few.
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class KNNKLResult:
    """k-NN estimates of D(P‖Q) and D(Q‖P) from samples of P and Q.

    Attributes:
        forward: D̂(P‖Q) in nats.
        reverse: D̂(Q‖P) in nats.
        forward_stderr: jackknife standard error of ``forward`` (over both samples).
        reverse_stderr: jackknife standard error of ``reverse``.
        n: reference samples used (finite rows).
        m: model samples used (finite rows).
        d: dimension.
        k: neighbours.
        forward_terms: per reference row, d·log(ν_k/ρ_k) + log(m/(n−1)); the mean over
            ``forward_valid`` rows is ``forward``. 0 where not valid.
        reverse_terms: per model row, likewise; the mean over ``reverse_valid`` is
            ``reverse``.
        forward_valid: reference rows that entered the mean (finite, no zero distance).
        reverse_valid: model rows that entered the mean.
        model_nearest: per model row, the index of its nearest reference row (−1 for a
            dropped row): labels model samples with the reference's groups.
        ties: rows excluded because a k-th neighbour distance was 0 (≥ k exact
            duplicates), reference and model together.
        nonfinite: rows dropped because they held NaN or ±inf.
    """

    forward: float
    reverse: float
    forward_stderr: float
    reverse_stderr: float
    n: int
    m: int
    d: int
    k: int
    forward_terms: torch.Tensor
    reverse_terms: torch.Tensor
    forward_valid: torch.Tensor
    reverse_valid: torch.Tensor
    model_nearest: torch.Tensor
    ties: int
    nonfinite: int


def check_samples(
    name: str, x: object, d: int | None = None, min_rows: int = 1
) -> torch.Tensor:
    """Validate one ``(n, d)`` floating sample set; returns it unchanged.

    Raises:
        TypeError: not a tensor, or an integer/bool/complex dtype.
        ValueError: not 2-D, a different ``d`` than expected, or fewer than ``min_rows``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor of shape (n, d), got {type(x).__name__}.")
    if not x.is_floating_point():
        raise TypeError(
            f"`{name}` must have a floating dtype (float16, bfloat16, float32, float64), got "
            f"{x.dtype}; convert integer features with `.float()`."
        )
    if x.dim() != 2:
        hint = " (for 1-D points use `x.unsqueeze(-1)`)" if x.dim() == 1 else ""
        raise ValueError(f"`{name}` must have shape (n, d), got {tuple(x.shape)}{hint}.")
    if d is not None and x.shape[1] != d:
        raise ValueError(
            f"`{name}` has d = {x.shape[1]} features per sample but the reference has "
            f"d = {d}; both sample sets must live in the same feature space."
        )
    if x.shape[0] < min_rows:
        raise ValueError(f"`{name}` needs at least {min_rows} samples, got {x.shape[0]}.")
    return x


def _finite_rows(name: str, x: torch.Tensor, nonfinite: str) -> torch.Tensor:
    """Indices of the rows of ``x`` without NaN/±inf (others rejected or dropped)."""
    good = torch.isfinite(x).all(dim=1)
    bad = int((~good).sum())
    if bad:
        if nonfinite == "raise":
            raise ValueError(
                f"`{name}` has {bad} rows with NaN or ±inf; pass nonfinite='skip' to drop them."
            )
        warn_once(
            "knn_nonfinite",
            "kl_monitor: sample rows with NaN/±inf were dropped; counted in `nonfinite`. "
            "This warning is shown once.",
        )
    return good.nonzero().flatten()


def _neighbours(
    query: torch.Tensor, base: torch.Tensor, kk: int, same: bool, chunk_rows: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted distances ``(nq, kk)`` to the ``kk`` nearest rows of ``base``, and indices.

    ``same``: query is base; a row is not its own neighbour (its duplicates are).
    Rows are selected on |b|² − 2 q·b (one matrix product per chunk; the query's own
    |q|² does not change its ranking), fast but inexact for close points; the
    selected distances are then recomputed exactly from differences, so an exact
    duplicate has distance 0, not a rounding residue.
    """
    nq, nb = query.shape[0], base.shape[0]
    elems = _CHUNK_ELEMENTS if query.device.type == "cpu" else _CHUNK_ELEMENTS << 4
    step = max(1, min(nq, chunk_rows or elems // max(nb, 1)))
    dist = torch.empty(nq, kk, dtype=query.dtype, device=query.device)
    index = torch.empty(nq, kk, dtype=torch.long, device=query.device)
    sq_base, base_t = (base * base).sum(1), base.T
    for start in range(0, nq, step):
        q = query[start:start + step]
        score = torch.addmm(sq_base, q, base_t, alpha=-2.0)
        if same:
            rows = torch.arange(q.shape[0], device=q.device)
            score[rows, rows + start] = math.inf
        idx = score.topk(kk, dim=1, largest=False, sorted=False).indices
        del score
        exact = (q[:, None, :] - base[idx]).norm(dim=-1)
        exact, order = exact.sort(dim=1)
        dist[start:start + step] = exact
        index[start:start + step] = idx.gather(1, order)
    return dist, index


def _direction(
    own: tuple[torch.Tensor, torch.Tensor],
    other: tuple[torch.Tensor, torch.Tensor],
    n_b: int,
    k: int,
    d: int,
) -> tuple[float, float, torch.Tensor, torch.Tensor]:
    """D̂(A‖B) from the k+1 nearest neighbours of each a in A (``own``) and in B (``other``).

    With ρ_k (own sample, self excluded) and ν_k (other sample):

        D̂ = (d/n) Σ log(ν_k/ρ_k) + log(m/(n−1)).

    The standard error is the two-sample delete-one jackknife's. It is exact and cheap
    from the (k+1)-th neighbours: deleting row a of A removes its own term and moves
    ρ_k → ρ_{k+1} for the rows that had a among their k nearest; deleting row b of B
    moves ν_k → ν_{k+1} likewise. So the dependence between per-row terms (shared
    neighbours) is in the variance, which sd/√n would ignore.
    ``n_b`` is the size of B. Returns (estimate, stderr, per-row terms, valid rows).
    """
    (own_d, own_i), (oth_d, oth_i) = own, other
    n_a = own_d.shape[0]
    f64 = torch.float64
    rho, rho1 = own_d[:, k - 1].to(f64), own_d[:, k].to(f64)
    nu, nu1 = oth_d[:, k - 1].to(f64), oth_d[:, k].to(f64)
    valid = (rho > 0) & (nu > 0)
    u = valid.to(f64)
    n_u = float(u.sum())
    one = torch.ones((), dtype=f64, device=rho.device)
    t = torch.where(valid, nu.log() - rho.log(), 0.0)
    s = float(t.sum())
    const = math.log(n_b / (n_a - 1))
    value = d * s / n_u + const
    # delete row a of A: its own term goes, neighbours' ρ_k move to ρ_{k+1}
    delta = torch.where(valid, rho1.log() - torch.where(valid, rho, one).log(), 0.0)
    g = torch.zeros(n_a, dtype=f64, device=rho.device)
    g.index_add_(0, own_i[:, :k].reshape(-1), delta.repeat_interleave(k))
    own_del = d * (s - u * t - g) / (n_u - u) + math.log(n_b / (n_a - 2))
    # delete row b of B: ν_k of the rows that had b among their k nearest move to ν_{k+1}
    eps = torch.where(valid, nu1.log() - torch.where(valid, nu, one).log(), 0.0)
    h = torch.zeros(n_b, dtype=f64, device=rho.device)
    h.index_add_(0, oth_i[:, :k].reshape(-1), eps.repeat_interleave(k))
    other_del = d * (s + h) / n_u + math.log((n_b - 1) / (n_a - 1))
    var = (n_a - 1) / n_a * float(((own_del - own_del.mean()) ** 2).sum()) + (
        n_b - 1
    ) / n_b * float(((other_del - other_del.mean()) ** 2).sum())
    terms = torch.where(valid, d * t + const, 0.0)
    return value, math.sqrt(max(var, 0.0)), terms, valid


def group_means(
    terms: torch.Tensor, valid: torch.Tensor, labels: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group mean of per-row ``terms`` over ``valid`` rows, its count and stderr.

    Σ_g count_g·mean_g / Σ_g count_g is the overall mean: a group's contribution to the
    total is count_g/n · mean_g. The stderr is sd/√count, which ignores the dependence
    between neighbouring rows' terms (a rough scale; the global jackknife does not).
    Groups without valid rows get mean 0, count 0 and stderr ``inf``.
    """
    f64 = torch.float64
    keep = valid & (labels >= 0)
    lab = labels[keep].to(torch.long)
    t = terms[keep].to(f64)
    zeros = torch.zeros(num_groups, dtype=f64, device=terms.device)
    count = zeros.index_add(0, lab, torch.ones_like(t))
    total = zeros.index_add(0, lab, t)
    total_sq = zeros.index_add(0, lab, t * t)
    mean = torch.where(count > 0, total / count.clamp(min=1), 0.0)
    var = (total_sq - count * mean * mean).clamp(min=0) / (count - 1).clamp(min=1)
    stderr = torch.where(count > 1, (var / count.clamp(min=1)).sqrt(), math.inf)
    return mean, count, stderr


def knn_kl(
    reference_samples: torch.Tensor,
    model_samples: torch.Tensor,
    k: int = 5,
    *,
    nonfinite: str = "skip",
    chunk_rows: int | None = None,
    dtype: torch.dtype | None = None,
) -> KNNKLResult:
    r"""Forward and reverse KL from samples alone, by k nearest neighbours.

    With x_1..x_n ~ P and y_1..y_m ~ Q in d dimensions, ρ_k(i) the distance from x_i to its
    k-th nearest other x and ν_k(i) to its k-th nearest y (Wang, Kulkarni & Verdú 2009):

        D̂(P‖Q) = (d/n) Σ_i log(ν_k(i)/ρ_k(i)) + log(m/(n−1)),  D̂(Q‖P) with roles swapped.

    Bias, jackknife stderr, distances, ties, errors: the ``kl_monitor.knn`` module docstring.

    Args:
        reference_samples: ``(n, d)`` samples (or features) of the reference P.
        model_samples: ``(m, d)`` samples of the model Q, same d.
        k: neighbours (default 5). Larger k: less variance, more bias.
        nonfinite: ``"skip"`` or ``"raise"``.
        chunk_rows: query rows per chunk (default: about 2^22 distances per chunk).
        dtype: distance precision (default float32, float64 for float64 input).

    Returns:
        ``KNNKLResult``: both directions, their stderr, n, m, d, k, per-row terms, counters.

    Examples:
        >>> import torch
        >>> from kl_monitor import knn_kl
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.randn(2000, 2, generator=g)
        >>> y = torch.randn(2000, 2, generator=g) + torch.tensor([1.0, 0.0])
        >>> out = knn_kl(x, y)  # both directions are 0.5
        >>> abs(out.forward - 0.5) < 3 * out.forward_stderr, (out.n, out.m, out.d, out.k)
        (True, (2000, 2000, 2, 5))
    """
    x, y, keep_x, keep_y = _validated(reference_samples, model_samples, k, nonfinite, chunk_rows)
    xs, ys = _centred(x, y, keep_x, keep_y, dtype or compute_dtype(x))
    n, m, d = xs.shape[0], ys.shape[0], xs.shape[1]
    xx = _neighbours(xs, xs, k + 1, True, chunk_rows)
    xy = _neighbours(xs, ys, k + 1, False, chunk_rows)
    yy = _neighbours(ys, ys, k + 1, True, chunk_rows)
    yx = _neighbours(ys, xs, k + 1, False, chunk_rows)
    (fwd, fwd_se, f_terms, f_valid), (rev, rev_se, r_terms, r_valid), ties = (
        _both_directions(xx, xy, yy, yx, n, m, k, d)
    )
    return KNNKLResult(
        forward=fwd, reverse=rev, forward_stderr=fwd_se, reverse_stderr=rev_se,
        n=n, m=m, d=d, k=k,
        forward_terms=_scatter(f_terms, keep_x, x.shape[0], 0.0),
        reverse_terms=_scatter(r_terms, keep_y, y.shape[0], 0.0),
        forward_valid=_scatter(f_valid, keep_x, x.shape[0], False),
        reverse_valid=_scatter(r_valid, keep_y, y.shape[0], False),
        model_nearest=_scatter(keep_x[yx[1][:, 0]], keep_y, y.shape[0], -1),
        ties=ties,
        nonfinite=int(x.shape[0] - n + y.shape[0] - m),
    )


def _centred(
    x: torch.Tensor, y: torch.Tensor, keep_x: torch.Tensor, keep_y: torch.Tensor,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kept rows of both sets minus the reference mean (taken in float64), as ``dtype``."""
    centre = x.detach()[keep_x].to(torch.float64).mean(0)
    xs = (x.detach()[keep_x].to(torch.float64) - centre).to(dtype)
    ys = (y.detach()[keep_y].to(torch.float64) - centre).to(dtype)
    return xs, ys


def _both_directions(
    xx: tuple, xy: tuple, yy: tuple, yx: tuple, n: int, m: int, k: int, d: int
) -> tuple[tuple, tuple, int]:
    """Forward and reverse (value, stderr, terms, valid) from the four neighbour searches,
    and the rows left out for a zero k-th neighbour distance (warned once)."""
    out = []
    for name, own, other, n_b in (("reference", xx, xy, m), ("model", yy, yx, n)):
        valid = (own[0][:, k - 1] > 0) & (other[0][:, k - 1] > 0)
        if int(valid.sum()) < 2:
            raise ValueError(
                f"fewer than 2 {name} samples have a nonzero k-th neighbour distance: the "
                f"samples hold ≥ k={k} exact duplicates of almost every row (a discrete "
                "or collapsed distribution); use binned_kl, or a larger k."
            )
        out.append(_direction(own, other, n_b, k, d))
    ties = int(sum(int((~valid).sum()) for *_, valid in out))
    if ties:
        warn_once(
            "knn_ties",
            f"kl_monitor: {ties} samples have k={k} exact duplicates (a zero neighbour "
            "distance) and were left out of the k-NN KL; counted in `ties`. This warning "
            "is shown once.",
        )
    return out[0], out[1], ties


def _validated(
    reference_samples: object, model_samples: object, k: object, nonfinite: str,
    chunk_rows: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``knn_kl``'s checks; returns both sets and the indices of their finite rows."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"`k` must be a positive int, got {k!r}.")
    if chunk_rows is not None and (
        isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
    ):
        raise ValueError(f"`chunk_rows` must be a positive int or None, got {chunk_rows!r}.")
    check_nonfinite_mode(nonfinite)
    x = check_samples("reference_samples", reference_samples)
    y = check_samples("model_samples", model_samples, d=x.shape[1])
    if y.device != x.device:
        raise ValueError(
            f"`reference_samples` is on {x.device} and `model_samples` on {y.device}; "
            "expected one device."
        )
    keep_x = _finite_rows("reference_samples", x, nonfinite)
    keep_y = _finite_rows("model_samples", y, nonfinite)
    for name, kept, total in (("reference_samples", keep_x, x), ("model_samples", keep_y, y)):
        if kept.numel() < k + 2:
            raise ValueError(
                f"`{name}` has {kept.numel()} finite samples of {total.shape[0]}; k-NN KL "
                f"with k={k} needs at least k + 2 = {k + 2} (k neighbours, one more for "
                "the jackknife)."
            )
    return x, y, keep_x, keep_y


def _scatter(values: torch.Tensor, rows: torch.Tensor, total: int, fill: object) -> torch.Tensor:
    """``values`` of the kept ``rows`` placed back among ``total`` rows, ``fill`` elsewhere."""
    out = torch.full((total,), fill, dtype=values.dtype, device=values.device)
    out[rows] = values
    return out

"""Binned KL over cells learned from the reference: exact categorical KL of histograms.

Cells are a k-means partition of reference samples (fitted once, seeded). Each
evaluation counts reference and model samples per cell and computes the exact KL
between the two smoothed histograms, both directions, with multinomial standard
errors, and a per-cell test of over- and under-representation (the "number of
statistically different bins" of Richardson & Weiss 2018). By data processing the
KL between the cell probabilities is a lower bound of the KL between the
distributions.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from ._utils import check_nonfinite_mode
from .knn import _finite_rows, check_samples

__all__ = ["BinnedKLResult", "assign_cells", "binned_kl", "binned_kl_counts", "fit_cells"]

# Elements of one chunk of sample-to-centroid distances.
_CHUNK_ELEMENTS = 1 << 20


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"`{name}` must be an int ≥ {low}, got {value!r}.")
    return value


def assign_cells(
    samples: torch.Tensor, centroids: torch.Tensor, *, chunk_rows: int | None = None
) -> torch.Tensor:
    """Index of the nearest centroid (Euclidean) of every row, computed in chunks.

    Args:
        samples: ``(n, d)`` floating samples, finite.
        centroids: ``(K, d)`` cell centres from ``fit_cells``.
        chunk_rows: rows per chunk (default: about 2^20 distances per chunk).

    Returns:
        ``(n,)`` int64 cell indices on the samples' device.

    Examples:
        >>> c = torch.tensor([[0.0, 0.0], [10.0, 0.0]])
        >>> assign_cells(torch.tensor([[1.0, 0.0], [9.0, 1.0]]), c)
        tensor([0, 1])
    """
    # argmin_c |x − c|² = argmin_c (|c|² − 2 x·c): one matrix product, in float64 so
    # that the dropped |x|² cannot cost precision
    cen = centroids.to(samples.device, torch.float64)
    half_sq = 0.5 * (cen * cen).sum(1)
    step = max(1, chunk_rows or _CHUNK_ELEMENTS // max(cen.shape[0], 1))
    out = torch.empty(samples.shape[0], dtype=torch.long, device=samples.device)
    for start in range(0, samples.shape[0], step):
        chunk = samples[start:start + step].to(torch.float64)
        out[start:start + step] = (half_sq - chunk @ cen.T).argmin(1)
    return out


def fit_cells(
    reference_samples: torch.Tensor,
    num_cells: int = 16,
    *,
    seed: int = 0,
    iters: int = 50,
) -> torch.Tensor:
    r"""Cells for binned KL: k-means (Lloyd) with k-means++ seeding, on reference samples.

    Deterministic for a given ``seed`` and sample order (the random choices come from a
    CPU ``torch.Generator``), so every DDP rank fitting on the same gathered samples
    gets the same cells. Lloyd iterations stop when no assignment changes or after
    ``iters``; a cell that empties keeps its centre. Rows with NaN/±inf are ignored.
    k-means is equivariant to translation and scaling, so the cells move with the data.

    Args:
        reference_samples: ``(n, d)`` samples of P (n ≥ ``num_cells``).
        num_cells: K, the number of cells.
        seed: seed of the k-means++ choices.
        iters: at most this many Lloyd iterations.

    Returns:
        ``(K, d)`` float64 centroids.

    Raises:
        TypeError, ValueError: bad samples (see ``knn_kl``), K < 2, or n < K finite rows.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat((torch.randn(100, 2, generator=g), 10 + torch.randn(100, 2, generator=g)))
        >>> fit_cells(x, 2).round().abs().sum(1).sort().values
        tensor([ 0., 20.], dtype=torch.float64)
    """
    num_cells = _check_int("num_cells", num_cells, 2)
    _check_int("iters", iters, 1)
    x = check_samples("reference_samples", reference_samples)
    x = x.detach()[_finite_rows("reference_samples", x, "skip")].to(torch.float64)
    if x.shape[0] < num_cells:
        raise ValueError(
            f"`reference_samples` has {x.shape[0]} finite rows; {num_cells} cells need at "
            "least as many."
        )
    g = torch.Generator().manual_seed(int(seed))
    centres = _kmeans_pp(x, num_cells, g)
    assign = assign_cells(x, centres)
    for _ in range(iters):
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=num_cells).to(x.dtype)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
        new = assign_cells(x, centres)
        if torch.equal(new, assign):
            break
        assign = new
    return centres


def _kmeans_pp(x: torch.Tensor, k: int, g: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007): next centre drawn ∝ D²."""
    n = x.shape[0]
    idx = [int(torch.randint(n, (1,), generator=g))]
    d2 = ((x - x[idx[0]]) ** 2).sum(1)
    for _ in range(1, k):
        weights = d2.cpu()
        if float(weights.sum()) > 0:
            nxt = int(torch.multinomial(weights, 1, generator=g))
        else:  # fewer distinct points than cells: a duplicate centre (an empty cell)
            nxt = int(torch.randint(n, (1,), generator=g))
        idx.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return x[idx].clone()


@dataclass(frozen=True)
class BinnedKLResult:
    """Exact KL between smoothed cell histograms, both directions, and per-cell tests.

    Attributes:
        forward: D(p̂‖q̂) over the cells, nats.
        reverse: D(q̂‖p̂).
        forward_stderr: multinomial (delta-method) standard error of ``forward``.
        reverse_stderr: likewise for ``reverse``.
        n: reference samples counted.
        m: model samples counted.
        num_cells: K.
        reference_counts: ``(K,)`` reference samples per cell.
        model_counts: ``(K,)`` model samples per cell.
        reference_probs: ``(K,)`` smoothed p̂.
        model_probs: ``(K,)`` smoothed q̂.
        cell_log_ratio: ``(K,)`` log(p̂_c/q̂_c): the forward term of a cell (its reverse
            term is the negative). A cell's contribution to ``forward`` is
            p̂_c·log(p̂_c/q̂_c).
        cell_z: ``(K,)`` two-proportion z of the model's share against the reference's
            (negative: under-represented, the model lost mass there).
        different: ``(K,)`` cells with |z| ≥ the two-sided ``alpha`` quantile.
        ndb: number of statistically different bins (Richardson & Weiss 2018).
        smoothing: pseudo-count added to every cell.
        nonfinite: rows dropped for NaN/±inf.
    """

    forward: float
    reverse: float
    forward_stderr: float
    reverse_stderr: float
    n: int
    m: int
    num_cells: int
    reference_counts: torch.Tensor
    model_counts: torch.Tensor
    reference_probs: torch.Tensor
    model_probs: torch.Tensor
    cell_log_ratio: torch.Tensor
    cell_z: torch.Tensor
    different: torch.Tensor
    ndb: int
    smoothing: float
    nonfinite: int = 0


def _kl_and_stderr(
    a: torch.Tensor, b: torch.Tensor, n_a: int, n_b: int
) -> tuple[float, float]:
    """D(a‖b) and its delta-method stderr for independent multinomials of sizes n_a, n_b.

    Var = Var_a(log a/b)/n_a + (Σ a²/b − 1)/n_b: the gradient of D is log(a/b) + 1 in
    a and −a/b in b, each under its multinomial covariance (diag(π) − ππᵀ)/size.
    """
    lr = a.log() - b.log()
    value = float((a * lr).sum())
    var_a = float((a * lr * lr).sum()) - value * value
    var_b = float((a * a / b).sum()) - 1.0
    return value, math.sqrt(max(var_a, 0.0) / n_a + max(var_b, 0.0) / n_b)


def binned_kl_counts(
    reference_counts: torch.Tensor,
    model_counts: torch.Tensor,
    *,
    smoothing: float = 0.5,
    alpha: float = 0.05,
) -> BinnedKLResult:
    r"""Binned KL from per-cell counts (the part ``binned_kl`` and ``BinnedKL`` share).

    With counts n_c, m_c over K cells and pseudo-count a (``smoothing``),
    p̂_c = (n_c + a)/(n + Ka), q̂_c = (m_c + a)/(m + Ka), and

        D(p̂‖q̂) = Σ_c p̂_c log(p̂_c/q̂_c),   D(q̂‖p̂) = Σ_c q̂_c log(q̂_c/p̂_c).

    Smoothing keeps an empty cell finite (a dropped mode reads as a large, finite
    forward KL). Per cell, z = (m_c/m − n_c/n)/√(π(1 − π)(1/n + 1/m)) with the pooled
    π = (n_c + m_c)/(n + m); |z| ≥ z_{1−α/2} marks a statistically different bin.

    Examples:
        >>> r = binned_kl_counts(torch.tensor([50., 50.]), torch.tensor([100., 0.]))
        >>> round(r.forward, 3), r.ndb, r.cell_z[1] < 0
        (1.963, 2, tensor(True))
    """
    if not 0 < smoothing or not math.isfinite(smoothing):
        raise ValueError(f"`smoothing` must be a finite pseudo-count > 0, got {smoothing!r}.")
    if not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
    nc = reference_counts.detach().to(torch.float64)
    mc = model_counts.detach().to(torch.float64)
    n, m, k = float(nc.sum()), float(mc.sum()), nc.numel()
    if n < 1 or m < 1:
        raise ValueError(f"binned KL needs samples on both sides, got n={n:g}, m={m:g}.")
    p = (nc + smoothing) / (n + k * smoothing)
    q = (mc + smoothing) / (m + k * smoothing)
    fwd, fwd_se = _kl_and_stderr(p, q, int(n), int(m))
    rev, rev_se = _kl_and_stderr(q, p, int(m), int(n))
    pooled = (nc + mc) / (n + m)
    se = (pooled * (1 - pooled) * (1 / n + 1 / m)).sqrt()
    z = torch.where(se > 0, (mc / m - nc / n) / se.clamp(min=1e-300), 0.0)
    crit = _normal_quantile(1 - alpha / 2)
    different = z.abs() >= crit
    return BinnedKLResult(
        forward=fwd, reverse=rev, forward_stderr=fwd_se, reverse_stderr=rev_se,
        n=int(n), m=int(m), num_cells=k, reference_counts=nc, model_counts=mc,
        reference_probs=p, model_probs=q, cell_log_ratio=p.log() - q.log(), cell_z=z,
        different=different, ndb=int(different.sum()), smoothing=float(smoothing),
    )


def _normal_quantile(prob: float) -> float:
    return statistics.NormalDist().inv_cdf(prob)


def binned_kl(
    reference_samples: torch.Tensor,
    model_samples: torch.Tensor,
    centroids: torch.Tensor,
    *,
    smoothing: float = 0.5,
    alpha: float = 0.05,
    nonfinite: str = "skip",
) -> BinnedKLResult:
    r"""Forward and reverse KL between cell histograms of reference and model samples.

    Cells are the Voronoi cells of ``centroids`` (from ``fit_cells`` on held-out
    reference samples). See ``binned_kl_counts`` for the smoothing, the standard
    errors and the per-cell test. By data processing, KL between the true cell
    probabilities is at most the true KL: binned KL is a lower bound (see
    docs/generators.md for how far below on the test fixtures).

    Args:
        reference_samples: ``(n, d)`` samples of P.
        model_samples: ``(m, d)`` samples of Q.
        centroids: ``(K, d)`` cell centres.
        smoothing: pseudo-count per cell (default 0.5, Krichevsky–Trofimov).
        alpha: level of the per-cell two-sided test (0.05 as in Richardson & Weiss).
        nonfinite: rows with NaN/±inf are dropped (``"skip"``, counted) or rejected.

    Returns:
        ``BinnedKLResult``.

    Examples:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat((torch.randn(500, 2, generator=g), 8 + torch.randn(500, 2, generator=g)))
        >>> y = torch.randn(1000, 2, generator=g)  # the model keeps one of the two modes
        >>> out = binned_kl(x, y, fit_cells(x, 4))
        >>> out.reverse < 0.8 < 3 < out.forward, out.ndb
        (True, 4)
    """
    check_nonfinite_mode(nonfinite)
    x = check_samples("reference_samples", reference_samples, min_rows=1)
    y = check_samples("model_samples", model_samples, d=x.shape[1], min_rows=1)
    c = check_samples("centroids", centroids, d=x.shape[1], min_rows=2)
    keep_x = _finite_rows("reference_samples", x, nonfinite)
    keep_y = _finite_rows("model_samples", y, nonfinite)
    k = c.shape[0]
    nc = torch.bincount(assign_cells(x.detach()[keep_x], c), minlength=k)
    mc = torch.bincount(assign_cells(y.detach()[keep_y], c), minlength=k)
    out = binned_kl_counts(nc, mc, smoothing=smoothing, alpha=alpha)
    dropped = x.shape[0] - keep_x.numel() + y.shape[0] - keep_y.numel()
    return BinnedKLResult(**{**out.__dict__, "nonfinite": int(dropped)})

"""Functional core: KL estimators as pure torch functions.

- ``mc_kl``: D(A‖B) from samples of A (naive, k3 or control variate), with
  standard error, tail diagnostic and variance reduction.
- ``iw_reverse_kl``: D(B‖A) from samples of A only, by self-normalised
  importance weighting, with its effective sample size.
- ``categorical_kl``: exact D(P‖Q) and D(Q‖P) between categorical
  distributions given by logits, in one chunked pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._utils import check_floating, check_nonfinite_mode, compute_dtype, warn_once
from .stats import NONFINITE, SUPPORT, IWEstimate, KLEstimate, KLStats
from .stats import N as _N_COL

__all__ = ["mc_kl", "iw_reverse_kl", "categorical_kl", "categorical_kl_rows", "CategoricalKLResult"]


def mc_kl(
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    method: str = "cv",
    *,
    c: float | None = None,
    nonfinite: str = "skip",
) -> KLEstimate:
    r"""Monte Carlo estimate of D(A‖B) = E_A[log a − log b] from samples x ~ A.

    With ℓ = log a(x) − log b(x) and w = b(x)/a(x), E_A[w] = 1 makes (w − 1) a
    zero-mean control variate. The per-sample terms are

    - ``"naive"`` (k1): ℓ. Unbiased, noisy when the KL is small.
    - ``"k3"``: ℓ + (w − 1) ≥ 0. Excellent near A ≈ B; much worse than naive at
      large KL or when w is heavy-tailed.
    - ``"cv"`` (default): ℓ − c·(w − 1) with c = Cov(ℓ, w)/Var(w). Mind the sign: the
      good fixed choice is c = −1 (k3); c = +1 doubles the noise. c is cross-fitted
      over two hash-assigned folds, so it never sees the samples it corrects and the
      estimate stays unbiased. Unless the weights' Pareto tail index k̂ is
      confidently below 0.5 (Var(w) is infinite above it) ``cv`` falls back to
      naive, whose log-ratio tails stay light. It also falls back when mean(w − 1)
      is many standard errors from 0: B then has mass that samples of A never reach
      (reverse KL after mode dropping) and E_A[w] = 1 fails. ``.method_used`` says
      which ran.

    Forward KL D(P‖Q) is ``mc_kl(log_p, log_q)`` on samples of P; reverse KL D(Q‖P)
    is ``mc_kl(log_q, log_p)`` on samples of Q.

    Args:
        log_a: log a(x) at samples x ~ A, any shape.
        log_b: log b(x) at the same samples, same shape.
        method: ``"cv"``, ``"k3"`` or ``"naive"``.
        c: fixed control-variate coefficient for ``"cv"`` (no cross-fitting, no fallback).
        nonfinite: ``"skip"`` drops NaN/±inf samples with one warning and counts
            them; ``"raise"`` rejects them. log b = −inf with finite log a is a support
            violation, not a bad input: the estimate is then ``+inf``.

    Returns:
        A ``KLEstimate``: ``.value``, ``.stderr``, ``.n``,
        ``.c``, ``.variance_reduction``, ``.tail_index`` and counters; ``float(est)``
        is the value.

    Raises:
        TypeError: non-tensor or non-floating input.
        ValueError: shape mismatch, empty input, unknown method, non-finite input
            with ``nonfinite="raise"``, or no finite sample at all.

    Examples:
        >>> import torch
        >>> from kl_monitor import mc_kl
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> p, q = torch.distributions.Normal(0., 1.), torch.distributions.Normal(1., 1.)
        >>> x = p.sample((10_000,))
        >>> est = mc_kl(p.log_prob(x), q.log_prob(x))  # true D(P‖Q) = 0.5
        >>> abs(est.value - 0.5) < 3 * est.stderr, est.variance_reduction > 1.5
        (True, True)
    """
    sums, top, counts = KLStats.batch_tensors(log_a, log_b, nonfinite)
    _require_usable(sums, counts, "log_a", "log_b")
    return KLStats(sums, top, counts).estimate(method, c=c)


def iw_reverse_kl(
    log_p: torch.Tensor, log_q: torch.Tensor, *, nonfinite: str = "skip"
) -> IWEstimate:
    r"""Reverse KL D(Q‖P) from samples of P only, by self-normalised importance weighting.

    With w = q(x)/p(x) at x ~ P and w̃ = w / mean(w),

        D(Q‖P) = E_P[w log w] ≈ mean(w̃ · log w̃).

    Use it when the model cannot be sampled. Its variance can be enormous: check
    ``.ess`` (effective sample size, (Σw)²/Σw²) and ``.tail_index`` (k̂ > 0.7: do not
    trust the value).

    Args:
        log_p: log p(x) at samples x ~ P.
        log_q: log q(x) at the same samples.
        nonfinite: ``"skip"`` or ``"raise"``, as in ``mc_kl``.

    Returns:
        An ``IWEstimate`` (``value``, ``stderr``, ``ess``, ``n``,
        ``tail_index``).

    Examples:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> p, q = torch.distributions.Normal(0., 1.), torch.distributions.Normal(0.5, 1.)
        >>> x = p.sample((20_000,))
        >>> est = iw_reverse_kl(p.log_prob(x), q.log_prob(x))  # true D(Q‖P) = 0.125
        >>> abs(est.value - 0.125) < 4 * est.stderr, est.ess > 10_000
        (True, True)
    """
    sums, top, counts = KLStats.batch_tensors(log_p, log_q, nonfinite, names=("log_p", "log_q"))
    _require_usable(sums, counts, "log_p", "log_q")
    return KLStats(sums, top, counts).importance_weighted_reverse()


def _require_usable(sums: torch.Tensor, counts: torch.Tensor, name_a: str, name_b: str) -> None:
    """Reject a batch where every sample was dropped, naming the arguments."""
    n, support, bad = float(sums[:, _N_COL].sum()), float(counts[SUPPORT]), float(counts[NONFINITE])
    if n == 0 and support == 0:
        raise ValueError(
            f"no finite samples: every sample of `{name_a}`/`{name_b}` has a NaN or "
            f"infinite log-density ({int(bad)} dropped); expected at least one finite pair."
        )


@dataclass(frozen=True)
class CategoricalKLResult:
    """Exact categorical KL in both directions.

    Attributes:
        forward: D(P‖Q) per row (``"none"``), per sequence (``"sum"``) or the mean over
            unmasked rows (``"mean"``), in nats.
        reverse: D(Q‖P), reduced the same way.
        entropy_reference: H(P) per row (0 where masked).
        entropy_model: H(Q) per row (0 where masked).
        support_violations: rows where Q (P) has zero mass on a class P (Q) has mass,
            making forward (reverse) KL ``+inf``.
        n: unmasked, finite rows counted.
        nonfinite: rows dropped because a logit was NaN or +inf, or all were −inf.
        reduction: the reduction applied.
    """

    forward: torch.Tensor
    reverse: torch.Tensor
    entropy_reference: torch.Tensor
    entropy_model: torch.Tensor
    support_violations: int
    n: int
    nonfinite: int
    reduction: str


# CPU: chunks of 2^16 elements. The kernel's work buffer holds 8 × chunk floats
# (2 MiB in float32), about one core's L2 cache; smaller chunks pay more per-op
# dispatch and thread start-up, larger ones spill out of L2 (measured, see
# docs/performance.md). Accelerators get 64× larger chunks to keep kernel launches few.
_CHUNK_ELEMENTS = 1 << 16


def categorical_kl_rows(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    *,
    chunk_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row forward KL, reverse KL, H(P), H(Q) and a validity flag, chunked.

    The validation-free kernel behind ``categorical_kl`` and the metrics.
    Inputs ``(..., K)`` are flattened to rows; outputs have the leading shape and
    a float32 (float64 for float64 input) dtype. Rows with NaN or +inf logits, or
    all logits −inf on either side, are flagged invalid and get zeros.

    Per row, with x, y the logits of P, Q, xs = x − max x, ys = y − max y,
    ex = exp(xs), ey = exp(ys) and d = xs − ys, everything follows from seven sums:

        D(P‖Q) = Σex·d / Σex − g,   D(Q‖P) = g − Σey·d / Σey,
        H(P) = log Σex − Σex·xs / Σex,   H(Q) = log Σey − Σey·ys / Σey,

    where g = log(Σex / Σey) = log1p(Σ(ex − ey) / Σey). Taking g from the sum of the
    differences, and d from the shifted logits, keeps small KLs (P ≈ Q) accurate: no
    difference of two log-sum-exps. One exp per logit, plain sums (no matmul, so
    TF32/bf16 matmul settings cannot touch the precision), in a preallocated buffer.
    Rows holding −inf logits (probability 0) are recomputed with masking: 0·log 0 = 0,
    and mass on a class the other side gives probability 0 makes that KL ``+inf``.
    """
    k = logits_p.shape[-1]
    lead = logits_p.shape[:-1]
    p2 = logits_p.detach().reshape(-1, k)
    q2 = logits_q.detach().reshape(-1, k)
    rows = p2.shape[0]
    dtype = compute_dtype(logits_p)
    dev = logits_p.device
    if rows == 0:
        zero = torch.zeros(lead, dtype=dtype, device=dev)
        ones = torch.ones(lead, dtype=torch.bool, device=dev)
        return zero, zero.clone(), zero.clone(), zero.clone(), ones
    elems = _CHUNK_ELEMENTS if dev.type == "cpu" else _CHUNK_ELEMENTS << 6
    step = max(1, min(rows, chunk_rows or elems // k))
    sums = torch.empty(rows, 7, dtype=dtype, device=dev)
    maxes = torch.empty(rows, 2, dtype=dtype, device=dev)
    work = torch.empty(step, 8, k, dtype=dtype, device=dev)

    def views(r: int) -> tuple[torch.Tensor, ...]:
        # slots: d, xs, ys, ex, ey, ex − ey, ex·d, ey·d; xs, ys then become ex·xs, ey·ys
        w = work[:r]
        return (w[:, 0], w[:, 0:1], w[:, 1], w[:, 2], w[:, 1:3], w[:, 3:5], w[:, 5],
                w[:, 6:8], w[:, 1:8])

    def chunk(xp, xq, out_sums, out_max, v, masked=False):
        d, d1, xs, ys, xy, exy, diff, exy_d, summed = v
        xs.copy_(xp)
        ys.copy_(xq)
        torch.amax(xy, dim=-1, out=out_max)
        xy.sub_(out_max.unsqueeze(-1))
        torch.exp(xy, out=exy)
        if masked:
            neg_inf = torch.isneginf(xy)
            has_mass = exy > 0
            violations = torch.stack((
                (has_mass[:, 0] & neg_inf[:, 1]).any(-1),  # q = 0 < p: D(P‖Q) = +inf
                (has_mass[:, 1] & neg_inf[:, 0]).any(-1),  # p = 0 < q: D(Q‖P) = +inf
            ))
            xy.masked_fill_(neg_inf, 0.0)  # where a side is -inf its own exp is 0
        torch.sub(xs, ys, out=d)
        torch.sub(exy[:, 0], exy[:, 1], out=diff)
        torch.mul(exy, d1, out=exy_d)
        xy.mul_(exy)
        torch.sum(summed, dim=-1, out=out_sums)
        return violations if masked else None

    full = views(step)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        v = full if stop - start == step else views(stop - start)
        chunk(p2[start:stop], q2[start:stop], sums[start:stop], maxes[start:stop], v)
    # A row is valid when both maxima are finite (NaN and +inf propagate into the max;
    # all -inf gives -inf). A valid row with NaN sums holds -inf logits (0·-inf): redo.
    valid = torch.isfinite(maxes).all(1)
    infinite = torch.zeros(2, rows, dtype=torch.bool, device=dev)
    redo = (torch.isnan(sums).any(1) & valid).nonzero().flatten()
    for start in range(0, redo.numel(), step):
        idx = redo[start:start + step]
        s = torch.empty(idx.numel(), 7, dtype=dtype, device=dev)
        m = torch.empty(idx.numel(), 2, dtype=dtype, device=dev)
        infinite[:, idx] = chunk(p2[idx], q2[idx], s, m, views(idx.numel()), masked=True)
        sums[idx] = s
    sum_x_xs, sum_y_ys, sum_x, sum_y, sum_diff, sum_x_d, sum_y_d = sums.unbind(1)
    gap = torch.log1p(sum_diff / sum_y)
    out = torch.stack((
        (sum_x_d / sum_x - gap).masked_fill_(infinite[0], float("inf")),
        (gap - sum_y_d / sum_y).masked_fill_(infinite[1], float("inf")),
        sum_x.log() - sum_x_xs / sum_x,
        sum_y.log() - sum_y_ys / sum_y,
    ))
    out = torch.where(valid, out, 0.0)
    # KL ≥ 0 exactly; float32 rounding leaves ~1e-9 negatives on converged rows, and a
    # negative KL on a dashboard reads as a bug. The clamp moves a row by at most that.
    out[:2].clamp_(min=0.0)
    fwd, rev, hp, hq = (t.reshape(lead) for t in out)
    return fwd, rev, hp, hq, valid.reshape(lead)


def kept_rows(
    valid: torch.Tensor, counted: torch.Tensor, nonfinite: str
) -> tuple[torch.Tensor, int]:
    """Rows to keep (counted and valid) and how many counted rows were invalid.

    Invalid rows (NaN or +inf logits, or all −inf) are rejected with ``nonfinite="raise"``
    or dropped with one warning with ``"skip"``. Shared by :func:`categorical_kl` and the
    ``CategoricalKL`` metric.
    """
    n_bad = int((counted & ~valid).sum())
    if n_bad:
        if nonfinite == "raise":
            raise ValueError(
                f"{n_bad} rows have NaN or +inf logits, or all logits -inf. "
                "Pass nonfinite='skip' to drop them."
            )
        warn_once(
            "categorical_nonfinite",
            "kl_monitor: rows with NaN/+inf logits (or all -inf) were dropped; "
            "counted in `nonfinite`. This warning is shown once.",
        )
    return valid & counted, n_bad


def categorical_kl(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    nonfinite: str = "skip",
    chunk_rows: int | None = None,
) -> CategoricalKLResult:
    r"""Exact D(P‖Q) and D(Q‖P) between categoricals given by logits, in one pass.

    Over the last dimension (K classes), with p = softmax(logits_p), q = softmax(logits_q):

        D(P‖Q) = Σ_k p_k (log p_k − log q_k),    D(Q‖P) = Σ_k q_k (log q_k − log p_k).

    The math runs in float32 (float64 for float64 input) whatever the input dtype, on
    chunks of rows so the extra memory is bounded by a chunk, not by rows × K. A −inf
    logit is probability 0 and 0·log 0 = 0. A class with q = 0 < p makes the forward KL
    of that row ``+inf`` (and p = 0 < q the reverse KL); such rows are counted in
    ``support_violations`` — never NaN.

    Args:
        logits_p: reference logits, ``(..., K)``.
        logits_q: model logits, same shape.
        mask: optional bool ``(...)``; False rows (padding) are ignored.
        reduction: ``"mean"`` (per-token mean over unmasked rows), ``"sum"`` (per-sequence
            sum over the second-to-last axis, shape ``(...)`` without it) or ``"none"``
            (per row, 0 where masked).
        nonfinite: rows with NaN or +inf logits are dropped with one warning
            (``"skip"``) or rejected (``"raise"``).
        chunk_rows: rows per chunk (default: about 2^16 elements per chunk on CPU, 2^22
            on accelerators).

    Returns:
        ``CategoricalKLResult`` with ``forward``, ``reverse``, per-row entropies
        ``entropy_reference`` (H(P)) and ``entropy_model`` (H(Q)), and counters.

    Raises:
        TypeError: non-floating logits, or a non-bool mask.
        ValueError: shape mismatch, empty input, bad mask shape, unknown reduction,
            ``chunk_rows`` < 1.

    Examples:
        >>> import torch
        >>> from kl_monitor import categorical_kl
        >>> lp = torch.tensor([[0.0, 0.0], [0.0, -float("inf")]])
        >>> lq = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
        >>> out = categorical_kl(lp, lq, reduction="none")
        >>> out.forward, out.reverse
        (tensor([0.1201, 0.6931]), tensor([0.1109,    inf]))
        >>> out.support_violations
        1
    """
    check_floating("logits_p", logits_p)
    check_floating("logits_q", logits_q)
    check_nonfinite_mode(nonfinite)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"`reduction` must be 'mean', 'sum' or 'none', got {reduction!r}.")
    if chunk_rows is not None and (
        isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1
    ):
        # 0 or a negative step would silently skip the kernel and report KL = 0
        raise ValueError(f"`chunk_rows` must be a positive int or None, got {chunk_rows!r}.")
    if logits_p.dim() == 0 or logits_p.shape != logits_q.shape:
        raise ValueError(
            "`logits_p` and `logits_q` must have the same shape (..., K) with K classes "
            f"last, got {tuple(logits_p.shape)} and {tuple(logits_q.shape)}."
        )
    if logits_p.numel() == 0:
        raise ValueError(
            f"logits are empty (shape {tuple(logits_p.shape)}); expected rows × K > 0."
        )
    if reduction == "sum" and logits_p.dim() < 3:
        raise ValueError(
            "reduction='sum' sums over the sequence axis and needs logits of shape "
            f"(batch, seq, K), got {tuple(logits_p.shape)}."
        )
    lead = logits_p.shape[:-1]
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(
                f"`mask` must be a bool tensor, got {getattr(mask, 'dtype', type(mask).__name__)}."
            )
        if mask.shape != lead:
            raise ValueError(
                f"`mask` must have the logits' shape without the class axis, {tuple(lead)}, "
                f"got {tuple(mask.shape)}."
            )
    fwd, rev, hp, hq, valid = categorical_kl_rows(logits_p, logits_q, chunk_rows=chunk_rows)
    # every unmasked row counts: a non-finite row without a mask must still be reported
    counted = torch.ones_like(valid) if mask is None else mask.to(valid.device)
    keep, n_bad = kept_rows(valid, counted, nonfinite)
    zero = torch.zeros((), dtype=fwd.dtype, device=fwd.device)
    fwd, rev = torch.where(keep, fwd, zero), torch.where(keep, rev, zero)
    hp, hq = torch.where(keep, hp, zero), torch.where(keep, hq, zero)
    n = int(keep.sum())
    violations = int((keep & (torch.isinf(fwd) | torch.isinf(rev))).sum())
    if reduction == "mean":
        denom = max(n, 1)
        fwd_r, rev_r = fwd.sum() / denom, rev.sum() / denom
    elif reduction == "sum":
        fwd_r, rev_r = fwd.sum(-1), rev.sum(-1)
    else:
        fwd_r, rev_r = fwd, rev
    return CategoricalKLResult(
        forward=fwd_r, reverse=rev_r, entropy_reference=hp, entropy_model=hq,
        support_violations=violations, n=n, nonfinite=n_bad, reduction=reduction,
    )


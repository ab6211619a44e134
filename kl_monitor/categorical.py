r"""Exact categorical KL between logits: the kernel behind ``categorical_kl``.

Both directions, both entropies and the support-mismatch figures per row, from one
exp per logit and seven row sums (see :func:`categorical_kl_rows`). Two code paths
compute the same sums:

- eager (default): chunks of rows through a preallocated work buffer. On CPU each
  worker thread runs its chunks with one intra-op thread and takes the next chunk
  from a shared queue, so no operation waits at a barrier for a thread that another
  process has descheduled (the cause of the slowdown on busy machines, see
  docs/performance.md).
- fused (``fused=True``): the per-chunk body compiled by ``torch.compile`` (Inductor:
  C++/OpenMP on CPU, Triton on CUDA), one kernel that reads each logit once from
  memory. It falls back to the eager path, with one warning, when compilation is
  unavailable or fails.

**``categorical_kl_rows``.** Inputs ``(..., K)`` are flattened to rows; outputs have
the leading shape and a float32 (float64 for float64 input) dtype. Rows with NaN or
+inf logits, or all logits −inf on either side, are flagged invalid and get zeros.

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

Support mismatch (``support=True``). With supp P = {k : logit_p,k > −inf}, the same
for Q, and the shared support S = supp P ∩ supp Q:

    reference_mass_outside = P(supp P \ S) = Σ_{k ∉ supp Q} p_k   (forward is +inf iff > 0)
    model_mass_outside     = Q(supp Q \ S) = Σ_{k ∉ supp P} q_k   (reverse is +inf iff > 0)
    forward_shared = D(P̃‖Q̃),  reverse_shared = D(Q̃‖P̃),
    with p̃_k = p_k / P(S), q̃_k = q_k / Q(S) for k ∈ S (renormalised on S).

On rows without −inf logits they equal forward/reverse and 0; with S empty the
shared KLs are ``+inf``. Only rows holding −inf logits pay for them. With
``support=True`` the result is a :class:`CategoricalRows`, which adds
``forward_shared``, ``reverse_shared``, ``reference_mass_outside`` and
``model_mass_outside`` to the five per-row tensors.

**``categorical_kl``.** The math runs in float32 (float64 for float64 input) whatever
the input dtype, on chunks of rows so the extra memory is bounded by a chunk, not by
rows × K: by default (:func:`chunk_rows_for`) a work buffer of at most
``WORK_BUDGET_BYTES`` = 64 MiB, 2^16 elements per thread on CPU. A −inf logit is
probability 0 and 0·log 0 = 0. A class with q = 0 < p makes the forward KL of that row
``+inf`` (and p = 0 < q the reverse KL); such rows are counted in
``support_violations`` — never NaN. The KLs on the shared support and the mass each
side puts outside the other's support say how large the mismatch is (formulas above,
under ``categorical_kl_rows``). In the result, the entropies ``entropy_reference``
(H(P)) and ``entropy_model`` (H(Q)) stay per row; the support-mismatch figures
``forward_shared``, ``reverse_shared``, ``reference_mass_outside`` and
``model_mass_outside`` are reduced like ``forward``.

``fused=True`` runs the same math in the ``torch.compile``-d kernel: faster per call
once compiled, but the first call compiles (seconds to tens of seconds, see
docs/performance.md); where compilation fails it falls back to eager, with one warning.

``reduction="mean"`` with no row counted (all masked or dropped) raises ``ValueError``:
the mean of zero rows is not a number this function computed, as in
``CategoricalKL.compute()``.

The support figures of the example in ``categorical_kl``'s docstring (the second row
gives class 1 probability 0 under P, 0.5 under Q):

    >>> lp = torch.tensor([[0.0, 0.0], [0.0, -float("inf")]])
    >>> out = categorical_kl(lp, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), reduction="none")
    >>> out.support_violations, out.model_mass_outside
    (1, tensor([0.0000, 0.5000]))
    >>> out.reverse_shared  # both restricted to class 0: identical there
    tensor([0.1109, 0.0000])
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import NamedTuple

import torch

from ._utils import check_floating, check_mask, check_nonfinite_mode, compute_dtype, warn_once

__all__ = [
    "CategoricalKLResult",
    "CategoricalRows",
    "categorical_kl",
    "categorical_kl_rows",
    "chunk_rows_for",
    "kept_rows",
    "WORK_BUDGET_BYTES",
]

# The work buffer of one call stays within this budget on every device: the eager
# path holds _SLOTS × chunk values per worker thread. CPU chunks are further capped at
# _CPU_CHUNK_ELEMENTS per thread (measured: larger chunks leave the core's cache and run
# slower single-threaded, smaller ones pay more per-op dispatch; docs/performance.md).
# Accelerators take the whole budget, to keep kernel launches few.
WORK_BUDGET_BYTES = 64 << 20
_CPU_CHUNK_ELEMENTS = 1 << 16
_SLOTS = 8
_INF = float("inf")


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
        forward_shared: D(P̃‖Q̃) on the shared support, reduced like ``forward``: P and Q
            restricted to S = supp P ∩ supp Q and renormalised there (formulas in the
            module docstring). Equal to ``forward`` on rows without −inf
            logits; finite unless S is empty (then ``+inf``).
        reverse_shared: D(Q̃‖P̃), reduced the same way.
        reference_mass_outside: P(supp P \\ supp Q), the reference's mass on classes the
            model forbids (what makes ``forward`` infinite), reduced like ``forward``.
        model_mass_outside: Q(supp Q \\ supp P), the model's mass on classes the
            reference forbids (what makes ``reverse`` infinite), reduced the same way.
    """

    forward: torch.Tensor
    reverse: torch.Tensor
    entropy_reference: torch.Tensor
    entropy_model: torch.Tensor
    support_violations: int
    n: int
    nonfinite: int
    reduction: str
    forward_shared: torch.Tensor
    reverse_shared: torch.Tensor
    reference_mass_outside: torch.Tensor
    model_mass_outside: torch.Tensor


class CategoricalRows(NamedTuple):
    """Per-row output of ``categorical_kl_rows(..., support=True)`` (see the module docstring)."""

    forward: torch.Tensor
    reverse: torch.Tensor
    entropy_reference: torch.Tensor
    entropy_model: torch.Tensor
    valid: torch.Tensor
    forward_shared: torch.Tensor
    reverse_shared: torch.Tensor
    reference_mass_outside: torch.Tensor
    model_mass_outside: torch.Tensor


def chunk_rows_for(
    k: int, dtype: torch.dtype, device: torch.device, workers: int = 1, fused: bool = False
) -> int:
    """Rows per chunk: the work buffer within ``WORK_BUDGET_BYTES``, CPU chunks cache-sized.

    elements = WORK_BUDGET_BYTES / (8 slots × bytes per value × workers), capped at
    2¹⁶ per worker on the eager CPU path; rows = max(1, elements // K). The fused kernel
    keeps nothing per element, so it takes the uncapped budget on every device: its
    chunks only bound what a compiler that did not fuse everything could materialise.
    """
    itemsize = torch.finfo(dtype).bits // 8
    elements = WORK_BUDGET_BYTES // (_SLOTS * itemsize * max(1, workers))
    if device.type == "cpu" and not fused:
        elements = min(elements, _CPU_CHUNK_ELEMENTS)
    return max(1, elements // k)


# --------------------------------------------------------------------------- eager path
def _views(work: torch.Tensor, r: int) -> tuple[torch.Tensor, ...]:
    # slots: d, xs, ys, ex, ey, ex − ey, ex·d, ey·d; xs, ys then become ex·xs, ey·ys
    w = work[:r]
    return (w[:, 0], w[:, 0:1], w[:, 1], w[:, 2], w[:, 1:3], w[:, 3:5], w[:, 5],
            w[:, 6:8], w[:, 1:8])


def _eager_chunk(xp: torch.Tensor, xq: torch.Tensor, out_sums: torch.Tensor,
                 out_max: torch.Tensor, v: tuple[torch.Tensor, ...]) -> None:
    """Seven row sums and two row maxima of one chunk, in the work buffer views ``v``."""
    d, d1, xs, ys, xy, exy, diff, exy_d, summed = v
    xs.copy_(xp)
    ys.copy_(xq)
    torch.amax(xy, dim=-1, out=out_max)
    xy.sub_(out_max.unsqueeze(-1))
    torch.exp(xy, out=exy)
    torch.sub(xs, ys, out=d)
    torch.sub(exy[:, 0], exy[:, 1], out=diff)
    torch.mul(exy, d1, out=exy_d)
    xy.mul_(exy)
    torch.sum(summed, dim=-1, out=out_sums)


def _in_worker_threads(fn, workers: int) -> None:
    """Run ``fn`` in ``workers`` threads, each with one intra-op thread.

    Every thread keeps working while another is descheduled: there is no barrier per
    operation. The caller's thread count, grad and inference modes carry over.
    """
    caller_threads = torch.get_num_threads()
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            torch.set_num_threads(1)
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                fn()
        except BaseException as err:  # re-raised in the caller
            errors.append(err)

    try:
        if workers <= 1:
            run()
        else:
            threads = [threading.Thread(target=run, daemon=True) for _ in range(workers)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    finally:
        torch.set_num_threads(caller_threads)  # also restores the process-wide default
    if errors:
        raise errors[0]


def _eager_sums(p2: torch.Tensor, q2: torch.Tensor, sums: torch.Tensor,
                maxes: torch.Tensor, step: int, dtype: torch.dtype) -> None:
    rows, k = p2.shape
    starts = iter(range(0, rows, step))
    lock = threading.Lock()

    def worker() -> None:
        work = torch.empty(min(step, rows), _SLOTS, k, dtype=dtype, device=p2.device)
        full = _views(work, work.shape[0])
        while True:
            with lock:
                start = next(starts, None)
            if start is None:
                return
            stop = min(start + step, rows)
            v = full if stop - start == work.shape[0] else _views(work, stop - start)
            _eager_chunk(p2[start:stop], q2[start:stop], sums[start:stop],
                         maxes[start:stop], v)

    if p2.device.type != "cpu":
        worker()
        return
    _in_worker_threads(worker, min(torch.get_num_threads(), -(-rows // step)))


# --------------------------------------------------------------------------- fused path
def _fused_body(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eager chunk's math as one expression, for ``torch.compile`` to fuse."""
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dtype), y.to(dtype)
    mx, my = x.amax(-1, keepdim=True), y.amax(-1, keepdim=True)
    xs, ys = x - mx, y - my
    ex, ey = xs.exp(), ys.exp()
    d = xs - ys
    sums = torch.stack((
        (ex * xs).sum(-1), (ey * ys).sum(-1), ex.sum(-1), ey.sum(-1),
        (ex - ey).sum(-1), (ex * d).sum(-1), (ey * d).sum(-1),
    ), -1)
    return sums, torch.cat((mx, my), -1)


_COMPILED: dict[str, object] = {}
_FUSED_FAILED: set[str] = set()


def _fused_sums(p2: torch.Tensor, q2: torch.Tensor, sums: torch.Tensor,
                maxes: torch.Tensor, step: int) -> bool:
    """The fused path; False (after one warning) where compilation is unavailable."""
    dev = p2.device.type
    if dev in _FUSED_FAILED:
        return False
    try:
        fn = _COMPILED.get(dev)
        if fn is None:
            fn = _COMPILED[dev] = torch.compile(_fused_body, dynamic=True, fullgraph=True)
        for start in range(0, p2.shape[0], step):
            s, m = fn(p2[start:start + step], q2[start:start + step])
            sums[start:start + step] = s
            maxes[start:start + step] = m
        return True
    except Exception as err:  # any compiler failure: the eager path computes the same
        _FUSED_FAILED.add(dev)
        warn_once(
            f"categorical_fused_{dev}",
            f"kl_monitor: the fused categorical KL kernel could not be compiled on {dev} "
            f"({type(err).__name__}: {str(err)[:200]}); using the eager kernel.",
        )
        return False


# --------------------------------------------------------------------------- assembly
def _kl_from_sums(sums: torch.Tensor) -> torch.Tensor:
    """(4, rows): D(P‖Q), D(Q‖P), H(P), H(Q) from the seven row sums."""
    sum_x_xs, sum_y_ys, sum_x, sum_y, sum_diff, sum_x_d, sum_y_d = sums.unbind(-1)
    gap = torch.log1p(sum_diff / sum_y)
    return torch.stack((
        sum_x_d / sum_x - gap,
        gap - sum_y_d / sum_y,
        sum_x.log() - sum_x_xs / sum_x,
        sum_y.log() - sum_y_ys / sum_y,
    ))


def _masked_stats(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype):
    """Rows holding −inf logits: (4, r) KLs and entropies with 0·log 0 = 0 and +inf on a
    support violation, and (2, r) masses of P outside supp Q and of Q outside supp P."""
    xy = torch.stack((x, y), 1).to(dtype)
    xy = xy - xy.amax(-1, keepdim=True)
    neg_inf = torch.isneginf(xy)
    e = xy.exp()
    xy = xy.masked_fill(neg_inf, 0.0)  # where a side is -inf its own exp is 0
    (xs, ys), (ex, ey) = xy.unbind(1), e.unbind(1)
    d = xs - ys
    sums = torch.stack((
        (ex * xs).sum(-1), (ey * ys).sum(-1), ex.sum(-1), ey.sum(-1),
        (ex - ey).sum(-1), (ex * d).sum(-1), (ey * d).sum(-1),
    ), -1)
    out = _kl_from_sums(sums)
    outside = torch.stack((
        (ex * neg_inf[:, 1]).sum(-1) / sums[:, 2],  # p where q = 0
        (ey * neg_inf[:, 0]).sum(-1) / sums[:, 3],  # q where p = 0
    ))
    out[:2].masked_fill_(outside > 0, _INF)  # mass where the other side has none
    return out, outside


def _redo_masked(p2, q2, idx, dtype, out, shared, outside) -> None:
    """Recompute rows ``idx`` (valid, with −inf logits) with masking, in place."""
    x, y = p2[idx], q2[idx]
    o, m = _masked_stats(x, y, dtype)
    out[:, idx] = o
    outside[:, idx] = m
    both = torch.isfinite(x) & torch.isfinite(y)
    ninf = torch.tensor(-_INF, dtype=x.dtype, device=x.device)
    o_s, _ = _masked_stats(torch.where(both, x, ninf), torch.where(both, y, ninf), dtype)
    o_s = o_s[:2].nan_to_num_(nan=_INF)  # S empty: every class is -inf on one side
    shared[:, idx] = torch.where(both.any(-1), o_s, _INF)


def _no_rows(
    lead: torch.Size, dtype: torch.dtype, dev: torch.device, support: bool
) -> tuple[torch.Tensor, ...] | CategoricalRows:
    """:func:`categorical_kl_rows` of zero rows: zeros of the leading shape, all valid."""
    zero = torch.zeros(lead, dtype=dtype, device=dev)
    res = (zero, zero.clone(), zero.clone(), zero.clone(),
           torch.ones(lead, dtype=torch.bool, device=dev))
    return CategoricalRows(*res, zero.clone(), zero.clone(), zero.clone(),
                           zero.clone()) if support else res


def categorical_kl_rows(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    *,
    chunk_rows: int | None = None,
    fused: bool = False,
    support: bool = False,
) -> tuple[torch.Tensor, ...] | CategoricalRows:
    r"""Per-row forward KL, reverse KL, H(P), H(Q) and a validity flag, chunked.

    The validation-free kernel behind ``categorical_kl`` and the metrics. With x, y the
    logits of P, Q, xs = x − max x, ys = y − max y, ex = exp(xs), ey = exp(ys), d = xs − ys
    and g = log1p(Σ(ex − ey) / Σey) (entropies, numerics, −inf logits and the support
    figures: the ``kl_monitor.categorical`` module docstring), per row:

        D(P‖Q) = Σex·d / Σex − g,   D(Q‖P) = g − Σey·d / Σey.

    Args:
        logits_p: reference logits ``(..., K)``.
        logits_q: model logits, same shape (not checked: see ``categorical_kl``).
        chunk_rows: rows per chunk (default: :func:`chunk_rows_for`).
        fused: compute the sums with the ``torch.compile``-d kernel (eager fallback).
        support: also return the support-mismatch figures.

    Returns:
        ``(forward, reverse, entropy_reference, entropy_model, valid)`` of the leading
        shape (0 on invalid rows), or with ``support=True`` a :class:`CategoricalRows`.

    Examples:
        >>> categorical_kl_rows(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 1.0]]))[0]
        tensor([0.1201])
    """
    k, lead = logits_p.shape[-1], logits_p.shape[:-1]
    p2, q2 = logits_p.detach().reshape(-1, k), logits_q.detach().reshape(-1, k)
    rows, dtype, dev = p2.shape[0], compute_dtype(logits_p), logits_p.device
    if rows == 0:
        return _no_rows(lead, dtype, dev, support)
    workers = torch.get_num_threads() if dev.type == "cpu" and not fused else 1
    step = max(1, min(rows, chunk_rows or chunk_rows_for(k, dtype, dev, workers, fused)))
    sums = torch.empty(rows, 7, dtype=dtype, device=dev)
    maxes = torch.empty(rows, 2, dtype=dtype, device=dev)
    if not (fused and _fused_sums(p2, q2, sums, maxes, step)):
        _eager_sums(p2, q2, sums, maxes, step, dtype)
    # A row is valid when both maxima are finite (NaN and +inf propagate into the max;
    # all -inf gives -inf). A valid row with NaN sums holds -inf logits (0·-inf): redo.
    valid = torch.isfinite(maxes).all(1)
    out = _kl_from_sums(sums)
    shared = out[:2].clone()
    outside = torch.zeros(2, rows, dtype=dtype, device=dev)
    redo = (torch.isnan(sums).any(1) & valid).nonzero().flatten()
    for start in range(0, redo.numel(), step):
        _redo_masked(p2, q2, redo[start:start + step], dtype, out, shared, outside)
    out = torch.where(valid, torch.cat((out, shared, outside)), 0.0)
    # KL ≥ 0 exactly; float32 rounding leaves ~1e-9 negatives on converged rows, and a
    # negative KL on a dashboard reads as a bug. The clamp moves a row by at most that.
    out[[0, 1, 4, 5]] = out[[0, 1, 4, 5]].clamp(min=0.0)
    fwd, rev, hp, hq, fwd_s, rev_s, m_p, m_q = (t.reshape(lead) for t in out)
    if support:
        return CategoricalRows(fwd, rev, hp, hq, valid.reshape(lead), fwd_s, rev_s, m_p, m_q)
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


def _check_args(logits_p, logits_q, mask, reduction, nonfinite, chunk_rows, fused) -> None:
    """The argument checks of :func:`categorical_kl`, with messages naming the argument."""
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
    if not isinstance(fused, bool):
        raise TypeError(f"`fused` must be True or False, got {fused!r}.")
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
        check_mask(mask, tuple(lead))


def categorical_kl(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    *,
    nonfinite: str = "skip",
    chunk_rows: int | None = None,
    fused: bool = False,
) -> CategoricalKLResult:
    r"""Exact D(P‖Q) and D(Q‖P) between categoricals given by logits, in one pass.

    Over the last dimension (K classes), with p = softmax(logits_p), q = softmax(logits_q):

        D(P‖Q) = Σ_k p_k (log p_k − log q_k),    D(Q‖P) = Σ_k q_k (log q_k − log p_k).

    A class with mass on one side only makes that row's KL ``+inf`` (never NaN); dtype,
    memory, ``fused`` and the support figures: the ``kl_monitor.categorical`` module docstring.

    Args:
        logits_p: reference logits, ``(..., K)``.
        logits_q: model logits, same shape.
        mask: optional bool ``(...)``; False rows (padding) are ignored.
        reduction: ``"mean"`` (per-token mean over unmasked rows), ``"sum"`` (per-sequence
            sum over the second-to-last axis, shape ``(...)`` without it) or ``"none"``
            (per row, 0 where masked).
        nonfinite: ``"skip"`` (drop rows with NaN/+inf logits, one warning) or ``"raise"``.
        chunk_rows: rows per chunk (default: :func:`chunk_rows_for`).
        fused: use the ``torch.compile``-d kernel (eager fallback, with one warning).

    Returns:
        ``CategoricalKLResult`` (``forward``, ``reverse``, entropies, support figures, counts).

    Raises:
        TypeError: non-floating logits, a non-bool mask, a non-bool ``fused``.
        ValueError: shape mismatch, empty input, bad mask shape, unknown reduction,
            ``chunk_rows`` < 1, or ``reduction="mean"`` with no row counted.

    Examples:
        >>> from kl_monitor import categorical_kl
        >>> lp = torch.tensor([[0.0, 0.0], [0.0, -float("inf")]])
        >>> out = categorical_kl(lp, torch.tensor([[0.0, 1.0], [0.0, 0.0]]), reduction="none")
        >>> out.forward, out.reverse, out.support_violations
        (tensor([0.1201, 0.6931]), tensor([0.1109,    inf]), 1)
    """
    _check_args(logits_p, logits_q, mask, reduction, nonfinite, chunk_rows, fused)
    rows = categorical_kl_rows(logits_p, logits_q, chunk_rows=chunk_rows, fused=fused,
                               support=True)
    valid = rows.valid
    # every unmasked row counts: a non-finite row without a mask must still be reported
    counted = torch.ones_like(valid) if mask is None else mask.to(valid.device)
    keep, n_bad = kept_rows(valid, counted, nonfinite)
    n = int(keep.sum())
    if n == 0 and reduction == "mean":
        raise ValueError(
            f"categorical_kl(reduction='mean'): no rows were counted ({n_bad} non-finite "
            f"rows dropped, rows where `mask` is False are not counted); the mean of zero "
            "rows is undefined. Use reduction='none' or 'sum' to get per-row zeros."
        )
    return _reduced_result(rows, keep, n, n_bad, reduction)


def _reduced_result(
    rows: CategoricalRows, keep: torch.Tensor, n: int, n_bad: int, reduction: str
) -> CategoricalKLResult:
    """:func:`categorical_kl`'s result: the ``keep`` rows of ``rows`` (others 0), reduced."""
    zero = torch.zeros((), dtype=rows.forward.dtype, device=keep.device)
    fwd, rev, hp, hq, _, *extra = (torch.where(keep, t, zero) for t in rows)
    violations = int((keep & (torch.isinf(fwd) | torch.isinf(rev))).sum())
    if reduction == "mean":
        fwd, rev, *extra = (t.sum() / n for t in (fwd, rev, *extra))
    elif reduction == "sum":
        fwd, rev, *extra = (t.sum(-1) for t in (fwd, rev, *extra))
    return CategoricalKLResult(
        forward=fwd, reverse=rev, entropy_reference=hp, entropy_model=hq,
        support_violations=violations, n=n, nonfinite=n_bad, reduction=reduction,
        forward_shared=extra[0], reverse_shared=extra[1],
        reference_mass_outside=extra[2], model_mass_outside=extra[3],
    )

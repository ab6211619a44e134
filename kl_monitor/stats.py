"""Mergeable sufficient statistics for Monte Carlo KL, and the estimates they give.

Samples x ~ A come with log a(x) and log b(x). With the log ratio ℓ = log a − log b
and the weight w = b/a = exp(−ℓ), every estimator of D(A‖B) in this package is a
function of a handful of float64 sums. They add across batches and across ranks,
so an estimate over a whole held-out set is exact however the set was split.

The control variate is stored as u = w − 1 = expm1(−ℓ) rather than as w: near
A ≈ B the interesting quantities (Var u, Cov(ℓ, u)) are tiny differences of
numbers close to 1, and ``expm1`` keeps them to full relative precision.

Cross-fitting. The optimal coefficient c = Cov(ℓ, u)/Var(u) estimated on the same
samples it is applied to biases the estimate by O(1/n). Every sample is therefore
assigned to one of two folds by a hash of its ℓ (so the assignment does not depend
on batching or on the rank that saw it); c fitted on one fold is applied to the
other. This is the default because it is unbiased on the first evaluation, needs
no history and survives any split across batches and ranks. Passing ``c`` (for
example ``previous_stats.optimal_c()``) uses a fixed coefficient instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ._utils import check_floating, check_nonfinite_mode, check_same_shape, warn_once

__all__ = ["KLEstimate", "KLStats", "IWEstimate", "pareto_tail_index", "tail_may_be_heavy"]

# Columns of the per-fold sums. ww* feed the importance-weighted reverse estimate.
_COLUMNS = ("n", "l", "ll", "u", "uu", "lu", "ww", "wwl", "wwll")
N, L, LL, U, UU, LU, WW, WWL, WWLL = range(len(_COLUMNS))
# Counters: rows dropped as non-finite, support violations (b = 0), clipped weights.
NONFINITE, SUPPORT, CLIPPED = range(3)

#: log w above this is clipped before exponentiation. Under A, E[w] = 1, so by
#: Markov P(w > e^80) < 2e-35: such a weight means a broken density, not a tail.
MAX_LOG_WEIGHT = 80.0
#: Largest log-weights kept for the tail diagnostic (merge = union, then top-k).
TOP_K = 512
#: Var(w) is infinite when the tail index ξ ≥ 0.5.
HEAVY_TAIL_THRESHOLD = 0.5
#: One-sided z for "the data show ξ < 0.5". k̂ from M tail weights has standard
#: error ≈ (1 + k̂)/√M (about 0.13 at n = 1000), and using the control variate on a
#: missed heavy tail costs far more than a missed variance reduction.
TAIL_Z = 1.5
#: ``cv`` falls back to naive when the sample mean of u = w − 1 is more than this
#: many standard errors from 0. E_A[w] = 1 is what makes u a zero-mean control
#: variate; it fails in practice when B has mass that samples of A never reach
#: (reverse KL of a model that dropped modes: mean(w) is the fraction of B's mass
#: A covers), and then any c ≠ 0 biases the estimate by c·mean(u). At 4 it also fired
#: on 0.1% of healthy batches near A ≈ B, exactly those where naive is worst
#: (benchmarks/estimators.py); a dropped mode gives z in the tens or more.
CV_MEAN_Z = 8.0
METHODS = ("naive", "k3", "cv")

# splitmix64 finaliser constants, as signed int64.
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)


def _fold_of(ell: torch.Tensor) -> torch.Tensor:
    """Pseudo-random fold (0/1) from the bits of each float64 ℓ."""
    z = ell.view(torch.int64)
    z = (z ^ (z >> 30)) * _MIX1
    z = (z ^ (z >> 27)) * _MIX2
    z = z ^ (z >> 31)
    return (z >> 17) & 1


@dataclass(frozen=True)
class KLEstimate:
    """One estimate of D(A‖B) with everything needed to judge it.

    Attributes:
        value: the estimate in nats (``+inf`` when B has zero density at a sample of A).
        stderr: its standard error from the residual variance (``inf`` when n < 2).
        n: finite samples used.
        c: control-variate coefficient actually applied, in ℓ − c·(w − 1).
        variance_reduction: per-sample variance of naive over that of the method used.
        tail_index: Pareto k̂ of the weights w = b/a; ≥ 0.5 means Var(w) = ∞
            (``nan`` when fewer than 20 samples).
        method: the method asked for.
        method_used: what was applied (``"naive"`` when ``cv`` fell back on a heavy tail).
        nonfinite: samples dropped because an input was NaN or ±inf.
        support_violations: samples where b = 0 < a (they make the value ``+inf``).
        clipped: weights clipped at exp(MAX_LOG_WEIGHT).
    """

    value: float
    stderr: float
    n: int
    c: float
    variance_reduction: float
    tail_index: float
    method: str
    method_used: str
    nonfinite: int = 0
    support_violations: int = 0
    clipped: int = 0

    def __float__(self) -> float:
        return self.value


@dataclass(frozen=True)
class IWEstimate:
    """Self-normalised importance-weighted estimate of D(B‖A) from samples of A.

    Attributes:
        value: the estimate in nats.
        stderr: delta-method standard error.
        ess: effective sample size (Σw)²/Σw²; far below n means the value is unreliable.
        n: samples of A used (support violations count: they carry weight 0).
        tail_index: Pareto k̂ of the weights (k̂ ≥ 0.7: do not trust the value).
    """

    value: float
    stderr: float
    ess: float
    n: int
    tail_index: float

    def __float__(self) -> float:
        return self.value


def _gpd_shape(x: np.ndarray) -> float:
    """Generalised Pareto shape by Zhang & Stephens (2009), with PSIS's weak prior.

    ``x`` holds positive exceedances, sorted ascending, float64. NumPy, not torch:
    these few hundred numbers live on the host, and torch's intra-op threads make
    such tiny ops hundreds of times slower on a loaded CPU.
    """
    n = x.size
    prior = 3.0
    m = 30 + int(math.sqrt(n))
    bs = 1.0 - np.sqrt(m / (np.arange(1, m + 1, dtype=np.float64) - 0.5))
    bs = bs / (prior * x[int(n / 4 + 0.5) - 1]) + 1.0 / x[-1]
    ks = np.log1p(-bs[:, None] * x).mean(axis=1)
    profile = n * (np.log(-bs / ks) - ks - 1.0)
    # exp overflows to inf for candidates far below the best: their weight is then
    # exactly 0, as intended, so the overflow is not worth a warning to the user
    with np.errstate(over="ignore"):
        weights = 1.0 / np.exp(profile[None, :] - profile[:, None]).sum(axis=1)
    b = float((bs * weights).sum())
    k = float(np.log1p(-b * x).mean())
    return (k * n + prior * 0.5) / (n + prior)


def pareto_tail_index(top_log_w: torch.Tensor, n: int) -> float:
    """Pareto k̂ (PSIS) of the weights from their largest values.

    Fits a generalised Pareto distribution to the M = min(n/5, 3√n) largest weights.
    k̂ estimates the tail index ξ: Var(w) is infinite when ξ ≥ 0.5, the mean when ξ ≥ 1.

    Args:
        top_log_w: the largest log-weights, any order (``-inf`` padding is ignored).
        n: how many weights they were taken from.

    Returns:
        k̂, or ``nan`` when n < 20 or the top weights are all equal.

    Examples:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> x = torch.randn(4000)
        >>> heavy = 3 * x**2 / 8 - math.log(2)  # w = N(x; 0, 2²)/N(x; 0, 1): ξ = 0.75
        >>> light = -x - 0.5                    # w = N(x; -1, 1)/N(x; 0, 1): lognormal
        >>> pareto_tail_index(heavy, 4000) > 0.5, pareto_tail_index(light, 4000) < 0.5
        (True, True)
    """
    top = top_log_w.detach().to("cpu", torch.float64).numpy()
    top = top[np.isfinite(top)]
    m = min(_tail_count(n), top.size - 1)
    if n < 20 or m < 5:
        return float("nan")
    top = np.sort(top)[::-1][: m + 1]
    # Exceedances over the (m+1)-th weight, divided by the largest weight (k̂ is scale-free):
    # e^(t_i − t_0) − e^(t_m − t_0) cannot overflow, however far apart the log-weights are
    # (expm1(t_i − t_m) overflowed past 709 nats and the fit returned NaN, read as "light").
    exceed = (np.exp(top[:m] - top[0]) * -np.expm1(top[m] - top[:m]))[::-1]
    # All top weights equal up to rounding (e.g. w = q/p constant on a kept mode): there
    # is no tail to fit, and a GPD fitted to rounding noise returns nonsense (k̂ ≈ 300).
    if not exceed[-1] > 1e-9:
        return float("nan")
    exceed = np.maximum(exceed, 1e-300)
    return _gpd_shape(exceed)


def _tail_count(n: int) -> int:
    """Weights in the Pareto fit: M = min(n/5, 3√n), at most TOP_K − 1."""
    if n < 0:  # not "math domain error" from the square root
        raise ValueError(f"`n` (how many weights there were) must be ≥ 0, got {n}.")
    return int(min(0.2 * n, 3.0 * math.sqrt(n), TOP_K - 1))


def tail_may_be_heavy(tail_index: float, n: int) -> bool:
    """False only when k̂ is confidently below 0.5: k̂ + TAIL_Z·(1 + k̂)/√M < 0.5.

    ``nan`` (too few samples to tell) counts as light: with fewer than 20 samples
    the regression c has no tail to be misled by, and k3-like behaviour is wanted.
    """
    if math.isnan(tail_index):
        return False
    m = max(_tail_count(n), 1)
    return tail_index + TAIL_Z * (1.0 + tail_index) / math.sqrt(m) >= HEAVY_TAIL_THRESHOLD


class KLStats:
    """Sufficient statistics of ℓ = log a − log b over samples of A, in float64.

    Holds, per cross-fitting fold, n, Σℓ, Σℓ², Σu, Σu², Σℓu (u = w − 1) and the
    weight sums Σw², Σw²ℓ, Σw²ℓ² for the importance-weighted reverse estimate; a
    bounded top-k of log w for the tail diagnostic; and counters of non-finite
    inputs, support violations and clipped weights. ``merge`` (or ``+``) of two
    statistics equals the statistics of the concatenated samples.

    Args:
        sums: ``(2, 9)`` float64 per-fold sums (zeros for an empty object).
        top_log_w: ``(TOP_K,)`` largest log-weights, ``-inf`` padded.
        counts: ``(3,)`` float64 counters (non-finite, support violations, clipped).

    Examples:
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> p, q = torch.distributions.Normal(0., 1.), torch.distributions.Normal(1., 1.)
        >>> x = p.sample((4000,))
        >>> stats = KLStats().update(p.log_prob(x[:1500]), q.log_prob(x[:1500]))
        >>> stats = stats.update(p.log_prob(x[1500:]), q.log_prob(x[1500:]))
        >>> est = stats.estimate("cv")
        >>> abs(est.value - 0.5) < 3 * est.stderr
        True
    """

    def __init__(
        self,
        sums: torch.Tensor | None = None,
        top_log_w: torch.Tensor | None = None,
        counts: torch.Tensor | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        self.sums = (
            sums if sums is not None
            else torch.zeros(2, len(_COLUMNS), dtype=torch.float64, device=device)
        )
        self.top_log_w = (
            top_log_w if top_log_w is not None
            else torch.full((TOP_K,), -math.inf, dtype=torch.float64, device=self.sums.device)
        )
        self.counts = (
            counts if counts is not None
            else torch.zeros(3, dtype=torch.float64, device=self.sums.device)
        )

    # ------------------------------------------------------------------ building
    @staticmethod
    def batch_tensors(
        log_a: torch.Tensor,
        log_b: torch.Tensor,
        nonfinite: str = "skip",
        names: tuple[str, str] = ("log_a", "log_b"),
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Statistics of one batch as ``(sums, top_log_w, counts)`` tensors.

        This is the one place samples are turned into statistics; ``update`` and the
        torchmetrics classes both add its output to their state. ``names`` are the
        caller's argument names for ``log_a`` and ``log_b``, used in error messages.
        """
        return KLStats.grouped_batch_tensors(log_a, log_b, None, 0, nonfinite, names)[:3]

    @staticmethod
    def grouped_batch_tensors(
        log_a: torch.Tensor,
        log_b: torch.Tensor,
        groups: torch.Tensor | None,
        num_groups: int,
        nonfinite: str = "skip",
        names: tuple[str, str] = ("log_a", "log_b"),
    ) -> tuple[torch.Tensor, ...]:
        """``batch_tensors`` plus per-group ``(num_groups, 2, 9)`` sums and ``(num_groups, 3)``
        counters, from one pass over the samples.

        ``groups`` holds a validated integer label in [0, num_groups) per sample (same
        number of elements as ``log_a``); with ``None`` the last two outputs are empty.
        """
        name_a, name_b = names
        check_nonfinite_mode(nonfinite)
        check_floating(name_a, log_a)
        check_floating(name_b, log_b)
        check_same_shape(name_a, log_a, name_b, log_b)
        if log_a.numel() == 0:
            raise ValueError(
                f"`{name_a}` and `{name_b}` are empty (shape {tuple(log_a.shape)}); "
                "expected at least one sample."
            )
        a = log_a.detach().reshape(-1).to(torch.float64)
        b = log_b.detach().reshape(-1).to(torch.float64)
        # b = 0 at a sample of A is a real support violation: D(A‖B) = +inf.
        support = torch.isfinite(a) & (b == -math.inf)
        valid = torch.isfinite(a) & torch.isfinite(b)
        bad = ~(valid | support)
        n_bad = int(bad.sum())
        if n_bad:
            if nonfinite == "raise":
                raise ValueError(
                    f"{n_bad} of {a.numel()} samples have NaN or infinite log-densities "
                    f"(`{name_a}` must be finite; `{name_b}` may be -inf only for a support "
                    "violation). Pass nonfinite='skip' to drop them."
                )
            warn_once(
                "mc_kl_nonfinite",
                "kl_monitor: samples with NaN or infinite log-densities were dropped "
                "(counted in `nonfinite`). This warning is shown once.",
            )
        ell = a[valid] - b[valid]
        log_w = -ell
        clipped = log_w > MAX_LOG_WEIGHT
        log_w = log_w.clamp(max=MAX_LOG_WEIGHT)
        u = torch.expm1(log_w)
        w2 = torch.exp(2.0 * log_w)
        ones = torch.ones_like(ell)
        feats = torch.stack(
            (ones, ell, ell * ell, u, u * u, ell * u, w2, w2 * ell, w2 * ell * ell), dim=-1
        )
        fold = _fold_of(ell)
        sums = torch.zeros(2, len(_COLUMNS), dtype=torch.float64, device=a.device)
        sums.index_add_(0, fold, feats)
        top = torch.full((TOP_K,), -math.inf, dtype=torch.float64, device=a.device)
        k = min(TOP_K, ell.numel())
        if k:
            top[:k] = torch.topk(-ell, k).values
        counts = torch.stack(
            (bad.sum(), support.sum(), clipped.sum())
        ).to(torch.float64)
        g = max(num_groups, 0)
        group_sums = torch.zeros(g, 2, len(_COLUMNS), dtype=torch.float64, device=a.device)
        group_counts = torch.zeros(g, 3, dtype=torch.float64, device=a.device)
        if groups is not None:
            labels = groups.reshape(-1).to(device=a.device, dtype=torch.long)
            kept = labels[valid]
            group_sums.view(2 * g, -1).index_add_(0, 2 * kept + fold, feats)
            clipped_all = torch.zeros_like(bad)
            clipped_all[valid] = clipped
            flags = torch.stack((bad, support, clipped_all), dim=-1).to(torch.float64)
            group_counts.index_add_(0, labels, flags)
        return sums, top, counts, group_sums, group_counts

    @staticmethod
    def merge_top(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Union of two top-k buffers, then top-k."""
        return torch.topk(torch.cat((a, b)), TOP_K).values

    def update(self, log_a: torch.Tensor, log_b: torch.Tensor, nonfinite: str = "skip") -> KLStats:
        """Add samples x ~ A given log a(x) and log b(x); returns ``self``."""
        sums, top, counts = self.batch_tensors(log_a, log_b, nonfinite)
        self.sums = self.sums.to(sums.device) + sums
        self.top_log_w = self.merge_top(self.top_log_w.to(top.device), top)
        self.counts = self.counts.to(counts.device) + counts
        return self

    def merge(self, other: KLStats) -> KLStats:
        """Statistics of both sample sets together (neither input is changed)."""
        dev = self.sums.device
        return KLStats(
            self.sums + other.sums.to(dev),
            self.merge_top(self.top_log_w, other.top_log_w.to(dev)),
            self.counts + other.counts.to(dev),
        )

    __add__ = merge

    # ------------------------------------------------------------------ reading
    @property
    def n(self) -> int:
        return int(self.sums[:, N].sum())

    def _host(self) -> tuple[torch.Tensor, list[float]]:
        return self.sums.detach().to("cpu", torch.float64), self.counts.detach().cpu().tolist()

    def tail_index(self) -> float:
        """Pareto k̂ of the weights w = b/a (see ``pareto_tail_index``)."""
        return pareto_tail_index(self.top_log_w, self.n)

    def optimal_c(self) -> float:
        """Regression coefficient Cov(ℓ, u)/Var(u) over all samples (0 if undefined).

        Use it as the fixed ``c`` of a *later* estimate to get an unbiased control variate
        from previous statistics.
        """
        return _regression_c(self._host()[0].sum(0))

    def estimate(self, method: str = "cv", c: float | None = None) -> KLEstimate:
        """Estimate D(A‖B) from the statistics.

        Per-sample terms (mean over samples, standard error from their variance):

        - ``naive`` (k1): ℓ
        - ``k3``: ℓ + (w − 1)
        - ``cv``: ℓ − c·(w − 1). With ``c=None``, c = Cov(ℓ, w)/Var(w) is cross-fitted
          (fitted on one fold, applied to the other), and the method falls back to
          ``naive`` unless the weights' tail index k̂ is confidently below 0.5
          (``tail_may_be_heavy``): above it Var(w) is infinite and any w-based
          interval is meaningless. It also falls back when mean(w − 1) is more than
          ``CV_MEAN_Z`` standard errors from 0: E_A[w] = 1 fails in practice when B has
          mass the samples of A never reach (reverse KL after mode dropping), and the
          control variate would then bias the estimate.

        Args:
            method: ``"naive"``, ``"k3"`` or ``"cv"``.
            c: fixed coefficient for ``cv`` (disables cross-fitting and the fallback).

        Raises:
            ValueError: unknown method, or no usable samples.
        """
        if method not in METHODS:
            raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
        if c is not None and method != "cv":
            raise ValueError(f"`c` is only used by method='cv', got method={method!r}.")
        sums, counts = self._host()
        total = sums.sum(0)
        n = int(total[N])
        nonfinite, support, clipped = (int(v) for v in counts)
        if n == 0 and support == 0:
            raise ValueError(
                f"no finite samples to estimate from ({nonfinite} non-finite samples dropped)."
            )
        if clipped:
            warn_once(
                "kl_clipped",
                f"kl_monitor: {clipped} weights w = b/a exceeded exp({MAX_LOG_WEIGHT:g}) and "
                "were clipped; check that both log-densities are normalised.",
            )
        tail = self.tail_index()
        common = dict(
            n=n, tail_index=tail, method=method,
            nonfinite=nonfinite, support_violations=support, clipped=clipped,
        )
        if support:
            return KLEstimate(
                value=math.inf, stderr=math.inf, c=0.0, variance_reduction=1.0,
                method_used=method, **common,
            )
        var_naive = _residual_var(total, 0.0)
        fallback = method == "cv" and c is None and (
            tail_may_be_heavy(tail, n) or not _control_mean_plausible(total)
        )
        if method == "naive" or fallback:
            used, c_used, mean, var = "naive", 0.0, float(total[L]) / n, var_naive
        elif method == "k3":
            used, c_used = "k3", -1.0
            mean, var = _residual_mean(total, c_used), _residual_var(total, c_used)
        elif c is not None:
            used, c_used = "cv", float(c)
            mean, var = _residual_mean(total, c_used), _residual_var(total, c_used)
        else:
            used = "cv"
            c_fold = [_regression_c(sums[f]) for f in (0, 1)]
            # fold f is corrected with the coefficient fitted on the other fold
            r = [_residual_sums(sums[f], c_fold[1 - f]) for f in (0, 1)]
            s1, s2 = r[0][0] + r[1][0], r[0][1] + r[1][1]
            mean = s1 / n
            var = max(s2 - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.inf
            c_used = (sums[0, N].item() * c_fold[0] + sums[1, N].item() * c_fold[1]) / n
        stderr = math.sqrt(var / n) if n > 1 else math.inf
        if n < 2:
            reduction = 1.0  # both variances are undefined (inf / inf)
        elif var > 0:
            reduction = var_naive / var
        else:
            reduction = math.inf if var_naive > 0 else 1.0
        return KLEstimate(
            value=mean, stderr=stderr, c=c_used, variance_reduction=reduction,
            method_used=used, **common,
        )

    def importance_weighted_reverse(self) -> IWEstimate:
        """Self-normalised estimate of D(B‖A) = E_A[w log w] from the same samples of A.

        With w = b/a and w̃ = w / mean(w), the estimate is mean(w̃ log w̃); the standard
        error is from the delta method. Support violations (b = 0) enter as w = 0.
        Check ``ess`` and ``tail_index``: its variance can be enormous.
        """
        sums, counts = self._host()
        t = sums.sum(0)
        n = int(t[N]) + int(counts[SUPPORT])
        if n == 0:
            raise ValueError("no finite samples to estimate from.")
        sum_w = float(t[N] + t[U])
        if sum_w <= 0:
            return IWEstimate(math.inf, math.inf, 0.0, n, self.tail_index())
        b = sum_w / n
        a = -float(t[L] + t[LU]) / n  # mean of w·log w
        value = a / b - math.log(b)
        alpha, beta = 1.0 / b, -(a / b**2 + 1.0 / b)
        second = (
            alpha**2 * float(t[WWLL]) - 2 * alpha * beta * float(t[WWL]) + beta**2 * float(t[WW])
        ) / n
        var = max(second - (alpha * a + beta * b) ** 2, 0.0) * n / max(n - 1, 1)
        stderr = math.sqrt(var / n) if n > 1 else math.inf
        ess = sum_w**2 / float(t[WW]) if float(t[WW]) > 0 else 0.0
        return IWEstimate(value, stderr, ess, n, self.tail_index())

    def __repr__(self) -> str:
        return f"KLStats(n={self.n}, counts={self.counts.tolist()})"


def _central(t: torch.Tensor) -> tuple[float, float, float, float]:
    """n·Var(ℓ), n·Var(u), n·Cov(ℓ, u) (biased, from raw sums) and n."""
    n = float(t[N])
    if n == 0:
        return 0.0, 0.0, 0.0, 0.0
    sl, su = float(t[L]), float(t[U])
    sll = max(float(t[LL]) - sl * sl / n, 0.0)
    suu = max(float(t[UU]) - su * su / n, 0.0)
    slu = float(t[LU]) - sl * su / n
    return sll, suu, slu, n


def _regression_c(t: torch.Tensor) -> float:
    sll, suu, slu, n = _central(t)
    # suu is Σu² − (Σu)²/n: below ~1e-9 of Σu² it is rounding noise of a constant u
    # (Var(u) = 0, c undefined), and slu/suu would be an arbitrary number.
    if n < 3 or suu <= _CANCELLATION * float(t[UU]):
        return 0.0
    return slu / suu


_CANCELLATION = 1e-9


def _control_mean_plausible(t: torch.Tensor) -> bool:
    """Is mean(u) within CV_MEAN_Z standard errors of 0, as E_A[w] = 1 requires?"""
    _, suu, _, n = _central(t)
    if n < 2:
        return True
    mean_u = float(t[U]) / n
    return abs(mean_u) <= CV_MEAN_Z * math.sqrt(suu / (n - 1) / n)


def _residual_mean(t: torch.Tensor, c: float) -> float:
    return (float(t[L]) - c * float(t[U])) / float(t[N])


def _residual_var(t: torch.Tensor, c: float) -> float:
    """Unbiased sample variance of ℓ − c·u."""
    sll, suu, slu, n = _central(t)
    if n < 2:
        return math.inf
    return max(sll - 2 * c * slu + c * c * suu, 0.0) / (n - 1)


def _residual_sums(t: torch.Tensor, c: float) -> tuple[float, float]:
    """Σr and Σr² of r = ℓ − c·u over the samples summarised by ``t``."""
    s1 = float(t[L]) - c * float(t[U])
    s2 = float(t[LL]) - 2 * c * float(t[LU]) + c * c * float(t[UU])
    return s1, s2

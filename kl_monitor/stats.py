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

__all__ = [
    "COLUMNS", "COUNTERS", "KLEstimate", "KLStats", "IWEstimate", "control_variate_estimate",
    "pareto_tail_index", "sample_features", "tail_may_be_heavy",
]

#: Columns of the per-fold sums, by name; widths and indices derive from this tuple.
#: ``n`` counts samples; ``l``/``ll`` are Σℓ, Σℓ²; ``u``/``uu``/``lu`` are Σu, Σu², Σℓu
#: (u = w − 1); ``ww``/``wwl``/``wwll`` are Σw², Σw²ℓ, Σw²ℓ² for the importance-weighted
#: reverse estimate.
#: ``sss``/``ssu``/``suu``/``uuu`` are third moments in s = ℓ + u (the k3 term, accurate
#: near A ≈ B where ℓ and u cancel) and u: they give the skewness of ℓ − c·u for any c.
COLUMNS = ("n", "l", "ll", "u", "uu", "lu", "ww", "wwl", "wwll", "sss", "ssu", "suu", "uuu")
NCOL = len(COLUMNS)
COL = {name: i for i, name in enumerate(COLUMNS)}
N, L, LL, U, UU, LU, WW, WWL, WWLL, SSS, SSU, SUU, UUU = (COL[name] for name in COLUMNS)
_COLUMNS = COLUMNS  # the name other modules imported before COLUMNS was public
#: Counters: rows dropped as non-finite, support violations (b = 0), clipped weights.
COUNTERS = ("nonfinite", "support", "clipped")
NCOUNT = len(COUNTERS)
NONFINITE, SUPPORT, CLIPPED = (COUNTERS.index(name) for name in COUNTERS)

#: log w above this is clipped before exponentiation. Under A, E[w] = 1, so by
#: Markov P(w > e^80) < 2e-35: such a weight means a broken density, not a tail.
MAX_LOG_WEIGHT = 80.0
#: Largest log-weights kept for the tail diagnostic (merge = union, then top-k).
TOP_K = 512
#: Var(w) is infinite when the tail index ξ ≥ 0.5.
HEAVY_TAIL_THRESHOLD = 0.5
#: One-sided z for "the data show ξ < 0.5" (``tail_may_be_heavy``). k̂ from M tail
#: weights has standard error ≈ (1 + k̂)/√M (about 0.13 at n = 1000).
TAIL_Z = 1.5
#: The default ``cv`` applies the control variate with a weight λ ∈ [0, 1], the product
#: of four smooth factors computed on the *other* cross-fitting fold
#: (``control_variate_gates``). Each is 1 only where the control variate's interval can
#: be trusted and falls smoothly to 0 elsewhere, and a λ strictly between 0 and 1 widens
#: the interval to that of the naive/control-variate mixture. The thresholds below were
#: chosen on benchmarks/validation.py (see docs/estimators.md for which rows).
#:
#: Gain: λ rises from 0 to 1 as the variance reduction R̂ = 1/(1 − ρ̂²) (ρ̂: correlation
#: of ℓ and w) goes from CV_NONE to CV_FULL. Near A ≈ B, R̂ is 10–400.
CV_NONE = 4.0
CV_FULL = 16.0
#: Skewness: λ falls from 1 to 0 as the coverage shortfall that the skewness of ℓ or of
#: the residual predicts for an interval of n samples goes from CV_SKEW_ON to CV_SKEW_OFF.
CV_SKEW_ON = 0.004
CV_SKEW_OFF = 0.012
#: Tail: λ falls from 1 to 0 as the upper bound k̂ + TAIL_Z·(1 + k̂)/√M of the weights'
#: tail index goes from CV_TAIL_ON to CV_TAIL_OFF (Var(w) = ∞ above ξ = 0.5, and the
#: residual's skewness is infinite above ξ = 1/3).
CV_TAIL_ON = 0.3
CV_TAIL_OFF = 0.5
#: Mean: E_A[w] = 1 is what makes u = w − 1 a zero-mean control variate. It fails when B
#: has mass that samples of A never reach (reverse KL after mode dropping: mean(w) is
#: the fraction of B's mass A covers), when b is not normalised, and in effect when the
#: sample has not yet met the heavy tail of w. λ falls from 1 to 0 as |z| of mean(u)
#: goes from CV_MEAN_Z_LOW to CV_MEAN_Z.
CV_MEAN_Z_LOW = 3.0
CV_MEAN_Z = 5.0
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
        method_used: what was applied: ``"naive"`` when the default ``cv`` gave the
            control variate weight 0 (``cv_weight == 0``), else the method asked for.
        nonfinite: samples dropped because an input was NaN or ±inf.
        support_violations: samples where b = 0 < a (they make the value ``+inf``).
        clipped: weights clipped at exp(MAX_LOG_WEIGHT).
        cv_weight: mean weight λ ∈ [0, 1] the default ``cv`` gave the control variate
            (0: the value is naive's; 1: the full cross-fitted control variate). 1 for a
            fixed ``c``, 0 for ``naive`` and ``k3``.
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
    cv_weight: float = 0.0

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
        tail_index: Pareto k̂ of the weights.
        reliable: whether the interval value ± 1.96·stderr can be trusted
            (``iw_reliability``); when ``False`` treat the value as a rough indication.
        reason: why it is not reliable (empty when it is).
        mean_weight_z: standard errors between mean(w) and its known value 1.
    """

    value: float
    stderr: float
    ess: float
    n: int
    tail_index: float
    reliable: bool = True
    reason: str = ""
    mean_weight_z: float = 0.0

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


def tail_upper_bound(tail_index: float, n: int) -> float:
    """k̂ + TAIL_Z·(1 + k̂)/√M, a one-sided upper bound on the tail index (``nan`` stays ``nan``)."""
    m = max(_tail_count(n), 1)
    return tail_index + TAIL_Z * (1.0 + tail_index) / math.sqrt(m)


def tail_may_be_heavy(tail_index: float, n: int) -> bool:
    """False only when k̂ is confidently below 0.5: k̂ + TAIL_Z·(1 + k̂)/√M < 0.5.

    ``nan`` (too few samples to tell) counts as light: with fewer than 20 samples
    the regression c has no tail to be misled by, and k3-like behaviour is wanted.
    """
    if math.isnan(tail_index):
        return False
    m = max(_tail_count(n), 1)
    return tail_index + TAIL_Z * (1.0 + tail_index) / math.sqrt(m) >= HEAVY_TAIL_THRESHOLD


def sample_features(ell: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample terms of the sums, the fold and the clipping flag, for float64 ℓ of any shape.

    Returns ``(feats, fold, clipped)``: ``feats[..., j]`` is the term summed into column
    ``COLUMNS[j]``, ``fold`` the 0/1 cross-fitting fold (a hash of ℓ's bits, so it does not
    depend on batching), ``clipped`` whether log w was clipped at ``MAX_LOG_WEIGHT``.
    """
    log_w = -ell
    clipped = log_w > MAX_LOG_WEIGHT
    log_w = log_w.clamp(max=MAX_LOG_WEIGHT)
    u = torch.expm1(log_w)
    w2 = torch.exp(2.0 * log_w)
    terms = {
        "n": torch.ones_like(ell), "l": ell, "ll": ell * ell, "u": u, "uu": u * u,
        "lu": ell * u, "ww": w2, "wwl": w2 * ell, "wwll": w2 * ell * ell,
    }
    k3 = ell + u
    terms.update(sss=k3 * k3 * k3, ssu=k3 * k3 * u, suu=k3 * u * u, uuu=u * u * u)
    return torch.stack([terms[name] for name in COLUMNS], dim=-1), _fold_of(ell), clipped


def _finite_samples(
    log_a: torch.Tensor, log_b: torch.Tensor, nonfinite: str, names: tuple[str, str]
) -> tuple[torch.Tensor, ...]:
    """Validated float64 ``a``, ``b`` and the masks ``valid``, ``support`` (b = 0 < a) and
    ``bad`` (NaN/inf, dropped with one warning or rejected, as ``nonfinite`` says)."""
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
    return a, b, valid, support, bad


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
            else torch.zeros(2, NCOL, dtype=torch.float64, device=device)
        )
        self.top_log_w = (
            top_log_w if top_log_w is not None
            else torch.full((TOP_K,), -math.inf, dtype=torch.float64, device=self.sums.device)
        )
        self.counts = (
            counts if counts is not None
            else torch.zeros(NCOUNT, dtype=torch.float64, device=self.sums.device)
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
        a, b, valid, support, bad = _finite_samples(log_a, log_b, nonfinite, names)
        ell = a[valid] - b[valid]
        feats, fold, clipped = sample_features(ell)
        sums = torch.zeros(2, NCOL, dtype=torch.float64, device=a.device)
        sums.index_add_(0, fold, feats)
        top = torch.full((TOP_K,), -math.inf, dtype=torch.float64, device=a.device)
        k = min(TOP_K, ell.numel())
        if k:
            top[:k] = torch.topk(-ell, k).values
        counts = torch.stack(
            (bad.sum(), support.sum(), clipped.sum())
        ).to(torch.float64)
        g = max(num_groups, 0)
        group_sums = torch.zeros(g, 2, NCOL, dtype=torch.float64, device=a.device)
        group_counts = torch.zeros(g, NCOUNT, dtype=torch.float64, device=a.device)
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
        - ``cv`` with a fixed ``c``: ℓ − c·(w − 1)
        - ``cv`` (default, ``c=None``): naive minus the control variate λ·ĉ·mean(w − 1),
          with ĉ = Cov(ℓ, w)/Var(w) and the weight λ ∈ [0, 1] both taken from the *other*
          cross-fitting fold (``control_variate_estimate``). λ is 1 only where the control
          variate's gain is large and its interval can be trusted (light-tailed weights,
          a residual whose skewness the sample size absorbs, mean(w) ≈ 1), falls smoothly
          to 0 otherwise, and the estimate is then naive's. ``cv_weight`` reports mean λ.

        Args:
            method: ``"naive"``, ``"k3"`` or ``"cv"``.
            c: fixed coefficient for ``cv`` (no cross-fitting, no weighting: λ = 1).

        Raises:
            ValueError: unknown method, or no usable samples.
        """
        _check_method(method, c)
        sums, counts = self._host()
        total = sums.sum(0)
        n = int(total[N])
        nonfinite, support, clipped = _checked_counts(n, counts)
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
        weight = 1.0
        if method == "cv" and c is None:
            upper = torch.tensor(tail_upper_bound(tail, n), dtype=torch.float64)
            out = control_variate_estimate(sums, upper)
            mean, var, c_used, weight = (float(out[k]) for k in ("value", "var", "c", "weight"))
            used = "cv" if weight > 0 else "naive"
        else:
            used, c_used = method, {"naive": 0.0, "k3": -1.0}.get(method, c)
            c_used = float(c_used)
            mean, var = _residual_mean(total, c_used), _residual_var(total, c_used)
        return KLEstimate(
            value=mean, stderr=math.sqrt(var / n) if n > 1 else math.inf, c=c_used,
            variance_reduction=_reduction(var_naive, var, n), method_used=used,
            cv_weight=weight if method == "cv" else 0.0, **common,
        )

    def importance_weighted_reverse(self) -> IWEstimate:
        """Self-normalised estimate of D(B‖A) = E_A[w log w] from the same samples of A.

        With w = b/a and w̃ = w / mean(w), the estimate is mean(w̃ log w̃); the standard
        error is from the delta method. Support violations (b = 0) enter as w = 0.
        ``reliable`` is ``False`` (with a ``reason``) unless mean(w) is within
        ``IW_MEAN_Z`` standard errors of 1, the weights' tail is confidently light, the
        effective sample size is at least ``IW_MIN_ESS_FRACTION`` of n and the log ratio is
        not too skewed for n (``iw_reliability``).
        """
        sums, counts = self._host()
        t = sums.sum(0)
        support = torch.tensor(counts[SUPPORT], dtype=torch.float64)
        n = int(t[N]) + int(counts[SUPPORT])
        if n == 0:
            raise ValueError("no finite samples to estimate from.")
        out = importance_weighted_from_sums(t, support)
        tail = self.tail_index()
        value, stderr, ess, z, short = (
            float(out[k]) for k in ("value", "stderr", "ess", "z_mean_w", "shortfall")
        )
        reliable, reason = iw_reliability(ess, n, tail, z, short)
        return IWEstimate(value, stderr, ess, n, tail, reliable, reason, z)

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


def _check_method(method: str, c: float | None) -> None:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if c is not None and method != "cv":
        raise ValueError(f"`c` is only used by method='cv', got method={method!r}.")


def _checked_counts(n: int, counts: list[float]) -> tuple[int, int, int]:
    """The counters as ints; raises when nothing is usable, warns once on clipping."""
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
    return nonfinite, support, clipped


def _reduction(var_naive: float, var: float, n: int) -> float:
    """Per-sample variance of naive over that of the method used."""
    if n < 2:
        return 1.0  # both variances are undefined (inf / inf)
    if var > 0:
        return var_naive / var
    return math.inf if var_naive > 0 else 1.0


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


def _smoothstep(t: torch.Tensor) -> torch.Tensor:
    t = t.clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _safe_div(
    num: torch.Tensor, den: torch.Tensor, ok: torch.Tensor, fill: float = 0.0
) -> torch.Tensor:
    """num/den where ``ok``, ``fill`` elsewhere, without 0/0 in the unused branch."""
    return torch.where(ok, num / den.where(ok, torch.ones_like(den)), torch.full_like(num, fill))


def _skew2(sums: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared skewness of r = s − b·u (s = ℓ + u), i.e. of ℓ − c·u with c = b − 1."""
    n = sums[..., N].clamp(min=1.0)
    su = sums[..., U]
    r1 = (sums[..., L] + su - b * su) / n
    ss = sums[..., LL] + 2 * sums[..., LU] + sums[..., UU]
    r2 = (ss - 2 * b * (sums[..., LU] + sums[..., UU]) + b * b * sums[..., UU]) / n
    r3 = (sums[..., SSS] - 3 * b * sums[..., SSU] + 3 * b * b * sums[..., SUU]
          - b**3 * sums[..., UUU]) / n
    m2 = (r2 - r1 * r1).clamp(min=0.0)
    m3 = r3 - 3 * r1 * r2 + 2 * r1**3
    return _safe_div(m3 * m3, m2**3, m2 > 0)


def _fold_moments(sums: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per fold: centred sums, regression c, ρ², z of mean(u) and skewness², batched."""
    n = sums[..., N]
    safe = n.clamp(min=1.0)
    sl, su = sums[..., L], sums[..., U]
    sll = (sums[..., LL] - sl * sl / safe).clamp(min=0.0)
    suu = (sums[..., UU] - su * su / safe).clamp(min=0.0)
    slu = sums[..., LU] - sl * su / safe
    # suu below ~1e-9 of Σu² is rounding noise of a constant u: c is undefined there
    ok = (n >= 3) & (suu > _CANCELLATION * sums[..., UU]) & (sll > 0)
    c = _safe_div(slu, suu, ok)
    rho2 = _safe_div(slu * slu, sll * suu, ok).clamp(0.0, 1.0)
    se_u = (suu / (safe - 1.0).clamp(min=1.0) / safe).sqrt()
    z = _safe_div(su / safe, se_u, se_u > 0, math.inf)
    skew2 = torch.maximum(_skew2(sums, 1.0 + c), _skew2(sums, torch.ones_like(c)))
    return {"n": n, "sll": sll, "suu": suu, "slu": slu, "c": c, "rho2": rho2, "z": z,
            "skew2": skew2}


def _ramp_down(x: torch.Tensor, on: float, off: float) -> torch.Tensor:
    """1 for x ≤ on, 0 for x ≥ off, smooth (C¹) in between; ``nan`` gives 1."""
    return torch.nan_to_num(1.0 - _smoothstep((x - on) / (off - on)), nan=1.0)


def control_variate_gates(m: dict[str, torch.Tensor], n: torch.Tensor,
                          tail_upper: torch.Tensor) -> dict[str, torch.Tensor]:
    """The factors of λ, each in [0, 1], per fold, from that fold's moments ``m``.

    - ``gain``: rises from 0 to 1 (smoothly in log R̂) as R̂ = 1/(1 − ρ̂²) goes from
      ``CV_NONE`` to ``CV_FULL``;
    - ``mean``: falls from 1 to 0 as |z| of mean(u) goes from ``CV_MEAN_Z_LOW`` to ``CV_MEAN_Z``;
    - ``skew``: falls from 1 to 0 as the coverage shortfall predicted for an interval of
      the total n, 0.229·(1.08·γ² + 1.71)/n (one-term Edgeworth expansion of the
      studentised mean, kurtosis term dropped), goes from ``CV_SKEW_ON`` to ``CV_SKEW_OFF``;
      γ² is the larger squared skewness of ℓ and of the residual ℓ − c·u;
    - ``tail``: falls from 1 to 0 as k̂'s upper bound goes from ``CV_TAIL_ON`` to ``CV_TAIL_OFF``.
    """
    span = math.log(CV_FULL) - math.log(CV_NONE)
    log_r = -torch.log1p(-m["rho2"].clamp(max=1.0 - 1e-15))
    shortfall = 0.229 * (1.08 * m["skew2"] + 1.71) / n.clamp(min=1.0).unsqueeze(-1)
    return {
        "gain": _smoothstep((log_r - math.log(CV_NONE)) / span),
        "mean": _ramp_down(m["z"].abs(), CV_MEAN_Z_LOW, CV_MEAN_Z),
        "skew": _ramp_down(shortfall, CV_SKEW_ON, CV_SKEW_OFF),
        "tail": _ramp_down(tail_upper, CV_TAIL_ON, CV_TAIL_OFF).unsqueeze(-1).expand_as(log_r),
    }


def _pooled_var(sums: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Sample variance of r = ℓ − a_f·u over both folds (a: per-fold coefficients)."""
    n = sums[..., N].sum(-1)
    s1 = (sums[..., L] - a * sums[..., U]).sum(-1)
    s2 = (sums[..., LL] - 2 * a * sums[..., LU] + a * a * sums[..., UU]).sum(-1)
    return (s2 - s1 * s1 / n.clamp(min=1.0)).clamp(min=0.0) / (n - 1.0).clamp(min=1.0)


def control_variate_estimate(
    sums: torch.Tensor, tail_upper: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The default ``cv`` estimate from ``(..., 2, NCOL)`` per-fold sums, batched over ``...``.

    Fold f is corrected with a_f = λ·ĉ, both fitted on the *other* fold only:
    ĉ = Cov(ℓ, u)/Var(u) and λ = gain·mean·skew·tail (``control_variate_gates``). Because
    a_f never sees the samples it corrects, E[a_f·mean(u_f)] = 0 whenever E_A[w] = 1, so
    the estimate is unbiased; λ moves it smoothly from naive (λ = 0) to the full
    cross-fitted control variate (λ = 1), never by a jump.

        value = Σ_f (Σ_f ℓ − a_f·Σ_f u) / n,
        stderr² = Var(ℓ − a_f·u)/n + Σ_f (n_f/n)²·ū_f²·λ_f²·Var(ĉ of the other fold)

    ``tail_upper`` is ``tail_upper_bound(k̂, n)`` of the whole sample (``...`` shaped).

    Returns:
        Tensors over ``...``: ``value``, ``var`` (per-sample, so stderr = √(var/n)),
        ``var_naive``, ``c`` (mean applied coefficient), ``weight`` (mean λ), ``n``, and
        ``gate_<name>``: the mean of each factor of λ.
    """
    m = _fold_moments(sums)
    other = [1, 0]  # fold f uses the other fold's decision and coefficient
    n_f = sums[..., N]
    n = n_f.sum(-1)
    safe = n.clamp(min=1.0)
    gates = {k: g[..., other] for k, g in control_variate_gates(m, n, tail_upper).items()}
    lam = gates["gain"] * gates["mean"] * gates["skew"] * gates["tail"]
    m_o = {k: v[..., other] for k, v in m.items()}
    a = lam * m_o["c"]
    s1 = (sums[..., L] - a * sums[..., U]).sum(-1)
    var = _pooled_var(sums, a)
    var_naive = _pooled_var(sums, torch.zeros_like(a))
    weight = (n_f * lam).sum(-1) / safe
    # Between naive (λ = 0) and the full control variate (λ = 1) the weight is a guess:
    # report the variance of the two-model mixture, (1 − λ)·V0 + λ·V1 + λ(1 − λ)·n·(m0 − m1)²,
    # so that an uncertain decision widens the interval instead of trusting either side.
    a1 = m_o["c"]
    full = (sums[..., L] - a1 * sums[..., U]).sum(-1) / safe
    gap = n * (sums[..., L].sum(-1) / safe - full) ** 2
    var_full = _pooled_var(sums, a1)
    mixture = (1 - weight) * var_naive + weight * var_full + weight * (1 - weight) * gap
    var = torch.maximum(var, mixture)
    # Var(ĉ) of the other fold's regression times this fold's mean(u)²: the part of the
    # error the residual variance misses (O(1/n²) unless mean(u) is far from 0).
    resid_o = (m_o["sll"] - m_o["c"] * m_o["slu"]).clamp(min=0.0) / (m_o["n"] - 2.0).clamp(min=1.0)
    var_c = _safe_div(resid_o, m_o["suu"], m_o["suu"] > 0)
    mean_u = sums[..., U] / n_f.clamp(min=1.0)
    var = var + n * ((n_f / safe.unsqueeze(-1)) ** 2 * mean_u**2 * lam * lam * var_c).sum(-1)
    inf = torch.full_like(var, math.inf)
    out = {
        "value": s1 / safe, "var": torch.where(n > 1, var, inf),
        "var_naive": torch.where(n > 1, var_naive, inf),
        "c": (n_f * a).sum(-1) / safe, "weight": weight, "n": n,
    }
    out.update({f"gate_{k}": (n_f * g).sum(-1) / safe for k, g in gates.items()})
    return out


def importance_weighted_from_sums(
    t: torch.Tensor, support: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Self-normalised D(B‖A) from ``(..., NCOL)`` total sums, batched over ``...``.

    ``support`` counts samples with b = 0 (weight 0). Returns ``value``, ``stderr``
    (delta method), ``ess`` = (Σw)²/Σw², ``n``, ``z_mean_w``: how many standard errors
    mean(w) is from its known value 1 (negative when the sample has not reached all of
    B's mass, which is how a tail the sample lacks shows), and ``shortfall``: the
    coverage shortfall predicted from the skewness of ℓ and of ℓ + w − 1.
    """
    n = t[..., N] + support
    safe = n.clamp(min=1.0)
    sum_w = t[..., N] + t[..., U]
    b = sum_w / safe
    a = -(t[..., L] + t[..., LU]) / safe  # mean of w·log w
    pos = b > 0
    b_safe = b.where(pos, torch.ones_like(b))
    value = torch.where(pos, a / b_safe - torch.log(b_safe), torch.full_like(b, math.inf))
    alpha, beta = 1.0 / b_safe, -(a / b_safe**2 + 1.0 / b_safe)
    second = alpha**2 * t[..., WWLL] - 2 * alpha * beta * t[..., WWL] + beta**2 * t[..., WW]
    second = second / safe
    var = (second - (alpha * a + beta * b) ** 2).clamp(min=0.0) * safe / (n - 1.0).clamp(min=1.0)
    stderr = torch.where(pos & (n > 1), (var / safe).sqrt(), torch.full_like(b, math.inf))
    ww = t[..., WW]
    ess = _safe_div(sum_w**2, ww, ww > 0)
    var_w = (ww - sum_w**2 / safe).clamp(min=0.0) / (n - 1.0).clamp(min=1.0)
    se_w = (var_w / safe).sqrt()
    z = torch.where(se_w > 0, (b - 1.0) / se_w.where(se_w > 0, torch.ones_like(se_w)),
                    torch.where(b == 1.0, torch.zeros_like(b), torch.full_like(b, -math.inf)))
    skew2 = torch.maximum(_skew2(t, torch.zeros_like(b)), _skew2(t, torch.ones_like(b)))
    shortfall = 0.229 * (1.08 * skew2 + 1.71) / safe
    return {"value": value, "stderr": stderr, "ess": ess, "n": n, "z_mean_w": z,
            "shortfall": shortfall}


#: The importance-weighted reverse estimate is flagged unreliable unless its effective
#: sample size is at least this fraction of n ...
IW_MIN_ESS_FRACTION = 0.5
#: ... mean(w) is within this many standard errors of 1, k̂ is confidently below 0.5 ...
IW_MEAN_Z = 3.0
#: ... and the coverage shortfall predicted from the skewness of ℓ and of ℓ + w − 1 (near
#: A ≈ B the estimator's influence function is ≈ ℓ²/2, like k3's) is at most this.
IW_MAX_SHORTFALL = 0.01
#: Below this many samples the interval is never called reliable (measured: flagged
#: batches at n = 64 covered 0.49).
IW_MIN_N = 200


def iw_reliability(
    ess: float, n: int, tail_index: float, z_mean_w: float, shortfall: float = 0.0
) -> tuple[bool, str]:
    """Can the importance-weighted interval be trusted? ``(reliable, reason)``."""
    if n < IW_MIN_N:
        return False, f"fewer than {IW_MIN_N} samples"
    if not abs(z_mean_w) <= IW_MEAN_Z:
        return False, f"mean(w) is {z_mean_w:+.1f} standard errors from its known value 1"
    if math.isnan(tail_index):
        return False, "the weights' tail index cannot be estimated"
    if tail_may_be_heavy(tail_index, n):
        return False, f"weights may be heavy-tailed (k̂ = {tail_index:.2f})"
    if ess < IW_MIN_ESS_FRACTION * n:
        return False, f"effective sample size {ess:.0f} of {n}"
    if not shortfall <= IW_MAX_SHORTFALL:
        return False, f"the log-ratio is too skewed for n = {n} (shortfall {shortfall:.3f})"
    return True, ""

"""Change detection and alert rules for forward and reverse KL series.

Pure Python (``math`` only): no torch, no Lightning, so every rule here can be unit
tested on scripted numbers. The Lightning callback builds one ``Evaluation``
per evaluation and passes it to ``AlertRules.update``, which returns the
``Alert`` objects to act on (warn, log, call the user hook, stop training).

Training makes both KL directions fall, so nothing here thresholds raw values.
Every series (global forward, global reverse, and each group's forward and reverse
when group labels are given) feeds a one-sided upward CUSUM on its standardised
rise above a baseline (``CusumDetector``):

    z_t = (x_t − b) / σ_t,     S_t = min(h, max(0, S_{t−1} + z_t − k))

and a rise is *significant* when the uncapped ``S_{t−1} + z_t − k`` reaches ``h``
**and** the rise ``x_t − b`` is at least ``min_effect`` nats. The second condition
matters because exact categorical estimates can have a near-zero standard error;
standardised by that alone, rounding noise looks like a 50σ event once training has
converged.

What "baseline frozen after a warm-up" means here. A literal reading (estimate the
mean during the warm-up, then never move it) fails on a falling series: a rise
after convergence that is still below the warm-up level would never be seen. A
running minimum fails too, the other way: the minimum of noise keeps falling
(about σ·√(2 ln n) below the mean after n evaluations), so after a few hundred
in-control evaluations every ordinary value looks like a rise. The choices made
here:

* The first ``warmup`` finite values learn the series' own evaluation-to-evaluation
  noise τ (standard deviation of the mean-centred increments divided by √2, so a
  linear trend does not count as noise) and the starting level b (mean of the
  second half of the warm-up, which lags a falling series least). No alert can
  fire during the warm-up.
* After the warm-up, b (a running mean over the last ``memory`` = 10 × warm-up
  evaluations), τ and the typical standard error keep learning, but they are
  **frozen while evidence of a rise accumulates (0 < S < h) and for the whole
  of an episode** (from an alarm until re-arm), so a collapse can never teach the
  detector that it is normal. Values more than 3σ *and* min_effect above b are
  never learned from either (the first value of a jump comes while S = 0). They
  do learn at S = h while no alarm is open: that rise is significant but smaller
  than min_effect, and learning lets a baseline that started a little low catch
  up instead of holding the statistic at h for ever.
* The gates look at the statistic *before* the new value (and, for an increment,
  before its first value), never at the value itself. Gating on the new value
  would select low values and drag b about 1.5σ low, which then reads as a rise.
* Improvements are followed: a second, downward CUSUM (threshold ``h_fall`` = 2h)
  detects a significant fall and shortens the memory of b and τ to the warm-up
  length, so the next few values pull them down to the new level (and to its
  smaller noise: a KL estimate's noise shrinks with its level). b is not set from
  the values that triggered the fall, because they were selected for being low.
  The threshold is higher than h because a baseline lowered by chance would later
  read as a rise.
* σ_t² = max(s_t, τ′)² + max(s̄, τ′)²/n_b: the current estimate's own noise (its
  reported standard error s_t or the learned noise, whichever is larger) plus the
  uncertainty of a baseline averaged over n_b values. τ′ = τ·√(1 + 2/n) widens τ
  learned from n increments, so a noise scale from a 5-value warm-up does not
  make the next evaluations alarm-prone.
* The statistic is capped at h, so an episode's memory is bounded. The detector
  re-arms (can fire again) once S has drained to ``rearm`` (0 by default: back at
  the baseline, at least h/k evaluations after the series has returned), or after
  ``warmup`` evaluations in a row within min_effect/2 of the baseline.

With the defaults k = 0.5, h = 5, Siegmund's approximation gives an in-control
average run length ARL₀ ≈ e^{2k(h+1.166)}/(2k²) ≈ 940 evaluations between false
alarms of one detector, and ≈ 10 evaluations to detect a sustained 1σ shift. The
learned baseline and noise cost little: on simulated standard-normal series (100
seeds) this detector gives 1.9 false alarms per 2000 evaluations when the stderr
is known and 3.3 when the noise is learned alone, against 2.3 for the textbook
CUSUM with known mean and variance; it detects a 1σ shift in a median of 11
evaluations, onset included (textbook: 9). With K groups the
per-group detectors share one false-alarm budget: their threshold is
h + ln(K)/(2k), so the K of them together alarm about as rarely as one.

Kinds (DESIGN §4). Any significant rise of either direction, globally or in any
group, produces an alert; the kind is the best explanation of the evidence:

* ``"collapse"``: the model concentrates. Sharpening (reverse KL rose and the
  model's entropy is at least ``entropy_drop`` nats below the reference's), or mode
  dropping: groups whose forward KL rose are losing their model mass (``group_count``
  counts the model's rows or mass), or forward KL rose more than reverse while
  reverse rose but stayed bounded (≤ ln K, near ln(K/m) when m of K modes
  survive).
* ``"coverage_gap"``: forward KL rose (globally or in some groups) without the
  collapse signatures: the model misses part of the reference, typically
  concentrated in a few groups. An infinite forward KL (support violation) with a
  flat reverse is a coverage gap.
* ``"over_dispersion"``: reverse KL rose more than forward: mass where the
  reference has none.

Each kind fires once per episode and re-arms once every series that contributed
to it has re-armed. The alert names the groups most responsible: for collapse and
coverage gaps the groups whose forward KL rose most (weighted by their baseline
mass), for over-dispersion those whose reverse KL rose most; ``()`` without
groups.

Examples:
    >>> rules = AlertRules(warmup=3)
    >>> def ev(step, fwd, rev):
    ...     return Evaluation(step, fwd, 0.01, rev, 0.01)
    >>> [rules.update(ev(s, 1.0 / s, 0.5 / s)) for s in range(1, 9)]
    [[], [], [], [], [], [], [], []]
    >>> alerts = rules.update(ev(9, 2.5, 0.7))
    >>> [(a.kind, a.step) for a in alerts]
    [('collapse', 9)]
    >>> rules.update(ev(10, 2.6, 0.7))  # same episode: no second alert
    []
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .diagnosis import (
    ALERT_KINDS,
    Evidence,
    Reading,
    SeriesKey,
    alert_details,
    alert_message,
    classify,
    series_name,
)

__all__ = ["ALERT_KINDS", "Alert", "AlertRules", "CusumDetector", "Evaluation"]


#: Standardised values are clipped here so that +inf (a support violation) is an
#: extreme rise that still leaves every stored number finite.
Z_MAX = 1e6
#: Values above the baseline by this many standard deviations never update it,
#: even when the CUSUM was at rest: the first value of a jump must not teach the
#: detector that the jump is normal. (Truncating N(0, 1) at 3 shifts its mean by
#: only −0.004.)
Z_LEARN = 3.0
#: Scale floor relative to |baseline|, so a perfectly constant series cannot divide
#: by zero; min_effect then decides.
_REL_FLOOR = 1e-12
_STATE_VERSION = 1


def _finite(x: float) -> bool:
    return math.isfinite(x)


def _as_float(x: Any) -> float | None:
    """float(x), or None for None; tensors, numpy scalars and ints are accepted."""
    if x is None:
        return None
    try:
        return float(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"expected a real number or None, got {type(x).__name__}: {x!r}") from err


def _check_real(name: str, value: Any, *, low: float, strict: bool = False) -> float:
    """Validate a finite real config value ≥ low (> low if strict)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"`{name}` must be a real number, got {value!r}.")
    v = float(value)
    if not _finite(v) or v < low or (strict and v == low):
        op = ">" if strict else "≥"
        raise ValueError(f"`{name}` must be a finite number {op} {low:g}, got {value!r}.")
    return v


def _check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be an int ≥ {low}, got {value!r}.")
    if value < low:
        raise ValueError(f"`{name}` must be an int ≥ {low}, got {value!r}.")
    return int(value)


@dataclass(frozen=True)
class Alert:
    """One alert: what happened, when, how strongly and where.

    Attributes:
        kind: ``"collapse"``, ``"coverage_gap"`` or ``"over_dispersion"``.
        step: training step of the evaluation that fired.
        statistic: the CUSUM statistic (uncapped) of the series that drove the
            alert at this evaluation; it reached that series' threshold.
        groups: the groups most responsible, most responsible first; ``()`` when
            no group values were given or no group rose.
        message: one human sentence.
        details: the numbers behind it (levels, baselines, rises, z, per-group
            rises, shares and mass ratios, which series were significant).

    Examples:
        >>> a = Alert("coverage_gap", 10, 7.5, (3,), "coverage gap at step 10", {})
        >>> a.to_dict()["groups"]
        [3]
    """

    kind: str
    step: int
    statistic: float
    groups: tuple[int, ...]
    message: str
    details: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Normalise, so that Alert(**alert.to_dict()) == alert (also after JSON).
        object.__setattr__(self, "step", int(self.step))
        object.__setattr__(self, "statistic", float(self.statistic))
        object.__setattr__(self, "groups", tuple(int(g) for g in self.groups))

    def to_dict(self) -> dict:
        """Plain Python types (lists for tuples), for loggers and JSON.

        ``Alert(**d)`` rebuilds the alert. Infinite numbers in ``details`` (an
        infinite forward KL) stay floats; pass ``allow_nan=True`` (the default) to
        ``json.dumps`` or format them yourself.
        """
        d = asdict(self)
        d["groups"] = list(self.groups)
        return d


@dataclass(frozen=True)
class Evaluation:
    """The numbers of one evaluation; ``None`` where not available.

    Attributes:
        step: training step at which it was taken.
        forward: D(P‖Q) (``+inf`` means a support violation).
        forward_stderr: its standard error.
        reverse: D(Q‖P).
        reverse_stderr: its standard error.
        entropy_model: H(Q) in nats.
        entropy_reference: H(P) in nats.
        group_forward: per-group forward KL.
        group_reverse: per-group reverse KL.
        group_count: rows (mass) per group.

    Examples:
        >>> Evaluation(step=100, forward=0.2, forward_stderr=0.01,
        ...            reverse=0.1, reverse_stderr=0.01).forward
        0.2
    """

    step: int
    forward: float | None
    forward_stderr: float | None
    reverse: float | None
    reverse_stderr: float | None
    entropy_model: float | None = None
    entropy_reference: float | None = None
    group_forward: dict[int, float] | None = None
    group_reverse: dict[int, float] | None = None
    group_count: dict[int, float] | None = None

    @classmethod
    def from_result(cls, step: int, result: Any) -> Evaluation:
        """The detectors' view of a metric's typed result (both directions).

        ``result`` is a ``CategoricalResult`` or a ``SampledResult`` (any object with
        ``forward``/``reverse`` estimates, ``group_forward``/``group_reverse`` and
        ``group_weights()``); ``group_count`` is what ``group_weights()`` says it is:
        the reference's rows per group for logits, the model's mass for samples.
        """
        f, r = result.forward, result.reverse  # None: no rows of that source (logits)
        weights = result.group_weights()
        return cls(
            step=step, forward=f.value if f else None, forward_stderr=f.stderr if f else None,
            reverse=r.value if r else None, reverse_stderr=r.stderr if r else None,
            entropy_model=getattr(result, "entropy_model", None),
            entropy_reference=getattr(result, "entropy_reference", None),
            group_forward={g: e.value for g, e in result.group_forward.items()} or None,
            group_reverse={g: e.value for g, e in result.group_reverse.items()} or None,
            group_count=weights or None,
        )  # fmt: skip


_DETECTOR_CONFIG = ("k", "h", "warmup", "min_effect", "rearm", "h_fall", "memory")
_DETECTOR_STATE = (
    "statistic", "armed", "baseline", "noise", "_fall", "_warm", "_warm_se", "_n_base",
    "_se_ctrl", "_inc_mean", "_inc_var", "_n_inc", "_prev", "_was_in_control", "_calm",
    "n_updates",
)  # fmt: skip


def _increments(values: list[float]) -> tuple[float, float, int] | None:
    """Mean, variance and count of the increments of ``values`` (None without any)."""
    inc = [b - a for a, b in zip(values[:-1], values[1:], strict=False)]
    if len(inc) >= 2:
        m = sum(inc) / len(inc)
        return m, sum((d - m) ** 2 for d in inc) / (len(inc) - 1), len(inc)
    if inc:  # one increment: no way to separate trend from noise; count it all
        return 0.0, inc[0] ** 2, 1
    return None


def _check_version(name: str, d: Mapping[str, Any]) -> None:
    if d.get("version") != _STATE_VERSION:
        raise ValueError(
            f"unsupported {name} state version {d.get('version')!r}, expected {_STATE_VERSION}."
        )


class CusumDetector:
    """One-sided upward CUSUM on a standardised series, with a learned baseline.

    See the module docstring for the baseline, noise and re-arm rules.

    Args:
        k: allowance, in standard deviations (the CUSUM subtracts it each step);
            ≥ 0. k = δ/2 is optimal against a shift of δ standard deviations.
        h: decision threshold on the statistic, > 0.
        warmup: finite values used to learn the noise and the starting baseline
            before any alarm is possible; int ≥ 2 (one increment at least).
        min_effect: smallest rise above the baseline, in the series' units (nats),
            that may fire; ≥ 0.
        rearm: the detector re-arms after an alarm once the statistic has fallen
            to this level; 0 ≤ rearm < h.
        h_fall: threshold of the downward CUSUM that lets the baseline follow a
            significant fall; default 2h.
        memory: the baseline and the noise are running means over at most this
            many in-control values; default 10 × warmup.

    Attributes:
        statistic: the current (capped) CUSUM statistic S.
        armed: False from an alarm until recovery (the statistic drained to
            ``rearm``, or ``warmup`` evaluations in a row within min_effect/2 of the
            baseline).
        baseline: the current baseline b (None during the warm-up).
        noise: the learned evaluation-to-evaluation noise τ (None during warm-up).
        last_z: standardised rise of the latest update (None when it was skipped).
        last_effect: rise in the series' units of the latest update (None when skipped).
        last_raw: uncapped statistic of the latest update (None when skipped).
        significant: whether the latest update was a significant rise (uncapped
            statistic ≥ h and rise ≥ min_effect), fired or not.

    Examples:
        >>> det = CusumDetector(k=0.5, h=5.0, warmup=5, min_effect=0.05)
        >>> for v in [1.0, 0.8, 0.6, 0.5, 0.45, 0.42, 0.41, 0.40]:  # falling: quiet
        ...     assert det.update(v, 0.02) is None
        >>> det.statistic
        0.0
        >>> fired = [det.update(v, 0.02) for v in [1.5, 1.5, 1.5]]  # a jump
        >>> fired[0] is not None, fired[1:]  # fires once, then stays quiet
        (True, [None, None])
    """

    def __init__(
        self,
        k: float = 0.5,
        h: float = 5.0,
        warmup: int = 5,
        min_effect: float = 0.05,
        *,
        rearm: float = 0.0,
        h_fall: float | None = None,
        memory: int | None = None,
    ) -> None:
        self.k = _check_real("k", k, low=0.0)
        self.h = _check_real("h", h, low=0.0, strict=True)
        self.warmup = _check_int("warmup", warmup, low=2)
        self.min_effect = _check_real("min_effect", min_effect, low=0.0)
        self.rearm = _check_real("rearm", rearm, low=0.0)
        if self.rearm >= self.h:
            raise ValueError(f"`rearm` must be < h = {self.h:g}, got {rearm!r}.")
        self.h_fall = (
            2.0 * self.h if h_fall is None else _check_real("h_fall", h_fall, low=0.0, strict=True)
        )
        self.memory = (
            10 * self.warmup if memory is None else _check_int("memory", memory, low=self.warmup)
        )
        self._reset()

    # -- state -------------------------------------------------------------------------

    def _reset(self) -> None:
        self.statistic = 0.0  # upward CUSUM, capped at h
        self.armed = True
        self.baseline: float | None = None
        self.noise: float | None = None  # τ
        self._fall = 0.0  # downward CUSUM
        self._warm: list[float] = []
        self._warm_se: list[float] = []
        self._n_base = 0  # values in the baseline mean (≤ memory)
        self._se_ctrl = 0.0  # typical in-control standard error
        self._inc_mean = 0.0  # running mean / variance of increments (trend, 2τ²)
        self._inc_var = 0.0
        self._n_inc = 0  # increments behind _inc_var (≤ memory)
        self._prev: float | None = None  # last finite value
        self._was_in_control = True  # learning gate before the previous value
        self._calm = 0  # consecutive evaluations with a rise below min_effect / 2
        self.n_updates = 0  # values seen after the warm-up
        self._clear_last()

    def _clear_last(self) -> None:
        self.last_z: float | None = None
        self.last_effect: float | None = None
        self.last_raw: float | None = None
        self.significant = False

    @property
    def warmed_up(self) -> bool:
        return self.baseline is not None

    def state_dict(self) -> dict:
        """Everything needed to continue, as plain Python types (JSON-safe, finite)."""
        d: dict[str, Any] = {"version": _STATE_VERSION}
        d["config"] = {name: getattr(self, name) for name in _DETECTOR_CONFIG}
        for name in _DETECTOR_STATE:
            value = getattr(self, name)
            d[name.lstrip("_")] = list(value) if isinstance(value, list) else value
        return d

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore from ``state_dict``; the configuration is restored too."""
        _check_version("CusumDetector", d)
        cfg = d["config"]
        args = (cfg["k"], cfg["h"], cfg["warmup"], cfg["min_effect"])
        keywords = {name: cfg[name] for name in ("rearm", "h_fall", "memory")}
        self.__dict__.update(CusumDetector(*args, **keywords).__dict__)
        for name in _DETECTOR_STATE:
            value = d[name.lstrip("_")]
            setattr(self, name, list(value) if isinstance(value, list) else value)

    # -- the update ----------------------------------------------------------------------

    def update(self, value: float, stderr: float | None = None) -> float | None:
        """Feed one evaluation; return the statistic if this is a new alarm, else None.

        Args:
            value: the estimate (NaN is ignored; +inf is an extreme rise).
            stderr: its standard error; None, NaN or negative mean unknown, and
                +inf means the value carries no information (ignored).

        Returns:
            The uncapped statistic when a significant rise fires (once per
            episode), else None.
        """
        self._clear_last()
        v = _as_float(value)
        s = _as_float(stderr)
        if v is None or math.isnan(v) or v == -math.inf:
            return None  # no information (a KL is never −inf)
        if s is None or math.isnan(s) or s < 0:
            s = 0.0
        elif s == math.inf:
            return None
        if self.baseline is None:
            if _finite(v):  # an infinite value cannot teach a level or a noise
                self._warm.append(v)
                self._warm_se.append(s)
                if len(self._warm) >= self.warmup:
                    self._finish_warmup()
            return None
        return self._step(v, s)

    def _finish_warmup(self) -> None:
        w = self._warm
        self._learn_noise_from(w)
        half = w[-math.ceil(len(w) / 2) :]
        self.baseline = sum(half) / len(half)
        self._n_base = len(half)
        self._se_ctrl = sum(self._warm_se) / len(self._warm_se)
        self._prev = w[-1]
        self._warm, self._warm_se = [], []

    def _learn_noise_from(self, values: list[float]) -> None:
        """τ from the mean-centred increments of ``values`` (a linear trend is not noise)."""
        learned = _increments(values)
        if learned is not None:
            self._inc_mean, self._inc_var, self._n_inc = learned
            self.noise = math.sqrt(self._inc_var / 2.0)

    def _scale(self, s: float) -> float:
        assert self.baseline is not None and self.noise is not None
        # τ from n increments is uncertain (relative variance ≈ 1/(2n)); widen it so a
        # noise scale learned from a short warm-up does not make the first few
        # hundred evaluations alarm-prone.
        tau = self.noise * math.sqrt(1.0 + 2.0 / self._n_inc)
        now = max(s, tau)
        base = max(self._se_ctrl, tau)
        scale = math.hypot(now, base / math.sqrt(self._n_base))
        return max(scale, _REL_FLOOR * max(1.0, abs(self.baseline)))

    def _step(self, v: float, s: float) -> float | None:
        assert self.baseline is not None
        self.n_updates += 1
        b = self.baseline
        if v == math.inf:
            effect, z = math.inf, Z_MAX
        else:
            effect = v - b
            z = min(max(effect / self._scale(s), -Z_MAX), Z_MAX)
        # Learn unless evidence of a rise is accumulating (0 < S < h) or an episode is
        # open. At S = h while armed the rise is significant but below min_effect:
        # learning there lets a baseline that started too low catch up instead of
        # holding the statistic up for ever. The gate is judged before this value, so
        # the values learned from are not selected by their own size; increments
        # need the gate from before their first value too.
        in_control = self.armed and (self.statistic == 0.0 or self.statistic >= self.h)
        pair_in_control = self._was_in_control
        self._was_in_control = in_control
        raw = self.statistic + z - self.k
        self.statistic = min(max(raw, 0.0), self.h)
        self._fall = max(self._fall - z - self.k, 0.0)
        self.last_z, self.last_effect, self.last_raw = z, effect, raw
        self.significant = raw >= self.h and effect >= self.min_effect
        self._calm = self._calm + 1 if effect < self.min_effect / 2 else 0
        fired: float | None = None
        if self.significant and self.armed:
            self.armed = False
            fired = raw
        elif not self.armed and (self.statistic <= self.rearm or self._calm >= self.warmup):
            # Recovered: the statistic drained, or `warmup` evaluations in a row were
            # within min_effect/2 of the baseline (a statistic held up by a
            # practically negligible offset must not keep the episode open forever).
            self.armed = True
            self.statistic = min(self.statistic, self.rearm)
        if _finite(v):
            if z < Z_LEARN or effect < self.min_effect:
                self._learn(v, s, level=in_control, noise=pair_in_control)
            self._prev = v
            if self._fall >= self.h_fall:
                # A significant improvement. Setting b from the values that triggered
                # this would bias it low (they were selected for being low), so b
                # stays and its memory shrinks to the warm-up length: the values that
                # follow pull it down within a few evaluations. The noise of a KL
                # estimate shrinks with its level, so the noise memory shrinks too.
                self._n_base = min(self._n_base, self.warmup)
                self._n_inc = min(self._n_inc, self.warmup - 1)
                self._fall = 0.0
        return fired

    def _learn(self, v: float, s: float, *, level: bool, noise: bool) -> None:
        """Update the level and typical stderr (``level``) and the noise (``noise``)."""
        assert self.baseline is not None
        n = min(self._n_base + 1, self.memory)
        if level:
            self.baseline += (v - self.baseline) / n
            self._se_ctrl += (s - self._se_ctrl) / n
            self._n_base = n
        if noise and self._prev is not None:
            d = v - self._prev
            # Clip so that one jump (the first value of a rise is still "in control")
            # cannot inflate the noise much.
            lim = 3.0 * math.sqrt(max(self._inc_var, 2.0 * s * s))
            dc = min(max(d - self._inc_mean, -lim), lim)
            self._n_inc = min(self._n_inc + 1, self.memory)
            self._inc_mean += dc / self._n_inc
            self._inc_var += (dc * dc - self._inc_var) / self._n_inc
            self.noise = math.sqrt(self._inc_var / 2.0)


# ---------------------------------------------------------------------------------------
# Alert rules
# ---------------------------------------------------------------------------------------


def _clean_groups(name: str, d: Mapping[Any, Any] | None) -> dict[int, float]:
    """{int group: finite-or-inf float}, dropping None/NaN entries."""
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise TypeError(
            f"`{name}` must be a mapping group -> value or None, got {type(d).__name__}."
        )
    out: dict[int, float] = {}
    for g, x in d.items():
        try:
            gi = int(g)
        except (TypeError, ValueError) as err:
            raise ValueError(f"`{name}` keys must be integer group labels, got {g!r}.") from err
        f = _as_float(x)
        if f is not None and not math.isnan(f):
            out[gi] = f
    return out


class AlertRules:
    """The alert engine the callback calls once per evaluation.

    Args:
        k: CUSUM allowance shared by every series (see ``CusumDetector``).
        h: CUSUM threshold. Per-group detectors use h + ln(K)/(2k) for K groups
            (k below 0.25 counts as 0.25 there).
        warmup: evaluations that learn each series' level and noise before it can fire.
        min_effect: smallest rise, in nats, that may fire.
        entropy_drop: the model's entropy must be at least this many nats below the
            reference's for a reverse-KL rise to count as sharpening (collapse).
        kinds: the kinds to report; others are still diagnosed (and go through
            their episodes) but are not returned.
        rearm: re-arm level of every detector.

    Attributes:
        forward: the global ``CusumDetector`` of forward KL.
        reverse: the global ``CusumDetector`` of reverse KL.
        group_forward: per-group forward-KL detectors, created when a group first
            appears (group values may come and go).
        group_reverse: per-group reverse-KL detectors, likewise.
        n_evaluations: evaluations seen.
        last_step: the step of the latest evaluation.

    ``group_count`` may count the reference's rows per group (categorical
    evaluations: then only the forward/reverse balance tells collapse from a
    coverage gap) or the model's rows or mass per group (samples of the model: then
    a group losing its mass is the clearest mode-dropping signature). Shares are
    compared with their own baseline, learned while no detector is active.

    Examples:
        >>> rules = AlertRules(warmup=3, kinds=("collapse", "coverage_gap"))
        >>> rules.update(Evaluation(1, 0.5, 0.01, 0.4, 0.01))
        []
    """

    def __init__(
        self,
        *,
        k: float = 0.5,
        h: float = 5.0,
        warmup: int = 5,
        kinds: Iterable[str] = ALERT_KINDS,
        min_effect: float = 0.05,
        entropy_drop: float = 0.5,
        rearm: float = 0.0,
    ) -> None:
        # One throwaway detector validates the shared settings with its messages.
        CusumDetector(k, h, warmup, min_effect, rearm=rearm)
        self.k, self.h, self.warmup = float(k), float(h), int(warmup)
        self.min_effect, self.rearm = float(min_effect), float(rearm)
        self.entropy_drop = _check_real("entropy_drop", entropy_drop, low=0.0)
        if isinstance(kinds, str):
            raise ValueError(
                f"`kinds` must be a collection of kind names, got the string {kinds!r}; "
                f"did you mean ({kinds!r},)?"
            )
        kinds = tuple(kinds)
        unknown = [x for x in kinds if x not in ALERT_KINDS]
        if unknown or not kinds:
            raise ValueError(
                f"`kinds` must be a non-empty subset of {ALERT_KINDS}, got {kinds!r}"
                + (f" (unknown: {unknown!r})." if unknown else ".")
            )
        self.kinds = tuple(x for x in ALERT_KINDS if x in kinds)
        self._reset()

    def _reset(self) -> None:
        self.forward = self._detector()
        self.reverse = self._detector()
        self.group_forward: dict[int, CusumDetector] = {}
        self.group_reverse: dict[int, CusumDetector] = {}
        self._mass_base: dict[int, float] = {}  # baseline share of the rows per group
        self._mass_n = 0
        self._kind_armed = {kind: True for kind in ALERT_KINDS}
        # the series that contributed to each kind's open episode
        self._kind_series: dict[str, list[SeriesKey]] = {kind: [] for kind in ALERT_KINDS}
        self.n_evaluations = 0
        self.last_step: int | None = None

    def _detector(self, n_groups: int = 1) -> CusumDetector:
        h = self.h
        if n_groups > 1:  # shared false-alarm budget (Siegmund: ARL₀ ∝ e^{2kh})
            h += math.log(n_groups) / (2.0 * max(self.k, 0.25))
        return CusumDetector(self.k, h, self.warmup, self.min_effect, rearm=min(self.rearm, h / 2))

    def _table(self, direction: str) -> dict[int, CusumDetector]:
        return self.group_forward if direction == "forward" else self.group_reverse

    def _series(self, key: SeriesKey) -> CusumDetector | None:
        direction, group = key
        if group is None:
            return self.forward if direction == "forward" else self.reverse
        return self._table(direction).get(group)

    # -- state -------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Plain Python types only (lists, dicts with str keys, finite floats)."""
        return {
            "version": _STATE_VERSION,
            "config": {
                "k": self.k,
                "h": self.h,
                "warmup": self.warmup,
                "min_effect": self.min_effect,
                "entropy_drop": self.entropy_drop,
                "kinds": list(self.kinds),
                "rearm": self.rearm,
            },
            "forward": self.forward.state_dict(),
            "reverse": self.reverse.state_dict(),
            "group_forward": [[g, d.state_dict()] for g, d in self.group_forward.items()],
            "group_reverse": [[g, d.state_dict()] for g, d in self.group_reverse.items()],
            "mass_base": [[g, m] for g, m in self._mass_base.items()],
            "mass_n": self._mass_n,
            "kind_armed": dict(self._kind_armed),
            "kind_series": {
                kind: [series_name(key) for key in v] for kind, v in self._kind_series.items()
            },
            "n_evaluations": self.n_evaluations,
            "last_step": self.last_step,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore from ``state_dict`` (configuration included)."""
        _check_version("AlertRules", d)
        fresh = AlertRules(**d["config"])  # validates the configuration
        self.__dict__.update(fresh.__dict__)

        def det(sd: Mapping[str, Any]) -> CusumDetector:
            x = CusumDetector()
            x.load_state_dict(sd)
            return x

        self.forward = det(d["forward"])
        self.reverse = det(d["reverse"])
        self.group_forward = {int(g): det(sd) for g, sd in d["group_forward"]}
        self.group_reverse = {int(g): det(sd) for g, sd in d["group_reverse"]}
        self._mass_base = {int(g): float(m) for g, m in d["mass_base"]}
        self._mass_n = int(d["mass_n"])
        self._kind_armed = {kind: bool(d["kind_armed"][kind]) for kind in ALERT_KINDS}
        self._kind_series = {
            kind: [_series_key(name) for name in d["kind_series"][kind]] for kind in ALERT_KINDS
        }
        self.n_evaluations = int(d["n_evaluations"])
        self.last_step = d["last_step"]

    # -- the update ----------------------------------------------------------------------

    def update(self, ev: Evaluation) -> list[Alert]:
        """Feed one evaluation; return the new alerts (usually none).

        Args:
            ev: the evaluation's numbers.

        Returns:
            The new alerts: at most one per evaluation, of the kind that best
            explains the evidence (``diagnosis.classify``), and only if that kind is
            armed and listed in ``kinds``. Usually empty.
        """
        if not isinstance(ev, Evaluation):
            raise TypeError(f"`ev` must be an Evaluation, got {type(ev).__name__}.")
        step = int(ev.step)
        self.n_evaluations += 1
        self.last_step = step
        fresh, share = self._feed(ev)
        significant = [key for key, det in fresh.items() if det.significant]
        alerts: list[Alert] = []
        if significant:
            evidence = _evidence(self, step, ev, fresh, share)
            diagnosis = classify(evidence)
            kind = diagnosis.kind
            series = self._kind_series[kind]
            series.extend(key for key in significant if key not in series)
            if self._kind_armed[kind]:
                self._kind_armed[kind] = False
                if kind in self.kinds:
                    alerts.append(_alert(diagnosis, evidence))
        # A kind re-arms once every series that contributed to it has re-armed.
        for kind in ALERT_KINDS:
            if not self._kind_armed[kind]:
                dets = [self._series(key) for key in self._kind_series[kind]]
                if all(det is None or det.armed for det in dets):
                    self._kind_armed[kind] = True
                    self._kind_series[kind] = []
        quiet = not significant and all(d.armed for d in fresh.values())
        if quiet and share:
            self._learn_mass(share)
        return alerts

    def _feed(self, ev: Evaluation) -> tuple[dict[SeriesKey, CusumDetector], dict[int, float]]:
        """Update every series ``ev`` has a value for; returns them (in update order)
        and the current share of mass per group."""
        fwd_se, rev_se = _as_float(ev.forward_stderr), _as_float(ev.reverse_stderr)
        # A per-group value is a conditional mean of the log ratio, E_P[log p − log q | g]
        # (reverse alike): negative when the model gives the group more than its share.
        # A rise from below 0 back to 0 (a recovery elsewhere taking mass back) is no
        # coverage gap, so the detectors see only the positive part.
        gf = {g: max(x, 0.0) for g, x in _clean_groups("group_forward", ev.group_forward).items()}
        gr = {g: max(x, 0.0) for g, x in _clean_groups("group_reverse", ev.group_reverse).items()}
        gc = _clean_groups("group_count", ev.group_count)
        updated: list[SeriesKey] = []
        globals_ = (("forward", ev.forward, fwd_se), ("reverse", ev.reverse, rev_se))
        for direction, value, se in globals_:
            x = _as_float(value)
            if x is not None:
                self._series((direction, None)).update(x, se)  # type: ignore[union-attr]
                updated.append((direction, None))
        n_groups = len(set(gf) | set(gr))
        share = _shares(gc, set(gf) | set(gr))
        for direction, values, se in (("forward", gf, fwd_se), ("reverse", gr, rev_se)):
            table = self._table(direction)
            for g, x in values.items():
                det = table.get(g)
                if det is None:
                    det = table[g] = self._detector(n_groups)
                det.update(x, self._group_stderr(g, se, n_groups))
                updated.append((direction, g))
        # Detectors not updated this time carry no current evidence.
        fresh = {key: det for key in updated if (det := self._series(key)) is not None}
        return fresh, share

    # -- helpers -------------------------------------------------------------------------

    def _learn_mass(self, share: dict[int, float]) -> None:
        n = min(self._mass_n + 1, self.forward.memory)
        for g in set(share) | set(self._mass_base):
            m = self._mass_base.get(g, share.get(g, 0.0))
            self._mass_base[g] = m + (share.get(g, 0.0) - m) / n
        self._mass_n = n

    def _group_stderr(self, g: int, se: float | None, n_groups: int) -> float | None:
        """The global standard error scaled to one group's rows: se/√(baseline share).

        The baseline share, not the current one: a group whose model mass vanishes
        must not get an ever larger standard error.
        """
        if se is None or not _finite(se) or se < 0:
            return None
        pi = self._mass_base.get(g) or 1.0 / max(n_groups, 1)
        return se / math.sqrt(max(pi, 1e-6))


def _shares(counts: dict[int, float], groups: set[int]) -> dict[int, float]:
    """Share of the rows per group (absent groups count 0), or {} without counts."""
    pos = {g: c for g, c in counts.items() if _finite(c) and c > 0}
    total = sum(pos.values())
    if total <= 0:
        return {}
    return {g: pos.get(g, 0.0) / total for g in set(counts) | groups}


def _evidence(
    rules: AlertRules, step: int, ev: Evaluation, fresh: dict[SeriesKey, CusumDetector],
    share: dict[int, float],
) -> Evidence:  # fmt: skip
    """A snapshot of the fresh detectors and the evaluation, for ``classify``."""
    readings = {
        key: Reading(det.last_z, det.last_effect, det.last_raw, det.significant,
                     det.baseline, det.noise)
        for key, det in fresh.items()
    }  # fmt: skip
    return Evidence(
        step=step, readings=readings, share=share, mass_base=dict(rules._mass_base),
        n_groups_seen=len(rules.group_forward),
        forward=_as_float(ev.forward), reverse=_as_float(ev.reverse),
        entropy_model=_as_float(ev.entropy_model),
        entropy_reference=_as_float(ev.entropy_reference),
        min_effect=rules.min_effect, entropy_drop=rules.entropy_drop,
    )  # fmt: skip


def _alert(diagnosis: Any, evidence: Evidence) -> Alert:
    return Alert(
        diagnosis.kind, evidence.step, diagnosis.statistic, diagnosis.groups,
        alert_message(diagnosis, evidence), alert_details(diagnosis, evidence),
    )  # fmt: skip


def _series_key(name: str) -> SeriesKey:
    """Inverse of ``series_name``, for checkpointed states (version 1 stores names)."""
    if name in ("forward", "reverse"):
        return (name, None)
    series, group = name.rsplit(":", 1)
    return (series.removeprefix("group_"), int(group))

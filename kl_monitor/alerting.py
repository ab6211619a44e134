"""Alerts from paired evidence, judged by effect sizes in the user's terms.

Pure Python (``math`` only): no torch, no Lightning. The caller measures, for every
series, the change between the current evaluation and a *baseline evaluation* on the
same held-out rows (and on model samples drawn with common random numbers), row by
row: ``Change(current, baseline, se)`` where ``se`` is the standard error of the
paired change. ``AlertEngine.update`` turns one evaluation's ``Evidence`` into
``Decision(alerts, rebase, rebase_groups)``: the caller keeps the current
evaluation's per-row values as the new baseline of the global series (``rebase``)
and of each group in ``rebase_groups`` (every group has its own baseline
evaluation, so one group's improvement never hides another's later rise).

**Series.** With per-row values ℓ_i (forward: rows of P, ℓ = log p − log q; reverse:
model samples, ℓ = log q − log p) and group labels, a group's *contribution* is the
mean over all rows of 1[i ∈ g]·ℓ_i = (mass of g)·(KL conditional on g); the
contributions add up to the total. Every series is such a row mean, so its paired
change d_i = c_i(now) − c_i(baseline) has the honest standard error sd(d)/√n, and
its sufficient statistics (n, Σd, Σd²) merge across ranks by summation.

**Effects (``AlertThresholds``, documented defaults).** A series *moved* when:

* global forward or reverse KL rose by ≥ max(``global_nats``, ``relative`` × baseline
  level) (0.05 nats, 50%);
* a group's model mass fell to ≤ ``mass_loss`` (0.5) × its baseline mass ("mode 3
  lost ≥ 50% of its mass"; sampled path, when model samples carry groups);
* a group's contribution rose by ≥ max(``group_nats``, ``relative`` × its baseline
  contribution) (0.02 nats), counting for the forward direction only what its
  mass loss does not explain (a mode whose weight moved by 15% is not a fault);
* (kind only) a group's model entropy moved by ≥ ``entropy_nats`` (0.25 nats;
  logits path): entropy decides what a group's rise is, never that there is one.

**Significance.** A move counts only when its paired z = change/se reaches
z* = Φ⁻¹(1 − α/S), where S is the number of series in the evaluation (2 global +
groups × directions (+ masses, entropies)) and α = ``false_alarm_rate`` (1e-4): by
Bonferroni, sampling noise alone raises an alert in at most 1 of 10,000
evaluations, all series together. A fall is never an alert. No noise scale is
learned: the sanity evaluation and the early fall only move the baselines. The
global baseline moves to the current evaluation whenever both global directions
are at or below it (paired z ≤ −``rebase_z`` = 0) and nothing moved; a group's
baseline moves when all its series are at or below theirs (its mass at or above)
and none shows even half an effect. Outside an episode only: an event never
becomes the baseline. A fault that creeps up cannot drag its baseline along.

**Kinds (signature → kind), decided from per-group evidence:**

1. a group's model mass fell to ≤ ``mass_loss`` × baseline → ``collapse``
   (``mode_dropping``); sampled path.
2. a group's KL rose and its model entropy fell ≥ ``entropy_nats`` → ``collapse``
   (``sharpening``); logits path.
3. forward KL became infinite → ``coverage_gap`` (``support``).
4. a group's KL rose and its entropy rose ≥ ``entropy_nats``, or reverse KL rose
   more than forward → ``over_dispersion`` (``reverse_rise``).
5. otherwise (forward rose at least as much as reverse) → ``coverage_gap``
   (``forward_rise``).

The first matching row wins. The groups named are the groups carrying the
evidence of that row (for rises: the fewest carrying 90% of the rise).

**Episodes.** One event raises one alert. While the episode is open (until
``rearm`` evaluations in a row without any moved series) a change of kind or of
named groups is reported as an *update* of the same episode
(``details["update"] = True``, same ``details["episode"]``), e.g. over-dispersion
that becomes a lock-in on one token.

Examples:
    >>> eng = AlertEngine()
    >>> flat = Change(0.10, 0.10, 0.001)
    >>> eng.update(Evidence(0, forward=flat, reverse=flat)).alerts
    []
    >>> up = Change(0.20, 0.10, 0.001)       # +0.10 nats = 100% of the level
    >>> a = eng.update(Evidence(1, forward=up, reverse=flat)).alerts[0]
    >>> a.kind, a.details["signature"]
    ('coverage_gap', 'forward_rise')
    >>> eng.update(Evidence(2, forward=up, reverse=flat)).alerts  # same episode
    []
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from statistics import NormalDist
from typing import Any

from .detectors import Alert

__all__ = [
    "AlertEngine",
    "AlertThresholds",
    "Assessment",
    "Change",
    "Decision",
    "Evidence",
    "GroupFinding",
    "assess",
    "classify",
    "describe",
    "z_critical",
]

#: Groups named for a rise: the fewest that carry this share of it.
NAME_SHARE = 0.9
_STATE_VERSION = 1


@dataclass(frozen=True)
class AlertThresholds:
    """Effect sizes (in nats or mass ratios) and the false-alarm budget.

    The nats are **per token** (per sample for densities); for a sequence-level KL
    (``reduction="sequence_sum"``) they are multiplied by the mean number of tokens
    per sequence (``per_unit``).

    Attributes:
        global_nats: smallest rise of global forward/reverse KL, in nats.
        relative: smallest rise as a fraction of the baseline level (global and
            per-group contributions).
        group_nats: smallest rise of a group's contribution to the total, in nats.
        mass_loss: a group lost its mode when its model mass fell to this
            fraction of its baseline mass (capped at the reference's).
        entropy_nats: smallest move of a group's model entropy, in nats.
        false_alarm_rate: alerts per evaluation that sampling noise alone may
            raise, all series together.
        rebase_z: the baseline moves to the current evaluation when the global KL's
            paired z is ≤ −rebase_z and no series is rising (0: whenever it is
            at or below the baseline).
        rearm: evaluations in a row without a moved series that close an episode.

    Examples:
        >>> AlertThresholds().mass_loss
        0.5
    """

    global_nats: float = 0.05
    relative: float = 0.5
    group_nats: float = 0.02
    mass_loss: float = 0.5
    entropy_nats: float = 0.25
    false_alarm_rate: float = 1e-4
    rebase_z: float = 0.0
    rearm: int = 3

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"`{f.name}` must be a finite number, got {v!r}.")
            if v < 0:
                raise ValueError(f"`{f.name}` must be ≥ 0, got {v!r}.")
        if not 0 < self.mass_loss < 1:
            raise ValueError(f"`mass_loss` must be in (0, 1), got {self.mass_loss!r}.")
        if not 0 < self.false_alarm_rate < 1:
            raise ValueError(
                f"`false_alarm_rate` must be in (0, 1), got {self.false_alarm_rate!r}."
            )
        if not isinstance(self.rearm, int) or self.rearm < 1:
            raise ValueError(f"`rearm` must be an int ≥ 1, got {self.rearm!r}.")

    def per_unit(self, tokens: float) -> AlertThresholds:
        """The absolute floors (nats per token) for series in units of `tokens` tokens.

        A sequence-level KL (``reduction="sequence_sum"``) of 12-token sequences moves
        12 times as far as its per-token mean for the same change of the model: its
        floors are 12 times the per-token ones. Relative thresholds and masses are
        unit-free.

        Examples:
            >>> AlertThresholds().per_unit(12.0).group_nats
            0.24
        """
        if tokens == 1.0 or not math.isfinite(tokens) or tokens <= 0:
            return self
        return replace(
            self,
            global_nats=self.global_nats * tokens,
            group_nats=self.group_nats * tokens,
            entropy_nats=self.entropy_nats * tokens,
        )


def z_critical(n_series: int, false_alarm_rate: float = 1e-4) -> float:
    """One-sided Bonferroni bar: Φ⁻¹(1 − α / S).

    Examples:
        >>> round(z_critical(1, 0.05), 3)
        1.645
    """
    s = max(int(n_series), 1)
    return NormalDist().inv_cdf(1.0 - false_alarm_rate / s)


def _t_as_z(t: float, df: float) -> float:
    """The normal deviate with (about) the tail probability of Student's t with `df`.

    Wallace (1959): z = (8ν + 1)/(8ν + 3) · √(ν·ln(1 + t²/ν)); it errs low (safe: a
    t that is only just significant reads a little less significant), by under 1% of
    z for ν ≥ 15 at the tail probabilities the alerts use.
    """
    if not math.isfinite(df) or math.isinf(t):
        return t
    v = max(df, 1.0)
    return math.copysign((8 * v + 1) / (8 * v + 3) * math.sqrt(v * math.log1p(t * t / v)), t)


@dataclass(frozen=True)
class Change:
    """A series' paired change: current and baseline row means, se of the change.

    ``df`` is the degrees of freedom of ``se`` (the rows that carry the series, less
    one): a group with 8 held-out rows estimates its se from 8 differences, and its
    t = rise/se is judged as Student's t, not as a normal deviate.

    Examples:
        >>> c = Change.from_sums(n=4, current=2.0, baseline=1.0, sum_sq_diff=0.5)
        >>> c.rise, round(c.se, 4), c.df
        (0.25, 0.1443, 3.0)
    """

    current: float
    baseline: float
    se: float
    df: float = math.inf

    @classmethod
    def from_sums(
        cls, n: float, current: float, baseline: float, sum_sq_diff: float,
        df: float | None = None,
    ) -> Change:  # fmt: skip
        """From mergeable sums over n rows: Σc(now), Σc(baseline), Σ(d_i)².

        se² = (Σd²/n − d̄²)/(n − 1), the paired standard error of the mean change;
        ``df`` defaults to n − 1 (pass the carrying rows less one for a group's
        contribution, a mean over all n rows that is zero outside the group).
        """
        n = float(n)
        if n <= 0:
            return cls(math.nan, math.nan, math.inf)
        mean = (current - baseline) / n
        var = max(sum_sq_diff / n - mean * mean, 0.0) if math.isfinite(mean) else 0.0
        se = math.sqrt(var / max(n - 1.0, 1.0))
        return cls(current / n, baseline / n, se, float(n - 1.0 if df is None else df))

    @property
    def rise(self) -> float:
        """current − baseline (+inf for a new support violation)."""
        if self.current == math.inf:
            return 0.0 if self.baseline == math.inf else math.inf
        return self.current - self.baseline

    @property
    def z(self) -> float:
        """rise / se as a normal deviate (Student's t with ``df`` mapped to the normal
        scale); ±inf when se is 0 and the rise is not."""
        r = self.rise
        if math.isnan(r):
            return 0.0
        if r == 0:
            return 0.0
        if self.se <= 0 or math.isinf(r):
            return math.copysign(math.inf, r)
        return _t_as_z(r / self.se, self.df)


@dataclass(frozen=True)
class Evidence:
    """One evaluation's paired changes; leave out what the input cannot provide.

    Attributes:
        step: training step.
        forward: global forward KL (row mean over held-out rows of P).
        reverse: global reverse KL (row mean over model samples, or logits rows).
        group_forward: per group, its contribution to forward KL (mean over all
            rows of 1[g]·ℓ).
        group_reverse: per group, its contribution to reverse KL.
        group_mass: per group, the model's mass share (sampled path with model
            sample groups).
        group_reference_mass: per group, the reference's mass share p_g, as
            estimated from the held-out rows.
        reference_rows: how many held-out rows that share is estimated from (its
            standard error widens the cap on a group's baseline mass).
        group_entropy: per group, the model's mean entropy given the group
            (logits path).
        group_entropy_reference: per group, the reference's entropy (for messages).
        unit_tokens: tokens per unit of every series (1: per token or per sample;
            the mean counted tokens per sequence for ``reduction="sequence_sum"``).
            The absolute floors of ``AlertThresholds`` are per token and are
            multiplied by it; the relative ones do not depend on the unit.
    """

    step: int
    forward: Change | None = None
    reverse: Change | None = None
    group_forward: Mapping[int, Change] = field(default_factory=dict)
    group_reverse: Mapping[int, Change] = field(default_factory=dict)
    group_mass: Mapping[int, Change] = field(default_factory=dict)
    group_reference_mass: Mapping[int, float] = field(default_factory=dict)
    reference_rows: float | None = None
    group_entropy: Mapping[int, Change] = field(default_factory=dict)
    group_entropy_reference: Mapping[int, float] = field(default_factory=dict)
    unit_tokens: float = 1.0

    @property
    def n_series(self) -> int:
        """Series tested together (for the Bonferroni bar)."""
        n = sum(x is not None for x in (self.forward, self.reverse))
        n += len(self.group_forward) + len(self.group_reverse)
        return n + len(self.group_mass) + len(self.group_entropy)


@dataclass(frozen=True)
class GroupFinding:
    """What moved in one group (effects in user terms, z of the paired change)."""

    group: int
    forward_rise: float = 0.0  # contribution rise not explained by mass loss (nats)
    reverse_rise: float = 0.0
    mass_ratio: float | None = None  # model mass now / baseline mass
    entropy_change: float = 0.0
    support: bool = False
    forward: bool = False
    reverse: bool = False
    mass: bool = False
    sharpening: bool = False
    flattening: bool = False
    z: float = 0.0
    #: half the effect (a quarter of the mass loss) at half the z: not an alert, but
    #: named once an event exists
    weak_forward: bool = False
    weak_reverse: bool = False
    weak_mass: bool = False
    #: both contributions (less their mass parts) at or below their baselines, and
    #: no mass lost against the capped baseline
    improving: bool = False
    #: p_g·log(baseline mass / mass now) when the loss is significant at half the bar:
    #: the forward rise that mass leaving the group explains
    mass_rise: float = 0.0
    #: the group's whole forward contribution rise when its model mass fell and the
    #: rise is what losing a quarter of ``mass_loss`` (12.5%) of its density gives,
    #: p_g·log(1/0.875): measured on the held-out rows, far more precise than the
    #: mass from model samples; names the modes
    dropping_rise: float = 0.0

    @property
    def moved(self) -> bool:
        return self.forward or self.reverse or self.mass or self.sharpening or self.flattening


@dataclass(frozen=True)
class Assessment:
    """All findings of one evaluation."""

    step: int
    z_star: float
    forward: bool
    reverse: bool
    support: bool
    groups: tuple[GroupFinding, ...]
    falling: bool  # both global directions at or below their baseline

    @property
    def moved(self) -> bool:
        return self.forward or self.reverse or self.support or any(g.moved for g in self.groups)

    @property
    def rising(self) -> bool:
        """Any series moved, or any group shows half an effect at half the bar."""
        weak = any(g.weak_forward or g.weak_reverse or g.weak_mass for g in self.groups)
        return self.moved or weak


def _moved(c: Change | None, floor: float, relative: float, z_star: float) -> bool:
    if c is None or not math.isfinite(c.baseline):
        return False
    need = max(floor, relative * max(c.baseline, 0.0))
    return c.rise >= need and c.z >= z_star


def _mass_cap(p: float | None, rows: float | None) -> float | None:
    """The reference share less two standard errors of its estimate from `rows` rows."""
    if p is None:
        return None
    se = math.sqrt(p * (1 - p) / rows) if rows else 0.0
    return max(p - 2 * se, 0.0)


def _mass_ratio(m: Change | None, cap: float | None) -> float | None:
    """Model mass now over baseline mass, the baseline capped at the reference's share:
    a mode that had more than its share has not lost mass by coming back to it."""
    if m is None or not math.isfinite(m.current) or not math.isfinite(m.baseline):
        return None
    base = m.baseline if cap is None else min(m.baseline, cap)
    return m.current / base if base > 0 else None


def _xlogy_ratio(q: float, p: float) -> float:
    """q·log(q/p), 0 at q = 0."""
    return q * math.log(q / p) if q > 0 and p > 0 else 0.0


def _dropping_rise(
    f: Change | None, m: Change | None, p: float | None, th: AlertThresholds, z_star: float
) -> float:
    """A group's forward contribution when it is losing mode mass, else 0.

    Counted when its forward contribution rose significantly, its model mass fell by
    at least 12.5% of its own baseline (a quarter of ``mass_loss``), and the
    contribution's level p_g·KL_g is at least what a density 12.5% below the
    reference's (a quarter of ``mass_loss``) gives: p_g·log(1/0.875). Measured on
    the held-out rows, far more precise than a mass from model samples.
    """
    if f is None or m is None or not p or not math.isfinite(f.current) or m.baseline <= 0:
        return 0.0
    if m.current > (1 - 0.25 * (1 - th.mass_loss)) * m.baseline:
        return 0.0  # its own (paired) mass fell by less than 12.5%
    if f.z < z_star or f.current < p * -math.log(1 - 0.25 * (1 - th.mass_loss)):
        return 0.0
    return f.current


def _z(rise: float, se: float, df: float = math.inf) -> float:
    """Standardised rise (Student's t with `df` on the normal scale); ±inf for a rise
    with no noise, 0 for none."""
    if se > 0:
        return _t_as_z(rise / se, df)
    return math.copysign(math.inf, rise) if rise else 0.0


def _rises_without_mass_part(
    f: Any, r: Any, m: Any, p: float | None, rows: float | None = None
) -> tuple[float, float, float, float]:
    """A group's forward and reverse rises (and stderrs) less what its mass change explains.

    A mode's forward KL is log(p_g/q_g) + misfit: mass moving away adds
    p_g·log(q_g(b)/q_g(now)) to its contribution, and q_g·log(q_g/p_g) is the mass
    part of its reverse contribution. The mass rule judges mass; the rise rules
    judge what is left, with the noise of the mass estimate and of the reference
    share p_g (estimated from `rows` held-out rows, while the log ratios use the
    exact density) added to the change's: otherwise a share off by 4% reads as a
    significant rise of a converging group, and its baseline never moves.
    """
    f_rise, f_se = (f.rise, f.se) if f is not None and math.isfinite(f.rise) else (0.0, 0.0)
    r_rise, r_se = (r.rise, r.se) if r is not None and math.isfinite(r.rise) else (0.0, 0.0)
    if m is not None and p and m.baseline > 0 and math.isfinite(m.current):
        q_now = max(m.current, 0.5 * m.se, 1e-12)
        p_se = math.sqrt(p * (1 - p) / rows) if rows else 0.0
        moved = max(math.log(m.baseline / q_now), 0.0)
        f_rise -= p * moved
        f_se = math.hypot(f_se, p / q_now * m.se, moved * p_se)
        r_rise -= _xlogy_ratio(m.current, p) - _xlogy_ratio(m.baseline, p)
        r_se = math.hypot(r_se, (abs(math.log(q_now / p)) + 1.0) * m.se,
                          abs(m.current - m.baseline) / p * p_se)  # fmt: skip
    return f_rise, f_se, r_rise, r_se


def _group_need(c: Change | None, th: AlertThresholds) -> float:
    """The smallest rise of a group's contribution: max(group_nats, relative × baseline)."""
    return max(th.group_nats, th.relative * max(c.baseline, 0.0)) if c is not None else 0.0


def _mass_findings(
    ratio: float | None, m: Change | None, f: Change | None, p: float | None,
    th: AlertThresholds, z_star: float,
) -> tuple[bool, bool, float]:  # fmt: skip
    """(mass lost, a quarter of the loss at half the bar, forward rise the loss explains).

    A loss counts when the mass ratio is at or below ``mass_loss`` and either the mass
    fell significantly or the group's forward contribution rose significantly.
    """
    half = 0.5 * z_star

    def significant(bar: float) -> bool:
        return (m is not None and -m.z >= bar) or (f is not None and f.z >= bar)

    mass = ratio is not None and ratio <= th.mass_loss and significant(z_star)
    weak = ratio is not None and ratio <= 1 - 0.25 * (1 - th.mass_loss) and significant(half)
    rise = 0.0
    if ratio is not None and 0 < ratio < 1 and m is not None and -m.z >= half and p:
        rise = p * math.log(1.0 / max(ratio, 1e-12))
    return mass, weak, rise


def _group_finding(g: int, ev: Evidence, th: AlertThresholds, z_star: float) -> GroupFinding:
    f, r = ev.group_forward.get(g), ev.group_reverse.get(g)
    m, h = ev.group_mass.get(g), ev.group_entropy.get(g)
    p = ev.group_reference_mass.get(g)
    cap = _mass_cap(p, ev.reference_rows)
    ratio = _mass_ratio(m, cap)
    support = f is not None and f.current == math.inf and f.baseline != math.inf
    f_rise, f_se, r_rise, r_se = _rises_without_mass_part(f, r, m, p, ev.reference_rows)
    f_z = _z(f_rise, f_se, f.df if f is not None else math.inf)
    r_z = _z(r_rise, r_se, r.df if r is not None else math.inf)
    f_need, r_need = _group_need(f, th), _group_need(r, th)
    # A mode the model had already dropped at the baseline (mass below mass_loss ×
    # its share) cannot be dropped again: its forward contribution is log(p/q) of a
    # mass too small for the model samples to measure, not a new coverage gap.
    dropped = m is not None and p is not None and m.baseline < th.mass_loss * p
    fwd = (f is not None and not dropped and math.isfinite(f.baseline)
           and f_z >= z_star and f_rise >= f_need)
    rev = r is not None and math.isfinite(r.baseline) and r_z >= z_star and r_rise >= r_need
    # Entropy says which kind a rise is, never that there is one: while training
    # converges, a group's entropy moves by far more than any KL threshold.
    drop = -h.rise if h is not None and math.isfinite(h.rise) else 0.0
    kl_moved = fwd or support or rev
    sharp = kl_moved and h is not None and drop >= th.entropy_nats and -h.z >= 0.5 * z_star
    flat = kl_moved and h is not None and -drop >= th.entropy_nats and h.z >= 0.5 * z_star
    zs = [abs(c.z) for c in (f, r, m, h) if c is not None and not math.isnan(c.z)]
    half = 0.5 * z_star
    mass, weak_mass, mass_rise = _mass_findings(ratio, m, f, p, th, z_star)
    return GroupFinding(
        group=g,
        forward_rise=f_rise,
        reverse_rise=r_rise,
        mass_ratio=ratio,
        entropy_change=-drop,
        support=support,
        forward=fwd or support,
        reverse=rev,
        mass=mass,
        sharpening=sharp,
        flattening=flat,
        z=max(zs, default=0.0),
        weak_forward=f is not None and not dropped and f_z >= half and f_rise >= 0.5 * f_need,
        weak_reverse=r is not None and r_z >= half and r_rise >= 0.5 * r_need,
        # The forward contribution at or below its baseline and the mass at or above
        # it: no creeping fault (a mode dropping, narrowing or widening) passes both.
        # The reverse contribution only must not rise at half the bar: while a mode
        # regains mass its reverse part is the mass part, whose subtraction carries
        # the reference share's estimation error (a persistent z of about 1).
        improving=(f is None or f_z <= 0)
        and (r is None or r_z < half)
        and (ratio is None or ratio >= 1.0)
        and not support,
        mass_rise=mass_rise,
        dropping_rise=_dropping_rise(f, m, p, th, z_star),
        weak_mass=weak_mass,
    )


def assess(ev: Evidence, th: AlertThresholds | None = None) -> Assessment:
    """Which series moved, by effect size and paired significance (pure).

    Examples:
        >>> a = assess(Evidence(5, forward=Change(0.5, 0.1, 0.01)))
        >>> a.forward, a.moved
        (True, True)
    """
    th = (th or AlertThresholds()).per_unit(ev.unit_tokens)
    z_star = z_critical(ev.n_series, th.false_alarm_rate)
    keys = sorted(
        set(ev.group_forward) | set(ev.group_reverse) | set(ev.group_mass) | set(ev.group_entropy)
    )
    groups = tuple(_group_finding(g, ev, th, z_star) for g in keys)
    leads = [c for c in (ev.forward, ev.reverse) if c is not None]
    support = ev.forward is not None and ev.forward.current == math.inf
    support = support and ev.forward.baseline != math.inf
    return Assessment(
        step=int(ev.step),
        z_star=z_star,
        forward=_moved(ev.forward, th.global_nats, th.relative, z_star),
        reverse=_moved(ev.reverse, th.global_nats, th.relative, z_star),
        support=support or any(g.support for g in groups),
        groups=groups,
        falling=bool(leads) and all(c.z <= -th.rebase_z for c in leads),
    )


def _top(groups: list[GroupFinding], key: str) -> tuple[int, ...]:
    """The fewest groups carrying NAME_SHARE of the positive rise `key`."""
    w = {g.group: getattr(g, key) for g in groups if getattr(g, key) > 0}
    if not w:
        return ()
    order = sorted(w, key=lambda g: (-w[g], g))
    total, acc, named = sum(w.values()), 0.0, []
    for g in order:
        named.append(g)
        acc += w[g]
        if acc >= NAME_SHARE * total:
            break
    return tuple(sorted(named))


def classify(a: Assessment, ev: Evidence) -> tuple[str, str, tuple[int, ...]]:
    """(kind, signature, groups) from the signature → kind table (pure).

    Examples:
        >>> ev = Evidence(3, reverse=Change(0.5, 0.1, 0.01), forward=Change(0.1, 0.1, 0.01))
        >>> classify(assess(ev), ev)
        ('over_dispersion', 'reverse_rise', ())
    """
    gs = list(a.groups)
    d_f = ev.forward.rise if ev.forward is not None and math.isfinite(ev.forward.rise) else 0.0
    d_r = ev.reverse.rise if ev.reverse is not None and math.isfinite(ev.reverse.rise) else 0.0
    # Which direction rose more: within the groups that show it (their rises less
    # the mass parts, so a mass wobble elsewhere does not tip it), else globally.
    showing = [g for g in gs if g.forward or g.reverse or g.weak_forward or g.weak_reverse]
    if showing:
        d_f = sum(max(g.forward_rise, 0.0) for g in showing)
        d_r = sum(max(g.reverse_rise, 0.0) for g in showing)
    lost = sum(g.mass_rise for g in gs)
    dropping = any(g.dropping_rise > 0 for g in gs)
    if any(g.mass for g in gs) or (dropping and lost > 0 and lost >= 0.5 * max(d_f, d_r)):
        # Groups losing mass that explains at least half of the rise: modes being
        # dropped, caught before they are half gone. Named: the groups whose mass fell
        # carrying 90% of the forward rise of such groups.
        named = set(_top([g for g in gs if g.dropping_rise > 0], "dropping_rise"))
        named |= {g.group for g in gs if g.mass}
        return "collapse", "mode_dropping", tuple(sorted(named))
    if any(g.sharpening for g in gs):
        return "collapse", "sharpening", tuple(g.group for g in gs if g.sharpening)
    if a.support:
        named = tuple(g.group for g in gs if g.support)
        return "coverage_gap", "support", named
    if any(g.flattening for g in gs) or d_r > d_f:
        named = tuple(g.group for g in gs if g.flattening)
        cand = [g for g in gs if g.reverse or g.weak_reverse]
        return "over_dispersion", "reverse_rise", named or _top(cand, "reverse_rise")
    cand = [g for g in gs if g.forward or g.weak_forward]
    return "coverage_gap", "forward_rise", _top(cand, "forward_rise")


def _f(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return f"{x:.{digits}g}"


def _glist(groups: tuple[int, ...]) -> str:
    return ", ".join(str(g) for g in groups)


def describe(
    kind: str, signature: str, groups: tuple[int, ...], a: Assessment, ev: Evidence
) -> str:
    """The alert's sentence; every number agrees with its kind (pure)."""
    by = {g.group: g for g in a.groups}
    nats = "nats" if ev.unit_tokens == 1.0 else "nats per sequence"
    head = f"{kind.replace('_', ' ')} ({signature.replace('_', ' ')}) at step {a.step}: "
    f, r = ev.forward, ev.reverse

    def glob(name: str, c: Change | None) -> str:
        # A rise is quoted as a rise; a series that did not rise is quoted as a level.
        if c is None:
            return ""
        if c.current == math.inf:
            return f"{name} KL is infinite"
        if c.rise > 0 and c.z >= 2:
            return f"{name} KL rose +{c.rise:.3g} {nats} to {_f(c.current)} (z={_f(c.z, 2)})"
        return f"{name} KL is {_f(c.current)} {nats} overall"

    if signature == "mode_dropping":
        lost = ", ".join(f"{g} lost {1 - (by[g].mass_ratio or 0):.0%}" for g in groups)
        word, whose = ("mode", "its") if len(groups) == 1 else ("modes", "their")
        return head + f"{word} {lost} of {whose} mass; " + glob("forward", f)
    if signature == "sharpening":
        parts = []
        for g in groups:
            h = ev.group_entropy[g]
            ref = ev.group_entropy_reference.get(g)
            parts.append(
                f"group {g}'s model entropy fell {-by[g].entropy_change:.3g} {nats} to "
                f"{_f(h.current)}" + (f" (reference {_f(ref)})" if ref is not None else "")
            )
        return head + "; ".join(parts) + ("; " + glob("reverse", r) if r is not None else "")
    if signature == "support":
        where = f" in group{'s' if len(groups) > 1 else ''} {_glist(groups)}" if groups else ""
        return head + f"forward KL is infinite{where}: the model gives zero probability to " + (
            "reference rows"
        )
    main, other = (f, r) if kind == "coverage_gap" else (r, f)
    names = ("forward", "reverse") if kind == "coverage_gap" else ("reverse", "forward")
    msg = head
    if groups:
        key = "forward_rise" if kind == "coverage_gap" else "reverse_rise"
        rises = ", ".join(f"{g} +{getattr(by[g], key):.3g}" for g in groups)
        msg += f"{names[0]} KL rose in group{'s' if len(groups) > 1 else ''} {_glist(groups)} "
        msg += f"(rise of each group's share of the total, {nats}: {rises}); "
    msg += glob(names[0], main)
    if other is not None:
        msg += "; " + glob(names[1], other)
    return msg


@dataclass(frozen=True)
class Decision:
    """What the caller does after one evaluation."""

    alerts: list[Alert]
    rebase: bool
    assessment: Assessment
    rebase_groups: tuple[int, ...] = ()


#: Escalation order: an open episode is updated when its kind moves up this list.
_RANK = {"coverage_gap": 0, "over_dispersion": 0, "collapse": 1}


def _num(x: float) -> float:
    """Finite stand-in for JSON-friendly details (±1e300 for ±inf)."""
    return x if math.isfinite(x) else math.copysign(1e300, x) if not math.isnan(x) else x


def _details(
    a: Assessment, ev: Evidence, signature: str, groups: tuple[int, ...], episode: int,
    update: bool,
) -> dict:  # fmt: skip
    def series(c: Change | None) -> dict | None:
        if c is None:
            return None
        return {"current": c.current, "baseline": c.baseline, "rise": c.rise, "z": _num(c.z)}

    return {
        "signature": signature,
        "episode": episode,
        "update": update,
        "z_critical": a.z_star,
        "groups_losing_mass": list(groups) if signature == "mode_dropping" else [],
        "forward": series(ev.forward),
        "reverse": series(ev.reverse),
        "groups": {
            g.group: {
                "forward_rise": g.forward_rise,
                "reverse_rise": g.reverse_rise,
                "mass_ratio": g.mass_ratio,
                "entropy_change": g.entropy_change,
                "z": _num(g.z),
            }
            for g in a.groups
            if g.moved or g.support
        },
    }


class AlertEngine:
    """Episodes of alerts over a sequence of ``Evidence`` (see the module docstring).

    Args:
        thresholds: effect sizes and false-alarm budget; defaults documented in
            ``AlertThresholds``.

    Examples:
        >>> eng = AlertEngine()
        >>> d = eng.update(Evidence(0, forward=Change(1.0, 2.0, 0.01)))
        >>> d.alerts, d.rebase                     # a fall: never an alert
        ([], True)
    """

    def __init__(self, thresholds: AlertThresholds | None = None) -> None:
        if thresholds is not None and not isinstance(thresholds, AlertThresholds):
            raise TypeError(
                f"`thresholds` must be an AlertThresholds, got {type(thresholds).__name__}."
            )
        self.thresholds = thresholds or AlertThresholds()
        self.episode = 0
        self.open = False
        self.kind: str | None = None
        self.groups: tuple[int, ...] = ()
        self._calm = 0

    def update(self, ev: Evidence) -> Decision:
        """Assess one evaluation; open, update or close an episode.

        Returns:
            ``Decision``: the alerts (a new episode's first alert, or an update of
            the open one when its kind escalates to collapse or new groups join)
            and whether to rebase the pairing on this evaluation.
        """
        if not isinstance(ev, Evidence):
            raise TypeError(f"`ev` must be an Evidence, got {type(ev).__name__}.")
        a = assess(ev, self.thresholds)
        alerts: list[Alert] = []
        if a.moved:
            self._calm = 0
            kind, signature, groups = classify(a, ev)
            update = self.open
            fresh = not self.open
            if self.open:
                escalates = _RANK[kind] > _RANK[self.kind or kind]
                joins = bool(set(groups) - set(self.groups))
                fresh = escalates or joins
            else:
                self.episode += 1
                self.open = True
            if fresh:
                self.kind = kind if not update or _RANK[kind] >= _RANK[self.kind] else self.kind
                self.groups = tuple(sorted(set(groups) | (set(self.groups) if update else set())))
                stat = max([abs(g.z) for g in a.groups if g.moved], default=0.0)
                for c in (ev.forward, ev.reverse):
                    if c is not None and not math.isnan(c.z):
                        stat = max(stat, c.z)
                message = describe(kind, signature, groups, a, ev)
                if update:
                    message = f"update of alert {self.episode}: " + message
                alerts.append(
                    Alert(kind, a.step, min(stat, 1e6), groups, message,
                          _details(a, ev, signature, groups, self.episode, update))  # fmt: skip
                )
        elif self.open:
            self._calm += 1
            if self._calm >= self.thresholds.rearm:
                self.open, self.kind, self.groups, self._calm = False, None, (), 0
        rebase = not self.open and a.falling and not a.moved
        groups = () if self.open else tuple(
            g.group for g in a.groups
            if g.improving and not (g.moved or g.weak_forward or g.weak_reverse or g.weak_mass)
        )  # fmt: skip
        return Decision(alerts, rebase, a, groups)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python types; the thresholds are included."""
        th = self.thresholds
        return {
            "version": _STATE_VERSION,
            "thresholds": {f.name: getattr(th, f.name) for f in fields(th)},
            "episode": self.episode,
            "open": self.open,
            "kind": self.kind,
            "groups": list(self.groups),
            "calm": self._calm,
        }

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        """Restore from ``state_dict``."""
        if d.get("version") != _STATE_VERSION:
            raise ValueError(
                f"unsupported AlertEngine state version {d.get('version')!r}, "
                f"expected {_STATE_VERSION}."
            )
        self.thresholds = AlertThresholds(**d["thresholds"])
        self.episode, self.open = int(d["episode"]), bool(d["open"])
        self.kind, self.groups = d["kind"], tuple(int(g) for g in d["groups"])
        self._calm = int(d["calm"])

"""Which kind of alert explains a significant rise, and its text: pure functions.

``AlertRules`` runs the detectors and, when any series rose significantly, takes a
snapshot of what they read (``Evidence``). From here on nothing is stateful:

- ``classify(evidence) -> Diagnosis``: the kind, its signature, the groups to name
  and the series whose statistic is reported;
- ``alert_details(diagnosis, evidence)``: the numbers behind it, as plain data;
- ``alert_message(diagnosis, evidence)``: one human sentence, written from the
  diagnosis (nothing reads it back).

Series are keyed by ``(direction, group)`` tuples: ``("forward", None)`` is the
global forward KL, ``("reverse", 3)`` group 3's reverse KL. The kinds and their
signatures are documented in ``kl_monitor.detectors``.

Examples:
    >>> r = Reading(z=9.0, effect=0.8, raw=8.5, significant=True, baseline=0.1)
    >>> ev = Evidence(step=7, readings={("forward", None): r})
    >>> d = classify(ev)
    >>> d.kind, d.signature, d.groups
    ('coverage_gap', 'forward_rise', ())
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ALERT_KINDS",
    "AlertKind",
    "Diagnosis",
    "Evidence",
    "Reading",
    "SeriesKey",
    "alert_details",
    "alert_message",
    "classify",
    "series_name",
]

AlertKind = Literal["collapse", "coverage_gap", "over_dispersion"]
#: The alert kinds, in DESIGN §4 order.
ALERT_KINDS: tuple[AlertKind, ...] = ("collapse", "coverage_gap", "over_dispersion")
#: ``(direction, group)``; group ``None`` for the global series.
SeriesKey = tuple[str, "int | None"]
FORWARD: SeriesKey = ("forward", None)
REVERSE: SeriesKey = ("reverse", None)

#: A rise counts as supporting evidence for the explanation (not as a trigger) at
#: this z: lower than the CUSUM's bar because it only picks between explanations.
Z_EXPLAIN = 2.0
#: A group whose forward KL rose is losing its mode (collapse rather than a
#: coverage gap) when its share of the mass fell to MASS_LOSS_RATIO of its baseline
#: share, or fell to MASS_SHIFT_RATIO and the lost mass explains at least half of
#: the rise: a mode's forward KL is ln(p_g/w_g) + (misfit within the mode), so mass
#: moving away shows as ln(1/ratio), while a coverage gap is misfit with the mass kept.
MASS_LOSS_RATIO = 0.5
MASS_SHIFT_RATIO = 0.8
#: Groups named in an alert: the fewest that carry this share of the weighted rise.
NAME_SHARE = 0.9


def series_name(key: SeriesKey) -> str:
    """The name of a series in ``Alert.details``: ``"forward"``, ``"group_reverse:3"``."""
    direction, group = key
    return direction if group is None else f"group_{direction}:{group}"


@dataclass(frozen=True)
class Reading:
    """What one detector read at this evaluation (see ``CusumDetector``'s attributes)."""

    z: float | None
    effect: float | None
    raw: float | None
    significant: bool
    baseline: float | None = None
    noise: float | None = None

    def rose(self, min_effect: float) -> bool:
        """Significant, or a clear (z ≥ 2, ≥ min_effect) rise: evidence for a kind."""
        if self.z is None or self.effect is None:
            return False
        return self.significant or (self.z >= Z_EXPLAIN and self.effect >= min_effect)


@dataclass(frozen=True)
class Evidence:
    """A snapshot of one evaluation as the classification sees it.

    Attributes:
        step: the evaluation's training step.
        readings: the series updated at this evaluation, in update order.
        share: the current share of mass per group ({} without counts).
        mass_base: the baseline share of mass per group.
        n_groups_seen: groups with a forward detector so far.
        forward, reverse: the global values.
        entropy_model, entropy_reference: H(Q), H(P) (None when unknown).
        min_effect, entropy_drop: the rules' settings.
    """

    step: int
    readings: Mapping[SeriesKey, Reading]
    share: Mapping[int, float] = field(default_factory=dict)
    mass_base: Mapping[int, float] = field(default_factory=dict)
    n_groups_seen: int = 0
    forward: float | None = None
    reverse: float | None = None
    entropy_model: float | None = None
    entropy_reference: float | None = None
    min_effect: float = 0.05
    entropy_drop: float = 0.5

    @property
    def significant(self) -> list[SeriesKey]:
        return [key for key, r in self.readings.items() if r.significant]

    def rose(self, direction: str) -> list[int]:
        """Groups whose ``direction`` KL rose (sorted)."""
        return sorted(
            g for (d, g), r in self.readings.items()
            if d == direction and g is not None and r.rose(self.min_effect)
        )  # fmt: skip


@dataclass(frozen=True)
class Diagnosis:
    """The best explanation of a significant rise.

    Attributes:
        kind: ``"collapse"``, ``"coverage_gap"`` or ``"over_dispersion"``.
        signature: ``"sharpening"``, ``"mode_dropping"``, ``"support"``,
            ``"forward_rise"`` or ``"reverse_rise"``.
        groups: the groups most responsible, most responsible first.
        lead: the series whose statistic the alert reports.
        statistic: that series' uncapped CUSUM statistic.
        shares_forward, shares_reverse: each rising group's share of the weighted rise.
        mass_ratio: current over baseline share of mass, per group.
        losing: groups whose forward KL rose while they lost model mass.
        deficit: H(P) − H(Q), or None.
        n_modes: groups known (None without groups).
    """

    kind: AlertKind
    signature: str
    groups: tuple[int, ...]
    lead: SeriesKey
    statistic: float
    shares_forward: dict[int, float]
    shares_reverse: dict[int, float]
    mass_ratio: dict[int, float]
    losing: list[int]
    deficit: float | None
    n_modes: int | None


def _losing(ratio: float | None, reading: Reading) -> bool:
    """Whether a group whose forward KL rose is losing its model mass."""
    if ratio is None:
        return False
    if ratio <= MASS_LOSS_RATIO:
        return True
    rise = reading.effect or 0.0
    return ratio <= MASS_SHIFT_RATIO and math.log(1.0 / ratio) >= 0.5 * rise


def _rank(ev: Evidence, direction: str, groups: list[int]) -> tuple[tuple[int, ...], dict]:
    """The fewest groups carrying NAME_SHARE of the mass-weighted rise, and all shares."""
    n = max(len(groups), 1)
    weighted = {}
    for g in groups:
        rise = ev.readings[(direction, g)].effect or 0.0
        pi = ev.mass_base.get(g) or 1.0 / n
        weighted[g] = pi * rise if rise > 0 else 0.0
    weighted = {g: w for g, w in weighted.items() if w > 0}
    if not weighted:
        return (), {}
    order = sorted(weighted, key=lambda g: (-weighted[g], g))
    if any(w == math.inf for w in weighted.values()):
        named = [g for g in order if weighted[g] == math.inf]
        return tuple(named), {g: (1.0 / len(named) if g in named else 0.0) for g in order}
    total = sum(weighted.values())
    shares = {g: weighted[g] / total for g in order}
    named, acc = [], 0.0
    for g in order:
        named.append(g)
        acc += shares[g]
        if acc >= NAME_SHARE:
            break
    return tuple(named), shares


def _deficit(ev: Evidence) -> float | None:
    h_model, h_ref = ev.entropy_model, ev.entropy_reference
    if h_model is None or h_ref is None or not (math.isfinite(h_model) and math.isfinite(h_ref)):
        return None
    return h_ref - h_model


def _rise(reading: Reading | None) -> float:
    return max(reading.effect or 0.0, 0.0) if reading is not None else 0.0


def _kind(ev: Evidence, losing: list[int], n_modes: int | None) -> tuple[AlertKind, str]:
    """The kind and signature that best explain the rises (DESIGN §4)."""
    me = ev.min_effect
    f, r = ev.readings.get(FORWARD), ev.readings.get(REVERSE)
    rose_f, rose_r = f is not None and f.rose(me), r is not None and r.rose(me)
    d_f, d_r = _rise(f), _rise(r)
    gf_rose, gr_rose = ev.rose("forward"), ev.rose("reverse")
    bounded = True
    if n_modes and r is not None and r.baseline is not None:
        margin = max(me, 3.0 * (r.noise or 0.0))
        bounded = r.baseline + d_r <= math.log(n_modes) + margin
    forward_side = rose_f or bool(gf_rose)
    reverse_side = rose_r or bool(gr_rose)
    forward_led = forward_side and (not rose_r or d_f >= d_r)
    deficit = _deficit(ev)
    if (rose_r or gr_rose) and deficit is not None and deficit >= ev.entropy_drop:
        return "collapse", "sharpening"
    if losing or (forward_led and rose_r and bounded):
        return "collapse", "mode_dropping"
    if forward_led or (forward_side and not reverse_side):
        return "coverage_gap", "support" if d_f == math.inf else "forward_rise"
    return "over_dispersion", "reverse_rise"


def classify(ev: Evidence) -> Diagnosis:
    """The kind, signature and groups that best explain ``ev`` (at least one series
    must be significant)."""
    gf_rose = ev.rose("forward")
    named_f, shares_f = _rank(ev, "forward", gf_rose)
    named_r, shares_r = _rank(ev, "reverse", ev.rose("reverse"))
    # Mass lost by the groups whose forward KL rose (dropped modes).
    ratio = {
        g: ev.share.get(g, 0.0) / ev.mass_base[g]
        for g in set(ev.share) | set(ev.mass_base)
        if ev.mass_base.get(g, 0.0) > 0 and ev.share
    }
    losing = [g for g in gf_rose if _losing(ratio.get(g), ev.readings[("forward", g)])]
    n_modes = len(ev.mass_base) or ev.n_groups_seen or None
    kind, signature = _kind(ev, losing, n_modes)
    if kind == "over_dispersion":
        groups = named_r
    elif losing:
        groups = tuple(g for g in named_f if g in losing) or tuple(losing)
    else:
        groups = named_f
    # The statistic of the series that best explains the kind.
    significant = ev.significant
    first = [REVERSE, FORWARD] if kind == "over_dispersion" or signature == "sharpening" else [
        FORWARD, REVERSE]  # fmt: skip
    direction = "reverse" if kind == "over_dispersion" else "forward"
    lead = first + [(direction, g) for g in groups] + significant
    lead_key = next(key for key in lead if key in significant)
    return Diagnosis(
        kind, signature, tuple(groups), lead_key, float(ev.readings[lead_key].raw or 0.0),
        shares_f, shares_r, dict(sorted(ratio.items())), losing, _deficit(ev), n_modes,
    )  # fmt: skip


def alert_details(d: Diagnosis, ev: Evidence) -> dict[str, Any]:
    """The numbers behind an alert, as plain data (``Alert.details``)."""
    f, r = ev.readings.get(FORWARD), ev.readings.get(REVERSE)

    def rises(direction: str) -> dict[int, float | None]:
        groups = sorted(g for d, g in ev.readings if d == direction and g is not None)
        return {g: ev.readings[(direction, g)].effect for g in groups}

    return {
        "signature": d.signature,
        "series": [series_name(key) for key in ev.significant],
        "lead_series": series_name(d.lead),
        "forward": ev.forward,
        "reverse": ev.reverse,
        "forward_baseline": f.baseline if f is not None else None,
        "reverse_baseline": r.baseline if r is not None else None,
        "forward_rise": f.effect if f is not None else None,
        "reverse_rise": r.effect if r is not None else None,
        "forward_z": f.z if f is not None else None,
        "reverse_z": r.z if r is not None else None,
        "entropy_model": ev.entropy_model,
        "entropy_reference": ev.entropy_reference,
        "n_groups": d.n_modes,
        "group_forward_rise": rises("forward"),
        "group_reverse_rise": rises("reverse"),
        "group_forward_share": d.shares_forward,
        "group_reverse_share": d.shares_reverse,
        "group_mass_ratio": d.mass_ratio,
        "groups_losing_mass": d.losing,
    }


def _fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if x == math.inf:
        return "inf"
    return f"{x:.{digits}f}"


def _rise_text(name: str, reading: Reading | None, value: float | None) -> str:
    if value == math.inf:
        return f"{name} KL is infinite (support violation)"
    if reading is None or reading.effect is None:
        return f"{name} KL = {_fmt(value)}"
    return f"{name} KL rose {_fmt(reading.effect)} nats (z={_fmt(reading.z, 1)})"


def _collapse_text(d: Diagnosis, ev: Evidence) -> str:
    rev, n_modes = ev.reverse, d.n_modes
    rise = _rise_text("forward", ev.readings.get(FORWARD), ev.forward)
    msg = f"collapse at step {ev.step}: {rise} while reverse "
    if not (n_modes and rev is not None and math.isfinite(rev)):
        return msg + f"is only {_fmt(rev)}"
    # m of K modes left: from the groups losing mass, else from the reverse KL.
    m = n_modes - len(d.losing) if d.losing else round(n_modes * math.exp(-rev))
    m = min(max(m, 1), n_modes)
    bound = math.log(n_modes / m)
    if m < n_modes and abs(rev - bound) <= max(0.1 * bound, ev.min_effect):
        return msg + f"stayed at {_fmt(rev)} ≈ ln({n_modes}/{m})"
    if m < n_modes:
        return msg + (
            f"is {_fmt(rev)} (it settles at ln({n_modes}/{m}) = {_fmt(bound)} "
            f"once the {m} remaining modes are fitted)"
        )
    return msg + f"is {_fmt(rev)} (≤ ln {n_modes} = {_fmt(math.log(n_modes))})"


def alert_message(d: Diagnosis, ev: Evidence) -> str:
    """One human sentence for the alert (``Alert.message``)."""
    f, r = ev.readings.get(FORWARD), ev.readings.get(REVERSE)
    glist = ", ".join(str(g) for g in d.groups)
    if d.signature == "sharpening":
        msg = (
            f"collapse (sharpening) at step {ev.step}: model entropy "
            f"{_fmt(ev.entropy_model)} nats is {_fmt(d.deficit)} below the reference's "
            f"{_fmt(ev.entropy_reference)} while {_rise_text('reverse', r, ev.reverse)}"
        )
        return msg + (f"; groups losing coverage: {glist}" if d.groups else "")
    if d.kind == "collapse":
        return _collapse_text(d, ev) + (f"; modes dropped: {glist}" if d.groups else "")
    if d.kind == "coverage_gap":
        msg = f"coverage gap at step {ev.step}: {_rise_text('forward', f, ev.forward)}"
        if d.groups:
            carried = sum(d.shares_forward.get(g, 0.0) for g in d.groups)
            word = "group" if len(d.groups) == 1 else "groups"
            msg += f", concentrated in {word} {glist} ({carried:.0%} of the rise)"
        return msg + f"; reverse stayed at {_fmt(ev.reverse)}"
    msg = f"over-dispersion at step {ev.step}: {_rise_text('reverse', r, ev.reverse)}"
    msg += f" while forward is {_fmt(ev.forward)}"
    if f is not None and f.effect is not None and math.isfinite(f.effect):
        msg += f" ({f.effect:+.2f})"
    return msg + (f"; groups: {glist}" if d.groups else "")

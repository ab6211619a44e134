"""Typed results of the metrics: frozen dataclasses that are also flat Mappings.

``compute()`` of every metric returns one of these. The fields are the contract
(per direction: value, stderr, n and the method actually used; per group: the same
and the group's mass; entropies; counters). The flat ``str -> 0-dim tensor`` view
that ``self.log_dict(metric.compute())`` needs is generated from the fields here, in
``_pairs``, and nowhere else; no module parses a key back.

All numbers are Python floats, read from the metric's states in one host transfer.
The tensors of the Mapping view are built on first access, in one transfer to the
metric's device.

Examples:
    >>> r = CategoricalResult(
    ...     forward=DirectionEstimate(0.2, 0.01, 100.0, "exact"),
    ...     reverse=DirectionEstimate(0.1, 0.01, 100.0, "exact"),
    ...     entropy_reference=1.0, entropy_model=0.9, n_rows=100.0)
    >>> r.forward.value, float(r["asymmetry"]), r.reduction
    (0.2, 0.1, 'token_mean')
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "DIRECTIONS",
    "CategoricalResult",
    "RowSource",
    "Direction",
    "DirectionEstimate",
    "GroupEstimate",
    "KLResult",
    "MonteCarloResult",
    "SampledResult",
    "SamplesResult",
]

Direction = Literal["forward", "reverse"]
#: The two directions, forward D(P‖Q) first.
DIRECTIONS: tuple[Direction, ...] = ("forward", "reverse")
#: ``method_used`` of an exact (categorical) estimate and of an importance-weighted one.
EXACT, IMPORTANCE_WEIGHTED = "exact", "iw"
_Pairs = list[tuple[str, float]]


@dataclass(frozen=True)
class DirectionEstimate:
    """One direction's estimate over everything the metric has seen.

    Attributes:
        value: the KL in nats (``+inf`` with support violations).
        stderr: its standard error.
        n: units averaged (samples, rows or sequences).
        method_used: ``"exact"`` (categorical), ``"naive"``, ``"k3"``, ``"cv"`` or
            ``"iw"`` (importance-weighted reverse).
        c: the control-variate coefficient applied (Monte Carlo only).
        variance_reduction: naive variance over the method's (Monte Carlo only).
        tail_index: Pareto k̂ of the weights (Monte Carlo only).
        ess: effective sample size (importance-weighted only).
        reliable: whether the interval can be trusted (importance-weighted only:
            ``IWEstimate.reliable``; ``None`` elsewhere).
    """

    value: float
    stderr: float
    n: float
    method_used: str
    c: float | None = None
    variance_reduction: float | None = None
    tail_index: float | None = None
    ess: float | None = None
    reliable: bool | None = None


@dataclass(frozen=True)
class GroupEstimate:
    """A group's conditional KL (a naive mean over the group's units).

    Attributes:
        value: E[log ratio | group] in nats.
        stderr: its standard error.
        n: the group's units (rows, sequences or samples).
        mass: the group's share of the mass the estimate averages over: the share of
            rows (categorical) or the model's share of mass (sampled reverse);
            ``None`` where not defined.
    """

    value: float
    stderr: float
    n: float
    mass: float | None = None


class KLResult(Mapping):
    """Base of the typed results: a read-only ``Mapping[str, Tensor]`` of scalars.

    Subclasses are frozen dataclasses whose ``_pairs`` lists ``(key, float)`` in
    logging order. ``logged_pairs()`` is the subset the callback logs.
    """

    device: torch.device | str

    def _pairs(self, logged: bool) -> _Pairs:
        raise NotImplementedError

    def to_floats(self) -> dict[str, float]:
        """The Mapping view as plain Python floats (no device transfer)."""
        return dict(self._pairs(False))

    def logged_pairs(self) -> _Pairs:
        """What the callback logs: per-group detail (stderr, counts) left out."""
        return self._pairs(True)

    def _tensors(self) -> dict[str, torch.Tensor]:
        cached = self.__dict__.get("_cache")
        if cached is None:
            pairs = self._pairs(False)
            values = torch.tensor([v for _, v in pairs], dtype=torch.float64)
            values = values.to(self.device).unbind(0)
            cached = {k: v for (k, _), v in zip(pairs, values, strict=True)}
            object.__setattr__(self, "_cache", cached)
        return cached

    def __getitem__(self, key: str) -> torch.Tensor:
        return self._tensors()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors())

    def __len__(self) -> int:
        return len(self._tensors())

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_cache"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)


def _group_pairs(
    name: str, groups: Mapping[int, GroupEstimate], g: int, detail: bool, mass_key: str | None
) -> _Pairs:
    est = groups.get(g)
    if est is None:
        return []
    out = [(f"{name}/group_{g}", est.value)]
    if detail:
        out += [(f"{name}_stderr/group_{g}", est.stderr), (f"{name}_n/group_{g}", est.n)]
    if mass_key is not None and est.mass is not None:
        out.append((f"{mass_key}/group_{g}", est.mass))
    return out


@dataclass(frozen=True, eq=False)
class MonteCarloResult(KLResult):
    """``MonteCarloKL.compute()``: D(A‖B) from samples of A.

    Keys: ``kl``, ``stderr``, ``n``, ``c``, ``variance_reduction``, ``tail_index``,
    ``nonfinite``, ``support_violations``; per group g ``kl/group_g``,
    ``stderr/group_g``, ``n/group_g``.
    """

    estimate: DirectionEstimate
    method: str
    nonfinite: float = 0.0
    support_violations: float = 0.0
    groups: Mapping[int, GroupEstimate] = field(default_factory=dict)
    device: torch.device | str = "cpu"

    @property
    def method_used(self) -> str:
        return self.estimate.method_used

    def _pairs(self, logged: bool) -> _Pairs:
        e = self.estimate
        out = [("kl", e.value), ("stderr", e.stderr), ("n", e.n), ("c", e.c),
               ("variance_reduction", e.variance_reduction), ("tail_index", e.tail_index),
               ("nonfinite", self.nonfinite),
               ("support_violations", self.support_violations)]  # fmt: skip
        for g, ge in sorted(self.groups.items()):
            out += [(f"kl/group_{g}", ge.value), (f"stderr/group_{g}", ge.stderr),
                    (f"n/group_{g}", ge.n)]  # fmt: skip
        return [(k, float(v)) for k, v in out]


@dataclass(frozen=True, eq=False)
class _BothDirections(KLResult):
    """Fields shared by the results with both directions (see the subclasses)."""

    forward: DirectionEstimate
    reverse: DirectionEstimate
    nonfinite: float = 0.0
    support_violations: float = 0.0
    group_forward: Mapping[int, GroupEstimate] = field(default_factory=dict)
    group_reverse: Mapping[int, GroupEstimate] = field(default_factory=dict)
    device: torch.device | str = "cpu"

    @property
    def asymmetry(self) -> float | None:
        """forward − reverse (``nan`` when both are ``+inf``; ``None`` when a direction
        is missing: logits rows of one source only, see ``CategoricalResult``)."""
        if self.forward is None or self.reverse is None:
            return None
        return self.forward.value - self.reverse.value

    def direction(self, name: Direction) -> DirectionEstimate:
        return self.forward if name == "forward" else self.reverse

    def groups(self, name: Direction) -> Mapping[int, GroupEstimate]:
        return self.group_forward if name == "forward" else self.group_reverse

    def group_weights(self) -> dict[int, float]:
        """Per group, the weight the alert rules compare with its baseline."""
        raise NotImplementedError

    def contributions(self) -> dict[int, float]:
        """Per group, its part of the forward KL in nats: (n_g / Σn) · KL_g.

        The parts add up to the (naive) forward KL; a group matters by its part, not by
        its conditional KL (a rare group can have a large KL and move nothing).

        Examples:
            >>> est = DirectionEstimate(0.3, 0.01, 4.0, "naive")
            >>> r = SampledResult(forward=est, reverse=est, group_forward={
            ...     0: GroupEstimate(0.1, 0.0, 3.0), 1: GroupEstimate(0.9, 0.0, 1.0)})
            >>> {g: round(c, 3) for g, c in r.contributions().items()}
            {0: 0.075, 1: 0.225}
        """
        total = sum(ge.n for ge in self.group_forward.values())
        if not total:
            return {}
        return {g: ge.n / total * ge.value for g, ge in sorted(self.group_forward.items())}

    def bands(self) -> _Pairs:
        """``<direction>_lower``/``_upper``: value ∓ 2 stderr where stderr is finite."""
        out: _Pairs = []
        for name in DIRECTIONS:
            est = self.direction(name)
            if est is not None and math.isfinite(est.stderr):
                out += [(f"{name}_lower", est.value - 2.0 * est.stderr),
                        (f"{name}_upper", est.value + 2.0 * est.stderr)]  # fmt: skip
        return out


@dataclass(frozen=True)
class RowSource:
    """What the logits rows drawn from one distribution say (see ``CategoricalResult``).

    Attributes:
        sampled_from: ``"reference"`` or ``"model"``.
        forward: Σ (or mean) of D(P_t‖Q_t) over these rows, per unit.
        reverse: D(Q_t‖P_t) likewise.
        forward_shared: forward KL on the shared support (``kl_monitor.support``).
        reverse_shared: reverse KL on the shared support.
        entropy_reference: H(P) per unit on these rows.
        entropy_model: H(Q) per unit on these rows.
        reference_mass_outside: mean per row of P's mass on classes Q forbids.
        model_mass_outside: mean per row of Q's mass on classes P forbids.
        group_forward: per-group forward KL (with the group's share of units as mass).
        group_reverse: per-group reverse KL.
        group_mass_outside: per group, ``(reference_mass_outside, model_mass_outside)``.
        n_rows: rows counted; support_violations, nonfinite: as in the result.
    """

    sampled_from: str
    forward: DirectionEstimate
    reverse: DirectionEstimate
    forward_shared: DirectionEstimate
    reverse_shared: DirectionEstimate
    entropy_reference: float
    entropy_model: float
    reference_mass_outside: float
    model_mass_outside: float
    group_forward: Mapping[int, GroupEstimate] = field(default_factory=dict)
    group_reverse: Mapping[int, GroupEstimate] = field(default_factory=dict)
    group_mass_outside: Mapping[int, tuple[float, float]] = field(default_factory=dict)
    n_rows: float = 0.0
    support_violations: float = 0.0
    nonfinite: float = 0.0

    @property
    def valid(self) -> Direction:
        """The direction that is a sequence-level KL summed along these rows."""
        return "forward" if self.sampled_from == "reference" else "reverse"

    @property
    def other(self) -> Direction:
        return "reverse" if self.valid == "forward" else "forward"

    def estimate(self, name: Direction) -> DirectionEstimate:
        return self.forward if name == "forward" else self.reverse


@dataclass(frozen=True, eq=False)
class CategoricalResult(_BothDirections):
    """``CategoricalKL.compute()``: exact KL in both directions from logits.

    Keys: ``forward``, ``reverse``, ``asymmetry``, ``forward_stderr``,
    ``reverse_stderr``, ``entropy_reference``, ``entropy_model``,
    ``support_violations``, ``nonfinite``, ``n`` (units), ``n_rows``; per group g
    ``forward/group_g``, ``reverse/group_g``, ``forward_stderr/group_g``,
    ``reverse_stderr/group_g``, ``n/group_g``. Logged, ``n/group_g`` becomes
    ``mass/group_g`` (the group's share of the units) and the stderrs are left out.

    **Rows labelled by source** (``sources`` non-empty: updates said
    ``sampled_from``). Summed along a sequence, a direction is a sequence-level KL only
    on rows drawn from its first argument. ``forward`` then comes from the reference's
    rows and ``reverse`` from the model's (``None`` without such rows; ``asymmetry``
    only with both); the other direction of each source is the teacher-forced
    ``<direction>_on_<source>_samples`` (and ``_stderr``), and the entropy of the
    distribution that did not sample the only rows there are is
    ``entropy_<name>_on_<source>_samples``. Reference rows alone with
    ``reduction="token_mean"`` keep both plain directions (per-token KLs at the data's
    contexts). Always, beside each direction, its support-mismatch companions
    ``<direction>_shared`` (+ ``_stderr``, named like the direction) and the per-row
    masses ``model_mass_outside`` (the model's rows when there are some) and
    ``reference_mass_outside`` (the reference's rows when there are some), also per
    group; ``n_model_samples`` with both sources. Logged, the stderrs of the
    diagnostics and companions are left out.
    """

    entropy_reference: float = math.nan
    entropy_model: float = math.nan
    n_rows: float = 0.0
    reduction: str = "token_mean"
    sources: Mapping[str, RowSource] = field(default_factory=dict)

    def group_weights(self) -> dict[int, float]:
        # the units per group of the first source: both directions of a source average
        # over the same rows
        groups = self.group_forward or self.group_reverse
        return {g: est.n for g, est in groups.items()}

    def _pairs(self, logged: bool) -> _Pairs:
        if self.sources:
            return [(k, float(v)) for k, v in _labelled_pairs(self, logged)]
        f, r = self.forward, self.reverse
        out = [("forward", f.value), ("reverse", r.value), ("asymmetry", self.asymmetry),
               ("forward_stderr", f.stderr), ("reverse_stderr", r.stderr),
               ("entropy_reference", self.entropy_reference),
               ("entropy_model", self.entropy_model),
               ("support_violations", self.support_violations), ("nonfinite", self.nonfinite),
               ("n", f.n), ("n_rows", self.n_rows)]  # fmt: skip
        for g, gf in sorted(self.group_forward.items()):
            gr = self.group_reverse[g]
            out += [(f"forward/group_{g}", gf.value), (f"reverse/group_{g}", gr.value)]
            if logged:
                out.append((f"mass/group_{g}", gf.mass if gf.mass is not None else 0.0))
            else:
                out += [(f"forward_stderr/group_{g}", gf.stderr),
                        (f"reverse_stderr/group_{g}", gr.stderr),
                        (f"n/group_{g}", gf.n)]  # fmt: skip
        return [(k, float(v)) for k, v in out]


def _labelled_pairs(res: CategoricalResult, logged: bool) -> _Pairs:
    """The keys of a ``CategoricalResult`` whose rows said where they came from."""
    src = list(res.sources.values())
    ref, mod = res.sources.get("reference"), res.sources.get("model")
    # reference rows alone, per token: both plain (per-token KLs at the data's contexts)
    both_plain = mod is None and res.reduction == "token_mean"
    present = [name for name in DIRECTIONS if res.direction(name) is not None]
    out: _Pairs = [(name, res.direction(name).value) for name in present]
    if res.asymmetry is not None:
        out.append(("asymmetry", res.asymmetry))
    out += [(f"{name}_stderr", res.direction(name).stderr) for name in present]

    def add(key: str, est: DirectionEstimate) -> None:
        out.append((key, est.value))
        if not logged:
            out.append((f"{key}_stderr", est.stderr))

    for s in src:  # each source's other direction: a teacher-forced diagnostic
        if not both_plain:
            add(f"{s.other}_on_{s.sampled_from}_samples", s.estimate(s.other))
    for s in src:  # finite companions, named like their direction
        add(f"{s.valid}_shared", s.forward_shared if s.valid == "forward" else s.reverse_shared)
        other = s.reverse_shared if s.valid == "forward" else s.forward_shared
        add(f"{s.other}_shared" if both_plain else
            f"{s.other}_shared_on_{s.sampled_from}_samples", other)
    # each distribution's entropy on its own samples; else named by the rows it is on
    for key, own, rows in (("entropy_reference", ref, mod), ("entropy_model", mod, ref)):
        if own is not None:
            out.append((key, getattr(own, key)))
        elif both_plain:
            out.append((key, getattr(rows, key)))
        else:
            out.append((f"{key}_on_{rows.sampled_from}_samples", getattr(rows, key)))
    leak_src, cover_src = mod or ref, ref or mod
    out += [("model_mass_outside", leak_src.model_mass_outside),
            ("reference_mass_outside", cover_src.reference_mass_outside),
            ("support_violations", res.support_violations), ("nonfinite", res.nonfinite),
            ("n", src[0].estimate(src[0].valid).n)]  # fmt: skip
    if ref is not None and mod is not None:
        out.append(("n_model_samples", mod.reverse.n))
    out.append(("n_rows", res.n_rows))
    return out + _labelled_group_pairs(res, logged, leak_src, cover_src)


def _labelled_group_pairs(
    res: CategoricalResult, logged: bool, leak_src: RowSource, cover_src: RowSource
) -> _Pairs:
    out: _Pairs = []
    counts = res.group_forward or res.group_reverse
    for g in sorted(set(res.group_forward) | set(res.group_reverse)):
        for name in DIRECTIONS:
            est = res.groups(name).get(g)
            if est is not None:
                out.append((f"{name}/group_{g}", est.value))
        est = counts.get(g)
        if logged:
            if est is not None:
                out.append((f"mass/group_{g}", est.mass if est.mass is not None else 0.0))
        else:
            for name in DIRECTIONS:
                ge = res.groups(name).get(g)
                if ge is not None:
                    out.append((f"{name}_stderr/group_{g}", ge.stderr))
            if est is not None:
                out.append((f"n/group_{g}", est.n))
        if g in leak_src.group_mass_outside:
            out.append((f"model_mass_outside/group_{g}", leak_src.group_mass_outside[g][1]))
        if g in cover_src.group_mass_outside:
            out.append((f"reference_mass_outside/group_{g}", cover_src.group_mass_outside[g][0]))
    return out


@dataclass(frozen=True, eq=False)
class SampledResult(_BothDirections):
    """``SampledKL.compute()``: both directions from samples.

    Keys: ``forward``, ``forward_stderr``, ``forward_n``, ``forward_c``,
    ``forward_variance_reduction``, ``forward_tail_index``; ``reverse``,
    ``reverse_stderr``, ``reverse_n``, ``reverse_ess``, ``reverse_tail_index``,
    ``reverse_importance_weighted``, ``reverse_reliable`` (0 when the importance-weighted
    interval failed its checks, else 1) and, with model samples, ``reverse_c`` and
    ``reverse_variance_reduction``; ``asymmetry``, ``nonfinite``,
    ``support_violations``; per group g ``forward/group_g``, ``forward_stderr/group_g``,
    ``forward_n/group_g`` and, where the model has mass, ``reverse/group_g``,
    ``reverse_stderr/group_g``, ``reverse_n/group_g``, ``reverse_mass/group_g``.
    Logged, the per-group stderrs and counts are left out.
    """

    method: str = "cv"

    @property
    def importance_weighted(self) -> bool:
        return self.reverse.method_used == IMPORTANCE_WEIGHTED

    @property
    def reverse_estimator(self) -> str:
        return "importance_weighted" if self.importance_weighted else "model_samples"

    @property
    def forward_method_used(self) -> str:
        return self.forward.method_used

    @property
    def reverse_method_used(self) -> str:
        return self.reverse.method_used

    def group_weights(self) -> dict[int, float]:
        # the model's share of mass; 0 where the reference has the group and the model not
        mass = {g: est.mass or 0.0 for g, est in self.group_reverse.items()}
        return {g: mass.get(g, 0.0) for g in self.group_forward}

    def _pairs(self, logged: bool) -> _Pairs:
        f, r = self.forward, self.reverse
        out = [("forward", f.value), ("forward_stderr", f.stderr), ("forward_n", f.n),
               ("forward_c", f.c), ("forward_variance_reduction", f.variance_reduction),
               ("forward_tail_index", f.tail_index),
               ("reverse", r.value), ("reverse_stderr", r.stderr), ("reverse_n", r.n),
               ("reverse_ess", r.ess if self.importance_weighted else r.n),
               ("reverse_tail_index", r.tail_index),
               ("reverse_importance_weighted", float(self.importance_weighted)),
               ("reverse_reliable", float(r.reliable is not False))]  # fmt: skip
        if not self.importance_weighted:
            out += [("reverse_c", r.c), ("reverse_variance_reduction", r.variance_reduction)]
        out += [("asymmetry", self.asymmetry), ("nonfinite", self.nonfinite),
                ("support_violations", self.support_violations)]  # fmt: skip
        detail = not logged
        for g in sorted(self.group_forward):
            out += _group_pairs("forward", self.group_forward, g, detail, None)
            if self.importance_weighted:
                out += _group_pairs("reverse", self.group_reverse, g, detail, "reverse_mass")
        if not self.importance_weighted:
            for g in sorted(self.group_reverse):
                out += _group_pairs("reverse", self.group_reverse, g, detail, "reverse_mass")
        return [(k, float(v)) for k, v in out]


@dataclass(frozen=True, eq=False)
class SamplesResult(_BothDirections):
    """``KNNKL.compute()`` and ``BinnedKL.compute()``: both directions from samples alone.

    ``forward.n`` counts reference samples and ``reverse.n`` model samples;
    ``method_used`` is ``"knn"`` or ``"binned"``. Per-group values are means of the
    per-sample k-NN terms (or a cell's log ratio for binned); ``mass`` on the reverse
    estimates is the model's share of samples in the group.

    Keys: ``forward``, ``reverse``, ``asymmetry``, ``forward_stderr``,
    ``reverse_stderr``, ``n``, ``m``, ``d``, then ``k`` (k-NN) or ``num_cells`` and
    ``ndb`` (binned), ``ties``, ``nonfinite``, ``dropped``; per group g
    ``forward/group_g``, ``reverse_mass/group_g`` (0 where the model has no sample) and,
    where the model has samples, ``reverse/group_g``; not logged,
    ``forward_stderr/group_g``, ``forward_n/group_g``, ``reverse_stderr/group_g``,
    ``reverse_n/group_g``.

    Attributes beyond the keys: ``group_kind`` (``"group"`` for the user's labels,
    ``"cell"`` for k-means cells, ``None``), ``centroids`` (the cells' centres, or
    ``None``) and ``details`` (the functional core's ``KNNKLResult`` or
    ``BinnedKLResult``).
    """

    d: float = 0.0
    k: float | None = None
    num_cells: float | None = None
    ndb: float | None = None
    ties: float = 0.0
    dropped: float = 0.0
    group_kind: str | None = None
    centroids: torch.Tensor | None = None
    details: Any = None

    @property
    def estimator(self) -> str:
        return self.forward.method_used

    def group_weights(self) -> dict[int, float]:
        # the model's share of samples; 0 where the reference has the group and the model not
        mass = {g: est.mass or 0.0 for g, est in self.group_reverse.items()}
        return {g: mass.get(g, 0.0) for g in self.group_forward}

    def _pairs(self, logged: bool) -> _Pairs:
        f, r = self.forward, self.reverse
        out = [("forward", f.value), ("reverse", r.value), ("asymmetry", self.asymmetry),
               ("forward_stderr", f.stderr), ("reverse_stderr", r.stderr),
               ("n", f.n), ("m", r.n), ("d", self.d)]  # fmt: skip
        out += [(key, v) for key, v in (("k", self.k), ("num_cells", self.num_cells),
                                        ("ndb", self.ndb)) if v is not None]  # fmt: skip
        out += [("ties", self.ties), ("nonfinite", self.nonfinite), ("dropped", self.dropped)]
        detail, weights = not logged, self.group_weights()
        for g in sorted(self.group_forward):
            out += _group_pairs("forward", self.group_forward, g, detail, None)
            out.append((f"reverse_mass/group_{g}", weights[g]))
        for g in sorted(self.group_reverse):
            out += _group_pairs("reverse", self.group_reverse, g, detail, None)
        return [(k, float(v)) for k, v in out]

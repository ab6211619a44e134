"""Paired evidence: per-row values of the baseline evaluations, kept to pair with.

The held-out rows are the same at every evaluation (the loader is read in the same
order; model samples are drawn with common random numbers: the same seed each
time). So the change of any series between the current evaluation and a baseline
evaluation is a mean of per-row differences d_i = c_i(now) − c_i(baseline), whose
standard error sd(d)/√n is far smaller than two independent standard errors.
``PairedRows`` keeps, per rank and bounded by ``max_rows`` per stream:

* the held-out rows' per-unit forward KL (and for logits: reverse KL, the model's
  entropy) of each group's baseline evaluation, plus a fingerprint of the rows
  (log p(x) or the reference's entropy) that tells whether the rows are the same;
* the model samples' reverse log ratios and labels of each baseline evaluation
  still in use (usually one or two).

Every series reduces to six sums (n, Σnow, Σnow², Σbase, Σbase², Σd²), summed
across ranks in one collective: the evidence is the same on every rank. When the
rows are not the same (a shuffling loader, a different count), the change falls
back to the unpaired standard error √(var_now/n + var_base/n), agreed across ranks.

Examples:
    >>> import torch
    >>> from kl_monitor import KLInputs
    >>> pr = PairedRows()
    >>> lp = torch.zeros(4)
    >>> pr.start(); pr.add(KLInputs.from_log_probs(lp, lp - 0.1)); ev = pr.evidence(0, None)
    >>> pr.start(); pr.add(KLInputs.from_log_probs(lp, lp - 0.3)); ev = pr.evidence(1, None)
    >>> round(ev.forward.rise, 6), ev.forward.se
    (0.2, 0.0)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .alerting import Change, Decision, Evidence
from .estimators import categorical_kl_rows
from .inputs import KLInputs

__all__ = ["PairedRows"]

_F64 = torch.float64
#: per series: n, Σnow, Σnow², Σbase, Σbase², Σd²
_NSUM = 6


def _sums(now: Tensor, base: Tensor, lab: Tensor | None, blab: Tensor | None, g: int) -> Tensor:
    """(1 + G, 6) sums: row 0 the whole stream, row 1 + k the contribution of group k.

    A group's contribution is 1[label = k]·value over all rows (zero elsewhere), with
    the current labels for ``now`` and the baseline's for ``base`` (model samples
    change group between evaluations; held-out rows do not).
    """
    n = torch.full((1,), float(now.numel()), dtype=_F64)

    def six(a: Tensor, b: Tensor) -> Tensor:
        d = a - b
        dd = torch.where(torch.isfinite(d), d * d, torch.zeros((), dtype=_F64)).sum(0)
        return torch.stack(
            [n.expand(a.shape[1:]), a.sum(0), (a * a).sum(0), b.sum(0), (b * b).sum(0), dd]
        ).T

    out = [six(now[:, None], base[:, None])]
    if g:
        rows = torch.arange(g)
        a = torch.where(lab[:, None] == rows, now[:, None], torch.zeros((), dtype=_F64))
        b = torch.where(blab[:, None] == rows, base[:, None], torch.zeros((), dtype=_F64))
        out.append(six(a, b))
    return torch.cat(out)


def _change(s: list[float], paired: bool, n: float | None = None,
            df: float | None = None) -> Change:  # fmt: skip
    """A Change from the six sums; `n` overrides the count (conditional means), `df`
    the degrees of freedom (the rows carrying a group's contribution, less one)."""
    count = s[0] if n is None else n
    if paired:
        return Change.from_sums(count, s[1], s[3], s[5], df)
    if count <= 1:
        return Change(s[1] / max(count, 1), s[3] / max(count, 1), float("inf"))
    m1, m0 = s[1] / count, s[3] / count
    v1 = max(s[2] / count - m1 * m1, 0.0) if abs(m1) != float("inf") else 0.0
    v0 = max(s[4] / count - m0 * m0, 0.0) if abs(m0) != float("inf") else 0.0
    return Change(m1, m0, ((v1 + v0) / (count - 1)) ** 0.5,
                  float(count - 1 if df is None else df))  # fmt: skip


def _evidence(step: int, total: Tensor, layout: list[str], g: int, paired: bool) -> Evidence:
    """The Evidence from every series' six sums (reduced across ranks), by layout."""
    vals = total.tolist()
    blocks: dict[str, list[list[float]]] = {}
    i = 0
    for name in layout:
        k = 1 if name in ("forward", "reverse", "tokens") else g
        blocks[name] = [vals[i + j * _NSUM : i + (j + 1) * _NSUM] for j in range(k)]
        i += k * _NSUM
    ev: dict[str, Any] = {
        name: _change(blocks[name][0], paired) for name in ("forward", "reverse")
        if name in blocks
    }  # fmt: skip
    if "tokens" in blocks and blocks["tokens"][0][0] > 0:
        ev["unit_tokens"] = blocks["tokens"][0][1] / blocks["tokens"][0][0]
    if g and "count" in blocks:
        n = blocks["forward"][0][0]
        n_g = [row[1] for row in blocks["count"]]
        ev["reference_rows"] = n
        ev["group_reference_mass"] = {k: n_g[k] / n for k in range(g) if n_g[k] > 0}
        ev["group_forward"] = {k: _change(blocks["group_forward"][k], paired, df=n_g[k] - 1)
                               for k in ev["group_reference_mass"]}  # fmt: skip
    if g:
        counts = blocks.get("group_mass") or blocks.get("sample_count")
        if "group_reverse" in blocks:
            # the rows (or model samples) in the group carry its contribution
            carried = [row[1] for row in counts] if counts else n_g
            ev["group_reverse"] = {
                k: _change(s, paired, df=max(carried[k] - 1, 0.0))
                for k, s in enumerate(blocks["group_reverse"])
            }
        if "group_mass" in blocks:
            mass = blocks["group_mass"]
            ev["group_mass"] = {k: _change(s, paired) for k, s in enumerate(mass)}
        if "group_entropy" in blocks:
            seen = ev["group_reference_mass"]
            ent = blocks["group_entropy"]
            ev["group_entropy"] = {k: _change(ent[k], paired, n_g[k]) for k in seen}
            ev["group_entropy_reference"] = {
                k: blocks["entropy_reference"][k][1] / n_g[k] for k in seen
            }
    return Evidence(step, **ev)


class PairedRows:
    """Collects one evaluation's per-row values and pairs them with the baselines.

    Args:
        max_rows: per rank, rows (and model samples) kept per evaluation; later
            rows still count in the metric but not in the pairing.

    Call ``start()`` before an evaluation, ``add(inputs)`` per batch (with the
    metric that validated them, for its group labels), ``evidence(step, G, reduce)``
    after it, and ``rebase(decision)`` with the engine's decision.
    """

    def __init__(self, max_rows: int = 1 << 16) -> None:
        self.max_rows = int(max_rows)
        self._cur: dict[str, list[Tensor]] = {}
        self._now: dict[str, Tensor | None] = {}
        self._rows: dict[str, Tensor] | None = None  # per-row baselines (held-out rows)
        self._global: dict[str, Tensor | None] | None = None  # the global baseline
        self._pool: dict[int, dict[str, Tensor]] = {}  # model-sample baselines
        self._group_eval: dict[int, int] = {}
        self._eval_id = 0
        self.paired = True
        self._r_on_rows = False  # reverse KL from P's rows (logits), not model samples

    def start(self) -> None:
        self._cur = {k: [] for k in ("f", "r_rows", "h", "fp", "lab", "r", "rlab", "tok")}

    def add(self, inputs: KLInputs, metric: Any = None) -> None:
        """This batch's per-unit values (detached, float64, on the CPU)."""
        if not self._cur:
            self.start()
        if inputs.kind not in ("logits", "log_probs"):
            return  # no per-row log ratios to pair (samples only): no paired evidence
        if inputs.kind == "logits":
            self._add_logits(inputs, metric)
        else:
            f = (inputs.reference.detach().to(_F64) - inputs.model.detach().to(_F64)).reshape(-1)
            keep = ~torch.isnan(f)
            self._push("f", f[keep])
            self._push("fp", inputs.reference.detach().to(_F64).reshape(-1)[keep])
            if inputs.groups is not None:
                self._push("lab", inputs.groups.reshape(-1).to(torch.int64)[keep])
            if inputs.model_samples_log_q is not None:
                r = inputs.model_samples_log_q.detach().to(_F64)
                r = (r - inputs.model_samples_log_p.detach().to(_F64)).reshape(-1)
                rk = ~torch.isnan(r)
                self._push("r", r[rk])
                if inputs.model_samples_groups is not None:
                    self._push("rlab", inputs.model_samples_groups.reshape(-1).to(torch.int64)[rk])

    def _add_logits(self, inputs: KLInputs, metric: Any) -> None:
        ref = inputs.reference
        key, out = getattr(metric, "last_rows", (None, None))
        if key != (ref.data_ptr(), tuple(ref.shape)):  # not the batch the metric just saw
            out = categorical_kl_rows(ref, inputs.model)
        fwd, rev, hp, hq, valid = out[:5]
        lead = tuple(inputs.reference.shape[:-1])
        counted = valid if inputs.mask is None else valid & inputs.mask.to(valid.device)
        labels = None
        if inputs.groups is not None and metric is not None:
            labels = metric._labels(inputs.groups, lead, counted)  # the metric's own rule
        unit = counted
        vals = [x.to(_F64).detach() for x in (fwd, rev, hq, hp)]
        if getattr(metric, "reduction", "token_mean") == "sequence_sum":
            vals = [torch.where(counted, v, torch.zeros((), dtype=_F64)).sum(-1) for v in vals]
            unit = counted.any(-1)
            self._push("tok", counted.sum(-1).to(_F64)[unit].cpu())  # tokens per unit
        if inputs.sampled_from == "model":
            # the model's own generations: model samples (reverse KL, as the metric
            # reports it), paired by common random numbers, never rows of P
            self._push("r", vals[1][unit].cpu())
            if labels is not None:
                self._push("rlab", labels[unit].cpu())
            return
        for key, v in zip(("f", "r_rows", "h", "fp"), vals, strict=True):
            self._push(key, v[unit].cpu())
        if labels is not None:
            self._push("lab", labels[unit].cpu())

    @property
    def has_rows(self) -> bool:
        """Whether the current evaluation added rows to pair (same on every rank)."""
        return bool(self._cur.get("f") or self._cur.get("r"))

    def _push(self, key: str, x: Tensor) -> None:
        have = sum(t.numel() for t in self._cur[key])
        if have < self.max_rows:
            self._cur[key].append(x.detach().reshape(-1).cpu()[: self.max_rows - have])

    def _current(self) -> dict[str, Tensor | None]:
        cat = {k: torch.cat(v) if v else None for k, v in self._cur.items()}
        self._r_on_rows = cat["r"] is None and cat["r_rows"] is not None
        if self._r_on_rows:  # logits of P's rows only: reverse KL on the same rows
            cat["r"], cat["rlab"] = cat["r_rows"], cat["lab"]
        return cat

    # ------------------------------------------------------------------ evidence
    def _same_rows(self, cur: dict[str, Tensor | None]) -> tuple[bool, bool]:
        """(sizes agree, rows are the same) against the stored baselines."""
        base, glob = self._rows, self._global
        if base is None or glob is None:
            return False, False
        sizes = all(
            (cur[k] is None) == (glob[k] is None)
            and (cur[k] is None or cur[k].numel() == glob[k].numel())
            for k in ("f", "r")
        )
        same = sizes and (
            cur["fp"] is None
            or bool(torch.allclose(cur["fp"], base["fp"], rtol=1e-6, atol=1e-9, equal_nan=True))
        )
        return sizes, same

    def _set_all(self, cur: dict[str, Tensor | None], g: int) -> None:
        self._rows = {k: v.clone() for k, v in cur.items() if v is not None and k[0] != "r"}
        if cur["r_rows"] is not None:
            self._rows["r_rows"] = cur["r_rows"].clone()
        self._global = dict(cur)
        self._eval_id += 1
        self._pool = {self._eval_id: {"r": cur["r"], "rlab": cur["rlab"]}}
        self._group_eval = {k: self._eval_id for k in range(g)}

    def evidence(
        self, step: int, num_groups: int | None, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> Evidence:
        """The current evaluation's paired changes against the baselines.

        Args:
            step: training step.
            num_groups: G when the rows carry group labels, else ``None``.
            reduce: sums a tensor across ranks (``trainer.strategy.reduce``), or
                ``None`` on one process.
        """
        cur = self._now = self._current()
        g = num_groups or 0
        if cur["f"] is None and cur["r"] is None:
            raise ValueError("PairedRows.evidence(): no rows were added since start().")
        if cur["lab"] is None and cur["rlab"] is None:
            g = 0
        if self._rows is None:
            self._set_all(cur, g)  # the first evaluation is the first baseline
        sizes, same = self._same_rows(cur)
        flags = torch.tensor([float(not sizes), float(not same)], dtype=_F64)
        flags = reduce(flags) if reduce is not None else flags
        if flags[0] > 0:
            self._set_all(cur, g)  # the rows changed size somewhere: start over
        self.paired = bool(flags[0] > 0 or flags[1] == 0)
        parts, layout = self._parts(cur, g)
        total = torch.cat([p.reshape(-1) for p in parts])
        total = reduce(total) if reduce is not None else total
        return _evidence(step, total, layout, g, self.paired)

    def _parts(self, cur: dict[str, Tensor | None], g: int) -> tuple[list[Tensor], list[str]]:
        rows, glob = self._rows, self._global
        parts, layout = [], []
        for name, key in (("forward", "f"), ("reverse", "r")):
            if cur[key] is not None:
                parts.append(_sums(cur[key], glob[key], None, None, 0))
                layout.append(name)
        if cur["tok"] is not None:
            parts.append(_sums(cur["tok"], cur["tok"], None, None, 0))
            layout.append("tokens")
        if not g:
            return parts, layout
        if cur["f"] is not None and cur["lab"] is not None:  # held-out rows of P
            lab, blab = cur["lab"], rows.get("lab")
            ones = torch.ones_like(cur["f"])
            parts.append(_sums(ones, ones, lab, blab, g)[1:])  # n_g
            parts.append(_sums(cur["f"], rows["f"], lab, blab, g)[1:])
            layout += ["count", "group_forward"]
            if cur["h"] is not None:  # logits: the model's entropy on the same rows
                parts.append(_sums(cur["h"], rows["h"], lab, blab, g)[1:])
                parts.append(_sums(cur["fp"], cur["fp"], lab, lab, g)[1:])
                layout += ["group_entropy", "entropy_reference"]
            if self._r_on_rows:
                parts.append(_sums(cur["r"], rows["r_rows"], lab, blab, g)[1:])
                layout.append("group_reverse")
                return parts, layout
        if cur["r"] is not None and cur["rlab"] is not None:  # model samples
            rev, mass = self._sample_groups(cur, g)
            parts += [rev, mass]
            # log densities: a sample's group is where the model put it (its mass); a
            # generation's group is its prompt's, which the model cannot move: counts only
            mass_is_mass = cur["h"] is None and cur["fp"] is not None
            layout += ["group_reverse", "group_mass" if mass_is_mass else "sample_count"]
        return parts, layout

    def _sample_groups(self, cur: dict[str, Tensor | None], g: int) -> tuple[Tensor, Tensor]:
        """Per group, model-sample sums against that group's baseline evaluation."""
        rev = torch.zeros(g, _NSUM, dtype=_F64)
        mass = torch.zeros(g, _NSUM, dtype=_F64)
        ones = torch.ones_like(cur["r"])
        for eid in set(self._group_eval.values()):
            b = self._pool[eid]
            idx = [k for k in range(g) if self._group_eval.get(k) == eid]
            rev[idx] = _sums(cur["r"], b["r"], cur["rlab"], b["rlab"], g)[1:][idx]
            mass[idx] = _sums(ones, torch.ones_like(b["r"]), cur["rlab"], b["rlab"], g)[1:][idx]
        return rev, mass

    def rebase(self, decision: Decision) -> None:
        """Keep the current evaluation as the baseline the decision names."""
        cur = self._now
        if not cur or self._global is None:
            return
        if decision.rebase:
            self._global = dict(cur)
        groups = list(decision.rebase_groups)
        if not groups:
            return
        if cur["lab"] is not None:
            sel = torch.isin(cur["lab"], torch.tensor(groups, dtype=torch.int64))
            for key in ("f", "r_rows", "h"):
                if cur.get(key) is not None and key in self._rows:
                    self._rows[key] = torch.where(sel, cur[key], self._rows[key])
        if not self._r_on_rows and cur["r"] is not None and cur["rlab"] is not None:
            self._eval_id += 1
            self._pool[self._eval_id] = {"r": cur["r"], "rlab": cur["rlab"]}
            self._group_eval.update({k: self._eval_id for k in groups})
            used = set(self._group_eval.values())
            self._pool = {k: v for k, v in self._pool.items() if k in used}

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The baselines (bounded tensors), so a resumed run pairs with them."""
        return {
            "rows": self._rows,
            "global": self._global,
            "pool": self._pool,
            "group_eval": dict(self._group_eval),
            "eval_id": self._eval_id,
        }

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self._rows, self._global = d["rows"], d["global"]
        self._pool = dict(d["pool"])
        self._group_eval = {int(k): int(v) for k, v in d["group_eval"].items()}
        self._eval_id = int(d["eval_id"])

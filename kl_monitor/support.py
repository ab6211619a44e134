"""Support mismatch between two categoricals: KL on the shared support and leaked mass.

When the reference forbids a class (a −inf logit, top-k/top-p truncation) and the model
puts mass there, the reverse KL D(Q‖P) is +inf: true, and it says nothing about *how
much* mass leaked or how well the model fits elsewhere. Per row, with
S = supp P ∩ supp Q and P̃, Q̃ the two distributions restricted to S and renormalised:

- ``forward_shared`` = D(P̃‖Q̃), ``reverse_shared`` = D(Q̃‖P̃): finite unless S is empty;
  equal to the plain KLs on rows where the supports agree;
- ``reference_mass_outside`` = P(supp P \\ S): the reference's mass the model forbids
  (what makes the forward KL infinite);
- ``model_mass_outside`` = Q(supp Q \\ S): the model's mass the reference forbids
  (the leaked mass; what makes the reverse KL infinite).

The per-row figures come from the kernel, ``categorical_kl_rows(..., support=True)``;
this module watches the leaked mass over evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .detectors import Alert, CusumDetector

__all__ = ["LeakedMassRule", "LEAK_MIN_EFFECT"]


#: Smallest rise of the model's leaked mass (probability per row) that may alert.
LEAK_MIN_EFFECT = 0.01


class LeakedMassRule:
    """Over-dispersion alert when the model's mass outside the reference's support rises.

    Watches ``model_mass_outside`` (the mean per row of Q's mass on classes P forbids) with
    a ``CusumDetector`` (noise learned in the warm-up, like the KL series); a rise that is
    significant and at least ``min_effect`` fires one ``over_dispersion`` alert per
    episode, naming the groups whose leaked mass rose most. A constant leak (a model
    that always leaked a little) is the baseline, not an alarm.

    Args:
        k: CUSUM allowance; h: threshold; warmup: evaluations before it can fire.
        min_effect: smallest rise, in probability per row.

    Examples:
        >>> from types import SimpleNamespace as NS
        >>> def result(leak):
        ...     rows = NS(model_mass_outside=leak, group_mass_outside={})
        ...     return NS(sources={"model": rows})
        >>> rule = LeakedMassRule(warmup=3)
        >>> [rule.update(s, result(0.001 * (s % 2))) for s in range(6)]
        [[], [], [], [], [], []]
        >>> [a.kind for a in rule.update(6, result(0.2))]
        ['over_dispersion']
    """

    def __init__(
        self, *, k: float = 0.5, h: float = 5.0, warmup: int = 5,
        min_effect: float = LEAK_MIN_EFFECT,
    ) -> None:
        self.detector = CusumDetector(k, h, warmup, min_effect)
        self._group_base: dict[int, float] = {}
        #: leaked-mass values seen (0: the series has not started; nothing to checkpoint)
        self.n_values = 0

    def update(self, step: int, result: Any) -> list[Alert]:
        """Feed one evaluation's typed result; return the new alert, if any.

        Reads the ``model_mass_outside`` of the model's own rows when there are some,
        else of the reference's (``CategoricalResult.sources``); other results (samples,
        unlabelled rows) carry no leaked mass and are ignored.
        """
        sources = getattr(result, "sources", None) or {}
        src = sources.get("model") or sources.get("reference")
        if src is None or not math.isfinite(src.model_mass_outside):
            return []
        leaked = src.model_mass_outside
        self.n_values += 1
        groups = {g: masses[1] for g, masses in src.group_mass_outside.items()}
        base = self.detector.baseline
        statistic = self.detector.update(leaked, None)
        if statistic is None:
            if self.detector.armed and self.detector.statistic == 0:
                for g, v in groups.items():  # learn the groups' levels while quiet
                    self._group_base[g] = 0.9 * self._group_base.get(g, v) + 0.1 * v
            return []
        rises = {g: v - self._group_base.get(g, 0.0) for g, v in groups.items()}
        top = max(rises.values(), default=0.0)
        named = tuple(sorted((g for g, r in rises.items() if r > 0 and r >= 0.5 * top),
                             key=lambda g: -rises[g]))
        where = f"; groups: {', '.join(map(str, named))}" if named else ""
        message = (
            f"over-dispersion at step {step}: the model's mass on tokens the reference "
            f"forbids rose to {leaked:.4f} per row (baseline {base:.4f}){where}"
        )
        details = {"signature": "leaked_mass", "model_mass_outside": leaked,
                   "baseline": base, "group_rise": rises}
        return [Alert("over_dispersion", step, statistic, named, message, details)]

    def state_dict(self) -> dict:
        return {"detector": self.detector.state_dict(), "n_values": self.n_values,
                "group_base": [[g, v] for g, v in self._group_base.items()]}

    def load_state_dict(self, d: Mapping[str, Any]) -> None:
        self.detector.load_state_dict(d["detector"])
        self.n_values = int(d["n_values"])
        self._group_base = {int(g): float(v) for g, v in d["group_base"]}

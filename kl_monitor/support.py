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
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from .detectors import Alert, CusumDetector

__all__ = ["SupportRows", "support_rows", "LeakedMassRule", "LEAK_MIN_EFFECT"]


class SupportRows(NamedTuple):
    """Per-row support-mismatch companions (see the module docstring)."""

    forward_shared: torch.Tensor
    reverse_shared: torch.Tensor
    reference_mass_outside: torch.Tensor
    model_mass_outside: torch.Tensor


def support_rows(
    logits_p: torch.Tensor,
    logits_q: torch.Tensor,
    forward: torch.Tensor,
    reverse: torch.Tensor,
) -> SupportRows:
    """Shared-support KLs and masses outside the other's support, per row.

    ``forward``/``reverse`` are the rows' exact KLs (from ``categorical_kl_rows``): rows
    where both are finite have matching supports up to classes of probability 0 on
    both sides, so their companions are the KLs themselves and zero masses; only the
    others (a support violation) are recomputed, restricted to S.

    Args:
        logits_p: ``(..., K)`` reference logits.
        logits_q: ``(..., K)`` model logits.
        forward: ``(...)`` D(P‖Q) per row.
        reverse: ``(...)`` D(Q‖P) per row.

    Returns:
        ``SupportRows`` of ``(...)`` tensors in ``forward``'s dtype.

    Examples:
        >>> lp = torch.tensor([[0.0, 0.0, -math.inf]])
        >>> lq = torch.tensor([[0.0, 0.0, 0.0]])
        >>> rows = support_rows(lp, lq, torch.tensor([0.4055]), torch.tensor([math.inf]))
        >>> float(rows.reverse_shared[0]), round(float(rows.model_mass_outside[0]), 4)
        (0.0, 0.3333)
    """
    lead = forward.shape
    fwd_s, rev_s = forward.reshape(-1).clone(), reverse.reshape(-1).clone()
    p_out, q_out = torch.zeros_like(fwd_s), torch.zeros_like(fwd_s)
    bad = torch.isinf(fwd_s) | torch.isinf(rev_s)
    if not bool(bad.any()):
        return SupportRows(*(t.reshape(lead) for t in (fwd_s, rev_s, p_out, q_out)))
    k = logits_p.shape[-1]
    idx = bad.nonzero().flatten()
    x = logits_p.detach().reshape(-1, k)[idx].to(forward.dtype)
    y = logits_q.detach().reshape(-1, k)[idx].to(forward.dtype)
    shared = torch.isfinite(x) & torch.isfinite(y)
    lp, lq = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    p_in = torch.where(shared, lp.exp(), 0.0).sum(-1)
    q_in = torch.where(shared, lq.exp(), 0.0).sum(-1)
    neg_inf = torch.tensor(-math.inf, dtype=x.dtype, device=x.device)
    ls_p = torch.log_softmax(torch.where(shared, x, neg_inf), -1)
    ls_q = torch.log_softmax(torch.where(shared, y, neg_inf), -1)
    d = torch.where(shared, ls_p - ls_q, 0.0)
    f = torch.where(shared, ls_p.exp() * d, 0.0).sum(-1).clamp_(min=0.0)
    r = torch.where(shared, -ls_q.exp() * d, 0.0).sum(-1).clamp_(min=0.0)
    empty = ~shared.any(-1)  # no class both can emit: nothing to compare
    fwd_s[idx] = f.masked_fill(empty, math.inf)
    rev_s[idx] = r.masked_fill(empty, math.inf)
    p_out[idx] = (1 - p_in).clamp(min=0.0)
    q_out[idx] = (1 - q_in).clamp(min=0.0)
    return SupportRows(*(t.reshape(lead) for t in (fwd_s, rev_s, p_out, q_out)))


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

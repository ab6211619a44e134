"""TensorBoard extras: the custom-scalars layout, histograms and alert entries.

Scalars go through every Lightning logger; only these extras are TensorBoard-specific.
Each alert is written twice: as human text under ``<prefix>/alerts`` and as one JSON
object (``Alert.to_dict()``) under ``<prefix>/alert_records``, which is what
``kl-monitor report`` reads, so the wording of the text can change freely.
"""

from __future__ import annotations

import json
import math
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .results import DIRECTIONS

__all__ = ["ALERT_RECORDS", "TOP_GROUPS", "alert_record", "alert_text", "layout", "scalars",
           "top_groups"]

#: Tag suffix of the machine-readable alert entries (one JSON object each).
ALERT_RECORDS = "alert_records"


def scalars(prefix: str, result: Any) -> dict[str, float]:
    """Tags for one evaluation: ``<prefix>/<key>`` plus ±2-stderr bands per direction.

    ``result`` is a typed result with both directions (``CategoricalResult`` or
    ``SampledResult``): its ``logged_pairs()`` leave the per-group standard errors
    and counts out (with many groups they would triple the scalars written at every
    evaluation) and log a categorical group's share of the rows as ``mass/group_<g>``.
    """
    pairs = list(result.logged_pairs()) + list(result.bands())
    contributions = getattr(result, "contributions", None)
    if contributions is not None:
        pairs += [(f"forward_contribution/group_{g}", v) for g, v in contributions().items()]
    # TensorBoard silently drops ±inf and NaN, and a line that disappears reads as "no
    # data": an infinite KL (support violation) is carried by its finite companions
    # (`<direction>_shared`, the masses outside the other's support) and by
    # `support_violations`. The typed result keeps the formal +inf.
    return {f"{prefix}/{key}": value for key, value in pairs if math.isfinite(value)}


#: With more groups than this, the per-group charts show the top groups only.
TOP_GROUPS = 8


def top_groups(result: Any, alerted: Iterable[int] = (), k: int = TOP_GROUPS) -> list[int] | None:
    """The k groups with the largest part of the forward KL, and the alerted ones.

    ``None`` when there are at most k groups (every group is shown).
    """
    parts = getattr(result, "contributions", dict)()
    if len(parts) <= k:
        return None
    order = sorted(parts, key=lambda g: (-parts[g] if math.isfinite(parts[g]) else -math.inf, g))
    return sorted(set(order[:k]) | set(alerted))


def layout(
    prefix: str, unit: str = "nats", groups: Sequence[int] | None = None, logits: bool = True
) -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: margin charts (value ± 2 stderr) and both directions.

    ``unit`` goes into every chart title, so a per-token mean is never read as a
    per-sequence sum. ``groups``: the groups the per-group charts show (``None``: all);
    with many groups, the top ones by their part of the forward KL (``top_groups``).
    ``logits=False`` leaves out the charts only logits inputs fill (support mismatch,
    teacher-forced diagnostics), which would be empty.
    """
    charts: dict[str, list[Any]] = {
        f"{d} KL ± 2 stderr ({unit})": [
            "Margin",
            [f"{prefix}/{d}", f"{prefix}/{d}_lower", f"{prefix}/{d}_upper"],
        ]
        for d in DIRECTIONS
    }
    charts[f"forward vs reverse ({unit})"] = [
        "Multiline",
        [rf"^{prefix}/(forward|reverse)$"],  # regexes: anchor, or every forward_* matches
    ]
    charts[f"asymmetry: forward − reverse ({unit})"] = ["Multiline", [rf"^{prefix}/asymmetry$"]]
    if logits:
        # the other direction summed along rows it is not valid on: its own chart,
        # never mixed into the forward/reverse ones
        charts[f"teacher-forced diagnostics, not sequence-level KL ({unit})"] = [
            "Multiline", [rf"^{prefix}/(forward|reverse)_on_(model|reference)_samples$"],
        ]
        charts[f"support mismatch: KL on the shared support ({unit})"] = [
            "Multiline", [rf"^{prefix}/(forward|reverse)_shared$"],
        ]
        charts["support mismatch: mass outside the other's support (per row)"] = [
            "Multiline", [rf"^{prefix}/(model|reference)_mass_outside$"],
        ]
    which = r"\d+" if groups is None else "(" + "|".join(str(g) for g in groups) + ")"
    top = "" if groups is None else f", top {len(groups)} groups by part of forward KL"
    charts[f"per-group part of forward KL ({unit}{top})"] = [
        "Multiline", [rf"^{prefix}/forward_contribution/group_{which}$"],
    ]
    charts[f"per-group forward KL ({unit}{top})"] = [
        "Multiline", [rf"^{prefix}/forward/group_{which}$"],
    ]
    charts[f"per-group reverse KL ({unit}{top})"] = [
        "Multiline", [rf"^{prefix}/reverse/group_{which}$"],
    ]
    charts[f"per-group mass (share{top})"] = [
        "Multiline", [rf"^{prefix}/(reverse_)?mass/group_{which}$"],
    ]
    charts["alerts"] = ["Multiline", [rf"^{prefix}/alert/"]]
    return {f"KL monitor ({prefix})": charts}


def _writers(loggers: Iterable[Any]) -> list[Any]:
    """SummaryWriters of the TensorBoard loggers (other loggers are not touched)."""
    writers = []
    for logger in loggers:
        if type(logger).__name__ != "TensorBoardLogger":
            continue
        writer = logger.experiment
        if callable(getattr(writer, "add_custom_scalars", None)):
            writers.append(writer)
    return writers


# Every monitor's categories per writer: TensorBoard shows the last layout written to a
# run, so each monitor (one per prefix) writes the union, not only its own.
_LAYOUTS: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()


def write_layout(
    loggers: Iterable[Any], prefix: str, unit: str = "nats", groups: Sequence[int] | None = None,
    logits: bool = True,
) -> bool:  # fmt: skip
    """Add this prefix's layout to every TensorBoard logger, keeping the others'.

    Returns True if there was a TensorBoard logger. Written again when the top groups
    change: TensorBoard shows the last layout of a run.
    """
    writers = _writers(loggers)
    for writer in writers:
        merged = _LAYOUTS.setdefault(writer, {})
        merged.update(layout(prefix, unit, groups, logits))
        writer.add_custom_scalars(dict(merged))
    return bool(writers)


def write_extras(
    loggers: Iterable[Any],
    prefix: str,
    step: int,
    histogram: torch.Tensor | None,
    alerts: Sequence[Any],
) -> None:
    """Histogram of per-sample log ratios and one text entry per alert."""
    for writer in _writers(loggers):
        if histogram is not None and histogram.numel():
            writer.add_histogram(f"{prefix}/log_ratio", histogram, global_step=step)
        for alert in alerts:
            writer.add_text(f"{prefix}/alerts", alert_text(alert), global_step=step)
            writer.add_text(f"{prefix}/{ALERT_RECORDS}", alert_record(alert), global_step=step)
        writer.flush()


def alert_text(alert: Any) -> str:
    """The human entry of an alert (Markdown); nothing reads it back."""
    groups = ", ".join(str(g) for g in alert.groups) or "-"
    return (
        f"**{alert.kind}** at step {alert.step} (statistic {alert.statistic:.2f}; "
        f"groups: {groups})  \n{alert.message}"
    )


def alert_record(alert: Any) -> str:
    """The machine entry of an alert: ``Alert.to_dict()`` as one line of JSON.

    Infinite numbers are written as ``Infinity`` (``json`` reads them back).
    """
    return json.dumps(alert.to_dict(), sort_keys=True, default=str)


def write_cells(loggers: Iterable[Any], prefix: str, step: int, centroids: torch.Tensor) -> bool:
    """One text entry with the centre of every cell (groups of sample-only inputs)."""
    writers = _writers(loggers)
    rows = [f"| {c} | " + ", ".join(f"{v:.3g}" for v in row) + " |"
            for c, row in enumerate(centroids.tolist())]
    text = "| cell | centre |\n|---|---|\n" + "\n".join(rows)
    for writer in writers:
        writer.add_text(f"{prefix}/cells", text, global_step=step)
        writer.flush()
    return bool(writers)

"""TensorBoard extras: the custom-scalars layout, histograms and alert text.

Scalars go through every Lightning logger; only these extras are TensorBoard-specific.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["layout", "scalars"]

DIRECTIONS = ("forward", "reverse")
_PER_GROUP_DETAIL = re.compile(r"^(forward|reverse)_(stderr|n)/group_\d+$")


def scalars(prefix: str, result: Mapping[str, float]) -> dict[str, float]:
    """Tags for one evaluation: ``<prefix>/<key>`` plus ±2-stderr bands per direction.

    Per-group row counts (``n/group_<g>``) are logged as ``mass/group_<g>``: the
    fraction of held-out rows in the group. Per-group standard errors and sample
    counts stay in the metric's result but are not logged: with many groups they
    would triple the scalars written at every evaluation.
    """
    out: dict[str, float] = {}
    n_total = result.get("n", 0.0)
    for key, value in result.items():
        if _PER_GROUP_DETAIL.match(key):
            continue
        if key.startswith("n/group_"):
            share = value / n_total if n_total else 0.0
            out[f"{prefix}/mass/{key[2:]}"] = share
        else:
            out[f"{prefix}/{key}"] = float(value)
    for d in DIRECTIONS:
        value, se = result.get(d), result.get(f"{d}_stderr")
        if value is not None and se is not None and math.isfinite(se):
            out[f"{prefix}/{d}_lower"] = value - 2.0 * se
            out[f"{prefix}/{d}_upper"] = value + 2.0 * se
    return out


def layout(prefix: str, unit: str = "nats") -> dict[str, dict[str, list[Any]]]:
    """Custom-scalars layout: margin charts (value ± 2 stderr) and both directions.

    ``unit`` goes into every chart title, so a per-token mean is never read as a
    per-sequence sum.
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
    charts["per-group forward KL"] = ["Multiline", [rf"^{prefix}/forward/group_\d+$"]]
    charts["per-group mass"] = ["Multiline", [rf"^{prefix}/(reverse_)?mass/group_\d+$"]]
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


def write_layout(loggers: Iterable[Any], prefix: str, unit: str = "nats") -> bool:
    """Add the layout to every TensorBoard logger; True if there was one."""
    writers = _writers(loggers)
    for writer in writers:
        writer.add_custom_scalars(layout(prefix, unit))
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
            groups = ", ".join(str(g) for g in alert.groups) or "-"
            writer.add_text(
                f"{prefix}/alerts",
                f"**{alert.kind}** at step {alert.step} (statistic {alert.statistic:.2f}; "
                f"groups: {groups})  \n{alert.message}",
                global_step=step,
            )
        writer.flush()

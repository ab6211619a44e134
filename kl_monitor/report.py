"""Read KLMonitor's TensorBoard event files back: per-run series, a table and a plot.

Used by ``kl-monitor report LOGDIR`` and by the demo's figure. Alerts are read from
their machine-readable entries (``<prefix>/alert_records``, one JSON ``Alert.to_dict()``
each), never from the human text. Logs written by kl_monitor 0.1.0, which had only the
text, are read from the text as a fallback.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .tensorboard import ALERT_RECORDS

__all__ = ["ReportError", "Run", "load_runs", "summary_table", "plot_runs"]

# kl_monitor 0.1.0 wrote alerts only as this text: read for old logs, never for new ones
_LEGACY_ALERT_RE = re.compile(
    r"\*\*(?P<kind>\w+)\*\* at step (?P<step>\d+) \(statistic (?P<stat>[-\d.infa]+); "
    r"groups: (?P<groups>[^)]*)\)"
)


class ReportError(Exception):
    """A log directory that cannot be reported on (the message says why)."""


@dataclass
class Run:
    """Scalar series and alerts of one run (one directory of event files)."""

    name: str
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    alerts: list[dict] = field(default_factory=list)

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        points = sorted(self.scalars.get(tag, []))
        return [s for s, _ in points], [v for _, v in points]


def _event_dirs(logdir: Path) -> dict[Path, list[Path]]:
    dirs: dict[Path, list[Path]] = {}
    for root, _, files in os.walk(logdir):
        for f in sorted(files):
            if "tfevents" in f:
                dirs.setdefault(Path(root), []).append(Path(root) / f)
    return dirs


#: a run is a KLMonitor run when it logged one of these
_HEADLINES = ("forward", "reverse", "forward_shared", "reverse_shared")


def load_runs(logdir: str | os.PathLike, prefix: str = "kl") -> list[Run]:
    """Every run under ``logdir`` that logged ``<prefix>/forward``.

    Raises:
        ReportError: no such directory, no event files, unreadable files, or no
            KLMonitor scalars in them.
    """
    from tensorboard.backend.event_processing import event_accumulator as ea

    root = Path(logdir)
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory.")
    dirs = _event_dirs(root)
    if not dirs:
        raise ReportError(f"no TensorBoard event files (events.out.tfevents.*) under {root}.")
    runs: list[Run] = []
    problems: list[str] = []
    for d, files in sorted(dirs.items()):
        run = Run(name=str(d.relative_to(root)) if d != root else root.name)
        records: list[str] = []
        legacy: list[str] = []
        for path in files:
            acc = ea.EventAccumulator(str(path), size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
            try:
                acc.Reload()
            except Exception as err:  # corrupt or truncated files raise assorted errors
                problems.append(f"{path}: {type(err).__name__}: {err}")
                continue
            tags = acc.Tags()
            for tag in tags.get("scalars", []):
                if tag.startswith(f"{prefix}/"):
                    run.scalars.setdefault(tag, []).extend(
                        (e.step, e.value) for e in acc.Scalars(tag)
                    )
            for tag in tags.get("tensors", []):
                # text tags are stored as "<tag>/text_summary"
                if tag.startswith(f"{prefix}/{ALERT_RECORDS}"):
                    found = records
                elif tag.startswith(f"{prefix}/alerts"):
                    found = legacy
                else:
                    continue
                found.extend(s for e in acc.Tensors(tag) for s in _strings(e.tensor_proto))
        if records:
            run.alerts = [_alert(json.loads(text)) for text in records]
        else:
            run.alerts = [a for text in legacy for a in _legacy_alerts(text)]
        # a run on the model's generations alone logs no forward KL, and an infinite KL
        # is logged only through its finite companions (`<direction>_shared`)
        if any(f"{prefix}/{key}" in run.scalars for key in _HEADLINES):
            runs.append(run)
    if not runs:
        detail = ("; ".join(problems)) if problems else f"no '{prefix}/forward' scalars found"
        raise ReportError(f"no readable KLMonitor runs under {root} ({detail}).")
    return runs


def _strings(proto: object) -> list[str]:
    return [s.decode("utf-8", "replace") for s in getattr(proto, "string_val", [])]


def _alert(record: dict) -> dict:
    """The fields the report uses, from one machine-readable alert record."""
    return {
        "kind": str(record["kind"]),
        "step": int(record["step"]),
        "statistic": float(record["statistic"]),
        "groups": [str(g) for g in record.get("groups", [])],
        "update": bool((record.get("details") or {}).get("update", False)),
    }


def _legacy_alerts(text: str) -> list[dict]:
    alerts = []
    for m in _LEGACY_ALERT_RE.finditer(text):
        groups = m["groups"].strip()
        alerts.append(
            {
                "kind": m["kind"],
                "step": int(m["step"]),
                "statistic": float(m["stat"]),
                "groups": [] if groups in ("", "-") else [g.strip() for g in groups.split(",")],
            }
        )
    return alerts


def _fmt(value: float, stderr: float | None) -> str:
    if not math.isfinite(value):
        return f"{value}"
    if stderr is None or not math.isfinite(stderr):
        return f"{value:.4f}"
    return f"{value:.4f} ± {stderr:.4f}"


def summary_table(runs: list[Run], prefix: str = "kl") -> str:
    """Per run: last and best (lowest) forward and reverse KL with stderr, and alerts."""
    lines = []
    header = f"{'run':<24} {'direction':<9} {'last (step)':<30} {'best (step)':<30}"
    lines.append(header)
    lines.append("-" * len(header))
    for run in runs:
        for d in ("forward", "reverse"):
            steps, values = run.series(f"{prefix}/{d}")
            if not steps:
                continue
            se = dict(zip(*run.series(f"{prefix}/{d}_stderr"), strict=False))
            last = f"{_fmt(values[-1], se.get(steps[-1]))} ({steps[-1]})"
            finite = [(v, s) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
            if finite:
                bv, bs = min(finite)
                best = f"{_fmt(bv, se.get(bs))} ({bs})"
            else:
                best = "-"
            lines.append(f"{run.name:<24} {d:<9} {last:<30} {best:<30}")
        if run.alerts:
            for a in sorted(run.alerts, key=lambda a: a["step"]):
                groups = ", ".join(a["groups"]) or "-"
                # an engine episode's later alerts update its first (same event)
                label = "update" if a.get("update") else "ALERT"
                lines.append(
                    f"{'':<24} {label:<9} {a['kind']} at step {a['step']} "
                    f"(statistic {a['statistic']:.2f}; groups: {groups})"
                )
        else:
            lines.append(f"{'':<24} alerts    none")
    return "\n".join(lines)


def plot_runs(
    runs: list[Run], png: str | os.PathLike, prefix: str = "kl", axes: object = None
) -> None:
    """Forward and reverse KL of every run with ±2-stderr bands, alerts marked.

    Writes ``png`` unless ``axes`` (two matplotlib axes) are given to draw into.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for ax, d in zip(axes, ("forward", "reverse"), strict=True):
        for i, run in enumerate(runs):
            color = f"C{i}"
            steps, values = run.series(f"{prefix}/{d}")
            ax.plot(steps, values, color=color, label=run.name)
            lo = dict(zip(*run.series(f"{prefix}/{d}_lower"), strict=False))
            hi = dict(zip(*run.series(f"{prefix}/{d}_upper"), strict=False))
            band = [s for s in steps if s in lo and s in hi]
            if band:
                ax.fill_between(
                    band, [lo[s] for s in band], [hi[s] for s in band], color=color, alpha=0.25
                )
            for a in run.alerts:
                ax.axvline(a["step"], color=color, linestyle="--", linewidth=1)
        name = "D(P‖Q)" if d == "forward" else "D(Q‖P)"
        ax.set_title(f"{d} KL {name} ± 2 stderr (dashed: alerts)")
        ax.set_xlabel("training step")
        ax.set_ylabel("nats")
        ax.set_yscale("symlog", linthresh=0.1)
        ax.set_ylim(bottom=0.0)  # a KL is ≥ 0: no axis spent on negative nats
        ax.legend(fontsize=8)
    if fig is not None:
        fig.savefig(png, dpi=110)
        plt.close(fig)

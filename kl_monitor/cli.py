"""``kl-monitor report LOGDIR [--png FILE]``: a table and a plot from event files."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .report import ReportError, load_runs, plot_runs, summary_table

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kl-monitor", description="Reports on the TensorBoard logs KLMonitor wrote."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="table of last/best forward and reverse KL, alerts, PNG")
    rep.add_argument("logdir", help="directory holding one or several runs' event files")
    rep.add_argument("--png", help="write a plot of both directions with ±2 stderr bands")
    rep.add_argument("--prefix", default="kl", help="tag prefix given to KLMonitor (default: kl)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.logdir, prefix=args.prefix)
    except ReportError as err:
        print(f"kl-monitor report: {err}", file=sys.stderr)
        return 2
    print(summary_table(runs, prefix=args.prefix))
    if args.png:
        try:
            plot_runs(runs, args.png, prefix=args.prefix)
        except OSError as err:
            print(f"kl-monitor report: cannot write {args.png}: {err}", file=sys.stderr)
            return 1
        print(f"wrote {args.png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

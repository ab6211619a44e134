"""Soak: thousands of KLMonitor evaluations in one real training run, memory and time flat.

A tiny model trains with a real ``Trainer`` and the monitor evaluating every step
(``every_n_train_steps=1``), logging to TensorBoard and CSV, for N evaluations. Two
input kinds run one after the other: exact categorical KL from logits (a linear
student distilled from a teacher) and Monte Carlo KL from samples with 8 groups (the
scripted mixture of tests/lit_models.py, converged: its alerts are false alarms).

Measured, after a warm-up of ``--warmup`` evaluations:

* RSS (resident set, ``/proc/self/statm``) after every evaluation;
* the number of live ``torch.Tensor`` objects (``gc.get_objects()``), sampled every
  ``--sample-every`` evaluations (default: 50 samples per run; a full collection each);
* the time of each evaluation (``KLMonitor.evaluate``, including logging): the CPU time
  of the training thread (``time.thread_time``, what the monitor costs, nearly immune to
  other processes on the machine) and the wall time.

Each is compared between the first and the last 10% of the measured evaluations
(means for RSS and tensors, medians for times: other processes add spikes that are
not the monitor's). The table states the load average, because wall time depends on it.

    python benchmarks/soak.py               # 5,000 evaluations per input kind
    python benchmarks/soak.py --fast        # 300, as tests/test_soak.py runs it
    python benchmarks/soak.py --evals 20000 --kinds logits
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402
from lit_models import (  # noqa: E402
    namespace,
    ring_data,
    scripted_mixture_module,
    scripted_schedule,
    student_module,
    train_data,
)

from kl_monitor import KLMonitor  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE / 2**20


def live_tensors() -> int:
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on deprecated torch aliases warns
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


@dataclass
class SoakResult:
    kind: str
    evals: int
    warmup: int
    seconds: float
    rss_first: float
    rss_last: float
    tensors_first: float
    tensors_last: float
    ms_first: float
    ms_last: float
    cpu_ms_first: float
    cpu_ms_last: float
    failures: int
    alerts: int
    samples: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    rss_series: list[float] = field(repr=False, default_factory=list)
    tensor_series: list[int] = field(repr=False, default_factory=list)
    ms_deciles: list[float] = field(repr=False, default_factory=list)
    cpu_series: list[float] = field(repr=False, default_factory=list)

    @staticmethod
    def drift(first: float, last: float) -> float:
        return (last - first) / first if first else 0.0

    @property
    def rss_drift(self) -> float:
        return self.drift(self.rss_first, self.rss_last)

    @property
    def tensor_drift(self) -> float:
        return self.drift(self.tensors_first, self.tensors_last)

    @property
    def time_drift(self) -> float:
        return self.drift(self.ms_first, self.ms_last)

    @property
    def cpu_drift(self) -> float:
        return self.drift(self.cpu_ms_first, self.cpu_ms_last)

    @property
    def cpu_trend(self) -> float:
        """Growth of CPU time per evaluation over the whole run, by a robust line fit.

        Theil–Sen (the median of all pairwise slopes, over medians of blocks of 5
        evaluations) fitted to the series; returns slope × run length / the fit's start.
        A leak that slows evaluations (a list scanned every time, a growing state) grows
        steadily and reads as its growth (a doubling reads 1.0); a burst of other
        processes moves few pairs, so the median slope hardly sees it.
        """
        series = self.cpu_series
        blocks = [statistics.median(series[i : i + 5]) for i in range(0, len(series) - 4, 5)]
        x = [5 * i + 2 for i in range(len(blocks))]
        slopes = [
            (blocks[j] - blocks[i]) / (x[j] - x[i])
            for i in range(len(blocks))
            for j in range(i + 1, len(blocks))
        ]
        slope = statistics.median(slopes)
        start = statistics.median(b - slope * xi for b, xi in zip(blocks, x, strict=True))
        return slope * len(series) / start if start > 0 else 0.0


def _tenth(values: list, last: bool) -> list:
    k = max(1, len(values) // 10)
    return values[-k:] if last else values[:k]


def soak(kind: str = "logits", evals: int = 5000, warmup: int = 100, sample_every: int = 0,
         threads: int = 1) -> SoakResult:  # fmt: skip
    """Run one soak and return its figures (see the module docstring)."""
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _soak(kind, evals, warmup, sample_every)
    finally:
        torch.set_num_threads(old_threads)


def _soak(kind: str, evals: int, warmup: int, sample_every: int) -> SoakResult:
    sample_every = sample_every or max(1, evals // 50)
    pl = namespace("lightning.pytorch")
    pl.seed_everything(0, verbose=False)
    steps = warmup + evals
    if kind == "logits":
        model = student_module("lightning.pytorch", dropout=0.1)
        held_out = train_data(64, dim=4, batch_size=32, seed=5)
        train = train_data(steps * 4, dim=4, batch_size=4)
        monitor = KLMonitor(held_out, every_n_train_steps=1, max_batches=2)
    elif kind == "samples":
        # a healthy (converged, stationary) model: every detector keeps learning its
        # baseline and noise for the whole run, and any alert is a false alarm
        model = scripted_mixture_module("lightning.pytorch", scripted_schedule(None), every=1)
        held_out = ring_data(512, seed=1, batch_size=256)
        train = train_data(steps * 2, dim=2, batch_size=2)
        monitor = KLMonitor(held_out, every_n_train_steps=1, max_batches=2, num_groups=8)
    else:
        raise ValueError(f"unknown kind {kind!r}: 'logits' or 'samples'")

    times: list[float] = []
    cpu: list[float] = []
    rss: list[float] = []
    tensors: list[int] = []
    inner = monitor.evaluate

    def timed(trainer, pl_module):
        c0, t0 = time.thread_time(), time.perf_counter()
        out = inner(trainer, pl_module)
        elapsed, used = time.perf_counter() - t0, time.thread_time() - c0
        n = trainer.global_step - warmup  # measured evaluations so far
        if n > 0:
            times.append(elapsed)
            cpu.append(used)
            rss.append(rss_mib())
            if n % sample_every == 0 or n == 1:
                tensors.append(live_tensors())
        return out

    monitor.evaluate = timed
    with tempfile.TemporaryDirectory() as logdir:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=steps,
            logger=[
                pl.loggers.TensorBoardLogger(logdir, name="tb"),
                pl.loggers.CSVLogger(logdir, name="csv"),
            ],
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[monitor],
            log_every_n_steps=50,
        )
        load_before = os.getloadavg()
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.fit(model, train)
        seconds = time.perf_counter() - t0
        load_after = os.getloadavg()
    assert len(times) == evals, (len(times), evals)
    return SoakResult(
        kind=kind,
        evals=evals,
        warmup=warmup,
        seconds=seconds,
        rss_first=statistics.fmean(_tenth(rss, False)),
        rss_last=statistics.fmean(_tenth(rss, True)),
        tensors_first=statistics.fmean(_tenth(tensors, False)),
        tensors_last=statistics.fmean(_tenth(tensors, True)),
        ms_first=1e3 * statistics.median(_tenth(times, False)),
        ms_last=1e3 * statistics.median(_tenth(times, True)),
        cpu_ms_first=1e3 * statistics.median(_tenth(cpu, False)),
        cpu_ms_last=1e3 * statistics.median(_tenth(cpu, True)),
        failures=monitor.failures,
        alerts=len(monitor.alerts),
        samples=len(tensors),
        load_before=tuple(round(x, 2) for x in load_before),
        load_after=tuple(round(x, 2) for x in load_after),
        rss_series=rss,
        tensor_series=tensors,
        cpu_series=cpu,
        ms_deciles=[
            round(1e3 * statistics.median(cpu[i * evals // 10 : (i + 1) * evals // 10]), 3)
            for i in range(10)
        ],
    )


def table(results: list[SoakResult]) -> str:
    lines = [
        "| input | evaluations | RSS (MiB) | drift | live tensors | drift | CPU ms/eval | drift"
        " | CPU trend | wall ms/eval | drift | failures | alerts | run (s) | load avg |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.kind} | {r.evals:,} | {r.rss_first:.1f} → {r.rss_last:.1f} | "
            f"{r.rss_drift:+.2%} | {r.tensors_first:.0f} → {r.tensors_last:.0f} | "
            f"{r.tensor_drift:+.2%} | {r.cpu_ms_first:.2f} → {r.cpu_ms_last:.2f} | "
            f"{r.cpu_drift:+.1%} | {r.cpu_trend:+.1%} | {r.ms_first:.2f} → {r.ms_last:.2f} | "
            f"{r.time_drift:+.1%} | {r.failures} | {r.alerts} | {r.seconds:.0f} | "
            f"{r.load_before[0]:.1f} → {r.load_after[0]:.1f} |"
        )
    lines.append("")
    lines.append(
        "first → last: mean (RSS, tensors) or median (times) over the first and the last 10% "
        "of the measured evaluations; drift = last / first − 1. CPU trend: growth over the "
        "whole run by a Theil–Sen line fit (what tests/test_soak.py bounds)."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[SoakResult]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--evals", type=int, default=5000, help="measured evaluations per kind")
    parser.add_argument("--fast", action="store_true", help="300 evaluations (the CI test)")
    parser.add_argument("--warmup", type=int, default=None, help="evaluations before measuring")
    parser.add_argument("--sample-every", type=int, default=0, help="RSS/tensor sample period")
    parser.add_argument("--kinds", default="logits,samples", help="comma-separated input kinds")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    evals = 300 if args.fast else args.evals
    if args.fast and not args.sample_every:
        args.sample_every = 30
    warmup = args.warmup if args.warmup is not None else (30 if args.fast else 100)
    results = [
        soak(kind, evals, warmup, args.sample_every, args.threads)
        for kind in args.kinds.split(",")
    ]
    print(
        f"kl_monitor soak: python {platform.python_version()}, torch {torch.__version__}, "
        f"{os.cpu_count()} CPUs, {args.threads} torch thread(s), warm-up {warmup} evaluations"
    )
    print(table(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=1)
    return results


if __name__ == "__main__":
    main()

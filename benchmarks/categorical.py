"""Exact categorical KL: time and memory against the usual code, on a quiet and a busy CPU.

Compares, on the same inputs in the same process:

- ``categorical_kl(p, q)``: forward and reverse KL (and both entropies and the
  support-mismatch figures) per row, in one chunked pass (eager path, the default);
- the pair a user would write: ``F.log_softmax`` on both inputs (float32 whatever the
  input dtype), then ``F.kl_div`` twice (``reduction="batchmean"``, ``log_target=True``);
- the floor: one ``torch.logsumexp`` over each input, the least any exact method does;
- optionally ``categorical_kl(..., fused=True)`` (``--fused``; the first call compiles,
  its time is reported) and the kernel of an earlier commit (``--before REV``, loaded
  from git, timed at K = 32,768 float32 only: it is slow under load).

Each case is measured in two conditions that alternate within every round: *quiet* (no
load of our own) and *load* (two CPU-bound busy processes this script starts once,
resumes with SIGCONT for the load phases and pauses with SIGSTOP for the quiet ones,
and stops by PID at the end; they also exit on their own after a bounded time or when
this script dies). The machine's own load average is printed with every case: on a
shared machine "quiet" only means "no load of ours". Ratios are medians of rounds in the
same condition; methods are interleaved, rotating their order each round.

Targets: time ≤ 0.5× the pair quiet and ≤ 1.0× under the two-process load, float32 and
bfloat16, K ∈ {1,000, 32,768, 152,064}, rows × K ≥ 2²⁷; peak extra memory ≤ 0.1× the
pair's.

Run from the repository root::

    python benchmarks/categorical.py                    # full: rows × K ≥ 2^27 (~30 min)
    python benchmarks/categorical.py --fused --before 5e4290b
    python benchmarks/categorical.py --fast             # rows × K ≥ 2^22 smoke test

The exit code is 0 even when a target is missed; misses are listed at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # kl_monitor from this checkout

import kl_monitor  # noqa: E402
from kl_monitor import categorical_kl, categorical_kl_rows  # noqa: E402
from kl_monitor._utils import compute_dtype  # noqa: E402

CLASSES = (1000, 32768, 152064)
TIME_TARGET = {"quiet": 0.5, "load": 1.0}
MEM_TARGET = 0.1


def run_pair(p: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    lp = F.log_softmax(p, dim=-1, dtype=torch.float32)
    lq = F.log_softmax(q, dim=-1, dtype=torch.float32)
    # F.kl_div(input, target) = D(target ‖ input)
    fwd = F.kl_div(lq, lp, reduction="batchmean", log_target=True)
    rev = F.kl_div(lp, lq, reduction="batchmean", log_target=True)
    return fwd, rev


def run_ours(p: torch.Tensor, q: torch.Tensor, fused: bool = False):
    out = categorical_kl(p, q, fused=fused)
    return out.forward, out.reverse


def run_floor(p: torch.Tensor, q: torch.Tensor):
    return torch.logsumexp(p, -1), torch.logsumexp(q, -1)


def kernel_at(rev: str) -> Callable:
    """``categorical_kl_rows`` as it was at git revision ``rev`` (before-and-after runs)."""
    src = subprocess.run(["git", "show", f"{rev}:kl_monitor/estimators.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    start = src.index("_CHUNK_ELEMENTS = ")
    end = src.index("\ndef kept_rows(", start)
    ns = {"torch": torch, "compute_dtype": compute_dtype}
    exec("from __future__ import annotations\n" + src[start:end], ns)  # noqa: S102
    return ns["categorical_kl_rows"]


# --------------------------------------------------------------------------- load
_BUSY = """
import os, sys, time
end, parent = time.monotonic() + float(sys.argv[1]), os.getppid()
while time.monotonic() < end and os.getppid() == parent:
    for _ in range(100_000):
        pass
"""


class BusyLoad:
    """Two CPU-bound processes, started once, resumed/paused per phase, stopped by PID."""

    def __init__(self, processes: int, max_seconds: float) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", _BUSY, str(max_seconds)])
                      for _ in range(processes)]
        self.pause()

    def _signal(self, sig: int) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, sig)

    def resume(self) -> None:
        self._signal(signal.SIGCONT)
        time.sleep(0.3)  # let the scheduler spread them over the cores

    def pause(self) -> None:
        self._signal(signal.SIGSTOP)

    def alive(self) -> int:
        return sum(p.poll() is None for p in self.procs)

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait()


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------- memory
class HostMemory:
    """Peak resident memory of this process above a starting point (Linux).

    Before each measurement: garbage-collect, ``malloc_trim(0)`` (returns freed heap
    to the OS), read VmRSS, and reset the kernel's high-water mark VmHWM by writing
    "5" to /proc/self/clear_refs. After the call, VmHWM − the starting VmRSS is the
    peak extra memory it needed, with the inputs already resident.
    """

    def __init__(self) -> None:
        self.available = os.path.exists("/proc/self/clear_refs")
        if self.available:
            try:
                self._reset()
            except OSError:
                self.available = False
        try:
            self._trim = ctypes.CDLL("libc.so.6").malloc_trim
        except OSError:
            self._trim = None

    @staticmethod
    def _status(key: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        raise KeyError(key)

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn: Callable[[], object]) -> float:
        if not self.available:
            fn()
            return math.nan
        gc.collect()
        if self._trim is not None:
            self._trim(0)
        before = self._status("VmRSS")
        self._reset()
        result = fn()
        peak = self._status("VmHWM")
        del result
        return float(peak - before)


def cuda_peak_extra(fn: Callable[[], object], device: torch.device) -> float:
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    result = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    del result
    return float(peak - before)


# --------------------------------------------------------------------------- inputs
def make_inputs(rows: int, classes: int, dtype: torch.dtype, device: torch.device, seed: int):
    """Logits p ~ N(0, 2²), q = p + N(0, 1) per class, built in row blocks."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.empty(rows, classes, dtype=dtype, device=device)
    q = torch.empty(rows, classes, dtype=dtype, device=device)
    block = max(1, (1 << 24) // classes)
    for s in range(0, rows, block):
        e = min(s + block, rows)
        x = 2.0 * torch.randn(e - s, classes, generator=gen)
        p[s:e] = x.to(device, dtype)
        q[s:e] = (x + torch.randn(e - s, classes, generator=gen)).to(device, dtype)
    return p, q


# --------------------------------------------------------------------------- accuracy
def reference_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """(4, rows) forward, reverse, H(P), H(Q) in float64, straight from log-softmax."""
    lp, lq = F.log_softmax(p.double(), -1), F.log_softmax(q.double(), -1)
    pp, pq = lp.exp(), lq.exp()
    return torch.stack((
        (pp * (lp - lq)).sum(-1), (pq * (lq - lp)).sum(-1),
        -(pp * lp).sum(-1), -(pq * lq).sum(-1),
    ))


def accuracy(seed: int) -> list[str]:
    """categorical_kl_rows against float64 on the same (rounded) inputs; prints a table."""
    gen = torch.Generator().manual_seed(seed)
    x = 3.0 * torch.randn(64, 32768, generator=gen)
    cases = [("random logits, p = 3z, q = p + 1.5z'", x, x + 1.5 * torch.randn(64, 32768,
                                                                           generator=gen))]
    x = 2.5 * torch.randn(32, 50257, generator=gen)
    y = x + 0.014 * torch.randn(32, 50257, generator=gen)
    cases.append(("near-identical, q = p + 0.014z' (KL ≈ 1e-4)", x.bfloat16(), y.bfloat16()))
    head = ["case", "dtype", "rows × K", "mean D(P‖Q)", "max abs err fwd / rev",
            "max abs err H(P) / H(Q)", "max rel err fwd / rev"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    misses = []
    for name, p, q in cases:
        ref = reference_rows(p, q)
        got = torch.stack(categorical_kl_rows(p, q)[:4]).double()
        err = (got - ref).abs().amax(1)
        rel = ((got[:2] - ref[:2]).abs() / ref[:2]).amax(1)
        dtype = str(p.dtype).replace("torch.", "")
        print("| " + " | ".join([
            name, dtype, f"{p.shape[0]} × {p.shape[1]}", f"{float(ref[0].mean()):.3g}",
            f"{err[0]:.1e} / {err[1]:.1e}", f"{err[2]:.1e} / {err[3]:.1e}",
            f"{rel[0]:.1e} / {rel[1]:.1e}",
        ]) + " |")
        if dtype == "float32" and float(err.max()) >= 1e-5:
            misses.append(f"accuracy, {name}: max abs error {float(err.max()):.1e} ≥ 1e-5")
        if dtype == "bfloat16" and float(rel.max()) >= 0.01:
            misses.append(f"accuracy, {name}: max relative error {float(rel.max()):.1e} ≥ 1%")
    return misses


# --------------------------------------------------------------------------- run
def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    out = fn()
    del out
    return time.perf_counter() - t0


def bench_case(dtype: torch.dtype, classes: int, elements: int, rounds: int, load: BusyLoad,
               host_mem: HostMemory, extra: dict[str, Callable], seed: int) -> dict:
    """One (dtype, K): memory once, then rounds alternating quiet and load phases."""
    rows = -(-elements // classes)
    p, q = make_inputs(rows, classes, dtype, torch.device("cpu"), seed)
    methods = {"pair": run_pair, "ours": run_ours, "floor": run_floor, **extra}
    first = {name: timed(lambda fn=fn: fn(p, q)) for name, fn in methods.items()}  # warm-up
    mem = {name: host_mem.measure(lambda fn=methods[name]: fn(p, q))
           for name in ("pair", "ours", "fused") if name in methods}
    times: dict[str, dict[str, list[float]]] = {c: {m: [] for m in methods} for c in TIME_TARGET}
    names = list(methods)
    for r in range(rounds):
        for cond in (("quiet", "load") if r % 2 == 0 else ("load", "quiet")):
            load.resume() if cond == "load" else load.pause()
            for name in names[r % len(names):] + names[: r % len(names)]:
                times[cond][name].append(timed(lambda fn=methods[name]: fn(p, q)))
            load.pause()
    med = {c: {m: statistics.median(v) for m, v in t.items()} for c, t in times.items()}
    return dict(dtype=str(dtype).replace("torch.", ""), classes=classes, rows=rows, med=med,
                mem=mem, first=first, load=loadavg())


def mib(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{x / 2**20:,.1f}"


def print_time_table(results: list[dict], extra: list[str]) -> None:
    head = ["dtype", "K", "rows", "load avg after", "condition", "pair s", "ours s",
            "ours / pair", "floor s", "ours / floor"]
    for name in extra:
        head += [f"{name} s", f"{name} / pair"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for res in results:
        for cond, m in res["med"].items():
            cells = [res["dtype"], f"{res['classes']:,}", f"{res['rows']:,}", res["load"], cond,
                     f"{m['pair']:.4g}", f"{m['ours']:.4g}", f"{m['ours'] / m['pair']:.3f}",
                     f"{m['floor']:.4g}", f"{m['ours'] / m['floor']:.2f}"]
            for name in extra:
                got = m.get(name)
                cells += ["–", "–"] if got is None else [f"{got:.4g}", f"{got / m['pair']:.3f}"]
            print("| " + " | ".join(cells) + " |", flush=True)


def print_memory_table(results: list[dict]) -> None:
    fused = any("fused" in r["mem"] for r in results)
    head = ["dtype", "K", "pair peak extra MiB", "ours MiB", "ours / pair"]
    head += ["fused MiB", "fused / pair"] if fused else []
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        base = r["mem"]["pair"]
        cells = [r["dtype"], f"{r['classes']:,}", mib(base), mib(r["mem"]["ours"]),
                 f"{r['mem']['ours'] / base:.4f}" if base > 0 else "n/a"]
        if fused:
            cells += [mib(r["mem"]["fused"]), f"{r['mem']['fused'] / base:.4f}"]
        print("| " + " | ".join(cells) + " |")


def check_targets(results: list[dict]) -> list[str]:
    misses = []
    for r in results:
        where = f"{r['dtype']} K={r['classes']}"
        for cond, target in TIME_TARGET.items():
            ratio = r["med"][cond]["ours"] / r["med"][cond]["pair"]
            if ratio > target:
                misses.append(f"{where} {cond}: time ratio {ratio:.3f} > {target}")
        base = r["mem"]["pair"]
        if base > 0 and r["mem"]["ours"] / base > MEM_TARGET:
            misses.append(f"{where}: memory ratio {r['mem']['ours'] / base:.4f} > {MEM_TARGET}")
    return misses


def fused_summary(results: list[dict], evaluations: int = 100) -> None:
    """Fused vs eager per call, and with the first call's compile time spread over a run."""
    print(f"Fused path (torch.compile) against the eager default, compile time (first call "
          f"minus a timed call) amortised over {evaluations} evaluations of this size:\n")
    print("| dtype | K | condition | eager s | fused s | first fused call s | "
          f"fused + compile/{evaluations} s | fused faster? |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        for cond, m in r["med"].items():
            compile_s = max(0.0, r["first"]["fused"] - m["fused"])
            amortised = m["fused"] + compile_s / evaluations
            print(f"| {r['dtype']} | {r['classes']:,} | {cond} | {m['ours']:.3f} | "
                  f"{m['fused']:.3f} | {r['first']['fused']:.1f} | {amortised:.3f} | "
                  f"{'yes' if amortised < m['ours'] else 'no'} |")
    print("\nThe compile happens once per process and dtype (shapes are dynamic), so the "
          "first case of each dtype carries it; later cases show only recompile checks.\n")


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="smoke test: rows × K ≥ 2^22")
    ap.add_argument("--elements", type=int, default=None, help="rows × K per input")
    ap.add_argument("--classes", default=None, help="comma-separated K values")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per condition (3)")
    ap.add_argument("--fused", action="store_true", help="also time fused=True")
    ap.add_argument("--before", default=None, metavar="REV",
                    help="also time the kernel of git revision REV (K = 32768 float32)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    elements = args.elements or (1 << (22 if args.fast else 27))
    classes = [int(k) for k in args.classes.split(",")] if args.classes else list(CLASSES)
    rounds = args.rounds or (2 if args.fast else 3)
    dtypes = [getattr(torch, d.strip()) for d in args.dtypes.split(",")]
    before = kernel_at(args.before) if args.before else None
    t_start = time.perf_counter()
    print(f"# kl_monitor {kl_monitor.__version__} categorical KL benchmark"
          f"{' (FAST MODE: smoke test)' if args.fast else ''}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, "
          f"{platform.machine()}, torch threads {torch.get_num_threads()}, CPU cores "
          f"{os.cpu_count()}; load average at start: {loadavg()}")
    print(f"inputs: rows × K ≥ {elements:,} per tensor (K ∈ {classes}), logits_p ~ N(0, 2²), "
          f"logits_q = logits_p + N(0, 1); {rounds} rounds per condition, quiet and load "
          "alternating, methods interleaved; time = median wall clock.")
    print("load: two busy CPU-bound processes started by this script, resumed (SIGCONT) for "
          "the load phases, paused (SIGSTOP) for the quiet ones, killed by PID at the end. "
          "The machine may carry other load: see the load averages.")
    print("peak extra memory: VmHWM − VmRSS around one call (high-water mark reset via "
          "/proc/self/clear_refs, malloc_trim before), inputs resident, quiet phase.\n")
    load = BusyLoad(2, max_seconds=600 if args.fast else 7200)
    results, extras = [], (["fused"] if args.fused else []) + (["before"] if before else [])
    try:
        for dtype in dtypes:
            for k in classes:
                extra = {"fused": lambda p, q: run_ours(p, q, fused=True)} if args.fused else {}
                if before is not None and k == 32768 and dtype == torch.float32:
                    extra["before"] = lambda p, q: before(p, q)[:2]
                results.append(bench_case(dtype, k, elements, rounds, load, HostMemory(),
                                          extra, args.seed))
                gc.collect()
                print(f"  done: {results[-1]['dtype']} K={k} ({time.perf_counter() - t_start:.0f}"
                      f" s, load average {loadavg()}, busy processes alive: {load.alive()})",
                      flush=True)
    finally:
        load.stop()
        print(f"busy processes stopped: PIDs {', '.join(str(p.pid) for p in load.procs)}")
    return report(results, extras, args, t_start)


def report(results: list[dict], extras: list[str], args: argparse.Namespace,
           t_start: float) -> int:
    print("\nTime (ours = categorical_kl, eager default; pair = log_softmax + F.kl_div ×2; "
          "floor = torch.logsumexp over each input):\n")
    print_time_table(results, extras)
    print("\nPeak extra memory:\n")
    print_memory_table(results)
    print()
    if args.fused:
        fused_summary(results)
    print("Accuracy of categorical_kl_rows against float64 on the same rounded inputs "
          "(targets: max abs error < 1e-5 for float32 input; relative error < 1% for the "
          "near-identical bfloat16 case):\n")
    misses = accuracy(args.seed + 1) + check_targets(results)
    print(f"\nWall time {time.perf_counter() - t_start:.1f} s; load average at end: "
          f"{loadavg()}.")
    print(f"Targets: time ≤ {TIME_TARGET['quiet']}× the pair quiet, ≤ {TIME_TARGET['load']}× "
          f"under load; peak extra memory ≤ {MEM_TARGET}× the pair's.")
    if misses:
        print(f"\nTARGETS MISSED ({len(misses)}):")
        for m in misses:
            print(f"- {m}")
    else:
        print("\nAll targets met.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

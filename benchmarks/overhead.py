"""Monitor overhead: the demo's training loop with and without KLMonitor.

The demo's model (``demo_project.run.MixtureFit``: a learnable 8-component Gaussian
mixture fitted to the 8-mode ring, forward objective by default) trains for the same
number of steps with a real Lightning ``Trainer`` in three arms, run in turn in one
process, in a rotated order every round (A B R, B R A, R A B, ...):

- **A** (baseline): no callback.
- **B** (monitor): ``KLMonitor(held_out, num_groups=8)``, every other argument at
  its default: the sanity evaluation before training, then the adaptive cadence
  (``every_n_train_steps=None``: evaluations spaced so that they cost at most
  ``overhead_budget`` = 2% of training time), at most 8 held-out batches each.
  The held-out loader is the demo's:
  ``DataLoader(TensorDataset(x, mode), batch_size=1024)`` of ring samples, with 8192
  samples so that the default ``max_batches=8`` is used in full.
- **R** (reference, not a target): a bare callback that, at the steps where the last
  B run evaluated, only
  iterates the same 8 held-out batches and calls the model's ``kl_inputs`` under
  ``torch.no_grad()`` in eval mode. That is what any evaluation must pay (the user's
  data loading and forward passes); B − R is the monitor's own cost.

Both A and B use the same logger (a TensorBoardLogger in a temporary directory by
default, ``--logger none`` for ``logger=False``), no progress bar, no checkpointing.
Target: median over rounds of wall(B) / wall(A) ≤ 1.03. Also reported: the cost of
one evaluation (``KLMonitor.evaluate``, timed inside the real runs) as a multiple of
one training step (wall(A) / steps), a direct breakdown of one evaluation (held-out
loading, ``kl_inputs``, the monitor's own work), and, when the target is missed, a
cProfile of ``evaluate`` naming the hot spots. Every table is run once per
``torch.set_num_threads`` value in ``--threads`` (tiny ops on a loaded 2-core machine
are very sensitive to intra-op threads). The A and B arms must end with bitwise
identical weights (the monitor must not change training); that is checked too.

Run from the repository root::

    python benchmarks/overhead.py           # full: 5 rounds × 3000 steps, threads 1 and 2
    python benchmarks/overhead.py --fast    # smoke test (seconds; figures meaningless)

The exit code is 0 even when the target fails; the verdict is printed at the end.
"""

from __future__ import annotations

import argparse
import cProfile
import inspect
import logging
import math
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore", ".*LeafSpec.*")  # lightning's own, at import time

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # demo_project, kl_monitor

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

import kl_monitor  # noqa: E402
from demo_project.ring import Ring  # noqa: E402
from demo_project.run import MixtureFit  # noqa: E402
from kl_monitor import KLMonitor  # noqa: E402
from kl_monitor._lightning_compat import validation_mode as _eval_mode  # noqa: E402

TARGET = 1.03
TRAIN_BATCH = 256  # the demo's training batch
HELD_OUT_BATCH = 1024  # the demo's held-out batch
NUM_GROUPS = 8
_DEFAULTS = inspect.signature(KLMonitor.__init__).parameters
EVERY = _DEFAULTS["every_n_train_steps"].default  # None: the adaptive cadence
BUDGET = _DEFAULTS["overhead_budget"].default
MAX_BATCHES = _DEFAULTS["max_batches"].default


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def quiet() -> None:
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*litlogger.*")
    warnings.filterwarnings("ignore", category=kl_monitor.KLAlertWarning)


class Data:
    """The demo's training and held-out samples, drawn once and shared by every arm."""

    def __init__(self, steps: int, seed: int = 0) -> None:
        ring = Ring()
        g = torch.Generator().manual_seed(seed)
        self.train = ring.sample(steps * TRAIN_BATCH, generator=g)
        self.held = ring.sample(MAX_BATCHES * HELD_OUT_BATCH, generator=g)
        self.b_steps: set[int] = set()  # where the last B run evaluated (R mirrors it)

    def train_loader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.train), batch_size=TRAIN_BATCH)

    def held_loader(self) -> DataLoader:
        return DataLoader(TensorDataset(*self.held), batch_size=HELD_OUT_BATCH)


class InputsOnly(pl.Callback):
    """Reference arm: the user's share of an evaluation (data + kl_inputs), nothing else."""

    def __init__(self, loader: DataLoader, steps: set[int]) -> None:
        self.loader = loader
        self.steps = steps

    def _run(self, module: Any) -> None:
        with torch.no_grad(), _eval_mode(module):
            for i, batch in enumerate(self.loader):
                module.kl_inputs(batch)
                if i + 1 >= MAX_BATCHES:
                    break

    def on_fit_start(self, trainer: Any, module: Any) -> None:
        self._run(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step in self.steps:
            self._run(module)


def timed(fn: Callable, sink: list[float]) -> Callable:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    return wrapper


def fit(arm: str, data: Data, steps: int, objective: str, logdir: str | None) -> dict:
    """One training run; returns its wall time, final weights and monitor timings."""
    pl.seed_everything(0, verbose=False)
    model = MixtureFit(objective, seed=0)
    callbacks: list[Any] = []
    eval_times: list[float] = []
    hook_times: list[float] = []
    monitor = None
    if arm == "B":
        monitor = KLMonitor(data.held_loader(), num_groups=NUM_GROUPS)
        timed_evaluate = timed(monitor.evaluate, eval_times)  # the in-loop evaluations
        b_steps: set[int] = set()

        def evaluate(trainer: Any, module: Any) -> Any:
            b_steps.add(trainer.global_step)
            return timed_evaluate(trainer, module)

        monitor.evaluate = evaluate
        # everything the monitor does runs in these hooks: time them from outside
        for hook in ("on_fit_start", "on_train_start", "on_train_batch_end"):
            setattr(monitor, hook, timed(getattr(monitor, hook), hook_times))
        callbacks.append(monitor)
    elif arm == "R":
        callbacks.append(InputsOnly(data.held_loader(), data.b_steps))
    logger: Any = False
    if logdir is not None:
        logger = TensorBoardLogger(logdir, name=f"arm_{arm}", version="")
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )
    loader = data.train_loader()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, loader)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert trainer.global_step == steps, trainer.global_step
    if monitor is not None:
        data.b_steps = b_steps
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    n_evals = monitor.n_evals if monitor is not None else 0
    hooks = sum(hook_times)
    # share of training time: the monitor's hooks / the rest of fit, and its own books
    share = hooks / (wall - hooks) if monitor is not None else math.nan
    books = (
        monitor.cadence.seconds_evaluating / monitor.cadence.seconds_training
        if monitor is not None
        else math.nan
    )
    return dict(wall=wall, cpu=cpu, weights=weights, evals=eval_times, n_evals=n_evals,
                trainer=trainer, model=model, monitor=monitor, share=share,
                books=books)  # fmt: skip


def time_calls(fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def breakdown(run: dict, data: Data, repeats: int) -> dict[str, float]:
    """One evaluation, after training, split into what it is made of (median seconds)."""
    trainer, model, monitor = run["trainer"], run["model"], run["monitor"]
    loader = data.held_loader()

    def load_only() -> None:
        for i, _ in enumerate(loader):
            if i + 1 >= MAX_BATCHES:
                break

    def inputs_only() -> None:
        with torch.no_grad(), _eval_mode(model):
            for i, batch in enumerate(loader):
                model.kl_inputs(batch)
                if i + 1 >= MAX_BATCHES:
                    break

    return {
        "held-out loading (8 batches)": time_calls(load_only, repeats),
        "loading + kl_inputs": time_calls(inputs_only, repeats),
        "KLMonitor.evaluate (all of it)": time_calls(
            lambda: monitor.evaluate(trainer, model), repeats
        ),
    }


# Hot spots: (label, filename suffix, function name); cumulative time from cProfile.
HOT = (
    ("KLMonitor.evaluate", "kl_monitor/callback.py", "evaluate"),
    ("  Evaluator.accumulate (8 batches)", "kl_monitor/evaluator.py", "accumulate"),
    ("    held-out DataLoader __next__", "torch/utils/data/dataloader.py", "__next__"),
    ("      TensorDataset.__getitem__ (per row)", "torch/utils/data/dataset.py", "__getitem__"),
    ("      default_collate", "torch/utils/data/_utils/collate.py", "default_collate"),
    ("    MixtureFit.kl_inputs (user model)", "demo_project/run.py", "kl_inputs"),
    ("    SampledKL.update_from", "kl_monitor/metrics.py", "update_from"),
    ("      KLStats.batch_tensors (all calls)", "kl_monitor/stats.py", "batch_tensors"),
    ("      _fold_of (hash folds)", "kl_monitor/stats.py", "_fold_of"),
    ("      _group_batches (split by group)", "kl_monitor/metrics.py", "_group_batches"),
    ("      _add_sample_batch (state adds)", "kl_monitor/metrics.py", "_add_sample_batch"),
    ("    _metric_for (metric.to(device))", "kl_monitor/evaluator.py", "_metric_for"),
    ("    PairedRows.add (per-row values kept)", "kl_monitor/pairing.py", "add"),
    ("  _finish (compute, rules, log)", "kl_monitor/callback.py", "_finish"),
    ("    SampledKL.compute", "kl_monitor/metrics.py", "compute"),
    ("    AlertRules.update", "kl_monitor/detectors.py", "update"),
    ("    PairedRows.evidence (paired sums)", "kl_monitor/pairing.py", "evidence"),
    ("    AlertEngine.update", "kl_monitor/alerting.py", "update"),
    ("    tensorboard.write_extras", "kl_monitor/tensorboard.py", "write_extras"),
    ("    TensorBoardLogger.log_metrics", "loggers/tensorboard.py", "log_metrics"),
)


def profile(run: dict, calls: int) -> None:
    trainer, model, monitor = run["trainer"], run["model"], run["monitor"]
    monitor.evaluate(trainer, model)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        monitor.evaluate(trainer, model)
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    total = None
    print(f"cProfile of {calls} × KLMonitor.evaluate (profiler overhead inflates Python-heavy "
          "parts; shares are of the profiled total)")
    print()
    print("| part | calls / eval | ms / eval (profiled) | share |")
    print("|---|---|---|---|")
    for label, file, func in HOT:
        hits = [(v[1], v[3]) for (f, _, name), v in stats.items()
                if name == func and f.replace(os.sep, "/").endswith(file)]  # fmt: skip
        if not hits:
            continue
        ncalls = sum(h[0] for h in hits)
        cum = sum(h[1] for h in hits)
        if total is None:
            total = cum
        print(f"| {label} | {ncalls / calls:.0f} | {1e3 * cum / calls:.1f} | "
              f"{cum / total:.0%} |")  # fmt: skip
    print()
    print("Top 8 functions by own time:")
    print()
    print("| function | calls / eval | own ms / eval |")
    print("|---|---|---|")
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:8]
    for (f, line, name), v in top:
        where = f"{Path(f).parent.name}/{Path(f).name}:{line}" if f != "~" else "builtin"
        print(f"| `{name}` ({where}) | {v[1] / calls:.0f} | {1e3 * v[2] / calls:.1f} |")
    print()


def table(threads: int, args: argparse.Namespace, data: Data) -> tuple[float, bool]:
    torch.set_num_threads(threads)
    print(f"## torch.set_num_threads({threads}): {args.rounds} rounds × {args.steps} steps, "
          f"{args.objective} objective, logger {args.logger}")  # fmt: skip
    print()
    print(f"load average (1/5/15 min) at start: {load()}")
    print()
    arms = ("A", "B", "R")
    walls: dict[str, list[float]] = {a: [] for a in arms}
    evals: list[float] = []
    n_evals = 0
    identical = True
    shares: list[tuple[float, float]] = []
    last_b: dict | None = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arm in arms:  # warm-up, untimed: first-call costs land in no arm's figures
            fit(arm, data, min(args.steps, 100), args.objective,
                os.path.join(tmp, "warmup") if args.logger == "tensorboard" else None)
        for r in range(args.rounds):
            order = arms[r % 3 :] + arms[: r % 3]
            runs = {}
            for arm in order:
                logdir = os.path.join(tmp, f"t{threads}_r{r}") if args.logger == "tensorboard" \
                    else None  # fmt: skip
                runs[arm] = fit(arm, data, args.steps, args.objective, logdir)
                walls[arm].append(runs[arm]["wall"])
            identical = identical and torch.equal(runs["A"]["weights"], runs["B"]["weights"])
            evals += runs["B"]["evals"]
            n_evals = runs["B"]["n_evals"]
            last_b = runs["B"]
            shares.append((runs["B"]["share"], runs["B"]["books"]))
            a, b, ref = (runs[x]["wall"] for x in arms)
            ca, cb, cref = (runs[x]["cpu"] for x in arms)
            rows.append((r + 1, "".join(order), a, b, ref, b / a, ref / a, cb / ca, cref / ca,
                         load()))  # fmt: skip
        print("| round | order | A: no monitor (s) | B: KLMonitor (s) | R: inputs only (s) "
              "| B / A | R / A | CPU B / A | CPU R / A | load 1/5/15 |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        for row in rows:
            print("| {} | {} | {:.2f} | {:.2f} | {:.2f} | {:.3f} | {:.3f} | {:.3f} | {:.3f} "
                  "| {} |".format(*row))  # fmt: skip
        ratio = statistics.median(row[5] for row in rows)
        ref_ratio = statistics.median(row[6] for row in rows)
        cpu_ratio = statistics.median(row[7] for row in rows)
        cpu_ref = statistics.median(row[8] for row in rows)
        step = statistics.median(walls["A"]) / args.steps
        # a short run at the adaptive cadence may evaluate only before training
        ev_med = statistics.median(evals) if evals else math.nan
        ev_mean = statistics.mean(evals) if evals else math.nan
        print()
        print(f"median B / A = {ratio:.3f} (target ≤ {TARGET}: "
              f"{'PASS' if ratio <= TARGET else 'FAIL'}); per-round "
              f"{', '.join(f'{row[5]:.3f}' for row in rows)}")  # fmt: skip
        print(f"median R / A = {ref_ratio:.3f} (the floor any evaluation of this model and "
              "loader pays; not a target)")
        print(f"process CPU time (less sensitive to other load): median B / A = {cpu_ratio:.3f}, "
              f"R / A = {cpu_ref:.3f}")  # fmt: skip
        print(f"evaluations per run: {n_evals} (sanity evaluation + adaptive cadence at "
              f"overhead_budget={BUDGET}, max_batches={MAX_BATCHES} × {HELD_OUT_BATCH} "
              "held-out rows)")
        print(f"one training step (median wall(A) / steps): {1e3 * step:.2f} ms")
        print(f"one evaluation in the loop (KLMonitor.evaluate, {len(evals)} calls): median "
              f"{1e3 * ev_med:.1f} ms = {ev_med / step:.1f} training steps "
              f"(mean {1e3 * ev_mean:.1f} ms = {ev_mean / step:.1f} steps)")  # fmt: skip
        print(f"A and B final weights bitwise identical in every round: {identical}")
        print(f"monitor time / training time (B; budget {BUDGET:.0%}), per round: measured "
              f"inside its hooks {', '.join(f'{h:.2%}' for h, _ in shares)} (max "
              f"{max(h for h, _ in shares):.2%}); its own accounting "
              f"{', '.join(f'{b:.2%}' for _, b in shares)}")  # fmt: skip
        print()
        assert last_b is not None
        parts = breakdown(last_b, data, args.repeats)
        total = parts["KLMonitor.evaluate (all of it)"]
        load_s = parts["held-out loading (8 batches)"]
        inputs_s = parts["loading + kl_inputs"] - load_s
        own = total - parts["loading + kl_inputs"]
        print(f"One evaluation after training, direct timings (median of {args.repeats}):")
        print()
        print("| part | ms | training steps | share |")
        print("|---|---|---|---|")
        for label, sec in (
            ("held-out loading: DataLoader over TensorDataset, 8 × 1024 rows", load_s),
            ("MixtureFit.kl_inputs: sample 1024, 4 log-densities, cdist (× 8)", inputs_s),
            ("the monitor's own work (metric update, compute, rules, logging)", own),
            ("KLMonitor.evaluate, total", total),
        ):
            print(f"| {label} | {1e3 * sec:.1f} | {sec / step:.1f} | {sec / total:.0%} |")
        print()
        slack = TARGET - 1
        print(f"Cadence that would meet ≤ {TARGET}× (evaluation cost / ({slack:.0%} of a step)): "
              f"every {ev_med / (slack * step):.0f} steps at the in-loop evaluation cost; "
              f"every {math.ceil(max(inputs_s, 0.0) / (slack * step))} steps if the evaluation "
              "cost only kl_inputs (free loading, free monitor)")  # fmt: skip
        print()
        if ratio > TARGET or args.profile:
            profile(last_b, args.profile_calls)
        print(f"load average at end: {load()}")
        print()
    return ratio, identical


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fast", action="store_true", help="smoke test: tiny sizes")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (3000)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of A, B, R (5)")
    ap.add_argument("--threads", default=None, help="comma-separated thread counts (1,2)")
    ap.add_argument("--objective", choices=("forward", "reverse"), default="forward")
    ap.add_argument("--logger", choices=("tensorboard", "none"), default="tensorboard")
    ap.add_argument("--repeats", type=int, default=None, help="breakdown repeats (20)")
    ap.add_argument("--profile", action="store_true", help="profile even when the target passes")
    ap.add_argument("--profile-calls", type=int, default=None, help="evaluations profiled (20)")
    args = ap.parse_args(argv)
    fast = args.fast
    args.steps = args.steps or (100 if fast else 3000)
    args.rounds = args.rounds or (2 if fast else 5)
    args.repeats = args.repeats or (3 if fast else 20)
    args.profile_calls = args.profile_calls or (2 if fast else 20)
    threads = [int(t) for t in (args.threads or ("1" if fast else "1,2")).split(",")]
    quiet()
    default_threads = torch.get_num_threads()
    print(f"# kl_monitor {kl_monitor.__version__} monitor overhead benchmark"
          f"{' (--fast: figures meaningless)' if fast else ''}")  # fmt: skip
    print()
    print(f"torch {torch.__version__}, lightning {pl.__version__}, python "
          f"{platform.python_version()}, {os.cpu_count()} CPUs, default torch threads "
          f"{default_threads}, load average {load()}")  # fmt: skip
    print(f"KLMonitor defaults: every_n_train_steps={EVERY}, overhead_budget={BUDGET}, "
          f"max_batches={MAX_BATCHES}; "
          f"training batch {TRAIN_BATCH}, held-out batch {HELD_OUT_BATCH}")  # fmt: skip
    print()
    data = Data(args.steps)
    verdicts = []
    for t in threads:
        ratio, identical = table(t, args, data)
        verdicts.append((t, ratio, identical))
    torch.set_num_threads(default_threads)
    print("## Verdict")
    print()
    for t, ratio, identical in verdicts:
        print(f"threads {t}: median wall ratio {ratio:.3f} vs target ≤ {TARGET}: "
              f"{'PASS' if ratio <= TARGET else 'FAIL'}; training unchanged: "
              f"{'PASS' if identical else 'FAIL'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Train models of an 8-mode ring P, watched by KLMonitor: two mixtures and two GANs.

``--objective forward``: a Gaussian mixture Q by maximum likelihood on samples of P,
i.e. minimising D(P‖Q). It covers every mode. ``--objective reverse``: minimising
D(Q‖P) on the model's own samples. It is mode-seeking and drops modes; KLMonitor
raises a collapse alert that names them. Both give the monitor log-densities.

``--gan``: a GAN (no density: the monitor sees samples only, ``KLInputs.from_samples``)
trained twice, a healthy run and one whose collapse is induced (see
``demo_project/gan.py``); the monitor names the modes it lost and stays silent on the
healthy one. Run ``python -m demo_project`` (all four runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from kl_monitor import KLInputs, KLMonitor
from kl_monitor.report import load_runs, plot_runs

from . import gan
from .ring import GaussianMixture, Ring


class MixtureFit(pl.LightningModule):
    """A mixture model trained by forward or reverse KL against the ring."""

    def __init__(self, objective: str, lr: float = 0.05, seed: int = 0) -> None:
        super().__init__()
        self.objective = objective
        self.lr = lr
        self.q = GaussianMixture(seed=seed)
        self.p = Ring()

    def training_step(
        self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int
    ) -> torch.Tensor:
        x, _ = batch
        if self.objective == "forward":
            loss = -self.q.log_prob(x).mean()  # = D(P‖Q) + const
        else:
            loss = self.q.reverse_kl_loss(self.p.log_prob)  # D(Q‖P)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def kl_inputs(self, batch: tuple[torch.Tensor, torch.Tensor]) -> KLInputs:
        """Held-out samples of P with their mode, and as many samples of the model."""
        x, mode = batch
        y = self.q.sample(x.shape[0])
        return KLInputs.from_log_probs(
            self.p.log_prob(x),
            self.q.log_prob(x),
            model_samples_log_q=self.q.log_prob(y),
            model_samples_log_p=self.p.log_prob(y),
            groups=mode,
            model_samples_groups=self.p.nearest_mode(y),
        )


def train(objective: str, out: Path, steps: int, every: int, seed: int, progress: bool) -> dict:
    """One run; returns what the finale table and the figure need."""
    pl.seed_everything(seed, verbose=False)
    ring = Ring()
    g = torch.Generator().manual_seed(seed)
    train_x, train_mode = ring.sample(steps * 256, generator=g)
    held_x, held_mode = ring.sample(4096, generator=g)
    model = MixtureFit(objective, seed=seed)
    alerts: list[dict] = []
    monitor = KLMonitor(
        DataLoader(TensorDataset(held_x, held_mode), batch_size=1024),
        every_n_train_steps=every,
        max_batches=4,
        num_groups=ring.modes,
        on_alert=lambda a: alerts.append(a.to_dict()),
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(out), name=f"{objective}_kl_training", version=""),
        callbacks=[monitor],
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        log_every_n_steps=every,
    )
    train_loader = DataLoader(TensorDataset(train_x, train_mode), batch_size=256)
    trainer.fit(model, train_loader)
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        samples = model.q.sample(4000)
    covered, quality = ring.modes_covered(samples)
    last = monitor.last_evaluation  # the typed result of the last evaluation
    return {
        "objective": objective,
        "forward": last.forward.value,
        "forward_stderr": last.forward.stderr,
        "reverse": last.reverse.value,
        "reverse_stderr": last.reverse.stderr,
        "alerts": alerts,
        "evaluations": monitor.n_evals,
        "modes_covered": covered,
        "high_quality": quality,
        "samples": samples,
    }


def figure(results: list[dict], runs: list, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ring = Ring()
    fig, axes = plt.subplots(2, 2, figsize=(11, 9), constrained_layout=True)
    grid = torch.linspace(-6, 6, 200)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    density = (
        ring.log_prob(torch.stack((xx.reshape(-1), yy.reshape(-1)), 1)).exp().reshape(200, 200)
    )
    for ax, r in zip(axes[0], results, strict=True):
        ax.contour(xx, yy, density, levels=6, cmap="Greys")
        s = r["samples"][:1500]
        ax.scatter(
            s[:, 0], s[:, 1], s=3, alpha=0.5, color="C0" if r["objective"] == "forward" else "C1"
        )
        for k, (mx, my) in enumerate(ring.means.tolist()):  # numbered, as alerts name them
            ax.annotate(str(k), (mx * 1.3, my * 1.3), ha="center", va="center", fontsize=11,
                        fontweight="bold")  # fmt: skip
        ax.set_title(f"{r['objective']} KL training: {r['modes_covered']}/8 modes covered")
        ax.set_aspect("equal")
        ax.set_xlim(-6, 6)
        ax.set_ylim(-6, 6)
    plot_runs(runs, png, axes=axes[1])
    fig.savefig(png, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_project", description=__doc__)
    parser.add_argument("--objective", choices=("both", "forward", "reverse"), default="both")
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--steps", type=int, default=600, help="training steps per run")
    parser.add_argument("--every", type=int, default=20, help="KLMonitor cadence in steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide the progress bars (hidden anyway when stdout is not a terminal: one "
        "line per run instead)",
    )
    parser.add_argument(
        "--gan", choices=("both", "healthy", "collapse", "none"), default="both",
        help="GAN runs (samples only): both (default), one of them, or none",
    )
    parser.add_argument("--gan-batches", type=int, default=400, help="batches per GAN run")
    parser.add_argument(
        "--gan-collapse-at", type=int, default=250, help="batch where the collapse is induced"
    )
    parser.add_argument("--gan-every", type=int, default=50, help="GAN cadence in steps")
    args = parser.parse_args(argv)
    return single_threaded(_run, args)


def single_threaded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """``run(args)`` with one intra-op thread, the caller's count restored after.

    The demo models are tiny: intra-op threads only add synchronisation, and on a busy
    2-core machine they made the demo 4x slower (49.7 s vs 13.0 s, same results).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run(args)
    finally:
        torch.set_num_threads(threads)


def fresh_logdir(path: str) -> Path:
    """The run directory, emptied of earlier event files (a rerun draws fresh curves)."""
    out = Path(path)
    if out.exists():
        for old in out.rglob("events.out.tfevents.*"):
            old.unlink()
    out.mkdir(parents=True, exist_ok=True)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    return out


def _run(args: argparse.Namespace) -> int:
    out = fresh_logdir(args.out)
    objectives = ("forward", "reverse") if args.objective == "both" else (args.objective,)
    start = time.perf_counter()
    # Piped to a file, progress bars are thousands of carriage-return updates that bury
    # the alert: there, print one line per run.
    bars = not args.no_progress and sys.stdout.isatty()
    results = []
    for objective in objectives:
        title = f"{objective} KL training ({args.steps} steps, KLMonitor every {args.every})"
        if bars:
            print(f"\n=== {title} ===")
        began = time.perf_counter()
        results.append(train(objective, out, args.steps, args.every, args.seed, bars))
        if not bars:
            r = results[-1]
            print(
                f"=== {title}: {time.perf_counter() - began:.1f} s, {r['evaluations']} "
                f"evaluations, {len(r['alerts'])} alert(s)",
                flush=True,
            )
    gans = []
    for name in ("healthy", "collapse") if args.gan == "both" else (args.gan,):
        if name == "none":
            break
        collapse_at = args.gan_collapse_at if name == "collapse" else None
        title = f"GAN, {name} ({args.gan_batches} batches, samples only)"
        if bars:
            print(f"\n=== {title} ===")
        began = time.perf_counter()
        gans.append(gan.train(name, collapse_at, out, args.gan_batches, args.gan_every,
                              args.seed, bars))  # fmt: skip
        if not bars:
            r = gans[-1]
            print(
                f"=== {title}: {time.perf_counter() - began:.1f} s, {r['evaluations']} "
                f"evaluations, {len(r['alerts'])} alert(s)",
                flush=True,
            )
    wall = time.perf_counter() - start

    print("\n" + "=" * 96)
    print(f"{'run':<13} {'forward KL D(P‖Q)':<22} {'reverse KL D(Q‖P)':<22} {'modes':<7} alerts")
    for r in results + gans:
        alerts = (
            "; ".join(
                ("update" if a["details"].get("update") else a["kind"])
                + f" @ step {a['step']} (modes {', '.join(map(str, a['groups'])) or '-'})"
                for a in r["alerts"]
            )
            or "none"
        )
        print(
            f"{r['objective']:<13} {r['forward']:>8.3f} ± {r['forward_stderr']:<9.3f} "
            f"{r['reverse']:>8.3f} ± {r['reverse_stderr']:<9.3f} {r['modes_covered']}/8    {alerts}"
        )
    for r in gans:
        if r["alerts"]:
            print(f"{r['objective']}: modes lost at the alert (step {r['alert_step']}): "
                  f"{r['lost_at_alert']}, at the end: {r['lost_at_end']}")
    log = {r["objective"]: r["alerts"] for r in results + gans}
    (out / "alerts.json").write_text(json.dumps(log, indent=2))
    png = out / "demo.png"
    runs = [r for r in load_runs(out) if not r.name.startswith("gan_")]
    figure(results, runs, png) if len(results) == 2 else plot_runs(runs, png)
    if gans:
        gan.figure(gans, out / "gan.png")
        print(f"GAN figure: {out / 'gan.png'}")
    print("=" * 96)
    print(f"wall time {wall:.1f} s")
    print(f"figure:     {png}")
    print(f"alert log:  {out / 'alerts.json'}")
    print(
        f"TensorBoard logs: {out}   ->   tensorboard --logdir {out}   (then open http://localhost:6006)"
    )
    print(f"report:     kl-monitor report {out} --png {out / 'report.png'}")
    return 0

"""A tiny language model watched by sequence-level KL on its own generations.

Text comes from a known Markov source P: a prompt is one of four prompt-type tokens,
and the continuation (12 tokens over 8 symbols) follows a transition matrix of that
type. A GRU language model Q is trained on it with Lightning (maximum likelihood).
From step ``--finetune-at`` it is "fine-tuned" on reward-filtered data: for prompt type
2 the reward picks one continuation, the same every time, and the model learns to
answer type 2 with it alone (the other types keep their data).

At each evaluation ``KLMonitor`` gets, for held-out prompts, the model's own
generations (sampled with the monitor's generator) and the reference's continuations
(held-out text), with the exact reference logits of the Markov source at every
position. It logs, per sequence:

- ``kl/reverse``: D(Q‖P) on the model's generations (the RLHF penalty);
- ``kl/forward``: D(P‖Q) on the reference continuations;
- ``kl/forward_on_model_samples`` and ``kl/reverse_on_reference_samples``: the other
  direction along the same sequences, a teacher-forced diagnostic;

and raises a collapse (sharpening) alert naming prompt type 2 a few evaluations after
fine-tuning starts. Run ``python -m demo_project.lm`` (about 30 s on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from kl_monitor import KLInputs, KLMonitor
from kl_monitor.generation import sample_continuations
from kl_monitor.report import load_runs

from .run import fresh_logdir, single_threaded

TYPES, SYMBOLS, LENGTH = 4, 8, 12
COLLAPSED = 2  # the prompt type the reward collapses


class MarkovSource:
    """P: for prompt type g, y₁ ~ init[g] and y_t ~ trans[g, y_{t−1}], over 8 symbols."""

    def __init__(self, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        alpha = torch.full((SYMBOLS,), 0.7)
        dirichlet = torch.distributions.Dirichlet(alpha)
        with torch.random.fork_rng():
            torch.manual_seed(int(torch.randint(2**31, (1,), generator=g)))
            self.init = dirichlet.sample((TYPES,))  # (G, S)
            self.trans = dirichlet.sample((TYPES, SYMBOLS))  # (G, S, S)

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``(n, 1 + LENGTH)``: the prompt type, then symbols (ids offset by TYPES)."""
        types = torch.randint(TYPES, (n,), generator=generator)
        y = torch.empty(n, LENGTH, dtype=torch.long)
        y[:, 0] = torch.multinomial(self.init[types], 1, generator=generator)[:, 0]
        for t in range(1, LENGTH):
            y[:, t] = torch.multinomial(self.trans[types, y[:, t - 1]], 1, generator=generator)[
                :, 0
            ]
        return torch.cat((types[:, None], y + TYPES), 1)

    def logits(self, seqs: torch.Tensor) -> torch.Tensor:
        """Exact log P of the next symbol at positions 0..LENGTH−1: ``(n, LENGTH, S)``."""
        types, y = seqs[:, 0], seqs[:, 1:] - TYPES
        first = self.init[types].log()[:, None]
        rest = self.trans[types[:, None], y[:, :-1]].log()
        return torch.cat((first, rest), 1)

    def mode(self, prompt_type: int) -> torch.Tensor:
        """The greedy continuation of a prompt type (what the reward picks)."""
        y = [int(self.init[prompt_type].argmax())]
        for _ in range(LENGTH - 1):
            y.append(int(self.trans[prompt_type, y[-1]].argmax()))
        return torch.tensor([prompt_type] + [s + TYPES for s in y])


class GRULM(pl.LightningModule):
    """Q: embedding → GRU → next-symbol logits (over the 8 symbols)."""

    def __init__(self, source: MarkovSource, hidden: int = 64, lr: float = 0.01) -> None:
        super().__init__()
        self.embed = nn.Embedding(TYPES + SYMBOLS, 32)
        self.gru = nn.GRU(32, hidden, batch_first=True)
        self.head = nn.Linear(hidden, SYMBOLS)
        self.lr = lr
        self.source = source

    def step(self, new_ids: torch.Tensor, state):
        """A ``StepFn``: the GRU's hidden state is the cache. After the prompt, the new
        ids are sampled symbols (0..7), whose input ids are offset by TYPES."""
        ids = new_ids if state is None else new_ids + TYPES
        out, state = self.gru(self.embed(ids), state)
        return self.head(out[:, -1]), state

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(seqs[:, :-1]))
        return self.head(out)  # (n, LENGTH, S): logits of symbols 1..LENGTH

    def training_step(self, batch: tuple[torch.Tensor], batch_idx: int) -> torch.Tensor:
        (seqs,) = batch
        logits = self(seqs)
        loss = nn.functional.cross_entropy(logits.reshape(-1, SYMBOLS),
                                           (seqs[:, 1:] - TYPES).reshape(-1))
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)

    def kl_inputs(self, batch: tuple[torch.Tensor]) -> list[KLInputs]:
        """The model's generations for the held-out prompts, and the held-out text."""
        (seqs,) = batch
        types = seqs[:, 0]
        # KLMonitor seeds the global RNG the same at every evaluation (and restores
        # training's afterwards): generations with common random numbers pair with the
        # baseline evaluation's, sample by sample
        rng = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        gen = sample_continuations(self.step, seqs[:, :1], LENGTH, generator=rng)
        generated = torch.cat((seqs[:, :1], gen.continuation + TYPES), 1)
        on_model = KLInputs.from_logits(self.source.logits(generated), gen.logits,
                                        groups=types, sampled_from="model")
        on_reference = KLInputs.from_logits(self.source.logits(seqs), self(seqs),
                                            groups=types, sampled_from="reference")
        return [on_model, on_reference]


class Curriculum(IterableDataset):
    """Text of P; from batch ``switch`` on, prompt type 2 answered by the reward's pick."""

    def __init__(self, source: MarkovSource, steps: int, switch: int, seed: int,
                 batch: int = 64) -> None:
        self.source, self.steps, self.switch, self.seed, self.batch = (
            source, steps, switch, seed, batch)

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed)
        best = self.source.mode(COLLAPSED)
        for i in range(self.steps):
            seqs = self.source.sample(self.batch, g)
            if i >= self.switch:
                seqs[seqs[:, 0] == COLLAPSED] = best
            yield (seqs,)


def train(out: Path, steps: int, switch: int, every: int, seed: int, progress: bool) -> dict:
    pl.seed_everything(seed, verbose=False)
    source = MarkovSource(seed)
    held = source.sample(512, torch.Generator().manual_seed(seed + 1))
    model = GRULM(source)
    alerts: list[dict] = []
    monitor = KLMonitor(
        DataLoader(TensorDataset(held), batch_size=256), every_n_train_steps=every,
        max_batches=2, reduction="sequence_sum", num_groups=TYPES,
        on_alert=lambda a: alerts.append(a.to_dict()),
    )
    trainer = pl.Trainer(
        max_steps=steps, accelerator="cpu", devices=1,
        logger=TensorBoardLogger(str(out), name="lm", version=""),
        callbacks=[monitor], enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=progress, log_every_n_steps=every,
    )
    data = DataLoader(Curriculum(source, steps, switch, seed + 2), batch_size=None)
    trainer.fit(model, data)
    run = next(r for r in load_runs(out) if r.name == "lm")
    return {"alerts": alerts, "run": run}


TABLE = (
    ("forward", "D(P‖Q) on reference text"),
    ("reverse", "D(Q‖P) on generations"),
    ("forward_on_model_samples", "fwd on gens (diag)"),
    ("entropy_model", "H(Q)"),
    (f"reverse/group_{COLLAPSED}", f"D(Q‖P), type {COLLAPSED}"),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo_project.lm", description=__doc__)
    parser.add_argument("--out", default="runs/lm", help="run directory (default: runs/lm)")
    parser.add_argument("--steps", type=int, default=400, help="training steps")
    parser.add_argument("--finetune-at", type=int, default=250,
                        help="step at which the reward-filtered fine-tuning starts")
    parser.add_argument("--every", type=int, default=20, help="KLMonitor cadence in steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    return single_threaded(_run, args)


def _run(args: argparse.Namespace) -> int:
    out = fresh_logdir(args.out)
    warnings.filterwarnings("ignore", ".*log_every_n_steps.*")
    print(f"=== GRU LM on a Markov source: {args.steps} steps, reward fine-tuning of prompt "
          f"type {COLLAPSED} from step {args.finetune_at}, KLMonitor every {args.every} ===")
    start = time.perf_counter()
    result = train(out, args.steps, args.finetune_at, args.every, args.seed,
                   not args.no_progress)
    wall = time.perf_counter() - start
    run = result["run"]
    steps, _ = run.series("kl/forward")
    series = {key: dict(zip(*run.series(f"kl/{key}"), strict=True)) for key, _ in TABLE}
    print("\nnats per sequence (12 tokens); rows from the model's generations and from "
          "held-out text")
    print(f"{'step':>5} " + " ".join(f"{label:>26}" for _, label in TABLE))
    for step in steps:
        cells = " ".join(f"{series[key].get(step, float('nan')):>26.3f}" for key, _ in TABLE)
        mark = "  <- fine-tuning starts" if step == args.finetune_at else ""
        print(f"{step:>5} {cells}{mark}")
    for a in result["alerts"]:
        groups = ", ".join(map(str, a["groups"])) or "-"
        print(f"\nALERT {a['kind']} ({a['details'].get('signature')}) at step {a['step']}, "
              f"prompt types: {groups}\n  {a['message']}")
    if not result["alerts"]:
        print("\nno alert")
    (out / "alerts.json").write_text(json.dumps(result["alerts"], indent=2, default=str))
    print(f"\nwall time {wall:.1f} s")
    print(f"TensorBoard logs: {out}   ->   tensorboard --logdir {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

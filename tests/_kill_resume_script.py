"""Training run launched by ``tests/test_kill_resume.py`` (and runnable by hand).

A scripted 8-mode mixture model (tests/lit_models.py) converges, drops four modes at
evaluation ``ONSET1`` (an alert fires), recovers at ``RECOVER`` and drops the four
other modes at ``ONSET2`` (a second alert, after any kill the test makes). The monitor
evaluates every step and logs to TensorBoard under ``ROOT/tb`` and to CSV under
``ROOT/csv/version_<n>`` (one version per process); checkpoints go to
``ROOT/ckpt`` every step (``save_last=True``).

    python tests/_kill_resume_script.py ROOT --steps 36 [--resume] [--no-ckpt]
        [--step-sleep 0.05]

Each alert is appended to ``ROOT/alerts.jsonl`` by the ``on_alert`` hook as it fires
(flushed and fsynced, so a killed run leaves the record). The last line of stdout is a
JSON summary of the final monitor state: alerts, detector state, evaluation count.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from lit_models import MODES, namespace, ring_data, scripted_mixture_module, train_data  # noqa: E402

from kl_monitor import KLMonitor  # noqa: E402

ONSET1, RECOVER, ONSET2 = 8, 14, 28


def schedule(index: int) -> tuple[torch.Tensor, float]:
    """Model weights and spread at evaluation ``index`` (one evaluation per step)."""
    scale = 1.0 + 1.5 * math.exp(-index / 4)
    w = torch.ones(MODES, dtype=torch.float64)
    if ONSET1 <= index < RECOVER:
        w[[1, 2, 5, 6]] = 1e-3 ** (index - ONSET1 + 1)
    if index >= ONSET2:
        w[[0, 3, 4, 7]] = 1e-3 ** (index - ONSET2 + 1)
    return w / w.sum(), scale


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("root")
    parser.add_argument("--steps", type=int, default=36)
    parser.add_argument("--resume", action="store_true", help='fit(..., ckpt_path="last")')
    parser.add_argument("--no-ckpt", action="store_true", help="no checkpoints (reference run)")
    parser.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pl = namespace("lightning.pytorch")
    root = os.path.abspath(args.root)
    alerts_file = os.path.join(root, "alerts.jsonl")

    def on_alert(alert) -> None:
        with open(alerts_file, "a") as fh:
            fh.write(json.dumps({"pid": os.getpid(), **alert.to_dict()}) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    monitor = KLMonitor(
        ring_data(1024, seed=0), every_n_train_steps=1, max_batches=2, num_groups=8,
        on_alert=on_alert,
    )  # fmt: skip
    model = scripted_mixture_module("lightning.pytorch", schedule, every=1)
    if args.step_sleep:
        inner = model.training_step

        def training_step(batch, batch_idx):
            time.sleep(args.step_sleep)
            return inner(batch, batch_idx)

        model.training_step = training_step
    callbacks = [monitor]
    if not args.no_ckpt:
        callbacks.append(
            pl.callbacks.ModelCheckpoint(
                dirpath=os.path.join(root, "ckpt"), save_last=True, every_n_train_steps=1,
                save_top_k=-1,
            )  # fmt: skip
        )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=[
            pl.loggers.TensorBoardLogger(root, name="tb", version=""),
            # a new version per process: the resumed run must not delete the first CSV
            pl.loggers.CSVLogger(root, name="csv"),
        ],
        callbacks=callbacks,
        enable_checkpointing=not args.no_ckpt,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(
            model, train_data(4096, dim=2, batch_size=8),
            ckpt_path="last" if args.resume else None,
        )  # fmt: skip
    summary = {
        "global_step": trainer.global_step,
        "n_evals": monitor.n_evals,
        "failures": monitor.failures,
        "last_eval_step": monitor.last_eval_step,
        "alerts": [a.to_dict() for a in monitor.alerts],
        "rules": monitor.rules.state_dict(),
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()

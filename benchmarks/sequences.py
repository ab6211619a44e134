"""Sequence-level KL: the Rao–Blackwellized sum against k1 and k3, and generation cost.

Part 1, estimators, against an exact truth. P (reference) and Q (model) are Markov
chains over a small vocabulary; the sequence-level KL over T steps is exact by dynamic
programming. On the same sampled sequences (from Q for reverse KL, from P for forward)
it compares, per sequence:

- ``RB``: Σ_t KL(A_t‖B_t), exact per position along the sampled prefix
  (``kl_monitor.sequences.sequence_kl``);
- ``k1``: Σ_t ℓ_t with ℓ_t = log a(y_t|y_<t) − log b(y_t|y_<t) at the sampled token, the
  sampled log-ratio TRL, verl and OpenRLHF log;
- ``k3``: Σ_t (r_t − 1 − log r_t) with r_t = b/a at the sampled token, k3 per token
  summed as TRL (``kl_estimator="k3"``) and verl (``low_var_kl``) compute it.

Columns: truth; bias (mean − truth, in units of its standard error: |z| > 4 is a real
bias); sd per sequence; sd ratios against RB; coverage of the RB 95% interval (mean ±
1.96 sd/√n over n sequences) across repeats. The ``truncated`` case is a model that
samples P restricted to its 2 most likely tokens per state (a top-k sampler): k3 summed
per token is then biased (E[r − 1] = −P's mass outside Q's support), and k1's terms are
constant given the prefix, so k1 = RB exactly.

Part 2, cost: a tiny randomly initialised GPT-2 (1 layer, 32 dims) generates 64 prompts
× 32 new tokens with ``hf_generation_inputs`` (sampling with its KV cache, then one
reference pass), against one training step of the same model (forward, backward, Adam)
on the same 64 sequences, measured in the same run (medians). Target: ≤ 2 steps.

Run from the repository root::

    python benchmarks/sequences.py          # 1000 repeats × 64 sequences per case (~2 min)
    python benchmarks/sequences.py --fast   # smoke test (seconds)

The exit code is 0 even when a target is missed; misses are listed at the end.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kl_monitor from this checkout

from kl_monitor.sequences import sequence_kl  # noqa: E402

VOCAB = 6


def chains(seed: int, concentration: float, vocab: int = VOCAB):
    """Reference and model Markov chains: (initial distribution, transition matrix)."""
    rng = np.random.default_rng(seed)

    def one():
        return (rng.dirichlet(np.full(vocab, concentration)),
                rng.dirichlet(np.full(vocab, concentration), size=vocab))

    return one(), one()


def near(ref, scale: float, seed: int):
    """A model close to the reference: logits perturbed by N(0, scale²)."""
    rng = np.random.default_rng(seed)

    def tilt(p):
        x = np.log(p) + scale * rng.standard_normal(p.shape)
        return np.exp(x - np.log(np.exp(x).sum(-1, keepdims=True)))

    return tilt(ref[0]), tilt(ref[1])


def truncated(ref, keep: int = 2):
    """The reference restricted to its ``keep`` most likely tokens (a top-k sampler)."""

    def cut(p):
        kth = -np.sort(-p, axis=-1)[..., keep - 1:keep]
        q = np.where(p >= kth, p, 0.0)
        return q / q.sum(-1, keepdims=True)

    return cut(ref[0]), cut(ref[1])


def exact_kl(a, b, steps: int) -> float:
    """D(A_T‖B_T) = KL(a₁‖b₁) + Σ_{t≥2} E_{s∼A_{t−1}} KL(A(·|s)‖B(·|s)), by DP."""
    def kl(x, y):
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.sum(np.where(x > 0, x * (np.log(x) - np.log(y)), 0.0), axis=-1)

    total, state, per_state = float(kl(a[0], b[0])), a[0], kl(a[1], b[1])
    for _ in range(steps - 1):
        total += float(state @ per_state)
        state = state @ a[1]
    return total


def sample(a, b, n: int, steps: int, g: torch.Generator):
    """n sequences of chain a; per-position log-probabilities of a and b; tokens."""
    ia, ta = torch.tensor(a[0]), torch.tensor(a[1])
    ib, tb = torch.tensor(b[0]), torch.tensor(b[1])
    u = torch.rand(n, steps, 1, generator=g, dtype=torch.float64)
    x = torch.empty(n, steps, dtype=torch.long)
    x[:, 0] = (ia.cumsum(0) < u[:, 0] * ia.sum()).sum(-1).clamp(max=len(ia) - 1)
    cdf = ta.cumsum(-1)
    for t in range(1, steps):
        row = cdf[x[:, t - 1]]
        x[:, t] = (row < u[:, t] * row[:, -1:]).sum(-1).clamp(max=len(ia) - 1)
    prev = x[:, :-1]
    log_a = torch.cat((ia.log().expand(n, 1, -1), ta.log()[prev]), 1)
    log_b = torch.cat((ib.log().expand(n, 1, -1), tb.log()[prev]), 1)
    return log_a, log_b, x


def estimator_row(name, a, b, steps, sampled_from, repeats, n_seq, seed):
    """One table row: A samples, target D(A‖B)."""
    g = torch.Generator().manual_seed(seed)
    truth = exact_kl(a, b, steps)
    log_a, log_b, x = sample(a, b, repeats * n_seq, steps, g)
    log_p, log_q = (log_b, log_a) if sampled_from == "model" else (log_a, log_b)
    rb = sequence_kl(log_p, log_q, sampled_from=sampled_from).per_sequence.numpy()
    ell = (log_a.gather(-1, x[..., None]) - log_b.gather(-1, x[..., None]))[..., 0]
    k1 = ell.sum(1).numpy()
    k3 = (torch.expm1(-ell) + ell).sum(1).numpy()
    per_rep = rb.reshape(repeats, n_seq)
    se_rep = per_rep.std(1, ddof=1) / math.sqrt(n_seq)
    coverage = float(np.mean(np.abs(per_rep.mean(1) - truth) <= 1.96 * se_rep))
    direction = "reverse" if sampled_from == "model" else "forward"
    cells = {"case": name, "T": steps, "rows from": sampled_from, "target": direction,
             "truth": truth}
    sds = {}
    for label, v in (("RB", rb), ("k1", k1), ("k3", k3)):
        sd = float(v.std(ddof=1))
        sds[label] = sd
        z = (float(v.mean()) - truth) / (sd / math.sqrt(v.size)) if sd > 0 else 0.0
        cells[f"bias {label} (z)"] = f"{float(v.mean()) - truth:+.4f} ({z:+.1f})"
    for label in ("RB", "k1", "k3"):
        cells[f"sd {label}"] = sds[label]
    cells["sd k1/RB"] = sds["k1"] / sds["RB"]
    cells["sd k3/RB"] = sds["k3"] / sds["RB"]
    cells["RB coverage"] = coverage
    return cells


def cases():
    far = chains(1, 2.0)
    close_ref = chains(2, 2.0)[0]
    close = (close_ref, near(close_ref, 0.1, 3))
    trunc_ref = chains(4, 2.0)[0]
    return [
        ("random pair", far[0], far[1]),
        ("near (σ=0.1)", close[0], close[1]),
        ("truncated", trunc_ref, truncated(trunc_ref)),
    ]


def fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) >= 0.01 or v == 0 else f"{v:.2e}"
    return str(v)


def table(rows) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def cost_rows(repeats: int, prompts: int = 64, new_tokens: int = 32, prompt_len: int = 16):
    """Median seconds: generation + scoring vs one training step, same model, same run."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from kl_monitor.generation import hf_generation_inputs

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=256, bos_token_id=0,
                     eos_token_id=1, n_positions=prompt_len + new_tokens)
    model, reference = GPT2LMHeadModel(cfg), GPT2LMHeadModel(cfg)
    ids = torch.randint(2, 256, (prompts, prompt_len))
    batch = torch.randint(2, 256, (prompts, prompt_len + new_tokens))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)

    def train_step():
        model.train()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def generate():
        hf_generation_inputs(model, reference, ids, max_new_tokens=new_tokens, generator=gen)

    timings = {"train step": [], "generation + scoring": []}
    for i in range(repeats + 1):  # the first round warms up
        for name, fn in (("train step", train_step), ("generation + scoring", generate)):
            start = time.perf_counter()
            fn()
            if i:
                timings[name].append(time.perf_counter() - start)
    step = statistics.median(timings["train step"])
    gen_s = statistics.median(timings["generation + scoring"])
    rows = [{"what": name, "median ms": 1e3 * statistics.median(v), "runs": len(v)}
            for name, v in timings.items()]
    return rows, gen_s / step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke test: few repeats")
    parser.add_argument("--repeats", type=int, default=1000)
    parser.add_argument("--n-seq", type=int, default=64, help="sequences per estimate")
    args = parser.parse_args()
    repeats = 40 if args.fast else args.repeats
    torch.set_num_threads(1)  # a shared 2-core machine: one thread for every timing
    rows, misses = [], []
    for i, (name, ref, model) in enumerate(cases()):
        for steps in (8, 64):
            sources = ("model",) if name == "truncated" else ("model", "reference")
            for src in sources:
                a, b = (model, ref) if src == "model" else (ref, model)
                row = estimator_row(name, a, b, steps, src, repeats, args.n_seq, 100 * i + steps)
                rows.append(row)
                label = f"{name}, T={steps}, rows from {src}"
                if not 0.93 <= row["RB coverage"] <= 0.97:
                    misses.append(f"{label}: RB coverage {row['RB coverage']:.3f} not in "
                                  "[0.93, 0.97]")
                if row["sd RB"] > row["sd k1"] * (1 + 1e-9):  # truncated: k1 = RB exactly
                    misses.append(f"{label}: sd(RB) {row['sd RB']:.4f} > sd(k1) "
                                  f"{row['sd k1']:.4f}")
    print(f"## Sequence-level KL estimators ({repeats} repeats × {args.n_seq} sequences, "
          f"vocabulary {VOCAB})\n")
    print(table(rows))
    cost, ratio = cost_rows(3 if args.fast else 15)
    print("\n## Generation + scoring vs training, tiny GPT-2, 64 prompts × 32 new tokens\n")
    print(table(cost))
    print(f"\ngeneration + scoring = {ratio:.2f} training steps (target ≤ 2)")
    if ratio > 2:
        misses.append(f"generation + scoring costs {ratio:.2f} training steps (target ≤ 2)")
    print("\nMisses: " + ("none" if not misses else ""))
    for m in misses:
        print(f"- {m}")


if __name__ == "__main__":
    main()

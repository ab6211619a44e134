"""Categorical KL on a GPU: correctness, time, memory and bandwidth, in one command.

For a maintainer with a CUDA device (under 5 minutes on a current datacenter GPU)::

    python benchmarks/cuda_check.py

It prints, on the GPU:

1. correctness of ``categorical_kl_rows`` (eager and fused) against float64 computed on
   the same device from the same rounded inputs: random logits, a near-identical
   bfloat16 pair (KL ≈ 1e-4), rows with −inf (support mismatch) and NaN logits;
2. time and peak extra memory of ``categorical_kl`` (eager, and ``fused=True``) against
   the ``log_softmax`` + ``F.kl_div`` pair, float32 and bfloat16, K ∈ {1,000, 32,768,
   152,064}, rows × K = 2²⁷, medians of CUDA-synchronised wall clock;
3. the achieved bandwidth, 2 × rows × K × bytes per logit (each input read once) per
   second, against the device's peak (from its memory clock and bus width, or
   ``--peak-gbs``) and against a measured device-to-device copy.

Targets: ≤ 0.5× the pair's time; ≥ 50% of peak bandwidth for the fused path at
K = 152,064; peak extra memory ≤ 0.1× the pair's; float32 max abs error < 1e-5.

``--device cpu --smoke`` runs the same code on tiny CPU inputs (the test suite does, so
the script keeps working where no GPU is available). Exit code 0 even when a target is
missed; misses are listed at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # kl_monitor from this checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from categorical import cuda_peak_extra, make_inputs, run_floor, run_pair  # noqa: E402

from kl_monitor import categorical_kl, categorical_kl_rows  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn, device: torch.device, repeats: int) -> float:
    out = fn()  # warm-up (and the compile, for the fused path)
    del out
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        del out
    return statistics.median(times)


def peak_bandwidth(device: torch.device, override: float | None) -> float | None:
    """Bytes/s: --peak-gbs, else 2 (DDR) × memory clock × bus width from the properties."""
    if override:
        return override * 1e9
    if device.type != "cuda":
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    return 2.0 * clock_khz * 1e3 * bus_bits / 8 if clock_khz and bus_bits else None


def copy_bandwidth(device: torch.device) -> float:
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)
    t = median_time(lambda: x.clone(), device, 5)
    return 2 * x.numel() / t  # read + write


def reference64(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    lp, lq = F.log_softmax(p.double(), -1), F.log_softmax(q.double(), -1)
    pp, pq = lp.exp(), lq.exp()
    fwd = torch.where(pp > 0, pp * (lp - lq), 0.0).sum(-1)
    rev = torch.where(pq > 0, pq * (lq - lp), 0.0).sum(-1)
    return torch.stack((fwd, rev, -(pp * lp.nan_to_num(neginf=0.0)).sum(-1),
                        -(pq * lq.nan_to_num(neginf=0.0)).sum(-1)))


def correctness(device: torch.device, fused_too: bool) -> list[str]:
    g = torch.Generator().manual_seed(1)
    x = 3.0 * torch.randn(64, 32768, generator=g)
    near = 2.5 * torch.randn(32, 50257, generator=g)
    odd = 2.0 * torch.randn(8, 4096, generator=g)
    odd_q = odd + torch.randn(8, 4096, generator=g)
    odd[1, :50] = float("-inf")   # the reference forbids tokens: reverse = +inf
    odd_q[2, 7] = float("-inf")   # the model forbids one: forward = +inf
    odd_q[3, 0] = float("nan")    # an invalid row
    cases = [("random, q = p + 1.5z", x, x + 1.5 * torch.randn(64, 32768, generator=g)),
             ("near-identical bf16, KL ≈ 1e-4", near.bfloat16(),
              (near + 0.014 * torch.randn(32, 50257, generator=g)).bfloat16()),
             ("−inf and NaN rows", odd, odd_q)]
    print("| case | dtype | path | max abs err fwd / rev / H(P) / H(Q) | max rel err fwd / rev |"
          " inf rows agree | NaN row invalid |")
    print("|---|---|---|---|---|---|---|")
    misses = []
    for name, p, q in cases:
        p, q = p.to(device), q.to(device)
        ref = reference64(p, q)
        for path in ["eager"] + (["fused"] if fused_too else []):
            fwd, rev, hp, hq, valid = categorical_kl_rows(p, q, fused=path == "fused")
            got = torch.stack((fwd, rev, hp, hq)).double()
            ok = valid & torch.isfinite(ref).all(0)
            inf_agree = torch.equal(torch.isinf(got[:2]) & valid, torch.isinf(ref[:2]) & valid)
            err = (got - ref)[:, ok].abs().amax(1)
            rel = ((got[:2] - ref[:2]).abs() / ref[:2].abs().clamp_min(1e-12))[:, ok].amax(1)
            print(f"| {name} | {str(p.dtype)[6:]} | {path} | "
                  + " / ".join(f"{e:.1e}" for e in err.tolist()) + " | "
                  + " / ".join(f"{e:.1e}" for e in rel.tolist())
                  + f" | {inf_agree} | {bool(not valid[3]) if name.startswith('−inf') else '–'} |")
            if not inf_agree or (p.dtype == torch.float32 and float(err.max()) >= 1e-5):
                misses.append(f"correctness, {name}, {path}: max abs err {float(err.max()):.1e}")
            if p.dtype == torch.bfloat16 and float(rel.max()) >= 0.01:
                misses.append(f"correctness, {name}, {path}: rel err {float(rel.max()):.1e}")
    return misses


def measure_case(device: torch.device, dtype: torch.dtype, k: int, elements: int,
                 repeats: int, fused_too: bool) -> tuple[int, int, dict, dict]:
    """Median times and peak extra memory of each method on one (dtype, K) input."""
    rows = -(-elements // k)
    p, q = make_inputs(rows, k, dtype, device, seed=0)
    fns = {"pair": lambda: run_pair(p, q), "floor": lambda: run_floor(p, q),
           "eager": lambda: categorical_kl(p, q).forward}
    if fused_too:
        fns["fused"] = lambda: categorical_kl(p, q, fused=True).forward
    t = {name: median_time(fn, device, repeats) for name, fn in fns.items()}
    mem = {name: cuda_peak_extra(fn, device) if device.type == "cuda" else float("nan")
           for name, fn in fns.items() if name != "floor"}
    return rows, 2 * p.numel() * p.element_size(), t, mem


def performance(device: torch.device, elements: int, classes: list[int], repeats: int,
                fused_too: bool, peak: float | None) -> list[str]:
    print("| dtype | K | rows | pair s | eager s | eager / pair | fused s | fused / pair | "
          "floor s | eager GB/s | fused GB/s | fused % of peak | eager mem / pair | "
          "fused mem / pair |")
    print("|" + "---|" * 14)
    misses, nan = [], float("nan")
    for dtype in (torch.float32, torch.bfloat16):
        for k in classes:
            rows, nbytes, t, mem = measure_case(device, dtype, k, elements, repeats, fused_too)
            bw = {name: nbytes / t[name] for name in t}
            tf = t.get("fused", nan)
            pct = 100 * bw.get("fused", nan) / peak if peak else nan
            m_eager, m_fused = mem["eager"] / mem["pair"], mem.get("fused", nan) / mem["pair"]
            print(f"| {str(dtype)[6:]} | {k:,} | {rows:,} | {t['pair']:.4f} | {t['eager']:.4f} | "
                  f"{t['eager'] / t['pair']:.3f} | {tf:.4f} | {tf / t['pair']:.3f} | "
                  f"{t['floor']:.4f} | {bw['eager'] / 1e9:.0f} | {bw.get('fused', nan) / 1e9:.0f}"
                  f" | {pct:.0f} | {m_eager:.4f} | {m_fused:.4f} |", flush=True)
            best = min(t["eager"], tf) if fused_too else t["eager"]
            if best / t["pair"] > 0.5:
                misses.append(f"{dtype} K={k}: time ratio {best / t['pair']:.3f} > 0.5")
            if fused_too and k == 152064 and peak and pct < 50:
                misses.append(f"{dtype} K={k}: fused bandwidth {pct:.0f}% of peak < 50%")
            if device.type == "cuda" and m_eager > 0.1:
                misses.append(f"{dtype} K={k}: memory ratio {m_eager:.4f} > 0.1")
    return misses


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--smoke", action="store_true", help="tiny inputs, eager only (CI)")
    ap.add_argument("--no-fused", action="store_true", help="skip the torch.compile path")
    ap.add_argument("--peak-gbs", type=float, default=None, help="device peak, GB/s")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("No CUDA device: nothing to check (use --device cpu --smoke for a dry run).")
        return 0
    fused_too = not (args.no_fused or args.smoke)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_bandwidth(device, args.peak_gbs)
    print(f"# categorical KL on {name}; torch {torch.__version__}; peak bandwidth "
          f"{'unknown' if peak is None else f'{peak / 1e9:,.0f} GB/s'}; measured copy "
          f"{copy_bandwidth(device) / 1e9:,.0f} GB/s (read + write)\n")
    print("Correctness against float64 on the same device and rounded inputs:\n")
    misses = correctness(device, fused_too)
    print("\nTime (median of CUDA-synchronised wall clock), bandwidth and peak extra memory:\n")
    classes = [1000, 4096] if args.smoke else [1000, 32768, 152064]
    misses += performance(device, 1 << (18 if args.smoke else 27), classes,
                          2 if args.smoke else 10, fused_too, peak)
    print(f"\nWall time {time.perf_counter() - t0:.1f} s.")
    if misses:
        print(f"\nTARGETS MISSED ({len(misses)}):\n" + "\n".join(f"- {m}" for m in misses))
    else:
        print("\nAll targets met.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

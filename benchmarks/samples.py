"""KL from samples alone (k-NN and binned): speed, memory, bias and spread.

1. Speed and memory: ``knn_kl`` on 4096 × 4096 samples in d = 64 (float32), against
   one ``torch.cdist`` of the same size measured in the same run. ``knn_kl`` runs four
   neighbour searches (reference→reference, reference→model, model→model,
   model→reference), so about 4× one cdist is the floor for a chunked exact k-NN.
   Peak extra memory: CPU high-water mark above the resident inputs (see
   ``categorical.py``), against the 64 MiB of one full distance matrix.
2. Bias and sd versus n and d: P = N(0, I), Q = N(μ, I) with |μ| = 1 (KL = 0.5 both
   ways), k-NN (k = 5) and binned (16 k-means cells fitted on another n reference
   samples), with the mean jackknife stderr / sd and the 95%-interval coverage of k-NN.
3. Fixtures in 2-D (the demo's ring, 8 modes, σ = 0.25): mode dropping (5 of 8 kept,
   reverse = ln(8/5), forward = ∞) and over-dispersion (σ × 1.5): how far below the
   truth binned KL sits (it is a lower bound by data processing).

Run from the repository root::

    python benchmarks/samples.py            # default (~3-6 min on 2 busy cores)
    python benchmarks/samples.py --fast     # smoke test (seconds)
    python benchmarks/samples.py --repeats 100 --sizes 1000 4000 16000
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # kl_monitor from this checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from categorical import HostMemory, cuda_peak_extra  # noqa: E402

from kl_monitor import binned_kl, fit_cells, knn_kl  # noqa: E402

MIB = 2**20


def median_time(fn, repeats: int, sync=lambda: None) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(n: int, d: int, repeats: int, device: torch.device) -> list[list[str]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g).to(device)
    y = (torch.randn(n, d, generator=g) + 0.1).to(device)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    # warm-up at full size: the first call in a process also pays one-off allocator and
    # BLAS buffers (measured: 79 MiB then 27 MiB on the second call)
    knn_kl(x, y)
    torch.cdist(x, y)
    # memory first: after the timing loops, freed blocks of the intra-op threads'
    # allocator arenas can be counted as new peaks
    if cuda:
        m_cdist = cuda_peak_extra(lambda: torch.cdist(x, y), device)
        m_knn = cuda_peak_extra(lambda: knn_kl(x, y), device)
    else:
        # median of 3: the allocator's retained pages make single readings noisy
        host = HostMemory()
        m_cdist = statistics.median(host.measure(lambda: torch.cdist(x, y)) for _ in range(3))
        m_knn = statistics.median(host.measure(lambda: knn_kl(x, y)) for _ in range(3))
    t_cdist = median_time(lambda: torch.cdist(x, y), repeats, sync)
    t_knn = median_time(lambda: knn_kl(x, y), repeats, sync)
    return [
        [str(device), "torch.cdist (one n × m matrix)", f"{t_cdist:.3f}", "1.00",
         f"{m_cdist / MIB:.1f}"],
        [str(device), "knn_kl (4 chunked searches, both directions, jackknife)",
         f"{t_knn:.3f}", f"{t_knn / t_cdist:.2f}", f"{m_knn / MIB:.1f}"],
    ]


def bias_rows(sizes: list[int], dims: list[int], repeats: int) -> list[list[str]]:
    rows = []
    for d in dims:
        mu = torch.zeros(d)
        mu[0] = 1.0
        truth = 0.5
        for n in sizes:
            g = torch.Generator().manual_seed(1000 * d + n)
            kf, kr, kse, kcov, bf, br = [], [], [], [], [], []
            for _ in range(repeats):
                x = torch.randn(n, d, generator=g)
                y = mu + torch.randn(n, d, generator=g)
                out = knn_kl(x, y)
                kf.append(out.forward)
                kr.append(out.reverse)
                kse.append((out.forward_stderr, out.reverse_stderr))
                kcov.append((abs(out.forward - truth) < 1.96 * out.forward_stderr)
                            + (abs(out.reverse - truth) < 1.96 * out.reverse_stderr))
                cells = fit_cells(torch.randn(n, d, generator=g), 16)
                b = binned_kl(x, y, cells)
                bf.append(b.forward)
                br.append(b.reverse)
            sd_f, sd_r = _sd(kf), _sd(kr)
            se_ratio = statistics.fmean(s for s, _ in kse) / sd_f if sd_f > 0 else math.nan
            rows.append([
                str(d), str(n),
                f"{statistics.fmean(kf) - truth:+.3f}", f"{sd_f:.3f}",
                f"{statistics.fmean(kr) - truth:+.3f}", f"{sd_r:.3f}",
                f"{se_ratio:.2f}", f"{sum(kcov) / (2 * repeats):.2f}",
                f"{statistics.fmean(bf) - truth:+.3f}", f"{_sd(bf):.3f}",
                f"{statistics.fmean(br) - truth:+.3f}", f"{_sd(br):.3f}",
            ])
    return rows


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else math.nan


def ring(n: int, modes: list[int], sigma: float, g: torch.Generator) -> torch.Tensor:
    ang = torch.arange(8) * 2 * math.pi / 8
    means = 4 * torch.stack((ang.cos(), ang.sin()), 1)
    lab = torch.tensor(modes)[torch.randint(len(modes), (n,), generator=g)]
    return means[lab] + sigma * torch.randn(n, 2, generator=g)


def fixture_rows(n: int, repeats: int) -> list[list[str]]:
    f = 1.5
    cases = [
        ("mode drop: 5 of 8 kept", [0, 1, 2, 4, 6], 0.25, math.inf, math.log(8 / 5)),
        ("over-dispersion: σ × 1.5", list(range(8)), 0.25 * f,
         1 / f**2 - 1 + 2 * math.log(f), f**2 - 1 - 2 * math.log(f)),
    ]
    rows = []
    for name, modes, sigma, t_f, t_r in cases:
        g = torch.Generator().manual_seed(7)
        est = {key: [] for key in ("kf", "kr", "bf", "br")}
        for _ in range(repeats):
            x = ring(n, list(range(8)), 0.25, g)
            y = ring(n, modes, sigma, g)
            k = knn_kl(x, y)
            b = binned_kl(x, y, fit_cells(ring(n, list(range(8)), 0.25, g), 16))
            for key, v in (("kf", k.forward), ("kr", k.reverse), ("bf", b.forward),
                           ("br", b.reverse)):
                est[key].append(v)
        mean = {key: statistics.fmean(v) for key, v in est.items()}
        rows.append([
            name, "∞" if t_f == math.inf else f"{t_f:.3f}", f"{mean['kf']:.3f}",
            f"{mean['bf']:.3f}", f"{t_r:.3f}", f"{mean['kr']:.3f}", f"{mean['br']:.3f}",
            f"{mean['br'] - t_r:+.3f}",
        ])
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fast", action="store_true", help="smoke test: small and few")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000])
    parser.add_argument("--dims", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_speed, d_speed, t_rep = 4096, 64, 5
    if args.fast:
        print("FAST MODE: small inputs, few repeats; the figures mean little.\n")
        n_speed, t_rep = 1024, 2
        args.repeats, args.sizes, args.dims = 4, [300], [1, 8, 64]
    started = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print(f"## k-NN KL speed and memory: {n_speed} × {n_speed} samples, d = {d_speed}, "
          f"float32, median of {t_rep}\n")
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    rows = [r for dev in devices for r in speed(n_speed, d_speed, t_rep, dev)]
    print(table(["device", "what", "seconds", "× cdist", "peak extra MiB"], rows))
    full = n_speed * n_speed * 4 / MIB
    print(f"\nOne full {n_speed} × {n_speed} float32 distance matrix: {full:.0f} MiB.\n")
    print(f"## Bias and sd vs n and d: N(0, I) vs N(μ, I), |μ| = 1, KL = 0.5 both ways, "
          f"{args.repeats} repeats; k-NN k = 5, binned 16 cells\n")
    header = ["d", "n = m", "k-NN fwd bias", "sd", "k-NN rev bias", "sd", "se/sd",
              "k-NN 95% cover", "binned fwd bias", "sd", "binned rev bias", "sd"]
    print(table(header, bias_rows(args.sizes, args.dims, args.repeats)))
    n_fix = 300 if args.fast else 4000
    print(f"\n## 2-D ring fixtures: n = m = {n_fix}, {args.repeats} repeats (means)\n")
    header = ["case", "true fwd", "k-NN fwd", "binned fwd", "true rev", "k-NN rev",
              "binned rev", "binned rev − truth"]
    print(table(header, fixture_rows(n_fix, args.repeats)))
    print(f"\nWall time {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

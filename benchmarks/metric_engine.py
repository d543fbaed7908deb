"""Metric engine vs a straightforward two-pass p x p pipeline: time and peak memory.

Run: python benchmarks/metric_engine.py [--quick]

Each case runs in a fresh subprocess so its peak resident memory (ru_maxrss) is its own.
The engine does both rounds and finalizes every metric; the p x p pipeline computes the
same metrics the textbook way (class means, full within-class covariance, pseudo-inverse
of the between-class covariance, explicit distances for NCC). All float64, N = 100,000.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import numpy as np


def make_data(N: int, P: int, K: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, N)
    y[:K] = np.arange(K)  # every class present
    means = rng.normal(size=(K, P)).astype(np.float32)
    h = means[y] + rng.normal(size=(N, P)).astype(np.float32)
    W = rng.normal(size=(K, P))
    b = rng.normal(size=K)
    return h, y, W, b


def run_engine(h, y, W, b, K):
    from ncserve.metrics import finalize, round1_stats, round2_stats

    t0 = time.perf_counter()
    r1 = round1_stats(h, y, K)
    t1 = time.perf_counter()
    r2 = round2_stats(h, y, r1.class_means(), W, b)
    t2 = time.perf_counter()
    metrics = finalize(r1, r2, W, b)
    t3 = time.perf_counter()
    return {
        "accumulate_s": t2 - t0,
        "round1_s": t1 - t0,
        "round2_s": t2 - t1,
        "finalize_s": t3 - t2,
        "total_s": t3 - t0,
        "nc1": metrics["nc1"],
    }


def run_pxp(h, y, W, b, K):
    t0 = time.perf_counter()
    h64 = h.astype(np.float64)
    counts = np.bincount(y, minlength=K)
    mu = np.zeros((K, h.shape[1]))
    np.add.at(mu, y, h64)
    mu /= counts[:, None]
    mu_G = h64.mean(axis=0)
    R = h64 - mu[y]
    sigma_w = R.T @ R / h.shape[0]
    mbar = mu - mu_G
    sigma_b = mbar.T @ mbar / K
    nc1 = float(np.trace(sigma_w @ np.linalg.pinv(sigma_b, hermitian=True))) / K
    # NCC agreement with explicit distances, and the classifier's predictions.
    dist = (h64**2).sum(1)[:, None] - 2 * h64 @ mu.T + (mu**2).sum(1)[None, :]
    agree = np.mean((h64 @ W.T + b).argmax(1) == dist.argmin(1))
    t1 = time.perf_counter()
    return {"total_s": t1 - t0, "nc1": nc1, "nc4": float(agree)}


# The floor's product is taken in row blocks of at most this many output elements (256 MB
# of float64): at K = 20,000 the whole N x K product would be 16 GB on a 24 GiB machine.
FLOOR_BLOCK_ELEMENTS = 1 << 25


def run_matmul_floor(h, K):
    M = np.random.default_rng(1).normal(size=(h.shape[1], K))
    h64 = h.astype(np.float64)
    rows = max(1, FLOOR_BLOCK_ELEMENTS // K)
    out = np.empty((min(rows, h64.shape[0]), K))
    t0 = time.perf_counter()
    for start in range(0, h64.shape[0], rows):
        block = h64[start : start + rows]
        np.matmul(block, M, out=out[: block.shape[0]])
    return {"total_s": time.perf_counter() - t0}


def child(case: dict) -> None:
    h, y, W, b = make_data(case["N"], case["P"], case["K"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kind = case["kind"]
    run = {
        "engine": lambda: run_engine(h, y, W, b, case["K"]),
        "pxp": lambda: run_pxp(h, y, W, b, case["K"]),
        "floor": lambda: run_matmul_floor(h, case["K"]),
    }[kind]
    # Best of `repeats`: the first pass also pays page faults and BLAS thread start-up.
    runs = [run() for _ in range(case["repeats"])]
    out = min(runs, key=lambda r: r["total_s"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_mb"] = peak / 1024
    out["data_mb"] = base / 1024
    print(json.dumps(out))


def measure(kind: str, N: int, P: int, K: int, repeats: int) -> dict:
    case = json.dumps({"kind": kind, "N": N, "P": P, "K": K, "repeats": repeats})
    proc = subprocess.run(
        [sys.executable, __file__, "--child", case], capture_output=True, text=True, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="N = 20,000 instead of 100,000")
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    N = 20_000 if args.quick else 100_000
    print(f"N = {N:,}, float64 math, float32 features; times in seconds (best of 2 runs, 1 for")
    print("K = 20,000), memory in MB (peak RSS of the process, including the data)")
    header = (
        f"{'case':<22}{'engine s':>10}{'p x p s':>10}{'speedup':>9}{'eng/matmul':>12}"
        f"{'eng MB':>9}{'pxp MB':>9}{'nc1 rel diff':>14}"
    )
    print(header)
    for P, K in ((2048, 10), (2048, 100), (1024, 1000), (512, 20000)):
        repeats = 1 if K > 1000 else 2
        eng = measure("engine", N, P, K, repeats)
        floor = measure("floor", N, P, K, 3)
        pxp = measure("pxp", N, P, K, repeats) if K <= 1000 else None
        ratio = eng["accumulate_s"] / floor["total_s"]
        name = f"p={P} K={K}"
        if pxp:
            rel = abs(eng["nc1"] - pxp["nc1"]) / abs(pxp["nc1"])
            print(
                f"{name:<22}{eng['total_s']:>10.2f}{pxp['total_s']:>10.2f}"
                f"{pxp['total_s'] / eng['total_s']:>8.1f}x{ratio:>12.2f}"
                f"{eng['peak_mb']:>9.0f}{pxp['peak_mb']:>9.0f}{rel:>14.1e}"
            )
        else:
            print(
                f"{name:<22}{eng['total_s']:>10.2f}{'-':>10}{'-':>9}{ratio:>12.2f}"
                f"{eng['peak_mb']:>9.0f}{'-':>9}{'-':>14}"
            )
        sys.stdout.flush()
    print("eng/matmul: engine accumulate time (both rounds) / one N x p by p x K float64 product")


if __name__ == "__main__":
    main()

"""The torch engine (ncserve.metrics.torch_stats) beside the numpy engine, both rounds, on
the same features (not a timed test; numbers go in docs/metrics.md and docs/benchmarks.md).

    python benchmarks/torch_engine.py [--device cpu|cuda] [--repeats 2]

For each shape it prints the best of ``--repeats`` runs of each engine (round 1, the class
means, round 2) and their ratio. On the CPU the numpy engine is the one the Tracker uses;
with ``--device cuda`` the torch engine runs on the GPU where the features are.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ncserve.metrics import round1_stats, round2_stats

SHAPES = ((4_500, 512, 10), (20_000, 2_048, 100), (20_000, 1_024, 1_000))


def both_rounds(h, y, K, w, b) -> float:
    started = time.perf_counter()
    r1 = round1_stats(h, y, K)
    round2_stats(h, y, r1.class_means(), w, b)
    if isinstance(h, torch.Tensor) and h.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    print(f"numpy engine (host CPU) vs torch engine ({args.device}), best of {args.repeats}")
    for N, P, K in SHAPES:
        rng = np.random.default_rng(0)
        y = np.arange(N) % K
        h = (rng.normal(size=(N, P)) + y[:, None] % 7).astype(np.float32)
        w, b = rng.normal(size=(K, P)), rng.normal(size=K)
        h_t, y_t = torch.from_numpy(h).to(args.device), torch.from_numpy(y).to(args.device)
        numpy_s = min(both_rounds(h, y, K, w, b) for _ in range(args.repeats))
        torch_s = min(both_rounds(h_t, y_t, K, w, b) for _ in range(args.repeats))
        print(
            f"  N={N:>6} P={P:>5} K={K:>5}: numpy {numpy_s:8.3f} s   torch {torch_s:8.3f} s   "
            f"torch / numpy {torch_s / numpy_s:6.2f}"
        )


if __name__ == "__main__":
    main()

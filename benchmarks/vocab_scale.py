"""The metric engine at a language model's vocabulary: K = 50,257 classes, P = 768 (GPT-2's
head shape), token-level features with Zipf-like class frequencies.

Run: python benchmarks/vocab_scale.py [--tokens 200000] [--engine numpy|torch|both] [--service]
     python benchmarks/vocab_scale.py --quick     # K = 8,192 and 20,000 tokens: a smoke run

Both rounds and the finalizer run in float64 as the service and the ranks run them
(round1_stats -> class means -> round2_stats -> prepare_finalize -> complete_finalize). For
each stage it prints the wall time, the peak of numpy's allocations during the stage
(tracemalloc) and the peak resident memory of the process (sampled every 10 ms, and
ru_maxrss at the end). Then the bytes each push carries on the wire (round 1 with and without
the classifier's weight, round 2, the class-means answer) beside the service's default limit
on one push. With --service it also starts ``ncserve serve`` with its default settings as a
subprocess and sends the measurement through it, timing the pushes and the service's
finalize and reporting the service's peak memory.

The labels: every class once (a measurement split must hold every class: the engine refuses
class means with an empty class, which the script checks on a plain Zipf sample first), and
the rest drawn from a Zipf-Mandelbrot law over the vocabulary, so most classes are seen once
and a few thousand times. Features are float32, class mean plus unit noise; the weight has
GPT-2's initial scale and, like GPT-2's head, no bias.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncserve import wire
from ncserve.metrics import (
    METRIC_KEYS,
    MetricInputError,
    Round1Stats,
    Round2Stats,
    complete_finalize,
    prepare_finalize,
    round1_stats,
    round2_stats,
)
from ncserve.service.server import ServerConfig

GPT2_VOCAB = 50_257
GPT2_WIDTH = 768
FULL_TOKENS = 200_000
QUICK_CLASSES = 8_192
QUICK_TOKENS = 20_000
# Zipf-Mandelbrot frequencies 1 / (rank + shift)^exponent: close to token counts of
# English text under a BPE vocabulary.
ZIPF_EXPONENT = 1.0
ZIPF_SHIFT = 2.7
# GPT-2 initializes its weights with this standard deviation.
GPT2_INIT_STD = 0.02
RUN_ID = "vocab-scale"
MIB = 1 << 20


# -- memory ---------------------------------------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def max_rss_bytes() -> int:
    """ru_maxrss: the peak resident memory of this process so far (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def process_peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


class RssSampler:
    """Samples this process's resident memory every ``interval_s`` in a thread; ``peak()``
    is the largest value since the last ``reset()``."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self._interval_s = interval_s
        self._peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._peak = max(self._peak, rss_bytes())

    def reset(self) -> None:
        self._peak = rss_bytes()

    def peak(self) -> int:
        return max(self._peak, rss_bytes())

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Stage:
    name: str
    seconds: float = 0.0
    start_rss: int = 0
    peak_rss: int = 0
    traced_peak: int = 0


@contextlib.contextmanager
def measured(stages: list[Stage], name: str, sampler: RssSampler) -> Iterator[None]:
    """Time one stage and record its memory peaks (numpy's allocations and the process's)."""
    stage = Stage(name, start_rss=rss_bytes())
    sampler.reset()
    tracemalloc.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        stage.seconds = time.perf_counter() - start
        stage.traced_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        stage.peak_rss = sampler.peak()
        stages.append(stage)
        print(
            f"  {name:<18} {stage.seconds:8.2f} s   allocated at peak {stage.traced_peak / MIB:8.1f}"
            f" MiB   RSS {stage.start_rss / MIB:7.0f} -> peak {stage.peak_rss / MIB:7.0f} MiB",
            flush=True,
        )


# -- data -----------------------------------------------------------------------------------


def zipf_labels(rng: np.random.Generator, num_classes: int, n: int) -> np.ndarray:
    """``n`` token ids with Zipf-Mandelbrot frequencies, the frequency ranks shuffled over the
    ids (as a BPE vocabulary's ids are only loosely ordered by frequency)."""
    weights = 1.0 / (np.arange(num_classes) + ZIPF_SHIFT) ** ZIPF_EXPONENT
    ranks = rng.choice(num_classes, size=n, p=weights / weights.sum())
    return rng.permutation(num_classes)[ranks]


def class_profile(y_N: np.ndarray, num_classes: int) -> str:
    counts = np.bincount(y_N, minlength=num_classes)
    return (
        f"{int((counts == 0).sum())} classes absent, {int((counts == 1).sum())} seen once, "
        f"median {int(np.median(counts))}, most frequent {int(counts.max())} "
        f"({counts.max() / y_N.size:.1%} of tokens)"
    )


def make_features(
    num_classes: int, dim: int, tokens: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h float32 N x P, y int64 N, W float64 K x P): every class once, the rest Zipf."""
    rng = np.random.default_rng(seed)
    y = np.concatenate(
        [np.arange(num_classes), zipf_labels(rng, num_classes, tokens - num_classes)]
    )
    rng.shuffle(y)
    means = rng.standard_normal((num_classes, dim), dtype=np.float32)
    h = np.empty((tokens, dim), dtype=np.float32)
    block = 1 << 14
    for start in range(0, tokens, block):
        sl = slice(start, min(tokens, start + block))
        np.take(means, y[sl], axis=0, out=h[sl])
        h[sl] += rng.standard_normal((sl.stop - sl.start, dim), dtype=np.float32)
    weight = rng.normal(0.0, GPT2_INIT_STD, (num_classes, dim))
    return h, y, weight


def check_absent_classes_are_refused(num_classes: int, dim: int, tokens: int, seed: int) -> None:
    """A plain Zipf sample leaves classes empty; the engine must refuse its class means."""
    rng = np.random.default_rng(seed + 1)
    y = zipf_labels(rng, num_classes, tokens)
    print(f"plain Zipf sample of {tokens:,} tokens: {class_profile(y, num_classes)}")
    r1 = round1_stats(np.ones((tokens, 1), dtype=np.float32), y, num_classes)
    try:
        r1.class_means()
    except MetricInputError as error:
        print(f"  refused as documented: {str(error)[:150]}")
    else:
        if (np.bincount(y, minlength=num_classes) == 0).any():
            raise SystemExit("the engine accepted class means with an empty class")
        print("  (every class happened to be present)")


# -- the engine -----------------------------------------------------------------------------


@dataclass
class EngineResult:
    stages: list[Stage]
    r1: Round1Stats
    r2: Round2Stats
    metrics: dict[str, float]


def run_engine(h: Any, y: Any, weight: np.ndarray, num_classes: int) -> EngineResult:
    """Both rounds and the finalizer, one stage at a time (numpy arrays or torch tensors)."""
    stages: list[Stage] = []
    sampler = RssSampler()
    try:
        with measured(stages, "round 1", sampler):
            r1 = round1_stats(h, y, num_classes)
        with measured(stages, "class means", sampler):
            means = r1.class_means()
        with measured(stages, "round 2", sampler):
            r2 = round2_stats(h, y, means, weight)
        with measured(stages, "prepare_finalize", sampler):
            prepared = prepare_finalize(r1, weight)
        with measured(stages, "complete_finalize", sampler):
            metrics = complete_finalize(prepared, r2)
    finally:
        sampler.close()
    return EngineResult(stages, r1, r2, metrics)


# -- the service ----------------------------------------------------------------------------


def wire_sizes(r1: Round1Stats, r2: Round2Stats, weight: np.ndarray) -> dict[str, int]:
    means = r1.class_means()
    return {
        "round 1, rank 0 (counts, sums, weight)": wire.payload_nbytes(
            {**r1.to_arrays(), "weight": weight}
        ),
        "round 1, other ranks (counts, sums)": wire.payload_nbytes(r1.to_arrays()),
        "round 2 (P x P scatter, K sums)": wire.payload_nbytes(r2.to_arrays()),
        "round 2 with a held-out split": 2 * wire.payload_nbytes(r2.to_arrays()),
        "class means answer (to every rank)": wire.payload_nbytes(means.to_arrays()),
    }


def default_max_shard_bytes() -> int:
    return int(ServerConfig.model_fields["max_shard_bytes"].default)


@contextlib.contextmanager
def serve(workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``ncserve serve`` with its default settings on a loopback port the OS picks."""
    port_file = workdir / "port"
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "ncserve", "serve", "--listen", "127.0.0.1:0"),
            *("--db", str(workdir / "ncserve.db"), "--port-file", str(port_file)),
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "serve.log", "wb"),  # noqa: SIM115 (the child owns it)
    )
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    f"ncserve serve did not start:\n{(workdir / 'serve.log').read_text()}"
                )
            time.sleep(0.05)
        yield process, f"127.0.0.1:{int(port_file.read_text())}"
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def timed(label: str, call: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    result = call()
    print(f"  {label:<44} {time.perf_counter() - start:8.2f} s", flush=True)
    return result


def run_through_service(result: EngineResult, weight: np.ndarray, deadline_s: float | None) -> None:
    """One rank's measurement through a default-configured service; its metrics must equal
    the engine's."""
    from ncserve.client import NCClient

    K, P = result.r1.num_classes, result.r1.feature_dim
    kwargs: dict[str, Any] = {} if deadline_s is None else {"deadline_s": deadline_s}
    with (
        tempfile.TemporaryDirectory(prefix="vocab-scale-") as tmp,
        serve(Path(tmp)) as (proc, target),
        NCClient(target, spill_dir=Path(tmp) / "spool", **kwargs) as client,
    ):
        print(f"service at {target} (default settings), client deadline {client.deadline_s:g} s")
        timed("register", lambda: client.register_run(RUN_ID, K, P, 1))
        timed(
            "push round 1 (with W)",
            lambda: deliver(client, client.push_round1(RUN_ID, 0, 0, result.r1, weight)),
        )
        means = timed(
            "fetch class means", lambda: client.fetch_class_means(RUN_ID, 0, timeout_s=600.0)
        )
        if means is None:
            raise SystemExit("the service did not hand back the class means")
        expected = result.r1.class_means()
        if not np.array_equal(means.means_KP, expected.means_KP):
            raise SystemExit("the service's class means differ from the engine's")
        timed("push round 2", lambda: deliver(client, client.push_round2(RUN_ID, 0, 0, result.r2)))
        start = time.perf_counter()
        row = None
        while row is None and time.perf_counter() - start < 1800:
            rows = client.get_metrics(RUN_ID, all_steps=True)
            assert isinstance(rows, list)
            row = next((r for r in rows if r.get("status") == "complete"), None)
            if row is None:
                time.sleep(1.0)
        print(
            f"  {'measurement stored (finalize in the service)':<44} "
            f"{time.perf_counter() - start:8.2f} s"
        )
        if row is None:
            raise SystemExit("the service did not finalize the measurement in 30 minutes")
        worst = max(relative_difference(row[k], result.metrics[k]) for k in METRIC_KEYS)
        print(f"  service metrics vs the engine's: largest relative difference {worst:.1e}")
        print(f"  service peak RSS (VmHWM): {process_peak_rss(proc.pid) / MIB:.0f} MiB")


def deliver(client: Any, sent: bool) -> None:
    """Whether a push reached the service: at once (``sent``) or from the client's buffer
    within 10 minutes; anything else ends the run with the client's report."""
    if sent:
        return
    report = client.flush(timeout_s=600.0)
    if not report.complete:
        raise SystemExit(
            f"a push was not delivered: {report}; a longer --deadline may let it through"
        )
    print("    (delivered from the client's buffer, after the first try missed its deadline)")


def relative_difference(a: float, b: float) -> float:
    if math.isnan(a) and math.isnan(b):
        return 0.0
    return abs(a - b) / max(abs(a), abs(b), 1e-300)


# -- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--tokens",
        type=int,
        help=f"measurement tokens N (feature rows); default {FULL_TOKENS:,} "
        f"({QUICK_TOKENS:,} with --quick)",
    )
    parser.add_argument(
        "--classes",
        type=int,
        help=f"K, the vocabulary size; default GPT-2's {GPT2_VOCAB:,} "
        f"({QUICK_CLASSES:,} with --quick)",
    )
    parser.add_argument(
        "--dim",
        type=int,
        default=GPT2_WIDTH,
        help=f"P, the head's input width; default {GPT2_WIDTH}",
    )
    parser.add_argument(
        "--engine",
        choices=("numpy", "torch", "both"),
        default="numpy",
        help="numpy arrays, torch CPU tensors (the torch engine), or both side by side",
    )
    parser.add_argument(
        "--service",
        action="store_true",
        help="also send the measurement through `ncserve serve` with its default settings",
    )
    parser.add_argument(
        "--deadline",
        type=float,
        default=None,
        help="the client's deadline per call with --service, seconds (default: the client's own)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"K = {QUICK_CLASSES:,}, N = {QUICK_TOKENS:,} unless given: a smoke run of every stage",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed of the data (default 0)")
    args = parser.parse_args()
    K = args.classes or (QUICK_CLASSES if args.quick else GPT2_VOCAB)
    N = args.tokens or (QUICK_TOKENS if args.quick else FULL_TOKENS)
    P = args.dim
    if K < 2 or P < 1:
        parser.error("--classes must be at least 2 and --dim at least 1")
    if N <= K:
        parser.error(f"--tokens ({N}) must exceed --classes ({K}): the split holds every class")
    if args.deadline is not None and not args.deadline > 0:
        parser.error("--deadline must be positive")

    print(
        f"K = {K:,}, P = {P}, N = {N:,}; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB, "
        f"numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}"
    )
    check_absent_classes_are_refused(K, P, N, args.seed)
    start = time.perf_counter()
    h, y, weight = make_features(K, P, N, args.seed)
    print(
        f"measurement split: {class_profile(y, K)}; features {h.nbytes / MIB:.0f} MiB float32, "
        f"W {weight.nbytes / MIB:.0f} MiB float64 ({time.perf_counter() - start:.1f} s)"
    )
    print(f"K x K float64 would be {8 * K * K / 2**30:.1f} GiB; nothing below may come near it")

    results: dict[str, EngineResult] = {}
    for engine in ("numpy", "torch") if args.engine == "both" else (args.engine,):
        print(f"{engine} engine (stage, time, numpy allocations at peak, process RSS):")
        if engine == "torch":
            import torch

            results[engine] = run_engine(torch.from_numpy(h), torch.from_numpy(y), weight, K)
        else:
            results[engine] = run_engine(h, y, weight, K)
        total = sum(stage.seconds for stage in results[engine].stages)
        print(f"  total {total:.1f} s")
    if len(results) == 2:
        worst = max(
            relative_difference(results["numpy"].metrics[k], results["torch"].metrics[k])
            for k in METRIC_KEYS
        )
        print(f"torch vs numpy metrics: largest relative difference {worst:.1e}")
    result = next(iter(results.values()))
    print("metrics: " + ", ".join(f"{k} {result.metrics[k]:.4g}" for k in METRIC_KEYS))

    limit = default_max_shard_bytes()
    print(f"pushes on the wire (the service's default max_shard_bytes is {limit / MIB:,.0f} MiB):")
    for label, size in wire_sizes(result.r1, result.r2, weight).items():
        print(f"  {label:<40} {size / MIB:9.1f} MiB  {'fits' if size <= limit else 'TOO LARGE'}")
    if args.service:
        run_through_service(result, weight, args.deadline)
    print(f"peak RSS of this process (ru_maxrss): {max_rss_bytes() / MIB:.0f} MiB")


if __name__ == "__main__":
    main()

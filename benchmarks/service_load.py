"""Load benchmark: many simulated ranks against one ``ncserve serve`` (figures in
docs/reliability.md; not a timed test).

    python benchmarks/service_load.py [--ranks 256] [--compare-ranks 64] [--steps 10]
        [--classes 100] [--dim 512] [--processes 4] [--time-limit 600] [--json OUT]

Three scenarios, each against a fresh ``ncserve serve`` subprocess on loopback (SQLite in a
temporary directory): ``--compare-ranks`` ranks in plaintext, ``--ranks`` ranks in
plaintext, and ``--ranks`` ranks over TLS with a bearer token. The ranks are threads spread
over ``--processes`` client processes (one channel each); every rank plays each step as the
tracker does: push round 1 (counts, class sums; rank 0 also W and b), fetch the global class
means (the service's barrier), push round 2. Statistics are synthetic but valid, built once
per rank, and the same every step.

Printed per scenario: errors (must be 0), whether every step was finalized with the metrics
of the same statistics merged in this process (relative 1e-9), p50 / p99 latency of a push
(both rounds) and of the wait for the class means, p50 / p99 step time (first push to last
round-2 reply), throughput (shards and MB per second), and the server's peak resident
memory (VmHWM), which should not grow with the number of ranks: the service keeps one merge
per open step and admits at most --max-inflight-bytes of decoded shards at once.

Bounded: every call has a deadline, client processes are joined with a time limit and then
killed, and the server is stopped in all cases. Exit status 1 if any scenario had an error.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import queue
import secrets
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ncserve import wire  # noqa: E402
from ncserve.metrics import Round1Stats, Round2Stats, finalize  # noqa: E402
from ncserve.v1 import ncserve_pb2 as pb  # noqa: E402
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc  # noqa: E402
from tests.reliability_support import Sidecar  # noqa: E402
from tests.service_support import encoded_push, header, make_pki  # noqa: E402

RUN_ID = "load"
CALL_TIMEOUT_S = 120.0


# -- synthetic statistics -----------------------------------------------------------------------


def rank_stats(seed: int, rank: int, K: int, P: int) -> tuple[Round1Stats, Round2Stats]:
    """Valid round-1 and round-2 statistics of one rank (round 2's scatter is PSD)."""
    rng = np.random.default_rng([seed, rank])
    counts = rng.integers(1, 4, size=K)
    r1 = Round1Stats(counts, rng.normal(size=(K, P)) * counts[:, None])
    n = int(counts.sum())
    d = Round2Stats.scatter_dim(K, P)
    q = rng.normal(size=(2 * d, d))
    return r1, Round2Stats(n, q.T @ q, rng.random(K) * counts, n // 2, n // 3)


def classifier(seed: int, K: int, P: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, 1 << 30])
    return rng.normal(size=(K, P)), rng.normal(size=K)


def expected_metrics(seed: int, ranks: int, K: int, P: int) -> dict[str, float]:
    """What the service must finalize: the same statistics merged here, in rank order."""
    r1, r2 = Round1Stats.zeros(K, P), Round2Stats.zeros(K, P)
    for rank in range(ranks):
        a, b = rank_stats(seed, rank, K, P)
        r1, r2 = r1.merge(a), r2.merge(b)
    weight, bias = classifier(seed, K, P)
    return finalize(r1, r2, weight, bias)


# -- one client process ---------------------------------------------------------------------------


@dataclass
class Timing:
    step: int
    rank: int
    push1_s: float
    means_wait_s: float
    push2_s: float
    started: float
    ended: float


@dataclass
class ClientResult:
    timings: list[Timing] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    bytes_sent: int = 0


def client_process(
    target: str,
    ranks: list[int],
    steps: int,
    K: int,
    P: int,
    seed: int,
    ca_cert: bytes | None,
    token: str | None,
    ready: Any,
    go: Any,
    out: Any,
) -> None:
    """Play ``ranks`` (one thread each) for every step; put a ClientResult on ``out``."""
    payloads = {}
    for rank in ranks:
        r1, r2 = rank_stats(seed, rank, K, P)
        arrays = r1.to_arrays()
        if rank == 0:
            weight, bias = classifier(seed, K, P)
            arrays = {**arrays, "weight": weight, "bias": bias}
        payloads[rank] = (
            (list(wire.encode_arrays(arrays)), wire.payload_nbytes(arrays)),
            (list(wire.encode_arrays(r2.to_arrays())), wire.payload_nbytes(r2.to_arrays())),
        )
    options = [("grpc.max_receive_message_length", 64 << 20)]
    if ca_cert is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_cert)
        channel = grpc.secure_channel(target, credentials, options=options)
    stub = pb_grpc.NCServiceStub(channel)
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    result = ClientResult()
    lock = threading.Lock()

    def play(rank: int) -> None:
        (round1, size1), (round2, size2) = payloads[rank]
        sent = size1 + size2
        for step in range(steps):
            try:
                started = time.perf_counter()
                stub.PushRound1(
                    encoded_push(header(RUN_ID, step, rank, pb.ROUND_1, K, P), round1, size1),
                    timeout=CALL_TIMEOUT_S,
                    metadata=metadata,
                )
                pushed = time.perf_counter()
                request = pb.ClassMeansRequest(run_id=RUN_ID, step=step, rank=rank)
                for _ in stub.FetchClassMeans(request, timeout=CALL_TIMEOUT_S, metadata=metadata):
                    pass
                fetched = time.perf_counter()
                stub.PushRound2(
                    encoded_push(header(RUN_ID, step, rank, pb.ROUND_2, K, P), round2, size2),
                    timeout=CALL_TIMEOUT_S,
                    metadata=metadata,
                )
                ended = time.perf_counter()
            except grpc.RpcError as error:
                with lock:
                    result.errors.append(
                        f"rank {rank} step {step}: {error.code().name}: {error.details()}"
                    )
                return
            with lock:
                result.bytes_sent += sent
                result.timings.append(
                    Timing(step, rank, pushed - started, fetched - pushed, ended - fetched,
                           started, ended)
                )  # fmt: skip

    ready.put(len(ranks))
    go.wait()
    threads = [threading.Thread(target=play, args=(rank,)) for rank in ranks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    channel.close()
    out.put(result)


# -- one scenario ---------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    ranks: int
    steps: int
    tls_token: bool
    max_inflight_mb: int | None  # None: the server's default --max-inflight-bytes
    errors: list[str] = field(default_factory=list)
    steps_complete: int = 0
    metrics_match: bool = False
    wall_s: float = 0.0
    push_p50_ms: float = 0.0
    push_p99_ms: float = 0.0
    means_wait_p50_ms: float = 0.0
    means_wait_p99_ms: float = 0.0
    step_p50_s: float = 0.0
    step_p99_s: float = 0.0
    shards_per_s: float = 0.0
    mb_per_s: float = 0.0
    server_peak_rss_mb: float = 0.0


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _close(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def run_scenario(
    name: str, ranks: int, steps: int, K: int, P: int, processes: int, tls_token: bool,
    max_inflight_mb: int | None, time_limit_s: float, workdir: Path, seed: int = 0,
) -> Scenario:  # fmt: skip
    scenario = Scenario(name, ranks, steps, tls_token, max_inflight_mb)
    flags = ["--max-workers", str(ranks + 32), "--step-deadline", str(int(time_limit_s) + 60),
             "--log-level", "warning"]  # fmt: skip
    if max_inflight_mb is not None:
        flags += ["--max-inflight-bytes", str(max_inflight_mb << 20)]
    ca_cert, token, credentials = None, None, None
    if tls_token:
        pki = make_pki()
        paths = pki.write(workdir)
        token = secrets.token_hex(16)
        (workdir / "token").write_text(token + "\n")
        flags += ["--tls-cert", str(paths["server_cert"]), "--tls-key", str(paths["server_key"]),
                  "--token-file", str(workdir / "token")]  # fmt: skip
        ca_cert = pki.ca_cert
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_cert)
    sidecar = Sidecar(workdir / "nc.db", workdir / "serve.log", *flags)
    context = mp.get_context("spawn")
    workers: list[Any] = []
    try:
        sidecar.start()
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        channel = (
            grpc.insecure_channel(sidecar.target)
            if credentials is None
            else grpc.secure_channel(sidecar.target, credentials)
        )
        stub = pb_grpc.NCServiceStub(channel)
        stub.RegisterRun(
            pb.RegisterRunRequest(
                run_id=RUN_ID, num_classes=K, feature_dim=P, world_size=ranks,
                metadata={"optimizer": "sgd"},
            ),
            timeout=30, metadata=metadata,
        )  # fmt: skip
        ready, go, out = context.Queue(), context.Event(), context.Queue()
        shares = [list(range(ranks))[i::processes] for i in range(processes)]
        for share in shares:
            worker = context.Process(
                target=client_process,
                args=(sidecar.target, share, steps, K, P, seed, ca_cert, token, ready, go, out),
                daemon=True,
            )
            worker.start()
            workers.append(worker)
        # Payloads are built and channels made before the clock starts.
        waiting, deadline = len(workers), time.monotonic() + time_limit_s
        while waiting:
            if time.monotonic() > deadline or any(w.exitcode for w in workers):
                raise RuntimeError("client processes did not start (see their output)")
            try:
                ready.get(timeout=1.0)
                waiting -= 1
            except queue.Empty:
                continue
        started = time.perf_counter()
        go.set()
        results: list[ClientResult] = []
        deadline = time.monotonic() + time_limit_s
        while len(results) < len(workers):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                scenario.errors.append(f"time limit of {time_limit_s:g} s reached")
                break
            try:
                results.append(out.get(timeout=min(remaining, 5.0)))
            except queue.Empty:  # look at the clock and the workers again
                if not any(w.is_alive() for w in workers) and out.empty():
                    scenario.errors.append("a client process died without a result")
                    break
        scenario.wall_s = time.perf_counter() - started
        scenario.server_peak_rss_mb = sidecar.peak_rss_bytes() / 2**20
        for result in results:
            scenario.errors += result.errors
        timings = [t for r in results for t in r.timings]
        reply = stub.GetMetrics(
            pb.GetMetricsRequest(run_id=RUN_ID, range=pb.StepRange(), include_incomplete=True),
            timeout=60, metadata=metadata,
        )  # fmt: skip
        channel.close()
        complete = [m for m in reply.measurements if m.status == pb.STEP_COMPLETE]
        scenario.steps_complete = len(complete)
        want = expected_metrics(seed, ranks, K, P)
        scenario.metrics_match = len(complete) == steps and all(
            _close(getattr(m.metrics, key), value)
            for m in complete
            for key, value in want.items()
            if key in pb.NCMetrics.DESCRIPTOR.fields_by_name
        )
        pushes = [t.push1_s for t in timings] + [t.push2_s for t in timings]
        waits = [t.means_wait_s for t in timings]
        per_step: dict[int, list[Timing]] = {}
        for t in timings:
            per_step.setdefault(t.step, []).append(t)
        step_times = [
            max(t.ended for t in ts) - min(t.started for t in ts) for ts in per_step.values()
        ]
        scenario.push_p50_ms = 1e3 * _percentile(pushes, 0.50)
        scenario.push_p99_ms = 1e3 * _percentile(pushes, 0.99)
        scenario.means_wait_p50_ms = 1e3 * _percentile(waits, 0.50)
        scenario.means_wait_p99_ms = 1e3 * _percentile(waits, 0.99)
        scenario.step_p50_s = _percentile(step_times, 0.50)
        scenario.step_p99_s = _percentile(step_times, 0.99)
        scenario.shards_per_s = len(pushes) / scenario.wall_s
        scenario.mb_per_s = sum(r.bytes_sent for r in results) / 2**20 / scenario.wall_s
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
                worker.join()
        sidecar.stop()
    return scenario


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=256)
    parser.add_argument("--compare-ranks", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds per scenario")
    parser.add_argument(
        "--budget-mb", type=int, default=16, help="--max-inflight-bytes of the memory runs"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    small, large, budget = args.compare_ranks, args.ranks, args.budget_mb
    memory_steps = min(args.steps, 3)
    # (name, ranks, steps, TLS + token, --max-inflight-bytes in MiB or the default)
    plan = [
        (f"{small} ranks", small, args.steps, False, None),
        (f"{large} ranks", large, args.steps, False, None),
        (f"{large} ranks, TLS + token", large, args.steps, True, None),
        # With the default budget, 64 ranks' pushes all fit in it at once and 256 do not;
        # under a budget both exceed, the peaks show what the rank count itself costs.
        (f"{small} ranks, {budget} MiB in flight", small, memory_steps, False, budget),
        (f"{large} ranks, {budget} MiB in flight", large, memory_steps, False, budget),
    ]
    scenarios = []
    for name, ranks, steps, tls_token, inflight in plan:
        with tempfile.TemporaryDirectory(prefix="ncserve-load-") as tmp:
            print(f"running {name} x {steps} steps, K={args.classes}, p={args.dim} ...",
                  flush=True)  # fmt: skip
            scenario = run_scenario(
                name, ranks, steps, args.classes, args.dim, args.processes, tls_token,
                inflight, args.time_limit, Path(tmp),
            )  # fmt: skip
        scenarios.append(scenario)
        print(_summary(scenario), flush=True)
    for a, b in ((scenarios[0], scenarios[1]), (scenarios[3], scenarios[4])):
        budget_text = "default" if a.max_inflight_mb is None else f"{a.max_inflight_mb} MiB"
        print(
            f"server peak memory ({budget_text} in-flight budget): "
            f"{a.server_peak_rss_mb:.0f} MB at {a.ranks} ranks, "
            f"{b.server_peak_rss_mb:.0f} MB at {b.ranks} ranks "
            f"(x{b.server_peak_rss_mb / a.server_peak_rss_mb:.2f} for x{b.ranks / a.ranks:.0f} ranks)"
        )
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(s) for s in scenarios], indent=2))
    return 1 if any(s.errors or not s.metrics_match for s in scenarios) else 0


def _summary(s: Scenario) -> str:
    lines = [
        f"  errors {len(s.errors)}; steps finalized {s.steps_complete}/{s.steps}; "
        f"metrics equal to the in-process merge: {s.metrics_match}",
        f"  push latency p50 {s.push_p50_ms:.1f} ms, p99 {s.push_p99_ms:.1f} ms; "
        f"class-means wait p50 {s.means_wait_p50_ms:.0f} ms, p99 {s.means_wait_p99_ms:.0f} ms",
        f"  step time p50 {s.step_p50_s:.2f} s, p99 {s.step_p99_s:.2f} s; "
        f"{s.shards_per_s:.0f} shards/s, {s.mb_per_s:.0f} MB/s; wall {s.wall_s:.1f} s",
        f"  server peak RSS {s.server_peak_rss_mb:.0f} MB",
    ]
    lines += [f"  error: {e}" for e in s.errors[:5]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

"""Ingest benchmark of the ncserve service (numbers go in docs/service.md; not a timed test).

    python benchmarks/service_ingest.py [--clients 64] [--steps 20] [--classes 100] [--dim 2048]
    python benchmarks/service_ingest.py --quick      # under 3 minutes, to rerun often

Starts ``ncserve serve`` as a subprocess on loopback (SQLite store in a temporary
directory), then C client threads, one channel each, play C ranks of one run for
S steps: push round 1 (counts, class sums and, from rank 0, W and b), fetch the
class means, push round 2. It prints

- shards per second (both rounds, all ranks, over the whole run);
- p50 / p99 finalize latency: from the moment the last round-2 shard of a step has
  been sent (its client handed gRPC the stream's last message and gRPC took it) until a
  WatchMetrics subscriber receives the measurement; and, stricter, from the moment the
  last rank *started* its round-2 push, which adds the time the 64 client threads,
  sharing one interpreter, take to get their own messages out;
- the server's peak resident memory (VmHWM) with C ranks, and in shorter runs with C/4,
  C/2 and 2C ranks: decoded shards are capped by the server's in-flight byte budget
  (``--max-inflight-bytes``), so past the few dozen ranks that fill it memory grows only by
  per-stream transport buffers;
- the ratio of the total ingest time to the time the same clients take to send
  the same messages (and receive the same class-mean streams) through a bare
  gRPC echo server, also a subprocess, in the same run. The two alternate
  ``--repeats`` times and the median of the paired ratios is the result: on a small
  shared machine one run of either can be 30 % off.

Shards are synthetic but valid (the service validates and merges them as usual);
they are encoded once up front, so the clients measure transport and service only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ncserve import wire
from ncserve.metrics import Round1Stats, Round2Stats
from ncserve.v1 import ncserve_pb2 as pb
from ncserve.v1 import ncserve_pb2_grpc as pb_grpc
from tests.service_support import encoded_push, header

RUN_ID = "bench"
ECHO_SINK = "/bench.Echo/Sink"
ECHO_SOURCE = "/bench.Echo/Source"


@dataclass(frozen=True)
class RankPayload:
    round1: list[pb.TensorChunk]
    round2: list[pb.TensorChunk]
    round1_bytes: int  # tensor data, as the client library declares it in the header
    round2_bytes: int

    @property
    def num_bytes(self) -> int:
        return self.round1_bytes + self.round2_bytes


def make_payloads(clients: int, K: int, P: int, seed: int = 0) -> list[RankPayload]:
    """Valid round-1 / round-2 statistics per rank, encoded once."""
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(K, P))
    bias = rng.normal(size=K)
    payloads = []
    for rank in range(clients):
        counts = rng.integers(5, 15, size=K)
        r1 = Round1Stats(counts, rng.normal(size=(K, P)) * counts[:, None])
        arrays = r1.to_arrays()
        if rank == 0:
            arrays = {**arrays, "weight": weight, "bias": bias}
        n = int(counts.sum())
        d = Round2Stats.scatter_dim(K, P)
        q = rng.normal(size=(2 * d, d))
        r2 = Round2Stats(n, q.T @ q, rng.random(K) * 10, n // 2, n // 3)
        round1 = list(wire.encode_arrays(arrays))
        round2 = list(wire.encode_arrays(r2.to_arrays()))
        payloads.append(
            RankPayload(
                round1, round2, wire.payload_nbytes(arrays), wire.payload_nbytes(r2.to_arrays())
            )
        )
    return payloads


def shard_stream(
    step: int, rank: int, round_: pb.Round, payload: RankPayload, K: int, P: int
) -> Iterator[pb.ShardChunk]:
    """One push as ``ncserve.client`` sends it (header with the declared payload size)."""
    hdr = header(RUN_ID, step, rank, round_, K, P)
    if round_ == pb.ROUND_1:
        return encoded_push(hdr, payload.round1, payload.round1_bytes)
    return encoded_push(hdr, payload.round2, payload.round2_bytes)


# -- processes --------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


@contextlib.contextmanager
def subprocess_server(args: list[str], workdir: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    port_file = workdir / f"port-{time.monotonic_ns()}"
    process = subprocess.Popen(
        [*args, "--port-file", str(port_file)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert process.stderr is not None
    try:
        deadline = time.monotonic() + 60
        while not port_file.exists():
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()}")
            if time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        yield process, int(port_file.read_text())
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stderr.close()


def echo_main(port_file: str, means_bytes: int, workers: int) -> None:
    """A bare gRPC server: Sink drains a push stream, Source streams class-mean-sized chunks."""
    K_P = means_bytes // 8
    means = list(wire.encode_arrays({"means": np.zeros(K_P)}))

    def sink(request_iterator: Iterator[pb.ShardChunk], context: object) -> pb.PushReply:
        for _ in request_iterator:
            pass
        return pb.PushReply()

    def source(request: pb.ClassMeansRequest, context: object) -> Iterator[pb.TensorChunk]:
        yield from means

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {
            "Sink": grpc.stream_unary_rpc_method_handler(
                sink, pb.ShardChunk.FromString, pb.PushReply.SerializeToString
            ),
            "Source": grpc.unary_stream_rpc_method_handler(
                source, pb.ClassMeansRequest.FromString, pb.TensorChunk.SerializeToString
            ),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    Path(port_file).write_text(str(port))
    server.wait_for_termination()


# -- clients ----------------------------------------------------------------------------------


@dataclass
class RunResult:
    seconds: float
    latencies_s: list[float]
    latencies_from_start_s: list[float]
    peak_rss: int
    server_cpu_s: float


@dataclass
class StepTimes:
    """Per step, the latest moment any rank started, and finished sending, its round 2."""

    started: dict[int, float]
    sent: dict[int, float]


def _noting_when_sent(
    messages: Iterator[pb.ShardChunk], step: int, times: StepTimes, lock: threading.Lock
) -> Iterator[pb.ShardChunk]:
    yield from messages
    # gRPC asks for the next message once it has sent the previous one: the push is out.
    now = time.perf_counter()
    with lock:
        times.sent[step] = max(times.sent.get(step, 0.0), now)


def run_clients(
    port: int,
    payloads: list[RankPayload],
    steps: int,
    K: int,
    P: int,
    mode: str,
    step_done: list[threading.Event] | None = None,
) -> tuple[float, StepTimes]:
    """Every client plays its rank for every step; returns wall time and, per step, when the
    last round-2 shard started to be sent and when it was sent.

    mode "ncserve": push round 1, fetch the class means (the service's barrier), push
    round 2, wait until the step's measurement is out (``step_done``), as the tracker does.
    mode "echo-sync": the same traffic to the echo server with the same two barriers.
    mode "echo-free": the same traffic to the echo server, no barriers.
    """
    clients = len(payloads)
    times = StepTimes({}, {})
    lock = threading.Lock()
    errors: list[BaseException] = []
    start_gate = threading.Barrier(clients + 1)
    round1_in = threading.Barrier(clients)
    step_out = threading.Barrier(clients)

    def client(rank: int) -> None:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        try:
            if mode == "ncserve":
                stub = pb_grpc.NCServiceStub(channel)
                sink_1, sink_2, source = stub.PushRound1, stub.PushRound2, stub.FetchClassMeans
            else:
                sink_1 = sink_2 = channel.stream_unary(
                    ECHO_SINK, pb.ShardChunk.SerializeToString, pb.PushReply.FromString
                )
                source = channel.unary_stream(
                    ECHO_SOURCE, pb.ClassMeansRequest.SerializeToString, pb.TensorChunk.FromString
                )
            grpc.channel_ready_future(channel).result(timeout=30)
            start_gate.wait()
            payload = payloads[rank]
            for step in range(steps):
                sink_1(shard_stream(step, rank, pb.ROUND_1, payload, K, P), timeout=120)
                if mode == "echo-sync":
                    round1_in.wait(120)
                request = pb.ClassMeansRequest(run_id=RUN_ID, step=step, rank=rank)
                for _ in source(request, timeout=120):
                    pass
                push2 = shard_stream(step, rank, pb.ROUND_2, payload, K, P)
                started = time.perf_counter()
                with lock:
                    times.started[step] = max(times.started.get(step, 0.0), started)
                sink_2(_noting_when_sent(push2, step, times, lock), timeout=120)
                if mode == "echo-sync":
                    step_out.wait(120)
                elif step_done is not None and not step_done[step].wait(120):
                    raise RuntimeError(f"step {step} was never finalized")
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)
            for barrier in (start_gate, round1_in, step_out):
                barrier.abort()
        finally:
            channel.close()

    threads = [threading.Thread(target=client, args=(r,)) for r in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        start_gate.wait()
    began = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - began
    if errors:
        raise errors[0]
    return elapsed, times


def ncserve_run(
    workdir: Path,
    payloads: list[RankPayload],
    steps: int,
    K: int,
    P: int,
    tag: str,
    server_args: tuple[str, ...] = (),
) -> RunResult:
    db = workdir / f"{tag}.db"
    args = [
        sys.executable, "-c", "from ncserve.cli import main; main()", "serve",
        "--listen", "127.0.0.1:0", "--db", str(db), "--log-level", "warning",
        "--max-workers", str(max(64, 2 * len(payloads) + 32)), *server_args,
    ]  # fmt: skip
    with subprocess_server(args, workdir) as (process, port):
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.NCServiceStub(channel)
            stub.RegisterRun(
                pb.RegisterRunRequest(
                    run_id=RUN_ID, num_classes=K, feature_dim=P, world_size=len(payloads)
                ),
                timeout=30,
            )
            arrivals: dict[int, float] = {}
            step_done = [threading.Event() for _ in range(steps)]
            watch = stub.WatchMetrics(pb.WatchMetricsRequest(run_id=RUN_ID))

            def watcher() -> None:
                with contextlib.suppress(grpc.RpcError):
                    for measurement in watch:
                        arrivals[measurement.step] = time.perf_counter()
                        step_done[measurement.step].set()
                        if len(arrivals) == steps:
                            return

            watching = threading.Thread(target=watcher)
            watching.start()
            time.sleep(0.2)  # subscribed before the first step can finalize
            seconds, times = run_clients(
                port, payloads, steps, K, P, "ncserve", step_done=step_done
            )
            watching.join(30)
            watch.cancel()
        peak = peak_rss_bytes(process.pid)
        server_cpu = cpu_seconds(process.pid)
    if len(arrivals) != steps:
        raise RuntimeError(f"only {len(arrivals)} of {steps} steps were finalized")
    return RunResult(
        seconds,
        [arrivals[s] - times.sent[s] for s in arrivals],
        [arrivals[s] - times.started[s] for s in arrivals],
        peak,
        server_cpu,
    )


def echo_run(
    workdir: Path,
    payloads: list[RankPayload],
    steps: int,
    K: int,
    P: int,
    workers: int,
    mode: str,
) -> tuple[float, float]:
    args = [
        sys.executable, str(Path(__file__).resolve()), "--echo-server",
        "--means-bytes", str(8 * (K * P + K + P)), "--workers", str(workers),
    ]  # fmt: skip
    with subprocess_server(args, workdir) as (process, port):
        seconds, _ = run_clients(port, payloads, steps, K, P, mode)
        server_cpu = cpu_seconds(process.pid)
    return seconds, server_cpu


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument(
        "--repeats", type=int, default=3, help="echo / ncserve pairs run alternately (median)"
    )
    parser.add_argument(
        "--max-inflight-bytes",
        type=int,
        default=None,
        help="passed to ncserve serve (default: the server's own default)",
    )
    parser.add_argument(
        "--memory-steps",
        type=int,
        default=5,
        help="steps of each extra run that measures peak memory at C/4, C/2 and 2C ranks",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a run to repeat often (under 3 minutes on 2 cores): 6 steps, one echo / ncserve "
        "pair, 2-step memory runs; the same figures, noisier",
    )
    # Internal: run as the echo server subprocess.
    parser.add_argument("--echo-server", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--means-bytes", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=64, help=argparse.SUPPRESS)
    parser.add_argument("--port-file", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.echo_server:
        echo_main(args.port_file, args.means_bytes, args.workers)
        return
    if args.quick:
        args.steps, args.repeats, args.memory_steps = 6, 1, 2
    K, P, steps, clients = args.classes, args.dim, args.steps, args.clients

    payloads = make_payloads(clients, K, P)
    shard_bytes = sum(p.num_bytes for p in payloads) / clients
    print(f"ncserve ingest: {clients} clients (threads), K={K}, p={P}, {steps} steps, "
          f"{os.cpu_count()} CPUs, {shard_bytes / 2**20:.2f} MiB per rank per step, "
          f"{args.repeats} echo / ncserve pairs")  # fmt: skip
    workers = max(64, 2 * clients + 32)
    server_args: tuple[str, ...] = ()
    if args.max_inflight_bytes is not None:
        server_args = ("--max-inflight-bytes", str(args.max_inflight_bytes))
    pairs: list[tuple[float, float, RunResult]] = []
    with tempfile.TemporaryDirectory(prefix="ncserve-bench-") as tmp:
        workdir = Path(tmp)
        echo_free, _ = echo_run(workdir, payloads, steps, K, P, workers, "echo-free")
        for i in range(args.repeats):
            echo_s, echo_cpu = echo_run(workdir, payloads, steps, K, P, workers, "echo-sync")
            full = ncserve_run(workdir, payloads, steps, K, P, f"full-{i}", server_args)
            pairs.append((echo_s, echo_cpu, full))
            print(f"  pair {i + 1}: echo {echo_s:6.2f} s, ncserve {full.seconds:6.2f} s "
                  f"-> ratio {full.seconds / echo_s:.2f}   server CPU {full.server_cpu_s:.2f} s "
                  f"(echo server {echo_cpu:.2f} s)")  # fmt: skip
        # Peak memory against the number of ranks: shorter runs (the peak comes within a step
        # or two), each with its own server.
        peaks = {clients: max(pair[2].peak_rss for pair in pairs)}
        for ranks in sorted({max(2, clients // 4), max(2, clients // 2), 2 * clients}):
            run = ncserve_run(
                workdir, make_payloads(ranks, K, P, seed=ranks), args.memory_steps, K, P,
                f"memory-{ranks}", server_args,
            )  # fmt: skip
            peaks[ranks] = run.peak_rss

    ratios = [full.seconds / echo_s for echo_s, _, full in pairs]
    median_ratio = statistics.median(ratios)
    # The pair whose ratio is (nearest) the median carries the other figures.
    nearest = min(range(len(pairs)), key=lambda i: abs(ratios[i] - median_ratio))
    echo_s, echo_cpu, full = pairs[nearest]
    sent_ms = [1000 * v for p in pairs for v in p[2].latencies_s]
    started_ms = [1000 * v for p in pairs for v in p[2].latencies_from_start_s]
    shards = 2 * clients * steps
    print(
        f"  shards/s                          {shards / full.seconds:8.1f}  "
        f"({shards} shards in {full.seconds:.2f} s)"
    )
    print(
        f"  finalize latency p50 / p99        {statistics.median(sent_ms):8.1f} / "
        f"{percentile(sent_ms, 99):.1f} ms  (last shard sent -> measurement at a watcher; "
        f"{len(sent_ms)} steps)"
    )
    print(
        f"    from the last push's start      {statistics.median(started_ms):8.1f} / "
        f"{percentile(started_ms, 99):.1f} ms  (adds the client threads' own queueing)"
    )
    print(
        "  server peak RSS by ranks          "
        + ",  ".join(f"{ranks}: {peak / 2**20:.0f} MiB" for ranks, peak in sorted(peaks.items()))
    )
    print(
        f"  ingest / echo ratio (median)      {median_ratio:8.2f}   "
        f"(pairs: {', '.join(f'{r:.2f}' for r in ratios)})"
    )
    print(
        f"  server CPU time                   {full.server_cpu_s:8.2f} s  "
        f"(echo server: {echo_cpu:.2f} s)"
    )
    print(f"  echo, same traffic, no barriers   {echo_free:8.2f} s  "
          f"-> ingest / echo ratio {full.seconds / echo_free:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()

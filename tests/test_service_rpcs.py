"""In-process server: every RPC of ncserve.v1.NCService, health and reflection."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from ncserve.metrics import compute_metrics, round1_stats, round2_stats
from ncserve.v1 import ncserve_pb2 as pb
from tests.service_support import (
    assert_metrics_close,
    fetch_means,
    header,
    insecure_stub,
    make_dataset,
    metrics_dict,
    push_messages,
    push_round1,
    push_round2,
    register,
    round1_arrays,
    round2_arrays,
    run_step_sequentially,
    start_test_server,
)


def _code(call, *args, **kwargs) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        result = call(*args, **kwargs)
        if isinstance(result, Iterator):
            list(result)
    return info.value.code()


def test_register_run_is_idempotent_and_conflicts_are_refused(stub) -> None:
    data = make_dataset(0, 4, 6, 2, 20)
    first = register(stub, "run-a", data, metadata={"optimizer": "sgd"})
    assert first.created and first.run.world_size == 2 and first.run.num_classes == 4
    again = register(stub, "run-a", data, metadata={"optimizer": "adam", "lr": "0.1"})
    assert not again.created
    # The first registration's values stay; only new keys are added.
    assert dict(again.run.metadata) == {"optimizer": "sgd", "lr": "0.1"}
    assert _code(register, stub, "run-a", data, world_size=3) == grpc.StatusCode.ALREADY_EXISTS
    run = stub.GetRun(pb.GetRunRequest(run_id="run-a"))
    assert run.feature_dim == 6 and not run.HasField("latest_step") and run.num_measurements == 0
    register(stub, "run-b", data)
    assert [r.run_id for r in stub.ListRuns(pb.ListRunsRequest()).runs] == ["run-a", "run-b"]
    assert _code(stub.GetRun, pb.GetRunRequest(run_id="nope")) == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(("K", "P"), [(6, 10), (9, 4)])
def test_both_rounds_give_the_metrics_of_the_union(stub, K: int, P: int) -> None:
    data = make_dataset(1, K, P, 3, 40)
    register(stub, "run", data)
    measurement = run_step_sequentially(stub, "run", 5, data)
    h, y = data.union()
    reference = compute_metrics(h, y, data.weight_KP, data.bias_K)
    assert measurement.status == pb.STEP_COMPLETE
    assert_metrics_close(measurement.metrics, reference, rel=1e-9)
    assert measurement.metrics.num_samples == len(y)
    assert not measurement.metrics.HasField("holdout_nc4")
    run = stub.GetRun(pb.GetRunRequest(run_id="run"))
    assert (run.num_measurements, run.latest_step, run.num_open_steps) == (1, 5, 0)


def test_get_metrics_by_step_range_and_latest(stub) -> None:
    data = make_dataset(2, 3, 5, 2, 15)
    register(stub, "run", data)
    for step in (10, 20, 30):
        run_step_sequentially(stub, "run", step, data)
    latest = stub.GetMetrics(pb.GetMetricsRequest(run_id="run")).measurements
    assert [m.step for m in latest] == [30]
    explicit = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", latest=True)).measurements
    assert explicit == latest
    ranged = stub.GetMetrics(
        pb.GetMetricsRequest(run_id="run", range=pb.StepRange(first=15, last=30))
    ).measurements
    assert [m.step for m in ranged] == [20, 30]
    everything = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", range=pb.StepRange()))
    assert [m.step for m in everything.measurements] == [10, 20, 30]
    one = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=20)).measurements
    assert [m.step for m in one] == [20]
    not_found = grpc.StatusCode.NOT_FOUND
    assert _code(stub.GetMetrics, pb.GetMetricsRequest(run_id="run", step=21)) == not_found
    assert _code(stub.GetMetrics, pb.GetMetricsRequest(run_id="x")) == not_found
    register(stub, "empty", data)
    assert _code(stub.GetMetrics, pb.GetMetricsRequest(run_id="empty")) == not_found


def test_concurrent_ranks_wait_for_each_other(stub) -> None:
    world_size = 8
    data = make_dataset(3, 5, 12, world_size, 30)
    register(stub, "run", data)
    replies: dict[int, pb.PushReply] = {}
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            push_round1(stub, "run", 7, data, rank)
            means = fetch_means(stub, "run", 7, rank, data.num_classes, data.feature_dim)
            replies[rank] = push_round2(stub, "run", 7, data, rank, means)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert sorted(replies) == list(range(world_size))
    h, y = data.union()
    got = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=7)).measurements[0]
    assert_metrics_close(got.metrics, compute_metrics(h, y, data.weight_KP, data.bias_K), 1e-9)


def test_repeated_pushes_get_the_same_reply_and_count_once(stub, server) -> None:
    data = make_dataset(4, 4, 6, 2, 20)
    register(stub, "run", data)
    first = push_round1(stub, "run", 1, data, 0)
    assert push_round1(stub, "run", 1, data, 0) == first
    push_round1(stub, "run", 1, data, 1)
    means = fetch_means(stub, "run", 1, 0, 4, 6)
    r2 = push_round2(stub, "run", 1, data, 0, means)
    assert push_round2(stub, "run", 1, data, 0, means) == r2
    push_round2(stub, "run", 1, data, 1, means)
    # After the step is finalized a retry of any of its pushes is still recognised.
    assert push_round1(stub, "run", 1, data, 0) == first
    assert push_round2(stub, "run", 1, data, 0, means) == r2
    h, y = data.union()
    got = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=1)).measurements[0]
    assert_metrics_close(got.metrics, compute_metrics(h, y, data.weight_KP, data.bias_K), 1e-12)
    assert got.metrics.num_samples == len(y)
    # Same key, different payload: a client bug, refused rather than silently ignored.
    other = make_dataset(5, 4, 6, 2, 20)
    code = _code(push_round1, stub, "run", 1, other, 0)
    assert code == grpc.StatusCode.ALREADY_EXISTS
    scrape = server.metrics.registry.get_sample_value
    assert scrape("ncserve_shards_received_total", {"round": "1"}) == 2
    assert scrape("ncserve_shards_received_total", {"round": "2"}) == 2
    assert scrape("ncserve_steps_finalized_total", {"run_id": "run"}) == 1


def test_concurrent_repeats_of_every_push_count_once(stub, server) -> None:
    # Every push sent three times at once: repeats land in the same commit batch or later.
    world_size = 6
    data = make_dataset(17, 4, 8, world_size, 20)
    register(stub, "run", data)
    with futures.ThreadPoolExecutor(3 * world_size) as pool:
        first = [pool.submit(push_round1, stub, "run", 2, data, r) for r in range(world_size)]
        first += [pool.submit(push_round1, stub, "run", 2, data, r) for r in range(world_size)]
        first += [pool.submit(push_round1, stub, "run", 2, data, r) for r in range(world_size)]
        replies1 = [f.result() for f in first]
        means = fetch_means(stub, "run", 2, 0, 4, 8)
        second = [
            pool.submit(push_round2, stub, "run", 2, data, r % world_size, means)
            for r in range(3 * world_size)
        ]
        replies2 = [f.result() for f in second]
    for replies in (replies1, replies2):
        by_rank = {}
        for reply in replies:
            assert by_rank.setdefault(reply.rank, reply) == reply
        assert sorted(by_rank) == list(range(world_size))
    h, y = data.union()
    got = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=2)).measurements[0]
    assert_metrics_close(got.metrics, compute_metrics(h, y, data.weight_KP, data.bias_K), 1e-9)
    scrape = server.metrics.registry.get_sample_value
    assert scrape("ncserve_shards_received_total", {"round": "1"}) == world_size
    assert scrape("ncserve_shards_received_total", {"round": "2"}) == world_size


def test_fetch_class_means_is_bounded_by_the_call_deadline(stub) -> None:
    data = make_dataset(6, 3, 4, 2, 10)
    register(stub, "run", data)
    push_round1(stub, "run", 0, data, 0)
    started = time.monotonic()
    code = _code(fetch_means, stub, "run", 0, 1, 3, 4, timeout=0.5)
    assert code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 5


def test_step_deadline_marks_a_step_incomplete_and_never_half_counts(tmp_path) -> None:
    handle = start_test_server(tmp_path / "nc.db", step_deadline_s=0.4)
    channel, stub = insecure_stub(handle.port)
    try:
        data = make_dataset(7, 3, 4, 3, 10)
        register(stub, "run", data)
        push_round1(stub, "run", 3, data, 0)
        push_round1(stub, "run", 3, data, 1)
        deadline = time.monotonic() + 10
        while stub.GetRun(pb.GetRunRequest(run_id="run")).num_incomplete == 0:
            assert time.monotonic() < deadline, "step never marked incomplete"
            time.sleep(0.05)
        code = _code(stub.GetMetrics, pb.GetMetricsRequest(run_id="run", step=3))
        assert code == grpc.StatusCode.NOT_FOUND
        shown = stub.GetMetrics(
            pb.GetMetricsRequest(run_id="run", step=3, include_incomplete=True)
        ).measurements[0]
        assert shown.status == pb.STEP_INCOMPLETE and not shown.HasField("metrics")
        assert "round 1 missing ranks [2]" in shown.incomplete_reason
        late = _code(push_round1, stub, "run", 3, data, 2)
        assert late == grpc.StatusCode.FAILED_PRECONDITION
        assert _code(fetch_means, stub, "run", 3, 0, 3, 4) == grpc.StatusCode.FAILED_PRECONDITION
        scrape = handle.metrics.registry.get_sample_value
        assert scrape("ncserve_steps_incomplete_total", {"run_id": "run"}) == 1
        assert scrape("ncserve_open_steps") == 0
    finally:
        channel.close()
        handle.stop(0.5)


def test_watch_streams_measurements_as_they_land(tmp_path) -> None:
    handle = start_test_server(tmp_path / "nc.db", step_deadline_s=0.5)
    channel, stub = insecure_stub(handle.port)
    try:
        data = make_dataset(8, 3, 4, 2, 10)
        register(stub, "run", data)
        run_step_sequentially(stub, "run", 1, data)
        live = stub.WatchMetrics(pb.WatchMetricsRequest(run_id="run", include_incomplete=True))
        seen: list[pb.Measurement] = []

        def consume() -> None:
            for m in live:
                seen.append(m)
                if len(seen) == 2:
                    return

        reader = threading.Thread(target=consume)
        reader.start()
        time.sleep(0.2)  # the watcher is subscribed before anything new lands
        run_step_sequentially(stub, "run", 2, data)
        push_round1(stub, "run", 3, data, 0)  # rank 1 never comes: step 3 goes incomplete
        reader.join(15)
        live.cancel()
        assert [(m.step, m.status) for m in seen] == [
            (2, pb.STEP_COMPLETE),
            (3, pb.STEP_INCOMPLETE),
        ]
        # A watcher that says where it is gets the backlog first, in step order.
        replay = stub.WatchMetrics(pb.WatchMetricsRequest(run_id="run", after_step=0), timeout=1)
        backlog = []
        with pytest.raises(grpc.RpcError) as info:
            for m in replay:
                backlog.append(m.step)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert backlog == [1, 2]
        missing = stub.WatchMetrics(pb.WatchMetricsRequest(run_id="nope"))
        assert _code(list, missing) == grpc.StatusCode.NOT_FOUND
    finally:
        channel.close()
        handle.stop(0.5)


def test_watch_ends_cleanly_when_the_server_stops(tmp_path) -> None:
    handle = start_test_server(tmp_path / "nc.db")
    channel, stub = insecure_stub(handle.port)
    data = make_dataset(9, 3, 4, 1, 10)
    register(stub, "run", data)
    stream = stub.WatchMetrics(pb.WatchMetricsRequest(run_id="run"))
    result: list[object] = []
    reader = threading.Thread(target=lambda: result.append(list(stream)))
    reader.start()
    time.sleep(0.2)
    started = time.monotonic()
    handle.stop(5)
    reader.join(10)
    channel.close()
    assert result == [[]]
    assert time.monotonic() - started < 4, "stop waited for the watcher's grace period"


def test_record_and_get_scalars(stub, server) -> None:
    data = make_dataset(10, 3, 4, 1, 10)
    register(stub, "run", data)
    reply = stub.RecordScalars(
        pb.RecordScalarsRequest(run_id="run", step=1, epoch=0, values={"nc0": 2.0, "lr": 0.1})
    )
    assert reply.num_values == 2
    stub.RecordScalars(pb.RecordScalarsRequest(run_id="run", step=2, values={"nc0": 1.5}))
    stub.RecordScalars(pb.RecordScalarsRequest(run_id="run", step=1, values={"nc0": 1.9}))
    records = stub.GetScalars(pb.GetScalarsRequest(run_id="run")).records
    assert [(r.step, dict(r.values)) for r in records] == [
        (1, {"nc0": 1.9, "lr": 0.1}),
        (2, {"nc0": 1.5}),
    ]
    only = stub.GetScalars(
        pb.GetScalarsRequest(run_id="run", range=pb.StepRange(last=1), keys=["lr"])
    ).records
    assert [(r.step, dict(r.values)) for r in only] == [(1, {"lr": 0.1})]
    # The exported gauge follows the newest step, not the latest call.
    labels = {"run_id": "run", "optimizer": "sgd"}
    assert server.metrics.registry.get_sample_value("ncserve_nc0", labels) == 1.5


def test_holdout_split_and_training_scalars(stub) -> None:
    data = make_dataset(11, 4, 6, 2, 24)
    held = make_dataset(12, 4, 6, 2, 12)
    register(stub, "run", data)
    for rank in range(2):
        push_round1(stub, "run", 4, data, rank)
    means = fetch_means(stub, "run", 4, 0, 4, 6)
    for rank in range(2):
        h, y = held.shards[rank]
        arrays = round2_arrays(data, rank, means)
        holdout = round2_stats(h, y, means, data.weight_KP, data.bias_K).to_arrays()
        arrays.update({f"holdout.{k}": v for k, v in holdout.items()})
        hdr = header(
            "run", 4, rank, pb.ROUND_2, 4, 6,
            epoch=3 + rank,
            scalars={"lr": 0.01, "train_loss": 1.0 + rank},
            train_tally=pb.TrainTally(loss_sum=10.0 * (rank + 1), num_correct=5, num_samples=10),
        )  # fmt: skip
        stub.PushRound2(push_messages(hdr, arrays), timeout=10)
    m = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=4)).measurements[0]
    hh, hy = held.union()
    r1 = round1_stats(*data.union(), 4)
    ho = round2_stats(hh, hy, r1.class_means(), data.weight_KP, data.bias_K)
    assert m.metrics.holdout_num_samples == len(hy)
    assert m.metrics.holdout_nc4 == pytest.approx(ho.ncc_agree / len(hy), rel=1e-12)
    assert m.metrics.holdout_accuracy == pytest.approx(ho.correct / len(hy), rel=1e-12)
    # Tallies are summed (exact); other scalars are averaged over ranks.
    assert dict(m.scalars) == pytest.approx(
        {"lr": 0.01, "train_loss": 30.0 / 20, "train_accuracy": 10 / 20}
    )
    assert m.epoch == 4


def test_restart_between_rounds_continues_the_same_merge(tmp_path) -> None:
    data = make_dataset(13, 5, 7, 3, 25)
    reference = start_test_server(tmp_path / "ref.db")
    channel, stub = insecure_stub(reference.port)
    register(stub, "run", data)
    expected = metrics_dict(run_step_sequentially(stub, "run", 9, data).metrics)
    channel.close()
    reference.stop(0.5)

    first = start_test_server(tmp_path / "nc.db")
    channel, stub = insecure_stub(first.port)
    register(stub, "run", data)
    for rank in range(3):
        push_round1(stub, "run", 9, data, rank)
    channel.close()
    first.stop(0.5)

    second = start_test_server(tmp_path / "nc.db")
    channel, stub = insecure_stub(second.port)
    try:
        assert stub.GetRun(pb.GetRunRequest(run_id="run")).num_open_steps == 1
        means = fetch_means(stub, "run", 9, 0, 5, 7)
        push_round1(stub, "run", 9, data, 1)  # a retry after the restart: recognised
        for rank in range(3):
            push_round2(stub, "run", 9, data, rank, means)
        got = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=9)).measurements[0]
        assert metrics_dict(got.metrics) == expected  # bit for bit
    finally:
        channel.close()
        second.stop(0.5)


def test_limits_answer_resource_exhausted(tmp_path) -> None:
    handle = start_test_server(
        tmp_path / "nc.db", max_runs=1, max_open_steps=1, max_message_bytes=2 << 20
    )
    channel, stub = insecure_stub(handle.port)
    try:
        data = make_dataset(14, 3, 4, 2, 10)
        register(stub, "run", data)
        exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
        assert _code(register, stub, "second", data) == exhausted
        push_round1(stub, "run", 1, data, 0)
        assert _code(push_round1, stub, "run", 2, data, 0) == exhausted
        big = pb.RegisterRunRequest(
            run_id="run", num_classes=3, feature_dim=4, world_size=2, metadata={"x": "y" * 1000}
        )
        # A message over --max-message-bytes is refused by gRPC itself.
        big.metadata.update({f"k{i}": "v" * 1000 for i in range(3000)})
        assert _code(stub.RegisterRun, big) == exhausted
        huge_world = pb.RegisterRunRequest(
            run_id="run", num_classes=3, feature_dim=4, world_size=10_000
        )
        assert _code(stub.RegisterRun, huge_world) == exhausted
        scrape = handle.metrics.registry.get_sample_value
        assert scrape("ncserve_shards_rejected_total", {"reason": "resource_exhausted"}) == 1
    finally:
        channel.close()
        handle.stop(0.5)


def test_full_or_read_only_store_refuses_writes_and_keeps_answering(tmp_path) -> None:
    handle = start_test_server(tmp_path / "nc.db")
    channel, stub = insecure_stub(handle.port)
    writer = handle.store._writer  # the store's one write connection
    try:
        small = make_dataset(15, 4, 5, 2, 10)
        register(stub, "run", small)
        run_step_sequentially(stub, "run", 1, small)
        # Shards far larger than the pages a finalized step freed, so the file must grow.
        data = make_dataset(15, 4, 3000, 2, 10)
        register(stub, "big", data)
        pages = writer.execute("PRAGMA page_count").fetchone()[0]
        writer.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(grpc.RpcError) as info:
            push_round1(stub, "big", 2, data, 0)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "full" in info.value.details()
        # Queries are still answered, from what was stored before.
        assert stub.GetRun(pb.GetRunRequest(run_id="run")).num_measurements == 1
        assert len(stub.GetMetrics(pb.GetMetricsRequest(run_id="run")).measurements) == 1
        writer.execute("PRAGMA max_page_count = 1073741823")
        writer.execute("PRAGMA query_only = ON")
        with pytest.raises(grpc.RpcError) as info:
            stub.RecordScalars(pb.RecordScalarsRequest(run_id="run", step=1, values={"a": 1.0}))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "read-only" in info.value.details()
        assert [r.run_id for r in stub.ListRuns(pb.ListRunsRequest()).runs] == ["run", "big"]
        writer.execute("PRAGMA query_only = OFF")
        # Nothing half-done: the refused shard can now be pushed and the step completes.
        assert run_step_sequentially(stub, "big", 2, data).status == pb.STEP_COMPLETE
        assert handle.store.integrity_check() == "ok"
    finally:
        channel.close()
        handle.stop(0.5)


def test_health_and_reflection(server) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "ncserve.v1.NCService"):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert status.status == health_pb2.HealthCheckResponse.SERVING
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for s in next(answers).list_services_response.service}
        assert {"ncserve.v1.NCService", "grpc.health.v1.Health"} <= names
        watch = health.Watch(health_pb2.HealthCheckRequest(service="ncserve.v1.NCService"))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        stopper = threading.Thread(target=server.stop, args=(0.5,))
        stopper.start()
        # Shutdown begins by turning health NOT_SERVING, before in-flight calls drain.
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        stopper.join(10)
    finally:
        channel.close()


def test_k_larger_than_p_and_classes_missing_on_a_rank(stub) -> None:
    # Rank 1 holds no sample of class 0: fine, as long as the union has every class.
    rng = np.random.default_rng(16)
    K, P = 6, 3
    data = make_dataset(16, K, P, 2, 30)
    h1, y1 = data.shards[1]
    keep = y1 != 0
    data.shards[1] = (h1[keep], y1[keep])
    register(stub, "run", data)
    got = run_step_sequentially(stub, "run", 0, data)
    h, y = data.union()
    assert_metrics_close(got.metrics, compute_metrics(h, y, data.weight_KP, data.bias_K), 1e-9)
    assert rng is not None


def test_in_flight_budget_serializes_pushes_without_losing_any(tmp_path) -> None:
    # A budget smaller than one shard: pushes are decoded one at a time, all still land.
    handle = start_test_server(tmp_path / "nc.db", max_inflight_bytes=1 << 20)
    channel, stub = insecure_stub(handle.port)
    try:
        world_size = 6
        data = make_dataset(18, 8, 300, world_size, 20)
        register(stub, "run", data)
        with futures.ThreadPoolExecutor(world_size) as pool:
            list(pool.map(lambda r: push_round1(stub, "run", 0, data, r), range(world_size)))
            means = fetch_means(stub, "run", 0, 0, 8, 300)
            list(pool.map(lambda r: push_round2(stub, "run", 0, data, r, means), range(world_size)))
        h, y = data.union()
        got = stub.GetMetrics(pb.GetMetricsRequest(run_id="run", step=0)).measurements[0]
        assert_metrics_close(got.metrics, compute_metrics(h, y, data.weight_KP, data.bias_K), 1e-9)
    finally:
        channel.close()
        handle.stop(0.5)


def test_the_budget_holds_a_declared_payload_size_else_the_largest_push(
    tmp_path, monkeypatch
) -> None:
    """A push whose header declares its size is charged that size (only one rank sends W,
    which doubles a round-1 push); one that does not is charged the most the round carries."""
    from ncserve import wire
    from ncserve.service.servicer import ByteBudget

    held: list[int] = []
    real_hold = ByteBudget.hold

    def recording_hold(self, num_bytes, timeout_s):
        held.append(num_bytes)
        return real_hold(self, num_bytes, timeout_s)

    monkeypatch.setattr(ByteBudget, "hold", recording_hold)
    handle = start_test_server(tmp_path / "nc.db")
    channel, stub = insecure_stub(handle.port)
    try:
        K, P = 4, 6
        data = make_dataset(3, K, P, 2, 10)
        register(stub, "run", data)
        arrays = round1_arrays(data, 1)  # no W on rank 1
        declared = wire.payload_nbytes(arrays)
        assert declared == 8 * (K + K * P)
        hdr = header("run", 0, 1, pb.ROUND_1, K, P, payload_bytes=declared)
        stub.PushRound1(push_messages(hdr, arrays), timeout=30)
        assert held == [declared]
        push_round1(stub, "run", 0, data, 0)  # W and b, size not declared
        assert held[1] == 8 * (K + K * P) + 8 * (K * P + K)
    finally:
        channel.close()
        handle.stop(0.5)


def test_byte_budget_waits_then_gives_up_with_unavailable() -> None:
    from ncserve.service.errors import Unavailable
    from ncserve.service.servicer import ByteBudget

    budget = ByteBudget(100, max_wait_s=5)
    with budget.hold(60, None):
        with pytest.raises(Unavailable, match="server busy"), budget.hold(60, 0.05):
            pass
        released = threading.Event()

        def later() -> None:
            with budget.hold(1000, 5):  # larger than the budget: takes all of it
                released.set()

        waiter = threading.Thread(target=later)
        waiter.start()
        time.sleep(0.05)
        assert not released.is_set()
    waiter.join(5)
    assert released.is_set()


def test_byte_budget_grants_in_arrival_order() -> None:
    from ncserve.service.servicer import ByteBudget

    budget = ByteBudget(100, max_wait_s=5)
    order: list[str] = []
    lock = threading.Lock()

    def holder(name: str, need: int) -> None:
        with budget.hold(need, 5):
            with lock:
                order.append(name)
            time.sleep(0.05)

    def queued(count: int) -> None:
        deadline = time.monotonic() + 5
        while len(budget._waiters) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(budget._waiters) == count

    with budget.hold(60, None):
        big = threading.Thread(target=holder, args=("big", 80))
        big.start()
        queued(1)
        # Would fit beside the 60 held, but a larger request came first: it waits its turn
        # (and, not fitting beside that one either, until it is done).
        small = threading.Thread(target=holder, args=("small", 30))
        small.start()
        queued(2)
        time.sleep(0.05)
        assert order == []
    big.join(5)
    small.join(5)
    assert order == ["big", "small"]

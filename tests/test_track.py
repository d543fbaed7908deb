"""ncserve.track.Tracker: single-process and gloo multi-process measurements through the service."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ncserve.metrics import METRIC_KEYS, compute_metrics
from ncserve.service import ServerConfig, start_server
from ncserve.track import Tracker, TrackerError, find_classifier
from tests.reliability_support import free_port


class Net(nn.Module):
    def __init__(self, d_in=6, p=8, k=4):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(d_in, p), nn.Tanh())
        self.head = nn.Linear(p, k)

    def forward(self, x):
        return self.head(self.body(x))


def make_data(n=120, d_in=6, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    x = torch.randn(n, d_in, generator=g) + y[:, None].float()
    return x, y


def batches(x, y, size=32):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def assert_same_metrics(got, want):
    """Every NC metric of ``got`` equals ``want``'s to 1e-9 relative (1e-12 absolute)."""
    for key in METRIC_KEYS:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key


def reference(model, x, y):
    with torch.no_grad():
        h = model.body(x).double().numpy()
    W = model.head.weight.detach().double().numpy()
    b = model.head.bias.detach().double().numpy()
    return compute_metrics(h, y.numpy(), W, b)


def test_find_classifier_picks_the_last_linear():
    net = Net()
    assert find_classifier(net) is net.head
    with pytest.raises(TrackerError, match=r"no nn\.Linear found"):
        find_classifier(nn.Sequential(nn.ReLU()))


def test_single_process_with_embedded_service(tmp_path):
    torch.manual_seed(0)
    net = Net()
    x, y = make_data()
    tracker = Tracker(net, run_id="solo", run_dir=tmp_path, metadata={"optimizer": "sgd"})
    try:
        got = tracker.measure(batches(x, y), step=0, epoch=0, scalars={"train_loss": 1.5})
        nc0, _ = tracker.record_nc0(1, scalars={"lr": 0.1})
        stored = tracker.client.get_metrics("solo", step=0)
        assert stored["scalars"]["train_loss"] == 1.5
    finally:
        report = tracker.close()
    want = reference(net, x, y)
    assert_same_metrics(got, want)
    assert nc0 == pytest.approx(want["nc0"], rel=1e-12)
    assert report.complete and tracker.local_fallbacks == 0
    assert net.training  # eval mode was restored


def test_service_down_measures_locally_and_replays(tmp_path):
    """No service at the target: metrics still come back, and the pushes wait in the spool."""
    port = free_port()
    torch.manual_seed(1)
    net = Net()
    x, y = make_data(seed=3)
    tracker = Tracker(
        net, target=f"127.0.0.1:{port}", run_id="down", run_dir=tmp_path, deadline_s=0.5
    )
    got = tracker.measure(batches(x, y), step=5, epoch=1)
    assert tracker.local_fallbacks == 1
    want = reference(net, x, y)
    assert_same_metrics(got, want)
    report = tracker.close(timeout_s=0.5)
    assert not report.complete and report.persisted
    # The service comes up on that port later: a new client on the same spool delivers.
    server = start_server(ServerConfig(listen=f"127.0.0.1:{port}", db_path=tmp_path / "db.sqlite"))
    try:
        from ncserve.client import NCClient

        with NCClient(server.address, spill_dir=tmp_path / "spool" / "rank0") as client:
            assert client.flush(timeout_s=20).complete
            stored = client.get_metrics("down", step=5)
        assert_same_metrics(stored, got)
    finally:
        server.stop(grace_s=1)


def test_background_measurement_holds_the_model_state_of_its_step(tmp_path):
    """measure(background=True) returns at once; settle() gives the metrics of the model as
    it was at the measured step, even though training changed it meanwhile."""
    torch.manual_seed(4)
    net = Net()
    x, y = make_data(seed=6)
    want = reference(net, x, y)
    tracker = Tracker(net, run_id="bg", run_dir=tmp_path, background=True)
    try:
        assert tracker.measure(batches(x, y), step=7, epoch=1, scalars={"train_loss": 0.5}) is None
        with torch.no_grad():  # "training" goes on while the rounds run in the background
            for param in net.parameters():
                param.add_(1.0)
        settled = tracker.settle()
        assert [step for step, _ in settled] == [7] and tracker.settle() == []
        # The next measurement settles the previous one itself (here: nothing pending).
        assert tracker.measure(batches(x, y), step=8, epoch=2) is None
        later = tracker.settle()
    finally:
        tracker.close()
    assert_same_metrics(settled[0][1], want)
    assert [step for step, _ in later] == [8]
    assert later[0][1]["nc0"] == pytest.approx(reference(net, x, y)["nc0"], rel=1e-12)
    assert tracker.local_fallbacks == 0


def test_background_measurement_with_the_service_down_settles_locally(tmp_path):
    port = free_port()
    torch.manual_seed(5)
    net = Net()
    x, y = make_data(seed=7)
    tracker = Tracker(
        net, target=f"127.0.0.1:{port}", run_id="bgdown", run_dir=tmp_path, deadline_s=0.5
    )
    assert tracker.measure(batches(x, y), step=2, background=True) is None
    settled = tracker.settle()
    report = tracker.close(timeout_s=0.5)
    assert tracker.local_fallbacks == 1 and report.persisted
    want = reference(net, x, y)
    assert_same_metrics(settled[0][1], want)


def _worker(rank, world, port, target, run_dir, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    net = Net()
    x, y = make_data(n=160)
    mine = slice(rank, None, world)
    tracker = Tracker(net, target=target, run_id="dist", run_dir=run_dir)
    got = tracker.measure(batches(x[mine], y[mine], 16), step=3, epoch=0)
    tracker.close()
    if rank == 0:
        torch.save({"metrics": got, "reference": reference(net, x, y)}, out)
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_the_whole_dataset(tmp_path):
    server = start_server(ServerConfig(listen="127.0.0.1:0", db_path=tmp_path / "db.sqlite"))
    port = free_port()
    out = tmp_path / "out.pt"
    try:
        mp.spawn(_worker, args=(2, port, server.address, str(tmp_path), str(out)), nprocs=2)
    finally:
        server.stop(grace_s=1)
    result = torch.load(out, weights_only=False)
    assert_same_metrics(result["metrics"], result["reference"])
    assert np.isclose(result["metrics"]["num_samples"], 160)


def test_buffer_bound_reports_exactly_what_was_dropped(tmp_path):
    """Service down and a small buffer: later measurements are dropped and named, not lost silently."""
    port = free_port()
    torch.manual_seed(2)
    net = Net(p=64, k=4)
    x, y = make_data(seed=4)
    tracker = Tracker(
        net,
        target=f"127.0.0.1:{port}",
        run_id="bounded",
        run_dir=tmp_path,
        deadline_s=0.2,
        max_buffer_bytes=24 << 10,
    )
    for step in range(6):
        assert tracker.measure(batches(x, y), step=step) is not None
    report = tracker.close(timeout_s=0.2)
    dropped_steps = sorted({entry.key.step for entry in report.dropped})
    kept_steps = sorted({key.step for key in report.buffered if key.step is not None})
    assert dropped_steps, report.summary()
    assert kept_steps and set(kept_steps).isdisjoint(dropped_steps)
    assert set(kept_steps) | set(dropped_steps) == set(range(6))


def test_measuring_a_stored_step_again_returns_the_stored_measurement(tmp_path):
    """A resumed run re-measures a step the service finalized before the crash."""
    torch.manual_seed(5)
    net = Net()
    x, y = make_data(seed=6)
    server = start_server(ServerConfig(listen="127.0.0.1:0", db_path=tmp_path / "db.sqlite"))
    try:
        first = Tracker(net, target=server.address, run_id="again", run_dir=tmp_path / "a")
        stored = first.measure(batches(x, y), step=7)
        first.close()
        with torch.no_grad():  # the model moved on: a second measurement would differ
            net.head.weight.add_(0.5)
        second = Tracker(net, target=server.address, run_id="again", run_dir=tmp_path / "b")
        again = second.measure(batches(x, y), step=7)
        second.close()
        from ncserve.client import NCClient

        with NCClient(server.address) as client:
            rows = client.get_metrics("again", all_steps=True)
    finally:
        server.stop(grace_s=1)
    assert [row["step"] for row in rows] == [7]
    for key in METRIC_KEYS:
        assert again[key] == pytest.approx(stored[key], rel=1e-12, abs=1e-15), key


def test_close_finishes_the_run_and_an_exception_fails_it(tmp_path):
    """Tracker.close() ends the run as finished; leaving its ``with`` block by an exception
    ends it as failed, with the exception as the reason; heartbeats keep it alive."""
    server = start_server(ServerConfig(listen="127.0.0.1:0", db_path=tmp_path / "db.sqlite"))
    try:
        target = f"127.0.0.1:{server.port}"
        x, y = make_data()
        net = Net()
        with Tracker(net, target=target, run_id="ok", run_dir=tmp_path / "ok") as tracker:
            tracker.measure(batches(x, y), step=0)
        with (
            pytest.raises(RuntimeError, match="diverged"),
            Tracker(
                net, target=target, run_id="boom", run_dir=tmp_path / "boom", heartbeat_s=0.05
            ) as tracker,
        ):
            before = server.aggregator.run("boom").last_activity_unix
            deadline = time.monotonic() + 10
            while server.aggregator.run("boom").last_activity_unix == before:
                assert time.monotonic() < deadline, "no heartbeat arrived"
                time.sleep(0.02)
            raise RuntimeError("loss diverged")
        ok, boom = server.aggregator.run("ok"), server.aggregator.run("boom")
        assert (ok.state, ok.state_reason) == ("finished", "")
        assert boom.state == "failed" and boom.state_reason == "RuntimeError: loss diverged"
    finally:
        server.stop(0.5)


def test_two_pass_forwards_the_split_twice_in_chunks_and_equals_one_pass(tmp_path, monkeypatch):
    """Two-pass mode keeps no features: each round forwards the split again, here one batch
    per chunk, and the metrics equal the one-pass measurement's and the reference."""
    import ncserve.track.rounds as rounds

    monkeypatch.setattr(rounds, "TWO_PASS_CHUNK_BYTES", 1)
    torch.manual_seed(3)
    net = Net(p=8, k=4)
    x, y = make_data(n=150, seed=11)
    xh, yh = make_data(n=30, seed=12)
    forwards = []
    net.head.register_forward_pre_hook(lambda _m, inputs: forwards.append(inputs[0].shape[0]))
    server = start_server(ServerConfig(listen="127.0.0.1:0", db_path=tmp_path / "db.sqlite"))
    try:
        results = {}
        for two_pass in (False, True):
            forwards.clear()
            run_id = f"tp{int(two_pass)}"
            with Tracker(
                net,
                target=server.address,
                run_id=run_id,
                run_dir=tmp_path / run_id,
                two_pass=two_pass,
            ) as tracker:
                results[two_pass] = tracker.measure(
                    batches(x, y, 32), step=1, holdout_loader=batches(xh, yh, 16)
                )
            # One pass over each split, or two: class sums, then round 2 around the means.
            assert sum(forwards) == (2 if two_pass else 1) * (150 + 30) - (30 if two_pass else 0)
    finally:
        server.stop(grace_s=1)
    assert_same_metrics(results[True], reference(net, x, y))
    for key in (*METRIC_KEYS, "holdout_nc4", "holdout_accuracy"):
        assert results[True][key] == pytest.approx(results[False][key], rel=1e-10, abs=1e-14), key


class TokenNet(nn.Module):
    """A head applied to (batch, time, P) features, as in a language model."""

    def __init__(self, vocab=5, p=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, p)
        self.mix = nn.Linear(p, p)
        self.head = nn.Linear(p, vocab)

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


def test_token_level_features_are_one_sample_per_position(tmp_path):
    """(B, T) labels for a head on (B, T, P) features: B x T samples, each with its label."""
    torch.manual_seed(4)
    net = TokenNet()
    tokens = torch.randint(0, 5, (12, 7))
    targets = torch.roll(tokens, -1, dims=1)
    loader = [(tokens[i : i + 4], targets[i : i + 4]) for i in range(0, 12, 4)]
    with Tracker(net, target=None, run_id="tokens", run_dir=tmp_path) as tracker:
        got = tracker.measure(loader, step=0)
    with torch.no_grad():
        h = torch.tanh(net.mix(net.embed(tokens))).reshape(-1, 8).double().numpy()
    W = net.head.weight.detach().double().numpy()
    b = net.head.bias.detach().double().numpy()
    want = compute_metrics(h, targets.reshape(-1).numpy(), W, b)
    assert got["num_samples"] == 12 * 7
    assert_same_metrics(got, want)


def test_a_buffer_smaller_than_one_push_is_warned_about(tmp_path, caplog):
    """An outage would drop, not spool, pushes larger than the client's whole buffer."""
    net = Net(p=64, k=4)  # round 1 of rank 0: 8 x 4 x (2 x 64 + 1) = 4128 bytes
    with caplog.at_level("WARNING", logger="ncserve.track.tracker"):
        Tracker(
            net, target=f"127.0.0.1:{free_port()}", run_id="small", run_dir=tmp_path,
            deadline_s=0.2, max_buffer_bytes=4000,
        ).close(timeout_s=0)  # fmt: skip
    assert "cannot hold one round-1 push of K=4 x P=64 (4128 bytes)" in caplog.text

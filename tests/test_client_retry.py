"""Retry policy: capped exponential backoff with jitter, bounded by a deadline."""

from __future__ import annotations

import random
import threading
import time

import grpc
import numpy as np
import pytest

from ncserve.client.retry import RetryPolicy, is_transient


class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        super().__init__(code.name)
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code


def test_backoff_is_exponential_capped_and_jittered() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, jitter=0.5, rng=random.Random(0))
    for attempt, nominal in [(0, 0.1), (1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (50, 1.0)]:
        waits = [policy.backoff_s(attempt) for _ in range(200)]
        assert all(nominal * 0.5 <= w <= nominal for w in waits)
        assert max(waits) - min(waits) > nominal * 0.3  # really jittered
    assert RetryPolicy(jitter=0.0).backoff_s(10_000) == RetryPolicy().max_backoff_s


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"initial_backoff_s": 0}, "initial_backoff_s"),
        ({"initial_backoff_s": 1, "max_backoff_s": 0.5}, "max_backoff_s"),
        ({"multiplier": 0.5}, "multiplier"),
        ({"jitter": 1.5}, "jitter"),
    ],
)
def test_invalid_policy_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_transient_errors_are_retried_until_success() -> None:
    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002)
    codes = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
    timeouts: list[float] = []

    def attempt(timeout_s: float) -> str:
        timeouts.append(timeout_s)
        if codes:
            raise FakeRpcError(codes.pop(0))
        return "ok"

    assert policy.call(attempt, time.monotonic() + 5.0) == "ok"
    assert len(timeouts) == 3
    # Every attempt is given only the time left before the deadline.
    assert all(0 < t <= 5.0 for t in timeouts) and timeouts == sorted(timeouts, reverse=True)


def test_permanent_error_is_not_retried() -> None:
    calls = 0

    def attempt(timeout_s: float) -> None:
        nonlocal calls
        calls += 1
        raise FakeRpcError(grpc.StatusCode.INVALID_ARGUMENT)

    with pytest.raises(FakeRpcError) as info:
        RetryPolicy().call(attempt, time.monotonic() + 5.0)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert calls == 1
    assert not is_transient(info.value)
    assert not is_transient(ValueError("x"))


def test_retries_stop_at_the_deadline() -> None:
    policy = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)
    calls = 0

    def attempt(timeout_s: float) -> None:
        nonlocal calls
        calls += 1
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    start = time.monotonic()
    with pytest.raises(FakeRpcError):
        policy.call(attempt, start + 0.3)
    elapsed = time.monotonic() - start
    assert 0.2 <= elapsed < 0.6
    assert calls >= 4


def test_stop_event_ends_the_wait() -> None:
    stop = threading.Event()
    policy = RetryPolicy(initial_backoff_s=5.0, max_backoff_s=5.0, jitter=0.0)

    def attempt(timeout_s: float) -> None:
        stop.set()
        raise FakeRpcError(grpc.StatusCode.UNAVAILABLE)

    start = time.monotonic()
    with pytest.raises(FakeRpcError):
        policy.call(attempt, start + 60.0, stop=stop)
    assert time.monotonic() - start < 1.0


def test_a_push_gets_time_to_move_its_bytes_on_top_of_the_deadline(tmp_path):
    """A vocabulary-sized round 1 (hundreds of MiB) cannot move in a 1 s deadline: each push's
    deadline grows by its payload at the floor rate, small pushes keep the plain deadline."""
    from ncserve.client import NCClient
    from ncserve.client.delivery import MIN_TRANSFER_BYTES_PER_S, transfer_allowance_s
    from ncserve.client.retry import RetryPolicy
    from ncserve.metrics import Round1Stats

    granted: list[float] = []

    class Recording(RetryPolicy):
        def call(self, attempt_fn, deadline, **kwargs):
            granted.append(deadline - time.monotonic())
            return None  # delivered

    client = NCClient(
        "127.0.0.1:1", deadline_s=1.0, retry=Recording(), replay_in_background=False,
        spill_dir=tmp_path,
    )  # fmt: skip
    try:
        for num_classes, feature_dim in ((4, 8), (2000, 2048)):
            stats = Round1Stats.zeros(num_classes, feature_dim)
            weight = np.zeros((num_classes, feature_dim))
            assert client.push_round1("big", 0, 0, stats, weight_KP=weight)
    finally:
        client.close(timeout_s=0)
    small, large = granted
    assert 0.9 < small < 1.01
    payload = 8 * 2000 * (2 * 2048 + 1)  # class sums, W, counts
    assert transfer_allowance_s(payload) == payload / MIN_TRANSFER_BYTES_PER_S
    assert large == pytest.approx(1.0 + transfer_allowance_s(payload), abs=0.2)

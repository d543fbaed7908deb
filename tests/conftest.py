"""Fixtures shared by the test files: a service on an OS-picked loopback port and a stub."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.service_support import insecure_stub, start_test_server


@pytest.fixture
def server(tmp_path: Path) -> Iterator:  # -> ServerHandle
    """A service with the test limits (start_test_server) and its own database; stopped
    after the test."""
    handle = start_test_server(tmp_path / "nc.db", step_deadline_s=30)
    yield handle
    handle.stop(0.5)


@pytest.fixture
def stub(server) -> Iterator:  # -> NCServiceStub
    """An insecure stub connected to ``server``."""
    channel, stub = insecure_stub(server.port)
    yield stub
    channel.close()

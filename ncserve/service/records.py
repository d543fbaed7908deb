"""What the store holds, as the values the rest of the service passes around."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ncserve.protocol import RUN_RUNNING


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    num_classes: int
    feature_dim: int
    world_size: int
    metadata: dict[str, str]
    created_unix: float
    state: str = RUN_RUNNING  # one of ncserve.protocol.RUN_STATES
    state_reason: str = ""
    ended_unix: float | None = None
    last_activity_unix: float = 0.0

    @property
    def live(self) -> bool:
        return self.state == RUN_RUNNING


@dataclass(frozen=True)
class RunCounts:
    num_measurements: int
    num_incomplete: int
    latest_step: int | None
    first_step: int | None = None


@dataclass(frozen=True)
class ShardRecord:
    run_id: str
    step: int
    rank: int
    round: int
    payload_sha256: str
    payload_bytes: int
    num_samples: int


@dataclass(frozen=True)
class MeasurementRecord:
    id: int
    run_id: str
    step: int
    epoch: int | None
    status: str  # "complete" | "incomplete"
    metrics: dict[str, float] | None
    scalars: dict[str, float]
    reason: str
    finalized_unix: float


@dataclass
class OpenStepRecord:
    run_id: str
    step: int
    epoch: int | None
    state: dict[str, Any]
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    shards: list[ShardRecord] = field(default_factory=list)


@dataclass(frozen=True)
class ScalarRecord:
    step: int
    epoch: int | None
    values: dict[str, float]

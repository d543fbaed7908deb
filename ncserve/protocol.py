"""What the client library and the service agree on, beyond the .proto: names, patterns and
limits. One definition each; both sides import them from here (protobuf messages only: no
grpc, numpy or torch)."""

from __future__ import annotations

import re

from ncserve.v1 import ncserve_pb2 as pb

# -- the two rounds of a measurement ---------------------------------------------------------

ROUND_1 = 1
ROUND_2 = 2
ROUND1_NAMES = ("counts", "sums")
CLASSIFIER_NAMES = ("weight", "bias")
ROUND2_NAMES = ("num_samples", "scatter", "sq_resid", "ncc_agree", "correct")
# Round-2 tensors of the held-out split travel under this prefix.
HOLDOUT_PREFIX = "holdout."

# -- identifiers and what a client may send --------------------------------------------------

# A run id also names a folder (runs/<run-id>): no path separator, no "..".
RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9](?!.*\.\.)[A-Za-z0-9._:=+@-]{0,199}")
RUN_ID_RULE = (
    "1-200 characters of [A-Za-z0-9._:=+@-], starting with a letter or digit, without '..'"
)
SCALAR_KEY_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_METADATA_ENTRIES = 64
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 1024
MAX_SCALARS = 256
MAX_REASON_CHARS = 1024

# -- the life of a run -----------------------------------------------------------------------

RUN_RUNNING = "running"
RUN_FINISHED = "finished"
RUN_FAILED = "failed"
RUN_ABANDONED = "abandoned"
RUN_STATES = (RUN_RUNNING, RUN_FINISHED, RUN_FAILED, RUN_ABANDONED)
# The states a client ends a run with (FinishRun).
RUN_END_STATES = (RUN_FINISHED, RUN_FAILED)
# State names <-> ncserve.v1.RunState values.
RUN_STATE_VALUES = {
    RUN_RUNNING: pb.RUN_RUNNING,
    RUN_FINISHED: pb.RUN_FINISHED,
    RUN_FAILED: pb.RUN_FAILED,
    RUN_ABANDONED: pb.RUN_ABANDONED,
}
RUN_STATE_NAMES = {value: name for name, value in RUN_STATE_VALUES.items()}

# -- ListRuns paging (AIP-158) ---------------------------------------------------------------

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000

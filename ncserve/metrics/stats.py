"""Per-shard sufficient statistics for the two measurement rounds, and their exact merge.

Legend: N samples, K classes, P feature dim; ``h_NP`` features, ``y_N`` labels,
``w_KP`` last-layer weight, ``b_K`` its bias, ``mubar_KP`` class means minus the global mean.

Round 1 ships counts and class sums; merging is a sum. Round 2, given the global class
means, ships the K x K projected scatter G = sum_n q_n q_n^T with q_n = M^T (h_n - mu_{y_n})
when K <= P, or the centered P x P scatter when K > P, plus the per-class sums of
||h_n - mu_{y_n}||^2 and the NCC-agreement counts; merging is a sum too. Everything is
float64 and centered on the global class means before it is squared, whatever the dtype of
the features.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias, TypeGuard, TypeVar

import numpy as np
from threadpoolctl import ThreadpoolController

from ncserve.metrics.errors import MetricInputError

if TYPE_CHECKING:
    import torch

# Features and labels: numpy arrays, or torch tensors (computed on their device).
Features: TypeAlias = "np.ndarray | torch.Tensor"
Labels: TypeAlias = "np.ndarray | torch.Tensor"

# Rows per block are chosen so one float64 block of features stays near this size (2 MB):
# several passes over a block then run from cache, and BLAS still sees long products.
_BLOCK_ELEMENTS = 1 << 18
# Blocks of K-wide scores (NCC distances and logits) may be larger: 32 MB of float64.
_BLOCK_ELEMENTS_WIDE = 1 << 22
# Rows are visited sorted by class, so a block holds a few runs of one class each. Runs at
# least this long on average are handled one slice at a time (no gather, no scatter);
# shorter ones (many classes, few samples each) with one vectorized call per block.
_LONG_RUN_ROWS = 32
# Accumulation runs in up to this many threads, each given at least this many values.
_MAX_THREADS = 8
_MIN_ELEMENTS_PER_THREAD = 1 << 22
_T = TypeVar("_T")
# Counts received from elsewhere (a shard on the wire) are at most this: float64 holds every
# integer up to it exactly, and int64 sums of a few hundred shards of it cannot overflow.
MAX_COUNT = 2**53


def block_rows(width: int, num_rows: int) -> int:
    """How many rows of a float64 array ``width`` wide to process at once."""
    return max(16, min(num_rows, _BLOCK_ELEMENTS // max(1, width)))


def _row_blocks(num_rows: int, rows: int) -> Iterator[slice]:
    for start in range(0, num_rows, rows):
        yield slice(start, min(num_rows, start + rows))


@dataclass(frozen=True)
class _SortedBlock:
    """Rows ``rows_B`` of the features, sorted by class, as runs of one class each: run j
    covers block positions ``starts_J[j]:stops_J[j]`` and has class ``classes_J[j]``."""

    rows_B: np.ndarray
    labels_B: np.ndarray
    starts_J: np.ndarray
    stops_J: np.ndarray
    classes_J: np.ndarray

    @property
    def long_runs(self) -> bool:
        return self.starts_J.size * _LONG_RUN_ROWS <= self.rows_B.size

    def runs(self) -> Iterator[tuple[int, slice]]:
        for k, a, b in zip(
            self.classes_J.tolist(), self.starts_J.tolist(), self.stops_J.tolist(), strict=True
        ):
            yield k, slice(a, b)


class _ClassOrder:
    """The rows of a shard sorted by class (a stable sort: the same blocks every time)."""

    def __init__(self, y_N: np.ndarray) -> None:
        self.order_N = np.argsort(y_N, kind="stable")
        self.y_sorted_N = y_N[self.order_N]

    def blocks(self, part: slice, rows: int) -> Iterator[_SortedBlock]:
        """Blocks of at most ``rows`` rows of ``part`` (a slice of the sorted order)."""
        for start in range(part.start, part.stop, rows):
            sl = slice(start, min(part.stop, start + rows))
            labels = self.y_sorted_N[sl]
            starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
            stops = np.r_[starts[1:], labels.size]
            yield _SortedBlock(self.order_N[sl], labels, starts, stops, labels[starts])


def engine_threads(num_elements: int) -> int:
    """Worker threads for accumulating ``num_elements`` feature values: one per available core
    (at most _MAX_THREADS, or NCSERVE_ENGINE_THREADS when set), each with enough work."""
    env = os.environ.get("NCSERVE_ENGINE_THREADS", "").strip()
    if env:
        try:
            cap = max(1, int(env))
        except ValueError:
            raise MetricInputError(
                f"NCSERVE_ENGINE_THREADS must be a positive integer, got {env!r}"
            ) from None
    else:
        affinity = getattr(os, "sched_getaffinity", None)
        cap = min(_MAX_THREADS, len(affinity(0)) if affinity else (os.cpu_count() or 1))
    return max(1, min(cap, num_elements // _MIN_ELEMENTS_PER_THREAD))


def _map_parts(work: Callable[[slice], _T], num_rows: int, num_cols: int) -> list[_T]:
    """Run ``work`` on contiguous parts of range(num_rows), in threads when worthwhile.

    numpy releases the GIL in the per-block work; BLAS is held to one thread meanwhile so the
    workers do not oversubscribe the cores.
    """
    threads = engine_threads(num_rows * num_cols)
    bounds = np.linspace(0, num_rows, threads + 1).astype(int).tolist()
    parts = [slice(a, b) for a, b in itertools.pairwise(bounds)]
    # Held in one thread too: a small shard's products are too small for BLAS's own threads,
    # which would only spin against the caller's (up to 2.4x the CPU under contention).
    with _blas_controller().limit(limits=1, user_api="blas"):
        if threads == 1:
            return [work(parts[0])]
        with ThreadPoolExecutor(threads) as pool:
            return list(pool.map(work, parts))


@functools.cache
def _blas_controller() -> ThreadpoolController:
    """One inspection of the loaded BLAS libraries, reused: limiting through it costs ~16 us
    per call, against ~0.4 ms for threadpool_limits, which inspects them again each time."""
    return ThreadpoolController()


class _RowGather:
    """Copies chosen rows of the features, as float64, into one reused block (no allocation,
    and so no fresh pages to fault in, per block)."""

    def __init__(self, h_NP: np.ndarray, rows: int) -> None:
        self._h = h_NP
        self._out = np.empty((rows, h_NP.shape[1]), dtype=np.float64)
        self._raw = None if h_NP.dtype == np.float64 else np.empty_like(self._out, h_NP.dtype)

    def __call__(self, rows_B: np.ndarray) -> np.ndarray:
        out = self._out[: rows_B.size]
        # mode="clip" (the indices are valid by construction) lets take write straight into
        # `out`; the default mode buffers the whole result first.
        if self._raw is None:
            np.take(self._h, rows_B, axis=0, out=out, mode="clip")
        else:
            raw = self._raw[: rows_B.size]
            np.take(self._h, rows_B, axis=0, out=raw, mode="clip")
            np.copyto(out, raw)
        return out


def _subtract_rows(r_BP: np.ndarray, block: _SortedBlock, centers_JP: np.ndarray) -> None:
    """r[i] -= centers[j] for every row i of run j, in place."""
    if block.long_runs:
        for j, (_, run) in enumerate(block.runs()):
            r_BP[run] -= centers_JP[j]
    else:
        r_BP -= np.repeat(centers_JP, block.stops_J - block.starts_J, axis=0)


def _class_sq_norms(r_BP: np.ndarray, block: _SortedBlock) -> np.ndarray:
    """sum of ||r_i||^2 over the rows i of each run of the block (one value per run)."""
    if block.long_runs:
        # A run is contiguous in memory: one dot product each.
        return np.array([np.vdot(r_BP[run], r_BP[run]) for _, run in block.runs()])
    return np.add.reduceat(np.einsum("np,np->n", r_BP, r_BP), block.starts_J)


def _is_torch(values: object) -> TypeGuard[torch.Tensor]:
    """A torch tensor, told without importing torch (the numpy engine never needs it)."""
    return type(values).__module__.split(".", 1)[0] == "torch"


def check_shapes(h_shape: tuple[int, ...], y_shape: tuple[int, ...], num_classes: object) -> None:
    """The shapes of a block of features and labels (numpy's or torch's), and K."""
    if not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise MetricInputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if len(h_shape) != 2:
        raise MetricInputError(f"features must be 2-D (N x P), got shape {h_shape}")
    if len(y_shape) != 1 or y_shape[0] != h_shape[0]:
        raise MetricInputError(
            f"labels must be 1-D with one label per feature row ({h_shape[0]}), got shape {y_shape}"
        )
    if h_shape[1] < 1:
        raise MetricInputError("features have no columns (feature_dim 0)")


def check_label_range(lo: int, hi: int, num_classes: int) -> None:
    if lo < 0 or hi >= num_classes:
        bad = lo if lo < 0 else hi
        raise MetricInputError(
            f"labels must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"found label {bad}"
        )


def check_features(h_NP: np.ndarray, y_N: np.ndarray, num_classes: int) -> None:
    """Validate one block of features and labels; raise MetricInputError naming the problem."""
    check_shapes(tuple(h_NP.shape), tuple(y_N.shape), num_classes)
    if not (np.issubdtype(h_NP.dtype, np.floating) or np.issubdtype(h_NP.dtype, np.integer)):
        raise MetricInputError(f"features must be numeric, got dtype {h_NP.dtype}")
    if not np.issubdtype(y_N.dtype, np.integer):
        raise MetricInputError(f"labels must be integers, got dtype {y_N.dtype}")
    if y_N.size:
        check_label_range(int(y_N.min()), int(y_N.max()), num_classes)


def _non_finite_error(h_NP: np.ndarray) -> MetricInputError:
    """The error for features whose accumulated sums came out NaN or Inf (found afterwards,
    so valid features pay no extra pass)."""
    rows = block_rows(h_NP.shape[1], h_NP.shape[0])
    for sl in _row_blocks(h_NP.shape[0], rows):
        block = h_NP[sl]
        if not np.isfinite(block).all():
            bad_row = sl.start + int(np.argwhere(~np.isfinite(block))[0, 0])
            return MetricInputError(f"features contain NaN or Inf (first at row {bad_row})")
    return MetricInputError("features are too large: their float64 sums overflow to Inf")


def _as_array(arrays: Mapping[str, np.ndarray], key: str, where: str) -> np.ndarray:
    if key not in arrays:
        raise MetricInputError(f"{where}: missing field '{key}'")
    return np.asarray(arrays[key])


def all_finite(values: np.ndarray) -> bool:
    """Whether a float array holds no NaN or Inf.

    One BLAS dot product of the values with themselves, which reads them once and
    allocates nothing: it is finite exactly when every value is, unless it overflows
    (values beyond ~1e154), which the elementwise check then settles.
    """
    flat = values.reshape(-1)
    if flat.size < 4096:  # small: the elementwise check costs less than the setup below
        return bool(np.isfinite(flat).all())
    with np.errstate(over="ignore", invalid="ignore"):
        if math.isfinite(float(np.dot(flat, flat))):
            return True
    return bool(np.isfinite(flat).all())


def _expect(arr: np.ndarray, name: str, shape: tuple[int, ...], kind: str) -> np.ndarray:
    if arr.shape != shape:
        raise MetricInputError(f"field '{name}' must have shape {shape}, got {arr.shape}")
    if kind == "int":
        if not np.issubdtype(arr.dtype, np.integer):
            raise MetricInputError(f"field '{name}' must be integer counts, got dtype {arr.dtype}")
        if arr.size and int(arr.min()) < 0:
            raise MetricInputError(f"field '{name}' has a negative count ({int(arr.min())})")
        # Summed in float64, which cannot overflow, to bound the total as well as each count.
        if arr.size and float(arr.sum(dtype=np.float64)) > MAX_COUNT:
            raise MetricInputError(
                f"field '{name}' counts {float(arr.sum(dtype=np.float64)):.6g} samples in "
                f"total; at most 2**53 = {MAX_COUNT} allowed"
            )
        return np.asarray(arr, dtype=np.int64)  # a copy only when the dtype differs
    if not np.issubdtype(arr.dtype, np.floating):
        raise MetricInputError(f"field '{name}' must be floating point, got dtype {arr.dtype}")
    out = np.asarray(arr, dtype=np.float64)
    if not all_finite(out):
        raise MetricInputError(f"field '{name}' contains NaN or Inf")
    return out


def _scalar_count(arrays: Mapping[str, np.ndarray], key: str, where: str) -> int:
    arr = _as_array(arrays, key, where)
    if arr.shape not in ((), (1,)) or not np.issubdtype(arr.dtype, np.integer):
        raise MetricInputError(
            f"field '{key}' must be one integer count, got shape {arr.shape} dtype {arr.dtype}"
        )
    value = int(arr.reshape(()))
    if not 0 <= value <= MAX_COUNT:
        raise MetricInputError(f"field '{key}' must be in [0, 2**53 = {MAX_COUNT}], got {value}")
    return value


@dataclass(frozen=True)
class ClassMeans:
    """The global class means that round 1 hands back to every rank."""

    counts_K: np.ndarray
    means_KP: np.ndarray
    global_mean_P: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.means_KP.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.means_KP.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.counts_K.sum())

    def centered(self) -> np.ndarray:
        """mubar_KP: each class mean minus the global mean (the columns of M, as rows)."""
        return self.means_KP - self.global_mean_P

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "counts": self.counts_K,
            "means": self.means_KP,
            "global_mean": self.global_mean_P,
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], num_classes: int, feature_dim: int
    ) -> ClassMeans:
        where = "class means"
        K, P = num_classes, feature_dim
        counts = _expect(_as_array(arrays, "counts", where), "counts", (K,), "int")
        means = _expect(_as_array(arrays, "means", where), "means", (K, P), "float")
        gmean = _expect(_as_array(arrays, "global_mean", where), "global_mean", (P,), "float")
        return cls(counts, means, gmean)


@dataclass(frozen=True)
class Round1Stats:
    """Round-1 sufficient statistics of one shard (or of several, merged): per-class sample
    counts and feature sums. Merging is a sum, so merging two shards gives the same bits in
    either order and an accumulator needs one pass over the sums per shard.

    The within-class sums of squares are not here: they are taken in round 2, around the
    *global* class means, where they are a plain sum as well.
    """

    counts_K: np.ndarray
    sums_KP: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.sums_KP.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.sums_KP.shape[1])

    @property
    def num_samples(self) -> int:
        return int(self.counts_K.sum())

    @classmethod
    def zeros(cls, num_classes: int, feature_dim: int) -> Round1Stats:
        return cls(
            np.zeros(num_classes, dtype=np.int64),
            np.zeros((num_classes, feature_dim), dtype=np.float64),
        )

    def _check_compatible(self, other: Round1Stats) -> None:
        if other.sums_KP.shape != self.sums_KP.shape:
            raise MetricInputError(
                f"cannot merge round-1 statistics of shape (K, P) = {self.sums_KP.shape} "
                f"with {other.sums_KP.shape}"
            )

    def copy(self) -> Round1Stats:
        return Round1Stats(self.counts_K.copy(), self.sums_KP.copy())

    def merge(self, other: Round1Stats) -> Round1Stats:
        """The statistics of both (a new object)."""
        merged = self.copy()
        merged.merge_in_place(other)
        return merged

    def merge_in_place(self, other: Round1Stats) -> None:
        """The same merge, written into this object's arrays (no copies: for accumulators)."""
        self._check_compatible(other)
        np.add(self.counts_K, other.counts_K, out=self.counts_K)
        np.add(self.sums_KP, other.sums_KP, out=self.sums_KP)

    def class_means(self) -> ClassMeans:
        """Global class means and the global (sample) mean; every class needs a sample."""
        empty = np.flatnonzero(self.counts_K == 0)
        if empty.size:
            shown = ", ".join(str(int(k)) for k in empty[:10])
            more = f" and {empty.size - 10} more" if empty.size > 10 else ""
            raise MetricInputError(
                f"{empty.size} of {self.num_classes} classes have no samples at all "
                f"(classes {shown}{more}); every class needs at least one sample"
            )
        means_KP = self.sums_KP / self.counts_K[:, None]
        global_mean_P = self.sums_KP.sum(axis=0) / self.num_samples
        return ClassMeans(self.counts_K.copy(), means_KP, global_mean_P)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"counts": self.counts_K, "sums": self.sums_KP}

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], num_classes: int, feature_dim: int
    ) -> Round1Stats:
        where = "round-1 statistics"
        K, P = num_classes, feature_dim
        counts = _expect(_as_array(arrays, "counts", where), "counts", (K,), "int")
        sums = _expect(_as_array(arrays, "sums", where), "sums", (K, P), "float")
        empty = counts == 0
        if empty.any() and np.any(sums[empty] != 0):
            raise MetricInputError("field 'sums' is non-zero for a class whose count is 0")
        return cls(counts, sums)


@dataclass(frozen=True)
class Round2Stats:
    """Round-2 sufficient statistics of one shard (or of several, merged).

    ``scatter`` is the K x K projected within-class scatter when K <= P, else the P x P
    centered within-class scatter; ``sq_resid_K[k]`` is the sum of ||h - mu_k||^2 over the
    class-k samples. All are taken around the *global* class means, so merging is a sum.
    """

    num_samples: int
    scatter: np.ndarray
    sq_resid_K: np.ndarray
    ncc_agree: int
    correct: int

    @staticmethod
    def scatter_dim(num_classes: int, feature_dim: int) -> int:
        return num_classes if num_classes <= feature_dim else feature_dim

    @classmethod
    def zeros(cls, num_classes: int, feature_dim: int) -> Round2Stats:
        d = cls.scatter_dim(num_classes, feature_dim)
        return cls(0, np.zeros((d, d)), np.zeros(num_classes), 0, 0)

    def merge(self, other: Round2Stats) -> Round2Stats:
        if (other.scatter.shape, other.sq_resid_K.shape) != (
            self.scatter.shape,
            self.sq_resid_K.shape,
        ):
            raise MetricInputError(
                f"cannot merge round-2 statistics with scatter {self.scatter.shape} and "
                f"{other.scatter.shape} (K = {self.sq_resid_K.size} and {other.sq_resid_K.size})"
            )
        return Round2Stats(
            self.num_samples + other.num_samples,
            self.scatter + other.scatter,
            self.sq_resid_K + other.sq_resid_K,
            self.ncc_agree + other.ncc_agree,
            self.correct + other.correct,
        )

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "num_samples": np.asarray(self.num_samples, dtype=np.int64),
            "scatter": self.scatter,
            "sq_resid": self.sq_resid_K,
            "ncc_agree": np.asarray(self.ncc_agree, dtype=np.int64),
            "correct": np.asarray(self.correct, dtype=np.int64),
        }

    @classmethod
    def from_arrays(
        cls, arrays: Mapping[str, np.ndarray], num_classes: int, feature_dim: int
    ) -> Round2Stats:
        where = "round-2 statistics"
        d = cls.scatter_dim(num_classes, feature_dim)
        n = _scalar_count(arrays, "num_samples", where)
        scatter = _expect(_as_array(arrays, "scatter", where), "scatter", (d, d), "float")
        sq_resid = _expect(
            _as_array(arrays, "sq_resid", where), "sq_resid", (num_classes,), "float"
        )
        if (sq_resid < 0).any():
            k = int(np.flatnonzero(sq_resid < 0)[0])
            raise MetricInputError(
                f"field 'sq_resid' has a negative sum of squares ({float(sq_resid[k])!r} for class {k})"
            )
        agree = _scalar_count(arrays, "ncc_agree", where)
        correct = _scalar_count(arrays, "correct", where)
        for name, value in (("ncc_agree", agree), ("correct", correct)):
            if value > n:
                raise MetricInputError(f"field '{name}' ({value}) exceeds num_samples ({n})")
        return cls(n, scatter, sq_resid, agree, correct)


def round1_stats(h_NP: Features, y_N: Labels, num_classes: int) -> Round1Stats:
    """Round-1 statistics of a block of features (any float dtype; accumulated in float64).
    A torch tensor is computed on its own device (ncserve.metrics.torch_stats).

    Rows are visited sorted by class, a cache-sized block at a time, and each run of one
    class inside a block is summed at once.
    """
    if _is_torch(h_NP):  # computed on the tensor's device (ncserve.metrics.torch_stats)
        from ncserve.metrics import torch_stats

        return torch_stats.round1_stats(h_NP, y_N, num_classes)
    h_NP = np.asarray(h_NP)
    y_N = np.asarray(y_N).astype(np.intp, copy=False)
    check_features(h_NP, y_N, num_classes)
    K, P = num_classes, h_NP.shape[1]
    order = _ClassOrder(y_N)
    rows = block_rows(P, y_N.size)

    def accumulate(part: slice) -> Round1Stats:
        acc = Round1Stats.zeros(K, P)
        gather = _RowGather(h_NP, rows)
        for block in order.blocks(part, rows):
            r_BP = gather(block.rows_B)
            if block.long_runs:
                sums_JP = np.stack([r_BP[run].sum(axis=0) for _, run in block.runs()])
            else:
                sums_JP = np.add.reduceat(r_BP, block.starts_J, axis=0)
            # The classes of one block's runs are distinct: fancy-indexed += adds each once.
            acc.counts_K[block.classes_J] += block.stops_J - block.starts_J
            acc.sums_KP[block.classes_J] += sums_JP
        return acc

    parts = _map_parts(accumulate, y_N.size, P)
    total = parts[0]
    for part_stats in parts[1:]:
        total.merge_in_place(part_stats)
    if not np.isfinite(total.sums_KP).all():
        raise _non_finite_error(h_NP)
    return total


def round2_stats(
    h_NP: Features,
    y_N: Labels,
    class_means: ClassMeans,
    w_KP: np.ndarray,
    b_K: np.ndarray | None = None,
) -> Round2Stats:
    """Round-2 statistics of a block of features, given the global class means. A torch
    tensor is computed on its own device (ncserve.metrics.torch_stats)."""
    if _is_torch(h_NP):  # computed on the tensor's device (ncserve.metrics.torch_stats)
        from ncserve.metrics import torch_stats

        return torch_stats.round2_stats(h_NP, y_N, class_means, w_KP, b_K)
    h_NP = np.asarray(h_NP)
    y_N = np.asarray(y_N)
    K, P = class_means.num_classes, class_means.feature_dim
    check_features(h_NP, y_N, K)
    if h_NP.shape[1] != P:
        raise MetricInputError(
            f"features have feature_dim {h_NP.shape[1]} but the class means have {P}"
        )
    w64 = np.asarray(w_KP, dtype=np.float64)
    if w64.shape != (K, P):
        raise MetricInputError(f"weight must have shape (K, P) = {(K, P)}, got {w64.shape}")
    b64 = np.zeros(K) if b_K is None else np.asarray(b_K, dtype=np.float64)
    if b64.shape != (K,):
        raise MetricInputError(f"bias must have shape (K,) = {(K,)}, got {b64.shape}")

    mubar_KP = class_means.centered()
    mean_sq_K = np.einsum("kp,kp->k", mubar_KP, mubar_KP)
    projected = K <= P
    d = Round2Stats.scatter_dim(K, P)
    # One product per block gives both the projections q = M^T r and r.w_k:
    # (h - mu_G).mubar_k = q_k + (mubar_y.mubar_k) and h.w_k = r.w_k + (mu_y.w_k), where the
    # second terms are K x K lookup tables (K <= P only; for K > P they would not fit, so the
    # product is taken with h - mu_G directly).
    both_2KP = np.concatenate([mubar_KP, w64])
    if projected:
        offsets_K2K = class_means.means_KP @ both_2KP.T
        offsets_K2K[:, :K] -= class_means.global_mean_P @ mubar_KP.T
        offsets_K2K[:, K:] += b64
    else:
        offsets_2K = np.concatenate([np.zeros(K), class_means.global_mean_P @ w64.T + b64])
    N = h_NP.shape[0]
    rows = min(block_rows(P, N), max(16, _BLOCK_ELEMENTS_WIDE // (2 * K)))
    order = _ClassOrder(y_N.astype(np.intp, copy=False))
    both_P2K = np.ascontiguousarray(both_2KP.T)

    def accumulate(part: slice) -> Round2Stats:
        scatter = np.zeros((d, d))
        sq_resid_K = np.zeros(K)
        agree = correct = 0
        gather = _RowGather(h_NP, rows)
        scores_buf = np.empty((rows, 2 * K))
        for block in order.blocks(part, rows):
            r_NP = gather(block.rows_B)
            scores_N2K = scores_buf[: r_NP.shape[0]]
            y = block.labels_B
            if projected:
                _subtract_rows(r_NP, block, class_means.means_KP[block.classes_J])
                sq_resid_K[block.classes_J] += _class_sq_norms(r_NP, block)
                np.matmul(r_NP, both_P2K, out=scores_N2K)
                q_NK = scores_N2K[:, :K]
                scatter += q_NK.T @ q_NK
                scores_N2K += offsets_K2K[y]
            else:
                r_NP -= class_means.global_mean_P
                np.matmul(r_NP, both_P2K, out=scores_N2K)
                scores_N2K += offsets_2K
                _subtract_rows(r_NP, block, mubar_KP[block.classes_J])
                sq_resid_K[block.classes_J] += _class_sq_norms(r_NP, block)
                scatter += r_NP.T @ r_NP
            # argmin_k ||h - mu_k||^2 == argmin_k ||mubar_k||^2 - 2 (h - mu_G).mubar_k
            nearest_N = np.argmin(mean_sq_K - 2.0 * scores_N2K[:, :K], axis=1)
            predicted_N = np.argmax(scores_N2K[:, K:], axis=1)
            agree += int(np.count_nonzero(predicted_N == nearest_N))
            correct += int(np.count_nonzero(predicted_N == y))
        return Round2Stats(part.stop - part.start, scatter, sq_resid_K, agree, correct)

    total = Round2Stats.zeros(K, P)
    for part_stats in _map_parts(accumulate, N, P):
        total = total.merge(part_stats)
    if not (np.isfinite(total.scatter).all() and np.isfinite(total.sq_resid_K).all()):
        raise _non_finite_error(h_NP)
    return total

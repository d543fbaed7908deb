"""Saved-features files (.npz) that ``ncserve compute`` and ``ncserve push`` read.

Keys: ``features`` (N x P), ``labels`` (N, integers), ``weight`` (K x P), ``bias`` (K,
optional), ``num_classes`` (optional, defaults to K of ``weight``). Every problem raises
FeaturesFileError with the file name and what was wrong.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REQUIRED_KEYS = ("features", "labels", "weight")


class FeaturesFileError(ValueError):
    """A features file that cannot be used; the message starts with the file name."""


@dataclass(frozen=True)
class FeaturesFile:
    path: Path
    features_NP: np.ndarray
    labels_N: np.ndarray
    weight_KP: np.ndarray
    bias_K: np.ndarray | None
    num_classes: int

    @property
    def feature_dim(self) -> int:
        return int(self.features_NP.shape[1])


def _fail(path: Path, problem: str) -> FeaturesFileError:
    return FeaturesFileError(f"{path}: {problem}")


def _finite(path: Path, name: str, arr: np.ndarray) -> None:
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise _fail(path, f"'{name}' must be real numbers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        where = np.argwhere(~np.isfinite(arr))[0]
        raise _fail(
            path, f"'{name}' contains NaN or Inf (first at index {tuple(int(i) for i in where)})"
        )


def load_features(path: str | Path) -> FeaturesFile:
    """Read and validate one features file."""
    path = Path(path)
    if not path.is_file():
        raise _fail(path, "no such file")
    if not zipfile.is_zipfile(path):
        raise _fail(path, "not a .npz archive (not a zip file; write it with numpy.savez)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {key: archive[key] for key in archive.files}
    except (
        zipfile.BadZipFile,
        OSError,
        ValueError,
        EOFError,
        KeyError,
        MemoryError,
        NotImplementedError,
    ) as exc:
        # MemoryError: an .npy header declaring a shape far larger than its data (numpy
        # allocates the declared size before it reads). NotImplementedError: zipfile's
        # answer to a member needing a zip version or compression it does not know.
        raise _fail(path, f"not a readable .npz archive ({type(exc).__name__}: {exc})") from None
    missing = [key for key in REQUIRED_KEYS if key not in arrays]
    if missing:
        raise _fail(
            path,
            f"missing key(s) {', '.join(repr(m) for m in missing)}; found "
            f"{sorted(arrays) or 'none'} (needs features, labels, weight; bias, num_classes optional)",
        )
    features, labels, weight = arrays["features"], arrays["labels"], arrays["weight"]
    bias = arrays.get("bias")
    if features.ndim != 2:
        raise _fail(path, f"'features' must be 2-D (N x P), got shape {features.shape}")
    if weight.ndim != 2:
        raise _fail(path, f"'weight' must be 2-D (K x P), got shape {weight.shape}")
    if weight.shape[1] != features.shape[1]:
        raise _fail(
            path,
            f"'weight' has {weight.shape[1]} columns but 'features' has feature dim "
            f"{features.shape[1]}",
        )
    if labels.ndim != 1 or labels.shape[0] != features.shape[0]:
        raise _fail(
            path,
            f"'labels' must be 1-D with {features.shape[0]} entries (one per feature row), "
            f"got shape {labels.shape}",
        )
    if labels.size and np.issubdtype(labels.dtype, np.floating):
        if not np.isfinite(labels).all() or not np.all(labels == np.round(labels)):
            raise _fail(path, "'labels' must be integers")
        labels = labels.astype(np.int64)
    if not np.issubdtype(labels.dtype, np.integer):
        raise _fail(path, f"'labels' must be integers, got dtype {labels.dtype}")
    K = weight.shape[0]
    if "num_classes" in arrays:
        nc = arrays["num_classes"]
        if nc.shape not in ((), (1,)) or not np.issubdtype(nc.dtype, np.integer):
            raise _fail(path, f"'num_classes' must be one integer, got {nc!r}")
        if int(nc.reshape(())) != K:
            raise _fail(path, f"'num_classes' is {int(nc.reshape(()))} but 'weight' has {K} rows")
    if K < 2:
        raise _fail(path, f"'weight' must have at least 2 rows (classes), got {K}")
    if bias is not None and bias.shape != (K,):
        raise _fail(path, f"'bias' must have shape ({K},), got {bias.shape}")
    for name, arr in (("features", features), ("weight", weight), ("bias", bias)):
        if arr is not None:
            _finite(path, name, arr)
    if labels.size:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= K:
            bad = lo if lo < 0 else hi
            raise _fail(path, f"label {bad} out of range [0, {K - 1}] for {K} classes")
    return FeaturesFile(path, features, labels, weight, bias, K)

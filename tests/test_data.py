"""Dataset readers on small files written here, plus the built-in datasets."""

from __future__ import annotations

import gzip
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from launcher.data import (
    DATASET_NAMES,
    DatasetError,
    DatasetSplits,
    load_dataset,
    measurement_indices,
)

RNG = np.random.default_rng(0)


def assert_standardized_from(split_x: torch.Tensor, raw: np.ndarray) -> None:
    """x is an increasing per-channel affine map of the raw pixels with 0 mean, unit std."""
    x = split_x.numpy().astype(np.float64)
    for c in range(raw.shape[1]):
        raw_c, x_c = raw[:, c].ravel().astype(np.float64), x[:, c].ravel()
        std = raw_c.std()
        np.testing.assert_allclose(x_c, (raw_c - raw_c.mean()) / std, rtol=1e-5, atol=1e-5)


# --- IDX -----------------------------------------------------------------------------


def idx_bytes(array: np.ndarray, type_code: int = 0x08) -> bytes:
    header = bytes([0, 0, type_code, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(">u1" if type_code == 0x08 else array.dtype).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def write_idx_set(folder: Path, prefix: str, n: int, gz: bool = False) -> tuple[np.ndarray, ...]:
    images = RNG.integers(0, 256, size=(n, 5, 7), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    write(folder / f"{prefix}-images-idx3-ubyte", idx_bytes(images), gz)
    write(folder / f"{prefix}-labels-idx1-ubyte", idx_bytes(labels), gz)
    return images, labels


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("name", ["mnist", "fashionmnist"])
def test_idx_train_and_test_split(tmp_path: Path, name: str, gz: bool) -> None:
    images, labels = write_idx_set(tmp_path, "train", 30, gz)
    test_images, test_labels = write_idx_set(tmp_path, "t10k", 10, gz)
    data = load_dataset(name, tmp_path)
    assert isinstance(data, DatasetSplits) and data.name == name
    assert data.num_classes == 10 and data.input_shape == (1, 5, 7)
    x, y = data.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.shape == (30, 1, 5, 7)
    assert y.tolist() == labels.tolist()
    assert_standardized_from(x, images[:, None])
    assert data.holdout is not None
    hx, hy = data.holdout.tensors
    assert hy.tolist() == test_labels.tolist()
    # The held-out split reuses the training statistics.
    mean, std = images.astype(np.float64).mean(), images.astype(np.float64).std()
    np.testing.assert_allclose(hx.numpy()[:, 0], (test_images - mean) / std, rtol=1e-5, atol=1e-5)


def test_idx_without_test_files_has_no_holdout_and_torchvision_layout_is_found(
    tmp_path: Path,
) -> None:
    write_idx_set(tmp_path / "FashionMNIST" / "raw", "train", 12)
    data = load_dataset("fashionmnist", tmp_path)
    assert len(data.train) == 12 and data.holdout is None


def test_holdout_fraction_is_carved_per_class_from_train(tmp_path: Path) -> None:
    write_idx_set(tmp_path, "train", 40)
    write_idx_set(tmp_path, "t10k", 10)
    data = load_dataset("mnist", tmp_path, holdout_fraction=0.25, seed=3)
    assert data.holdout is not None
    assert len(data.train) == 30 and len(data.holdout) == 10
    assert torch.bincount(data.holdout.tensors[1]).tolist() == [1] * 10


def idx_error(tmp_path: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset("mnist", tmp_path)
    return str(info.value)


def test_idx_missing_files_name_what_is_expected(tmp_path: Path) -> None:
    message = idx_error(tmp_path)
    assert "train-images-idx3-ubyte[.gz] not found in" in message
    assert str(tmp_path) in message and "t10k-labels-idx1-ubyte" in message


def test_idx_bad_magic(tmp_path: Path) -> None:
    write_idx_set(tmp_path, "train", 4)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(b"\x12\x34" + path.read_bytes()[2:])
    message = idx_error(tmp_path)
    assert str(path) in message and "bad IDX magic number 0x12340803" in message


def test_idx_labels_and_images_swapped(tmp_path: Path) -> None:
    write_idx_set(tmp_path, "train", 4)
    images, labels = tmp_path / "train-images-idx3-ubyte", tmp_path / "train-labels-idx1-ubyte"
    image_bytes = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    labels.write_bytes(image_bytes)
    assert "IDX file has 1 dimensions, expected 3" in idx_error(tmp_path)


def test_idx_truncated_data(tmp_path: Path) -> None:
    write_idx_set(tmp_path, "train", 20)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-10])
    message = idx_error(tmp_path)
    assert f"{path}: truncated IDX data: header declares shape (20, 5, 7) (700 bytes)" in message
    assert "found 690 bytes" in message


def test_idx_truncated_header_and_trailing_bytes(tmp_path: Path) -> None:
    write_idx_set(tmp_path, "train", 20)
    path = tmp_path / "train-labels-idx1-ubyte"
    original = path.read_bytes()
    path.write_bytes(original[:6])
    assert "truncated IDX header: 6 bytes, need 8" in idx_error(tmp_path)
    path.write_bytes(original + b"xyz")
    assert "has 3 bytes after the 20 bytes its header (20,) declares" in idx_error(tmp_path)


def test_idx_truncated_and_invalid_gzip(tmp_path: Path) -> None:
    write_idx_set(tmp_path, "train", 20, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert f"{path}: gzip stream is truncated" in idx_error(tmp_path)
    path.write_bytes(b"this is not gzip at all")
    assert f"{path}: not a valid gzip file" in idx_error(tmp_path)


def test_idx_count_mismatch_and_label_range(tmp_path: Path) -> None:
    write_idx_set(tmp_path, "train", 20)
    labels_path = tmp_path / "train-labels-idx1-ubyte"
    labels_path.write_bytes(idx_bytes(np.zeros(19, dtype=np.uint8)))
    assert "19 labels for the 20 images" in idx_error(tmp_path)
    bad = np.zeros(20, dtype=np.uint8)
    bad[3] = 10
    labels_path.write_bytes(idx_bytes(bad))
    assert f"{labels_path}: label 10 at index 3 is outside [0, 10)" in idx_error(tmp_path)


def test_idx_half_a_test_split(tmp_path: Path) -> None:
    write_idx_set(tmp_path, "train", 10)
    write_idx_set(tmp_path, "t10k", 10)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    assert "but not t10k-labels-idx1-ubyte[.gz] beside it" in idx_error(tmp_path)


# --- CIFAR ---------------------------------------------------------------------------


def cifar_batch(n: int, label_key: bytes | str, num_classes: int) -> tuple[dict, np.ndarray]:
    data = RNG.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = [int(v) for v in RNG.integers(0, num_classes, size=n)]
    return {label_key: labels, b"data" if isinstance(label_key, bytes) else "data": data}, data


def write_pickle(path: Path, obj: object, protocol: int = 2) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))


def write_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int], list[int]]:
    folder = root / "cifar-10-batches-py"
    datas, labels = [], []
    for i in range(1, 6):
        # Bytes keys like the official Python-2 files, alternating pickle protocols.
        batch, data = cifar_batch(per_batch, b"labels", 10)
        write_pickle(folder / f"data_batch_{i}", batch, protocol=2 if i % 2 else 5)
        datas.append(data)
        labels += batch[b"labels"]
    test, _ = cifar_batch(3, "labels", 10)
    write_pickle(folder / "test_batch", test, protocol=4)
    return np.concatenate(datas), labels, test["labels"]


def test_cifar10_batches(tmp_path: Path) -> None:
    data, labels, test_labels = write_cifar10(tmp_path)
    split = load_dataset("cifar10", tmp_path)
    assert split.num_classes == 10 and split.input_shape == (3, 32, 32)
    x, y = split.train.tensors
    assert x.shape == (20, 3, 32, 32) and y.tolist() == labels
    assert_standardized_from(x, data.reshape(-1, 3, 32, 32))
    assert split.holdout is not None and split.holdout.tensors[1].tolist() == test_labels


def test_cifar10_folder_itself_can_be_data_dir(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    split = load_dataset("cifar10", tmp_path / "cifar-10-batches-py")
    assert len(split.train) == 20 and split.holdout is None


def cifar_error(root: Path, name: str = "cifar10") -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset(name, root)
    return str(info.value)


def test_cifar10_missing_files(tmp_path: Path) -> None:
    message = cifar_error(tmp_path)
    assert "data_batch_1 not found in" in message and "test_batch" in message
    write_cifar10(tmp_path)
    missing = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    assert f"{missing} is missing" in cifar_error(tmp_path)


def test_cifar10_truncated_pickle(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    assert f"{path}: truncated pickle" in cifar_error(tmp_path)


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.system, ("echo pwned",))


def test_cifar_pickle_cannot_run_code(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    write_pickle(path, {b"data": _RunsCode(), b"labels": [0]})
    message = cifar_error(tmp_path)
    assert f"{path}: not a CIFAR python pickle (refusing to load" in message
    assert "system" in message


def test_cifar_wrong_contents(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    path = tmp_path / "cifar-10-batches-py" / "data_batch_4"
    write_pickle(path, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    assert "'data' rows have 100 values, expected 3072" in cifar_error(tmp_path)
    write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8)})
    assert f"{path}: missing key 'labels'" in cifar_error(tmp_path)
    write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]})
    assert f"{path}: label 10 at index 1 is outside [0, 10)" in cifar_error(tmp_path)
    write_pickle(path, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    assert f"{path}: 1 labels for 2 images" in cifar_error(tmp_path)
    write_pickle(path, [1, 2, 3])
    assert "expected a pickled dict, found list" in cifar_error(tmp_path)


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    train, data = cifar_batch(6, b"fine_labels", 100)
    train[b"fine_labels"][0] = 99
    train[b"coarse_labels"] = [0] * 6
    write_pickle(folder / "train", train)
    test, _ = cifar_batch(2, b"fine_labels", 100)
    write_pickle(folder / "test", test)
    split = load_dataset("cifar100", tmp_path)
    assert split.num_classes == 100
    assert split.train.tensors[1].tolist() == train[b"fine_labels"]
    assert_standardized_from(split.train.tensors[0], data.reshape(-1, 3, 32, 32))
    assert split.holdout is not None and len(split.holdout) == 2
    train[b"fine_labels"][2] = 100
    write_pickle(folder / "train", train)
    assert "label 100 at index 2 is outside [0, 100)" in cifar_error(tmp_path, "cifar100")


# --- image folders -------------------------------------------------------------------


def write_image(path: Path, array: np.ndarray, fmt: str = "PNG") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format=fmt)


def test_image_folder_grayscale(tmp_path: Path) -> None:
    pixels = {}
    for cls in ("b_cat", "a_dog", "c_eel"):
        for i in range(2):
            array = RNG.integers(0, 256, size=(5, 6), dtype=np.uint8)
            write_image(tmp_path / cls / f"{i}.png", array)
            pixels[(cls, i)] = array
    (tmp_path / "a_dog" / "notes.txt").write_text("not an image")
    split = load_dataset("imagefolder", tmp_path)
    assert split.num_classes == 3 and split.input_shape == (1, 5, 6)
    x, y = split.train.tensors
    # Classes are numbered in sorted folder order, files in sorted name order.
    assert y.tolist() == [0, 0, 1, 1, 2, 2]
    raw = np.stack([pixels[(c, i)] for c in ("a_dog", "b_cat", "c_eel") for i in range(2)])
    assert_standardized_from(x, raw[:, None])
    assert split.holdout is None


def test_image_folder_color_and_test_split(tmp_path: Path) -> None:
    write_image(tmp_path / "train" / "red" / "0.png", np.full((4, 4, 3), [255, 0, 0], np.uint8))
    write_image(
        tmp_path / "train" / "red" / "1.jpg", np.full((4, 4, 3), [250, 5, 0], np.uint8), "JPEG"
    )
    write_image(tmp_path / "train" / "gray" / "0.png", np.full((4, 4), 128, np.uint8))
    write_image(tmp_path / "test" / "red" / "0.png", np.full((4, 4, 3), [255, 0, 0], np.uint8))
    write_image(tmp_path / "test" / "gray" / "0.PNG", np.full((4, 4), 128, np.uint8))
    split = load_dataset("imagefolder", tmp_path)
    assert split.input_shape == (3, 4, 4) and split.num_classes == 2
    # "gray" sorts before "red"; gray pixels are replicated to three channels.
    assert split.train.tensors[1].tolist() == [0, 1, 1]
    assert split.holdout is not None
    hx, hy = split.holdout.tensors
    assert hy.tolist() == [0, 1]
    # Same pixels, same standardized values in both splits.
    x = split.train.tensors[0]
    torch.testing.assert_close(hx, x[:2], rtol=0, atol=0)
    assert not torch.equal(x[0, 0], x[0, 1])  # channels are standardized separately


def folder_error(root: Path) -> str:
    with pytest.raises(DatasetError) as info:
        load_dataset("imagefolder", root)
    return str(info.value)


def test_image_folder_errors(tmp_path: Path) -> None:
    assert "no class subfolders found" in folder_error(tmp_path)
    write_image(tmp_path / "one" / "0.png", np.zeros((4, 4), np.uint8))
    assert "found 1 class folder (['one']); need at least 2" in folder_error(tmp_path)
    (tmp_path / "two").mkdir()
    assert f"{tmp_path / 'two'}: class folder has no .png/.jpg/.jpeg images" in folder_error(
        tmp_path
    )
    write_image(tmp_path / "two" / "0.png", np.zeros((5, 4), np.uint8))
    assert "0.png: image is 4x5 but the others are 4x4" in folder_error(tmp_path)
    write_image(tmp_path / "two" / "0.png", np.zeros((4, 4), np.uint8))
    corrupt = tmp_path / "two" / "1.png"
    corrupt.write_bytes(b"\x89PNG garbage")
    assert f"{corrupt}: not a readable PNG/JPEG image" in folder_error(tmp_path)


def test_image_folder_test_classes_must_be_training_classes(tmp_path: Path) -> None:
    for cls in ("a", "b"):
        write_image(tmp_path / "train" / cls / "0.png", np.zeros((4, 4), np.uint8))
    write_image(tmp_path / "val" / "z" / "0.png", np.zeros((4, 4), np.uint8))
    assert "class folders ['z'] are not among the training classes" in folder_error(tmp_path)


# --- built-in datasets ---------------------------------------------------------------


def test_mnist5k_is_the_5000_real_digits() -> None:
    split = load_dataset("mnist5k")
    x, y = split.train.tensors
    assert x.shape == (5000, 1, 28, 28) and split.input_shape == (1, 28, 28)
    assert split.num_classes == 10 and torch.bincount(y).tolist() == [500] * 10
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    assert split.holdout is None
    assert load_dataset("mnist5k", holdout_fraction=0.1).holdout is not None


def test_digits() -> None:
    split = load_dataset("digits", holdout_fraction=0.2, seed=0)
    assert split.input_shape == (1, 8, 8) and split.num_classes == 10
    assert split.holdout is not None
    assert len(split.train) + len(split.holdout) == 1797


def test_mnist1d_is_generated_offline_and_leaves_global_rngs_alone() -> None:
    random.seed(123)
    np.random.seed(123)
    expected_python, expected_numpy = random.random(), np.random.rand()
    random.seed(123)
    np.random.seed(123)
    split = load_dataset("mnist1d")
    assert (random.random(), np.random.rand()) == (expected_python, expected_numpy)
    assert split.input_shape == (40,) and split.num_classes == 10
    assert len(split.train) == 4000 and split.holdout is not None and len(split.holdout) == 1000
    assert torch.equal(split.train.tensors[0], load_dataset("mnist1d").train.tensors[0])


def test_synthetic_mixture() -> None:
    split = load_dataset("synthetic", num_classes=4, feature_dim=6, num_samples=103, seed=5)
    x, y = split.train.tensors
    assert x.shape == (103, 6) and split.input_shape == (6,) and split.num_classes == 4
    assert sorted(torch.bincount(y).tolist()) == [25, 26, 26, 26]
    again = load_dataset("synthetic", num_classes=4, feature_dim=6, num_samples=103, seed=5)
    assert torch.equal(again.train.tensors[0], x)
    other = load_dataset("synthetic", num_classes=4, feature_dim=6, num_samples=103, seed=6)
    assert not torch.equal(other.train.tensors[0], x)
    with pytest.raises(DatasetError, match="synthetic: num_samples must be an integer >= 4, got 3"):
        load_dataset("synthetic", num_classes=4, num_samples=3)


def test_load_dataset_argument_errors(tmp_path: Path) -> None:
    assert issubclass(DatasetError, ValueError)
    with pytest.raises(DatasetError, match=r"dataset must be one of mnist5k, digits.*'imagenet'"):
        load_dataset("imagenet")
    with pytest.raises(DatasetError, match="dataset 'cifar10' is read from files: give data_dir"):
        load_dataset("cifar10")
    with pytest.raises(DatasetError, match=r"data_dir .*nope is not a directory"):
        load_dataset("mnist", tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"holdout_fraction must be in \[0, 1\), got 1.0"):
        load_dataset("synthetic", holdout_fraction=1.0)
    assert set(DATASET_NAMES) >= {"mnist5k", "digits", "mnist1d", "synthetic", "imagefolder"}


# --- measurement split ---------------------------------------------------------------


def test_measurement_indices_are_balanced_sorted_and_seeded() -> None:
    labels = np.repeat(np.arange(4), [10, 7, 12, 9])
    picked = measurement_indices(labels, 5, seed=1)
    assert picked.dtype == np.int64 and np.all(np.diff(picked) > 0)
    assert np.bincount(labels[picked]).tolist() == [5, 5, 5, 5]
    assert np.array_equal(picked, measurement_indices(torch.from_numpy(labels), 5, seed=1))
    assert not np.array_equal(picked, measurement_indices(labels, 5, seed=2))
    assert np.array_equal(measurement_indices(labels, None, seed=0), np.arange(len(labels)))
    with pytest.raises(ValueError, match="per_class=8 but class 1 has only 7 samples"):
        measurement_indices(labels, 8, seed=0)
    with pytest.raises(ValueError, match="per_class must be a positive integer or None, got 0"):
        measurement_indices(labels, 0, seed=0)

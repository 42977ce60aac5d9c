"""Tests for trainers.data: loaders (on small fake datasets written to tmp_path, plus the Debian Fashion-MNIST
files when installed), deterministic splits, augmentations and argument errors."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import cifar, stl10

from trainers.data import (
    DATASETS,
    DEBIAN_FASHION_MNIST_DIR,
    DatasetInfo,
    TensorImageDataset,
    TransformedDataset,
    TwoViewDataset,
    contrastive_transform,
    eval_transform,
    load_splits,
    read_idx,
    tensor_dataset_from_hwc,
)

FMNIST = DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,))
RGB32 = DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
N_TRAIN, N_TEST = 200, 50  # sizes of the fake Fashion-MNIST

needs_debian = pytest.mark.skipif(
    not (Path(DEBIAN_FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"Debian package dataset-fashion-mnist is not installed ({DEBIAN_FASHION_MNIST_DIR} is missing)",
)


# ---------------------------------------------------------------------------------------------- helpers


def write_idx(path: Path, array: np.ndarray) -> None:
    """An idx file of unsigned bytes, gzipped when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def write_fake_fmnist(folder: Path, suffix: str = ".gz") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10)


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    write_fake_fmnist(tmp_path)
    return tmp_path


def ids(dataset: object) -> set[int]:
    return set(dataset.source_indices.tolist())  # type: ignore[attr-defined]


def write_image_tree(root: Path, counts: dict[str, int], classes: tuple[str, ...] = ("cat", "dog")) -> None:
    """root/<split>/<class>/<k>.png, 40x30 RGB, every pixel 40 * class_index + k (to check labels)."""
    for split, n in counts.items():
        for class_index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for k in range(n):
                pixels = np.full((30, 40, 3), 40 * class_index + k, dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{k}.png")


# ---------------------------------------------------------------------------------------- fashion-mnist


@needs_debian
def test_debian_fashion_mnist_loads_with_expected_shapes() -> None:
    splits = load_splits("fashion_mnist", download=False, val_size=5000)
    assert splits.info == FMNIST
    assert (len(splits.train), len(splits.val), len(splits.test)) == (55000, 5000, 10000)
    for dataset in (splits.train, splits.val, splits.test):
        assert dataset.images.dtype == torch.uint8
        assert dataset.images.shape[1:] == (1, 28, 28)
    assert torch.equal(torch.unique(splits.test.labels), torch.arange(10))
    image, label = splits.test[0]
    assert image.shape == (1, 28, 28) and isinstance(label, int)
    assert read_idx(Path(DEBIAN_FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").shape == (60000, 28, 28)


def test_fake_fashion_mnist_loads_from_root_with_gzipped_files(fake_fmnist: Path) -> None:
    splits = load_splits("fashion_mnist", str(fake_fmnist), val_size=40, download=False)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (N_TRAIN - 40, 40, N_TEST)
    originals = read_idx(fake_fmnist / "train-images-idx3-ubyte.gz")
    # Every carved sample is the image its source index names.
    assert torch.equal(splits.val.images[:, 0], originals[splits.val.source_indices])
    assert torch.equal(splits.val.labels, splits.val.source_indices % 10)


def test_fashion_mnist_found_in_torchvision_layout_with_plain_files(tmp_path: Path) -> None:
    write_fake_fmnist(tmp_path / "FashionMNIST" / "raw", suffix="")
    splits = load_splits("fashion_mnist", str(tmp_path), val_size=10, download=False)
    assert len(splits.train) + len(splits.val) == N_TRAIN
    assert len(splits.test) == N_TEST


def test_splits_are_deterministic_disjoint_and_change_with_split_seed(fake_fmnist: Path) -> None:
    torch.manual_seed(1)
    first = load_splits("fashion_mnist", str(fake_fmnist), val_size=40, download=False)
    torch.manual_seed(2)  # the training seed must not move the split
    rng_state = torch.get_rng_state()
    second = load_splits("fashion_mnist", str(fake_fmnist), val_size=40, download=False)
    assert torch.equal(torch.get_rng_state(), rng_state), "splitting must not consume the global RNG"
    for part in ("pretrain", "train", "val", "test"):
        assert torch.equal(getattr(first, part).source_indices, getattr(second, part).source_indices)

    assert len(ids(first.val)) == 40
    assert not ids(first.val) & ids(first.train)
    assert not ids(first.val) & ids(first.pretrain)
    assert ids(first.val) | ids(first.train) == set(range(N_TRAIN))
    assert ids(first.pretrain) == ids(first.train)

    other = load_splits("fashion_mnist", str(fake_fmnist), val_size=40, split_seed=1, download=False)
    assert ids(other.val) != ids(first.val)


def test_subsets_have_requested_sizes_and_leave_val_alone(fake_fmnist: Path) -> None:
    full = load_splits("fashion_mnist", str(fake_fmnist), val_size=40, download=False)
    sub = load_splits(
        "fashion_mnist",
        str(fake_fmnist),
        val_size=40,
        pretrain_subset=100,
        train_subset=30,
        test_subset=20,
        download=False,
    )
    assert (len(sub.pretrain), len(sub.train), len(sub.test)) == (100, 30, 20)
    assert torch.equal(sub.val.source_indices, full.val.source_indices)
    assert ids(sub.train) <= ids(sub.pretrain)  # first-k of one permutation: the smaller is nested
    assert not ids(sub.train) & ids(sub.val)
    assert ids(sub.test) < set(range(N_TEST))
    again = load_splits("fashion_mnist", str(fake_fmnist), val_size=40, train_subset=30, download=False)
    assert torch.equal(again.train.source_indices, sub.train.source_indices)


def test_subset_larger_than_its_pool_is_rejected(fake_fmnist: Path) -> None:
    with pytest.raises(ValueError, match=r"train_subset must be <= the 160 samples .*got 161"):
        load_splits("fashion_mnist", str(fake_fmnist), val_size=40, train_subset=161, download=False)


def test_val_size_not_smaller_than_training_set_is_rejected(fake_fmnist: Path) -> None:
    with pytest.raises(ValueError, match=rf"val_size must be < the {N_TRAIN} training images.*got {N_TRAIN}"):
        load_splits("fashion_mnist", str(fake_fmnist), val_size=N_TRAIN, download=False)


def test_read_idx_round_trips_plain_and_gzip(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "a-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        assert torch.equal(read_idx(tmp_path / name), torch.from_numpy(array))


def _truncated(path: Path) -> None:
    write_idx(path, np.zeros((10, 28, 28)))
    path.write_bytes(path.read_bytes()[:-5])


def _bad_magic(path: Path) -> None:
    path.write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")


def _wrong_type_code(path: Path) -> None:
    path.write_bytes(b"\x00\x00\x0d\x01" + struct.pack(">I", 1) + b"\x00\x00\x00\x00")


def _not_gzip(path: Path) -> None:
    path.with_suffix(".gz").write_bytes(b"this is not gzip data")


@pytest.mark.parametrize("corrupt", [_truncated, _bad_magic, _wrong_type_code])
def test_read_idx_rejects_corrupted_file_naming_it(tmp_path: Path, corrupt: object) -> None:
    path = tmp_path / "broken-idx3-ubyte"
    corrupt(path)  # type: ignore[operator]
    with pytest.raises(ValueError, match="broken-idx3-ubyte"):
        read_idx(path)


def test_read_idx_rejects_bad_gzip_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "broken-idx3-ubyte.gz"
    _not_gzip(path)
    with pytest.raises(ValueError, match=r"broken-idx3-ubyte\.gz"):
        read_idx(path)


def test_corrupted_fashion_mnist_file_fails_load_with_its_name(fake_fmnist: Path) -> None:
    _truncated(fake_fmnist / "t10k-images-idx3-ubyte.gz")
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz"):
        load_splits("fashion_mnist", str(fake_fmnist), val_size=40, download=False)


# ------------------------------------------------------------------------------------------ cifar / stl


def test_tensor_dataset_from_hwc_moves_channels_first() -> None:
    data = np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    dataset = tensor_dataset_from_hwc(data, [4, 5, 6])
    assert dataset.images.shape == (3, 3, 32, 32) and dataset.images.dtype == torch.uint8
    assert dataset.images[1, 2, 7, 9] == data[1, 7, 9, 2]
    assert dataset.labels.tolist() == [4, 5, 6] and dataset.labels.dtype == torch.int64


def test_cifar10_from_fake_batches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fake batches cannot match the real files' md5 sums, which torchvision checks before loading.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    # torchvision reads these pickles with encoding="latin1" and str keys, as in the real Python 2 files.
    batches = [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]
    flat: dict[str, np.ndarray] = {}
    for name in batches:
        flat[name] = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": flat[name], "labels": list(range(4))}, handle)
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, handle)

    splits = load_splits("cifar10", str(tmp_path), val_size=5, download=False)
    assert splits.info.channels == 3 and splits.info.image_size == 32
    assert (len(splits.train), len(splits.val), len(splits.test)) == (15, 5, 4)
    assert splits.test.images.shape == (4, 3, 32, 32)
    # CIFAR rows are channel-major 32x32 planes, so the CHW tensor is the row reshaped.
    assert torch.equal(splits.test.images[2], torch.from_numpy(flat["test_batch"][2].reshape(3, 32, 32)))


def test_stl10_pretrain_is_train_minus_val_plus_unlabeled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stl10, "check_integrity", lambda *args, **kwargs: True)
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"train": 20, "unlabeled": 30, "test": 10}
    images = {name: rng.integers(0, 256, (n, 3, 96, 96), dtype=np.uint8) for name, n in sizes.items()}
    for name, array in images.items():
        # STL-10 stores each channel column-major; torchvision transposes H and W back on load.
        (folder / f"{name}_X.bin").write_bytes(array.transpose(0, 1, 3, 2).tobytes())
    for name, n in (("train", 20), ("test", 10)):
        (folder / f"{name}_y.bin").write_bytes((np.arange(n) % 10 + 1).astype(np.uint8).tobytes())

    splits = load_splits("stl10", str(tmp_path), val_size=5, download=False)
    assert splits.info.image_size == 96 and splits.info.channels == 3
    assert (len(splits.train), len(splits.val), len(splits.test), len(splits.pretrain)) == (15, 5, 10, 45)
    assert ids(splits.pretrain) == ids(splits.train) | set(range(20, 50))
    assert not ids(splits.val) & ids(splits.pretrain)
    assert int((splits.pretrain.labels == -1).sum()) == 30
    position = splits.pretrain.source_indices.tolist().index(20 + 7)
    assert torch.equal(splits.pretrain.images[position], torch.from_numpy(images["unlabeled"][7]))
    assert torch.equal(splits.test.images[3], torch.from_numpy(images["test"][3]))


# ------------------------------------------------------------------------------------------ imagefolder


def test_imagefolder_carves_val_and_resizes(tmp_path: Path) -> None:
    write_image_tree(tmp_path, {"train": 6, "test": 2})
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    splits = load_splits("imagefolder", str(tmp_path), val_size=4, image_size=16)
    assert splits.info.num_classes == 2 and splits.info.channels == 3 and splits.info.image_size == 16
    assert (len(splits.train), len(splits.val), len(splits.test)) == (8, 4, 4)
    assert not ids(splits.train) & ids(splits.val)
    for index in range(len(splits.test)):
        image, label = splits.test[index]
        assert image.shape == (3, 16, 16) and image.dtype == torch.uint8
        # Labels follow sorted class names (cat=0, dog=1); test files 0.png, 1.png per class.
        assert int(image[0, 8, 8]) == 40 * label + index % 2


def test_imagefolder_uses_val_folder_and_default_size(tmp_path: Path) -> None:
    write_image_tree(tmp_path, {"train": 3, "val": 1, "test": 1})
    Image.fromarray(np.zeros((20, 20), dtype=np.uint8), mode="L").save(tmp_path / "train" / "dog" / "gray.png")
    splits = load_splits("imagefolder", str(tmp_path), val_size=10_000)  # unused: val/ exists
    assert (len(splits.train), len(splits.val), len(splits.test)) == (7, 2, 2)
    assert splits.info.image_size == 64
    images = [splits.train[i][0] for i in range(len(splits.train))]
    assert all(image.shape == (3, 64, 64) for image in images)  # grayscale files become RGB


def test_imagefolder_rejects_test_class_unknown_to_train(tmp_path: Path) -> None:
    write_image_tree(tmp_path, {"train": 2, "test": 1})
    write_image_tree(tmp_path, {"test": 1}, classes=("zebra",))
    with pytest.raises(ValueError, match="zebra"):
        load_splits("imagefolder", str(tmp_path), val_size=1)


# --------------------------------------------------------------------------------------- augmentations


def random_image(channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize(("info", "in_size"), [(FMNIST, 28), (RGB32, 32), (RGB32, 45)])
def test_contrastive_transform_output_dtype_and_shape(info: DatasetInfo, in_size: int) -> None:
    transform = contrastive_transform(info, blur_p=0.5)
    for _ in range(20):
        out = transform(random_image(info.channels, in_size))
        assert out.dtype == torch.float32
        assert out.shape == (info.channels, info.image_size, info.image_size)
        assert torch.isfinite(out).all()


def test_two_views_differ_and_seeded_rng_repeats_them() -> None:
    images = torch.stack([random_image(1, 28, seed) for seed in range(4)])
    dataset = TwoViewDataset(TensorImageDataset(images, torch.arange(4)), contrastive_transform(FMNIST))
    torch.manual_seed(0)
    view1, view2, index = dataset[2]
    assert index == 2
    assert not torch.equal(view1, view2)
    torch.manual_seed(0)
    again1, again2, _ = dataset[2]
    assert torch.equal(view1, again1) and torch.equal(view2, again2)


def test_full_crop_without_colour_is_the_eval_image_or_its_mirror() -> None:
    # With scale (1, 1) the crop is the whole image, so only the flip is left random.
    transform = contrastive_transform(RGB32, crop_scale=(1.0, 1.0), color_jitter=0.0, grayscale_p=0.0)
    image = random_image(3, 32)
    expected = eval_transform(RGB32)(image)
    seen_flip = seen_plain = False
    for _ in range(30):
        out = transform(image)
        seen_plain |= torch.allclose(out, expected)
        seen_flip |= torch.allclose(out, expected.flip(-1))
        assert torch.allclose(out, expected) or torch.allclose(out, expected.flip(-1))
    assert seen_plain and seen_flip


def test_grayscale_p_one_makes_channels_equal() -> None:
    transform = contrastive_transform(RGB32, color_jitter=0.0, grayscale_p=1.0)
    out = transform(random_image(3, 32))
    mean, std = torch.tensor(RGB32.mean)[:, None, None], torch.tensor(RGB32.std)[:, None, None]
    pixels = out * std + mean
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)


def test_eval_transform_normalises_exactly() -> None:
    image = torch.tensor([[[0, 255]]], dtype=torch.uint8)
    out = eval_transform(FMNIST)(image)
    expected = torch.tensor([[[-0.2860 / 0.3530, (1 - 0.2860) / 0.3530]]])
    assert torch.allclose(out, expected)


def test_datasets_collate_through_a_dataloader() -> None:
    base = TensorImageDataset(torch.stack([random_image(1, 28, s) for s in range(6)]), torch.arange(6) % 3)
    views = next(iter(DataLoader(TwoViewDataset(base, contrastive_transform(FMNIST)), batch_size=4)))
    assert views[0].shape == views[1].shape == (4, 1, 28, 28)
    assert views[2].tolist() == [0, 1, 2, 3]
    images, labels = next(iter(DataLoader(TransformedDataset(base, eval_transform(FMNIST)), batch_size=6)))
    assert images.dtype == torch.float32 and labels.tolist() == [0, 1, 2, 0, 1, 2]


def test_subset_indexes_tensors_and_keeps_provenance() -> None:
    base = TensorImageDataset(torch.stack([random_image(1, 4, s) for s in range(5)]), torch.arange(5))
    picked = base.subset([3, 1])
    assert picked.labels.tolist() == [3, 1]
    assert picked.source_indices.tolist() == [3, 1]
    assert torch.equal(picked[0][0], base[3][0])
    assert picked.subset([1]).source_indices.tolist() == [1]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"crop_scale": (0.0, 1.0)}, r"crop_scale must .*got \(0\.0, 1\.0\)"),
        ({"crop_scale": (0.8, 0.5)}, r"crop_scale must .*got \(0\.8, 0\.5\)"),
        ({"color_jitter": -0.1}, r"color_jitter must be in \[0, 2\], got -0\.1"),
        ({"grayscale_p": 1.5}, r"grayscale_p must be in \[0, 1\], got 1\.5"),
        ({"blur_p": -1.0}, r"blur_p must be in \[0, 1\], got -1\.0"),
    ],
)
def test_contrastive_transform_rejects_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        contrastive_transform(RGB32, **kwargs)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_dataset_names_value_and_choices() -> None:
    assert DATASETS == ("fashion_mnist", "cifar10", "stl10", "imagefolder")
    with pytest.raises(ValueError, match=r"dataset must be one of \(.*fashion_mnist.*\), got 'mnist'"):
        load_splits("mnist")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"val_size": 0}, "val_size must be a positive int, got 0"),
        ({"val_size": -5}, "val_size must be a positive int, got -5"),
        ({"pretrain_subset": 0}, "pretrain_subset must be None or a positive int, got 0"),
        ({"train_subset": -1}, "train_subset must be None or a positive int, got -1"),
        ({"test_subset": 0}, "test_subset must be None or a positive int, got 0"),
        ({"split_seed": -1}, "split_seed must be a non-negative int, got -1"),
        ({"image_size": 32}, "image_size applies only to dataset 'imagefolder', got 32"),
        ({"root": "/definitely/not/here"}, "root must be an existing directory, got '/definitely/not/here'"),
    ],
)
def test_bad_arguments_fail_before_any_loading(kwargs: dict[str, object], message: str) -> None:
    # cifar10 with download=True would try the network: these must fail before reaching it.
    with pytest.raises(ValueError, match=message):
        load_splits("cifar10", **kwargs)  # type: ignore[arg-type]


def test_imagefolder_requires_root() -> None:
    with pytest.raises(ValueError, match=r"root must be given for dataset 'imagefolder'.*got None"):
        load_splits("imagefolder")


def test_imagefolder_requires_train_and_test_folders(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(ValueError, match=r"missing .*test"):
        load_splits("imagefolder", str(tmp_path))

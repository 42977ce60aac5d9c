"""Datasets, deterministic splits and augmentations for contrastive pretraining and linear probing.

Small datasets (Fashion-MNIST, CIFAR-10, STL-10) are held in memory as uint8 tensors (N, C, H, W): a sample
is a tensor view, so the per-sample cost is the augmentation alone. Image folders are read lazily from disk.

Every split is a pure function of ``split_seed`` (never of the training seed), so all trials of a study tune
on the same validation images and the official test split is only ever reported, never tuned on.
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

DATASETS: tuple[str, ...] = ("fashion_mnist", "cifar10", "stl10", "imagefolder")

DEFAULT_DATA_DIR = "~/.cache/contrastive-study/data"
# Where Debian's `dataset-fashion-mnist` package puts the gzipped idx files.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"
)
DEFAULT_IMAGEFOLDER_SIZE = 64

_FMNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_UBYTE = 0x08  # idx type code of unsigned bytes, the only one Fashion-MNIST uses


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and its augmentations need to know about a dataset."""

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


# Per-channel statistics of the training images, used to normalise inputs. ImageFolder uses ImageNet's
# statistics because the folder's own are unknown before a full pass over it.
_FMNIST_INFO = DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,))
_CIFAR10_INFO = DatasetInfo("cifar10", 10, 3, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_STL10_INFO = DatasetInfo("stl10", 10, 3, 96, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class SubsettableDataset(Protocol):
    """A map-style dataset of (uint8 image (C, H, W), int label) that can cheaply select samples."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> tuple[Tensor, int]: ...

    def subset(self, indices: Sequence[int] | Tensor) -> SubsettableDataset: ...


class TensorImageDataset(Dataset):
    """Images and labels held in memory: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,).

    ``source_indices`` (N,) records where each sample sits in the split it was loaded from, so subsets and
    carve-outs can be checked for determinism and disjointness (images alone can have duplicates).
    """

    def __init__(self, images: Tensor, labels: Tensor, source_indices: Tensor | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W), got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"labels must have shape ({len(images)},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.source_indices = torch.arange(len(images)) if source_indices is None else source_indices

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def subset(self, indices: Sequence[int] | Tensor) -> TensorImageDataset:
        """The samples at ``indices``, in that order (copies only the selected rows)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TensorImageDataset(self.images[idx], self.labels[idx], self.source_indices[idx])


class ImageFileDataset(Dataset):
    """Images read lazily from files, as RGB, resized (shorter side) and centre-cropped to ``image_size``.

    Resizing here rather than in the augmentation gives every sample the same shape, so evaluation batches
    collate without a per-dataset transform; random crops then work on the resized image.
    """

    def __init__(
        self, samples: Sequence[tuple[str, int]], image_size: int, source_indices: Tensor | None = None
    ) -> None:
        self.samples = tuple(samples)
        self.image_size = image_size
        self.labels = torch.tensor([label for _, label in self.samples], dtype=torch.int64)
        self.source_indices = torch.arange(len(self.samples)) if source_indices is None else source_indices

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        with Image.open(path) as image:
            rgb = image.convert("RGB")
        rgb = F.center_crop(F.resize(rgb, [self.image_size], antialias=True), [self.image_size])
        return F.pil_to_tensor(rgb), label

    def subset(self, indices: Sequence[int] | Tensor) -> ImageFileDataset:
        """The samples at ``indices``, in that order (no file is read)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        samples = [self.samples[i] for i in idx.tolist()]
        return ImageFileDataset(samples, self.image_size, self.source_indices[idx])


@dataclass(frozen=True)
class DataSplits:
    """The four splits of a study.

    ``pretrain``: images for self-supervised pretraining (labels unused); ``train`` / ``val``: labeled probe
    training and validation sets, ``val`` carved deterministically from the training split; ``test``: the
    official test split, reported and never tuned on.
    """

    info: DatasetInfo
    pretrain: Dataset
    train: Dataset
    val: Dataset
    test: Dataset


class TwoViewDataset(Dataset):
    """``(view1, view2, index)``: two independent augmentations of one image, for contrastive losses. The
    index lets methods such as MoCo track samples for diagnostics."""

    def __init__(self, base: Dataset, transform: Callable[[Tensor], Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        image, _ = self.base[index]
        return self.transform(image), self.transform(image), index


class TransformedDataset(Dataset):
    """``(transform(image), label)``, for probes and evaluation."""

    def __init__(self, base: Dataset, transform: Callable[[Tensor], Tensor]) -> None:
        self.base = base
        self.transform = transform

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.base[index]
        return self.transform(image), label


# ----------------------------------------------------------------------------------------------- splits


def load_splits(
    name: str,
    root: str | None = None,
    *,
    val_size: int = 5000,
    split_seed: int = 0,
    pretrain_subset: int | None = None,
    train_subset: int | None = None,
    test_subset: int | None = None,
    download: bool = True,
    image_size: int | None = None,
) -> DataSplits:
    """Load dataset ``name`` and split it deterministically.

    The validation carve-out and each subset come from a permutation drawn from a fresh
    ``torch.Generator().manual_seed(split_seed)``, so each choice is identical across calls and independent
    of the other arguments: changing ``train_subset`` never moves the validation images. A subset is the
    first k of its permutation; for datasets where ``pretrain`` and ``train`` are the same images, the
    smaller of the two subsets is therefore contained in the larger, as in semi-supervised evaluations.

    Per dataset:
    * fashion_mnist: idx files from ``root`` (directly or ``root/FashionMNIST/raw``), then the Debian
      package folder, then torchvision's download into ``root`` (or ``~/.cache/contrastive-study/data``).
    * cifar10 / stl10: torchvision's datasets in ``root`` (or the cache folder), downloaded if allowed.
      For STL-10, ``pretrain`` is the labeled training images outside ``val`` plus the 100k unlabeled
      images (whose label is -1); ``val`` images are left out of pretraining, as for the other datasets.
    * imagefolder: ``root/train/<class>/*`` and ``root/test/<class>/*``; ``root/val/<class>/*`` is used as
      the validation set when it exists (``val_size`` then is unused). Images are resized to
      ``image_size`` (default 64), the only dataset this argument applies to.
    """
    root_path = _validate_arguments(
        name, root, val_size, split_seed, pretrain_subset, train_subset, test_subset, image_size
    )
    extra_pretrain: TensorImageDataset | None = None
    given_val: SubsettableDataset | None = None
    if name == "fashion_mnist":
        info, train_full, test = _load_fashion_mnist(root_path, download)
    elif name == "cifar10":
        info, train_full, test = _load_cifar10(root_path, download)
    elif name == "stl10":
        info, train_full, test, extra_pretrain = _load_stl10(root_path, download)
    else:
        assert root_path is not None  # validated above: imagefolder requires a root
        size = DEFAULT_IMAGEFOLDER_SIZE if image_size is None else image_size
        info, train_full, given_val, test = _load_image_folder(root_path, size)

    if given_val is None:
        if val_size >= len(train_full):
            raise ValueError(
                f"val_size must be < the {len(train_full)} training images of {name}, got {val_size}"
            )
        order = _permutation(len(train_full), split_seed)
        val, train = train_full.subset(order[:val_size]), train_full.subset(order[val_size:])
    else:
        val, train = given_val, train_full

    pretrain: SubsettableDataset = train
    if extra_pretrain is not None:
        assert isinstance(train, TensorImageDataset)  # STL-10 is loaded in memory
        pretrain = _concat(train, extra_pretrain, offset=len(train_full))
    return DataSplits(
        info=info,
        pretrain=_first_of_permutation(pretrain, pretrain_subset, split_seed, "pretrain_subset"),
        train=_first_of_permutation(train, train_subset, split_seed, "train_subset"),
        val=val,
        test=_first_of_permutation(test, test_subset, split_seed, "test_subset"),
    )


def _validate_arguments(
    name: str,
    root: str | None,
    val_size: int,
    split_seed: int,
    pretrain_subset: int | None,
    train_subset: int | None,
    test_subset: int | None,
    image_size: int | None,
) -> Path | None:
    """Reject bad arguments before any (possibly slow, possibly downloading) loading work."""
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if not _is_int(val_size) or val_size <= 0:
        raise ValueError(f"val_size must be a positive int, got {val_size!r}")
    if not _is_int(split_seed) or split_seed < 0:
        raise ValueError(f"split_seed must be a non-negative int, got {split_seed!r}")
    for param, value in (
        ("pretrain_subset", pretrain_subset),
        ("train_subset", train_subset),
        ("test_subset", test_subset),
    ):
        if value is not None and (not _is_int(value) or value <= 0):
            raise ValueError(f"{param} must be None or a positive int, got {value!r}")
    if image_size is not None:
        if name != "imagefolder":
            raise ValueError(
                f"image_size applies only to dataset 'imagefolder', got {image_size!r} for {name!r}"
            )
        if not _is_int(image_size) or image_size <= 0:
            raise ValueError(f"image_size must be None or a positive int, got {image_size!r}")
    if name == "imagefolder" and root is None:
        raise ValueError(
            "root must be given for dataset 'imagefolder' (a folder with train/ and test/), got None"
        )
    if root is None:
        return None
    root_path = Path(root).expanduser()
    if not root_path.is_dir():
        raise ValueError(f"root must be an existing directory, got {root!r}")
    return root_path


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _permutation(n: int, seed: int) -> Tensor:
    """A fresh generator per use: the permutation depends only on (n, seed), not on what was drawn before."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))


def _first_of_permutation(
    dataset: SubsettableDataset, k: int | None, seed: int, param: str
) -> SubsettableDataset:
    if k is None:
        return dataset
    if k > len(dataset):
        raise ValueError(f"{param} must be <= the {len(dataset)} samples it selects from, got {k}")
    return dataset.subset(_permutation(len(dataset), seed)[:k])


def _concat(first: TensorImageDataset, second: TensorImageDataset, *, offset: int) -> TensorImageDataset:
    """One in-memory dataset; ``second``'s source indices are shifted by ``offset`` (the size of ``first``'s
    source split), matching torchvision's "train+unlabeled" numbering for STL-10."""
    return TensorImageDataset(
        torch.cat([first.images, second.images]),
        torch.cat([first.labels, second.labels]),
        torch.cat([first.source_indices, second.source_indices + offset]),
    )


def _default_root() -> Path:
    path = Path(DEFAULT_DATA_DIR).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------ fashion-mnist


def read_idx(path: str | Path) -> Tensor:
    """Read an idx file of unsigned bytes (gzipped if the name ends in .gz) into a uint8 tensor.

    Strict on purpose: a truncated download or a wrong file must fail loudly here, naming the file, rather
    than surface later as a shape error or silently wrong labels.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"idx file {str(path)!r} cannot be read: {error}") from error
    if len(raw) < 4 or raw[0:2] != b"\x00\x00":
        raise ValueError(f"idx file {str(path)!r} is malformed: bad magic number {raw[:4].hex()!r}")
    if raw[2] != _IDX_UBYTE:
        raise ValueError(
            f"idx file {str(path)!r} has type code {raw[2]:#04x}; only unsigned bytes (0x08) are read"
        )
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_len:
        raise ValueError(f"idx file {str(path)!r} is malformed: truncated header for {ndim} dimensions")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = math.prod(dims)
    if len(raw) - header_len != expected:
        raise ValueError(
            f"idx file {str(path)!r} is malformed: dims {dims} need {expected} bytes of data, "
            f"found {len(raw) - header_len}"
        )
    # bytearray makes the buffer writable, which torch.frombuffer needs to avoid a warning.
    return torch.frombuffer(bytearray(raw[header_len:]), dtype=torch.uint8).reshape(dims)


def _find_idx_folder(folder: Path) -> dict[str, Path] | None:
    """The four Fashion-MNIST idx files in ``folder`` (plain preferred to .gz), or None if one is missing."""
    found: dict[str, Path] = {}
    for key, stem in _FMNIST_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def _read_fashion_mnist_split(images_path: Path, labels_path: Path) -> TensorImageDataset:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        raise ValueError(
            f"idx file {str(images_path)!r} must hold (N, 28, 28) images, got {tuple(images.shape)}"
        )
    if labels.dim() != 1 or len(labels) != len(images):
        raise ValueError(
            f"idx file {str(labels_path)!r} must hold {len(images)} labels, got shape {tuple(labels.shape)}"
        )
    if len(labels) and int(labels.max()) >= _FMNIST_INFO.num_classes:
        raise ValueError(f"idx file {str(labels_path)!r} has label {int(labels.max())}, outside 0..9")
    return TensorImageDataset(images.unsqueeze(1), labels.to(torch.int64))


def _load_fashion_mnist(
    root: Path | None, download: bool
) -> tuple[DatasetInfo, TensorImageDataset, TensorImageDataset]:
    candidates = [root, root / "FashionMNIST" / "raw"] if root is not None else []
    # The cache folder is searched too, so a torchvision download is reused without going through torchvision.
    candidates += [
        Path(DEBIAN_FASHION_MNIST_DIR),
        Path(DEFAULT_DATA_DIR).expanduser() / "FashionMNIST" / "raw",
    ]
    for folder in candidates:
        files = _find_idx_folder(folder)
        if files is not None:
            train = _read_fashion_mnist_split(files["train_images"], files["train_labels"])
            test = _read_fashion_mnist_split(files["test_images"], files["test_labels"])
            return _FMNIST_INFO, train, test
    if not download:
        searched = ", ".join(str(folder) for folder in candidates)
        raise FileNotFoundError(f"Fashion-MNIST idx files not found in: {searched}; pass download=True")
    from torchvision.datasets import FashionMNIST

    splits = [FashionMNIST(str(root or _default_root()), train=flag, download=True) for flag in (True, False)]
    train, test = (TensorImageDataset(s.data.unsqueeze(1), s.targets) for s in splits)
    return _FMNIST_INFO, train, test


# ------------------------------------------------------------------------------------- cifar-10 and stl-10


def tensor_dataset_from_hwc(data: np.ndarray, labels: Sequence[int] | np.ndarray) -> TensorImageDataset:
    """Convert torchvision-style (N, H, W, C) uint8 arrays (CIFAR's ``.data``) to a TensorImageDataset."""
    if data.dtype != np.uint8 or data.ndim != 4:
        raise ValueError(f"data must be a uint8 array (N, H, W, C), got {data.dtype} {data.shape}")
    images = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    return TensorImageDataset(images, torch.as_tensor(np.asarray(labels), dtype=torch.int64))


def _load_cifar10(
    root: Path | None, download: bool
) -> tuple[DatasetInfo, TensorImageDataset, TensorImageDataset]:
    from torchvision.datasets import CIFAR10

    folder = str(root or _default_root())
    train, test = (CIFAR10(folder, train=flag, download=download) for flag in (True, False))
    return _CIFAR10_INFO, tensor_dataset_from_hwc(train.data, train.targets), tensor_dataset_from_hwc(
        test.data, test.targets
    )


def _load_stl10(
    root: Path | None, download: bool
) -> tuple[DatasetInfo, TensorImageDataset, TensorImageDataset, TensorImageDataset]:
    """(info, labeled train, test, unlabeled); STL-10's ``.data`` is already (N, 3, 96, 96) uint8."""
    from torchvision.datasets import STL10

    folder = str(root or _default_root())
    splits = ("train", "test", "unlabeled")
    train, test, unlabeled = (STL10(folder, split=split, download=download) for split in splits)

    def convert(split: Any) -> TensorImageDataset:
        labels = split.labels if split.labels is not None else np.full(len(split.data), -1)
        return TensorImageDataset(torch.from_numpy(split.data), torch.as_tensor(labels, dtype=torch.int64))

    return _STL10_INFO, convert(train), convert(test), convert(unlabeled)


# ------------------------------------------------------------------------------------------- image folder


def _load_image_folder(
    root: Path, image_size: int
) -> tuple[DatasetInfo, ImageFileDataset, ImageFileDataset | None, ImageFileDataset]:
    train_dir, val_dir, test_dir = root / "train", root / "val", root / "test"
    for folder in (train_dir, test_dir):
        if not folder.is_dir():
            raise ValueError(f"root must hold train/ and test/ class folders, missing {str(folder)!r}")
    classes = sorted(entry.name for entry in train_dir.iterdir() if entry.is_dir())
    if not classes:
        raise ValueError(f"imagefolder {str(train_dir)!r} holds no class folders")
    class_to_idx = {cls: i for i, cls in enumerate(classes)}
    info = DatasetInfo("imagefolder", len(classes), 3, image_size, _IMAGENET_MEAN, _IMAGENET_STD)
    train = ImageFileDataset(_scan_class_folders(train_dir, class_to_idx), image_size)
    val = None
    if val_dir.is_dir():
        val = ImageFileDataset(_scan_class_folders(val_dir, class_to_idx), image_size)
    test = ImageFileDataset(_scan_class_folders(test_dir, class_to_idx), image_size)
    return info, train, val, test


def _scan_class_folders(split_dir: Path, class_to_idx: dict[str, int]) -> list[tuple[str, int]]:
    """(path, label) of every image under ``split_dir/<class>/``, sorted so the order is reproducible."""
    samples: list[tuple[str, int]] = []
    for class_dir in sorted(entry for entry in split_dir.iterdir() if entry.is_dir()):
        if class_dir.name not in class_to_idx:
            raise ValueError(f"class folder {str(class_dir)!r} has no counterpart in train/")
        label = class_to_idx[class_dir.name]
        files = sorted(
            f for f in class_dir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        samples += [(str(path), label) for path in files]
    if not samples:
        raise ValueError(
            f"imagefolder split {str(split_dir)!r} holds no images with suffix in {IMAGE_EXTENSIONS}"
        )
    return samples


# ------------------------------------------------------------------------------------------ augmentations


@dataclass(frozen=True)
class ContrastiveAugmentation:
    """One random SimCLR / MoCo v2 view of a uint8 image tensor (C, H, W) -> normalised float (C, S, S).

    Built by :func:`contrastive_transform`. Parameters are drawn per call by the v2 transforms' own samplers
    (``make_params``) from torch's global RNG and applied with v2's image kernels, so the distribution is
    that of ``v2.Compose([RandomResizedCrop, RandomHorizontalFlip, RandomApply([ColorJitter]), ...])``. It
    skips v2's per-call dispatch (pytree flattening, type checks, ColorJitter's loop over 0-d tensors),
    which costs about as much as the image work on 28x28 images: this runs ~1.5x faster than the Compose.

    The image becomes float right after the crop and flip, so colour jitter, grayscale and blur work on
    floats: cheaper than their uint8 kernels and free of rounding between steps.
    """

    crop: v2.RandomResizedCrop
    jitter: v2.ColorJitter | None
    jitter_p: float
    grayscale_p: float
    blur: v2.GaussianBlur | None
    blur_p: float
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Tensor) -> Tensor:
        box = self.crop.make_params([image])
        image = F.resized_crop_image(
            image, **box, size=list(self.crop.size), interpolation=self.crop.interpolation, antialias=True
        )
        if torch.rand(1) < 0.5:
            image = F.horizontal_flip_image(image)
        image = F.to_dtype_image(image, torch.float32, scale=True)
        if self.jitter is not None and torch.rand(1) < self.jitter_p:
            image = _color_jitter(image, self.jitter.make_params([image]))
        if self.grayscale_p > 0.0 and torch.rand(1) < self.grayscale_p:
            image = F.rgb_to_grayscale_image(image, num_output_channels=image.shape[-3])
        if self.blur is not None and torch.rand(1) < self.blur_p:
            image = F.gaussian_blur_image(image, list(self.blur.kernel_size), **self.blur.make_params([image]))
        return F.normalize_image(image, list(self.mean), list(self.std))


@dataclass(frozen=True)
class EvalTransform:
    """uint8 image tensor -> normalised float, without randomness (probes and evaluation)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, image: Tensor) -> Tensor:
        return F.normalize_image(F.to_dtype_image(image, torch.float32, scale=True), list(self.mean), list(self.std))


def _color_jitter(image: Tensor, params: dict[str, Any]) -> Tensor:
    """``v2.ColorJitter.transform`` on a plain image tensor: the four adjustments in the sampled order,
    skipping the ones that are disabled (None)."""
    adjustments = (
        (F.adjust_brightness_image, params["brightness_factor"]),
        (F.adjust_contrast_image, params["contrast_factor"]),
        (F.adjust_saturation_image, params["saturation_factor"]),
        (F.adjust_hue_image, params["hue_factor"]),
    )
    for fn_id in params["fn_idx"].tolist():
        kernel, factor = adjustments[fn_id]
        if factor is not None:
            image = kernel(image, factor)
    return image


def contrastive_transform(
    info: DatasetInfo,
    *,
    crop_scale: tuple[float, float] = (0.2, 1.0),
    color_jitter: float = 0.4,
    grayscale_p: float = 0.2,
    blur_p: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """The SimCLR / MoCo v2 augmentation of one uint8 image (C, H, W) -> normalised float (C, S, S).

    Random resized crop to S = ``info.image_size`` with ``crop_scale``, horizontal flip (p=0.5), colour
    jitter with p=0.8 (brightness, contrast and saturation ``color_jitter``, hue ``color_jitter / 4``: 0.4
    is MoCo v2's (0.4, 0.4, 0.4, 0.1); SimCLR's strength s is ``color_jitter = 0.8 s``), grayscale with
    ``grayscale_p``, Gaussian blur (kernel ~10% of S, sigma in [0.1, 2]) with ``blur_p``. One-channel
    images get only brightness and contrast jitter and no grayscale: without colour those mean nothing.
    """
    low, high = crop_scale
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got {crop_scale!r}")
    if not 0.0 <= color_jitter <= 2.0:
        # Above 2 the hue jitter (color_jitter / 4) would leave torchvision's range [0, 0.5].
        raise ValueError(f"color_jitter must be in [0, 2], got {color_jitter!r}")
    for param, value in (("grayscale_p", grayscale_p), ("blur_p", blur_p)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{param} must be in [0, 1], got {value!r}")

    size = info.image_size
    jitter = None
    if color_jitter > 0.0:
        if info.channels == 3:
            jitter = v2.ColorJitter(color_jitter, color_jitter, color_jitter, color_jitter / 4)
        else:
            jitter = v2.ColorJitter(brightness=color_jitter, contrast=color_jitter)
    kernel = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd, as a blur kernel needs a centre pixel
    return ContrastiveAugmentation(
        crop=v2.RandomResizedCrop(size, scale=crop_scale, antialias=True),
        jitter=jitter,
        jitter_p=0.8,
        grayscale_p=grayscale_p if info.channels == 3 else 0.0,
        blur=v2.GaussianBlur(kernel, sigma=(0.1, 2.0)) if blur_p > 0.0 else None,
        blur_p=blur_p,
        mean=info.mean,
        std=info.std,
    )


def eval_transform(info: DatasetInfo) -> Callable[[Tensor], Tensor]:
    """uint8 image -> normalised float. Image folders are already resized by their dataset, so no resize is
    needed here."""
    return EvalTransform(info.mean, info.std)

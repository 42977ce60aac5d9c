"""The configuration of one pretraining run: a frozen, typed dataclass, validated before any work starts.

Every field has a ``help`` text; the command line of ``python -m trainers.pretrain`` is generated from this
class, so the flags, their defaults and their documentation cannot drift apart. The resolved config is
printed and saved (``config.json``) with every run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

METHOD_NAMES = ("simclr", "moco")
DATASET_NAMES = ("fashion_mnist", "cifar10", "stl10", "imagefolder")
BACKBONE_NAMES = ("resnet_small", "resnet18", "resnet50")
OPTIMIZERS = ("sgd", "adamw", "lars")
BN_MODES = ("shuffle", "sync", "local")


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


class ConfigMixin:
    """Serialisation shared by the frozen config dataclasses (TrainConfig, StudyConfig)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Any:
        """Build and validate from a mapping of field names; anything else is a ValueError naming the problem."""
        if not isinstance(values, Mapping):
            raise ValueError(f"{cls.__name__} needs a mapping of field names to values, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        # Keys of a YAML/TOML file can be of any type (1, null, true): sort by repr so mixed types cannot raise.
        unknown = sorted(set(values) - known, key=repr)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {unknown}; known fields: {sorted(known)}")
        return cls(**values)


def check_field_types(config: Any) -> None:
    """Each field has its declared type (and one of its ``choices``), else a ValueError naming it and the value."""
    for f in dataclasses.fields(config):
        check_field_type(f, getattr(config, f.name))


def check_field_type(f: dataclasses.Field, value: Any) -> None:
    """``value`` has the declared type of field ``f`` (and is one of its ``choices``), else a ValueError."""
    choices = f.metadata.get("choices")
    if choices is not None:
        # a string test first: ``value in choices`` compares with ==, which an unhashable or array value may break
        require(isinstance(value, str) and value in choices, f.name, f"be one of {choices}", value)
    elif f.type in ("int", int):
        require(_is_int(value), f.name, "be an integer", value)
        require(INT64[0] <= value <= INT64[1], f.name, "fit in 64 bits (Parquet and torch seeds)", value)
    elif f.type in ("float", float):
        require(_is_number(value), f.name, "be a finite number", value)
    elif f.type in ("bool", bool):
        require(isinstance(value, bool), f.name, "be true or false", value)
    elif f.type in ("str", str):
        require(isinstance(value, str), f.name, "be a string", value)


@dataclass(frozen=True)
class TrainConfig(ConfigMixin):
    """Everything that decides the result of one pretraining + evaluation run."""

    # what is trained
    method: str = _f("simclr", "contrastive method", choices=METHOD_NAMES)
    backbone: str = _f("resnet_small", "encoder architecture", choices=BACKBONE_NAMES)
    cifar_stem: bool = _f(True, "torchvision ResNets: 3x3 stride-1 first conv and no max-pool (small images)")
    projection_dim: int = _f(128, "output size of the projection head (the space the loss lives in)")
    projection_hidden_dim: int = _f(0, "hidden size of the projection head; 0 = the backbone's feature size")
    # data
    dataset: str = _f("fashion_mnist", "dataset", choices=DATASET_NAMES)
    data_root: str = _f("", "dataset folder; empty = the Debian package folder or the download cache")
    val_size: int = _f(5000, "images carved (deterministically) from the training split for validation")
    pretrain_subset: int = _f(0, "use only this many pretraining images (0 = all)")
    probe_train_subset: int = _f(0, "use only this many labeled images to fit the probes (0 = all)")
    test_subset: int = _f(0, "evaluate on only this many test images (0 = all)")
    crop_scale_min: float = _f(0.2, "lower bound of RandomResizedCrop's area scale")
    blur_probability: float = _f(0.0, "probability of Gaussian blur in the augmentations")
    loader_workers: int = _f(0, "DataLoader worker processes (0 = augment in the training process)")
    # optimisation
    epochs: int = _f(10, "pretraining epochs")
    batch_size: int = _f(256, "global batch size (all workers together)")
    optimizer: str = _f("sgd", "optimizer", choices=OPTIMIZERS)
    lr: float = _f(0.06, "peak learning rate (already scaled for the batch size)")
    weight_decay: float = _f(5e-4, "weight decay")
    warmup_epochs: int = _f(0, "linear warm-up epochs before the cosine schedule")
    # the contrastive objective
    temperature: float = _f(0.2, "softmax temperature tau of InfoNCE (inverse temperature beta = 1 / tau)")
    momentum: float = _f(0.99, "MoCo: key encoder momentum m in v <- m v + (1 - m) theta (0 copies, 1 freezes)")
    queue_length: int = _f(4096, "MoCo: number of keys K in the queue (multiple of the keys per step)")
    symmetric: bool = _f(False, "MoCo: symmetric loss (both views as queries; enqueues both key views)")
    bn_mode: str = _f(
        "shuffle", "BN across workers: shuffle (MoCo's shuffle-BN), sync (global BN statistics) or local (per worker)",
        choices=BN_MODES,
    )
    # evaluation
    knn_k: int = _f(200, "neighbours of the weighted kNN classifier")
    knn_temperature: float = _f(0.1, "temperature of the kNN vote weights exp(sim / T)")
    monitor_bank_size: int = _f(5000, "kNN monitor each epoch: labeled training images in the bank (0 = off)")
    monitor_query_size: int = _f(1000, "kNN monitor each epoch: validation images classified")
    probe: bool = _f(True, "after training: linear probe + kNN on validation and test")
    baselines: bool = _f(True, "after training: the same probes on raw pixels and a random-init backbone")
    finetune_epochs: int = _f(0, "after training: fine-tune encoder + linear head for this many epochs (0 = off)")
    # run
    seed: int = _f(0, "seed of initialisation, data order and augmentations")
    split_seed: int = _f(0, "seed of the train/validation carve-out (keep fixed across a study)")
    device: str = _f("auto", "cpu, cuda, cuda:N or auto")

    def __post_init__(self) -> None:
        validate(self)

    @property
    def negatives_per_positive(self) -> int:
        """Negatives each anchor is contrasted with: ``2B - 2`` for SimCLR, ``K`` for MoCo."""
        return 2 * self.batch_size - 2 if self.method == "simclr" else self.queue_length

    @property
    def keys_per_step(self) -> int:
        """Keys MoCo enqueues per optimizer step (global batch, twice with the symmetric loss)."""
        return self.batch_size * (2 if self.symmetric else 1)



def require(ok: bool, name: str, rule: str, value: Any) -> None:
    if not ok:
        raise ValueError(f"{name} must {rule}, got {show(value)}")


def show(value: Any, limit: int = 200) -> str:
    """``repr(value)`` for a message, shortened: a value from a file can be a megabyte of text or an int whose
    repr Python refuses (more than 4300 digits)."""
    try:
        text = repr(value)
    except ValueError:
        return f"<an integer of {value.bit_length()} bits>"
    return text if len(text) <= limit else f"{text[: limit - 20]}...<{len(text)} characters>"


INT64 = (-(2**63), 2**63 - 1)  # Parquet columns and torch seeds are 64-bit


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool); an int beyond float range is not one: every use of it is a float."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # math.isfinite(10**400): "int too large to convert to float"
        return False


def validate(config: TrainConfig, *, world_size: int = 1) -> None:
    """Raise ``ValueError`` naming the field, the rule and the value for the first violated invariant."""
    check_field_types(config)
    c = config
    require(c.temperature > 0, "temperature", "be > 0 (and finite)", c.temperature)
    require(0 <= c.momentum <= 1, "momentum", "satisfy 0 <= m <= 1", c.momentum)
    require(c.queue_length >= 1, "queue_length", "be >= 1", c.queue_length)
    require(c.epochs >= 1, "epochs", "be >= 1", c.epochs)
    require(c.batch_size >= 2, "batch_size", "be >= 2 (an anchor needs a negative)", c.batch_size)
    require(c.lr > 0, "lr", "be > 0", c.lr)
    require(c.weight_decay >= 0, "weight_decay", "be >= 0", c.weight_decay)
    require(0 <= c.warmup_epochs < c.epochs, "warmup_epochs", f"lie in [0, epochs={c.epochs})", c.warmup_epochs)
    require(c.projection_dim >= 1, "projection_dim", "be >= 1", c.projection_dim)
    require(c.projection_hidden_dim >= 0, "projection_hidden_dim", "be >= 0", c.projection_hidden_dim)
    require(c.val_size >= 1, "val_size", "be >= 1", c.val_size)
    for name in ("pretrain_subset", "probe_train_subset", "test_subset", "loader_workers", "finetune_epochs",
                 "monitor_bank_size"):
        require(getattr(c, name) >= 0, name, "be >= 0", getattr(c, name))
    require(c.monitor_query_size >= 1, "monitor_query_size", "be >= 1", c.monitor_query_size)
    require(0 < c.crop_scale_min <= 1, "crop_scale_min", "lie in (0, 1]", c.crop_scale_min)
    require(0 <= c.blur_probability <= 1, "blur_probability", "lie in [0, 1]", c.blur_probability)
    require(c.knn_k >= 1, "knn_k", "be >= 1", c.knn_k)
    require(c.knn_temperature > 0, "knn_temperature", "be > 0", c.knn_temperature)
    require(c.dataset != "imagefolder" or bool(c.data_root), "data_root", "be set for dataset imagefolder",
             c.data_root)
    require(re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", c.device) is not None, "device", "be auto, cpu or cuda[:N]",
             c.device)
    require(world_size >= 1, "world_size", "be >= 1", world_size)
    require(c.batch_size % world_size == 0, "batch_size",
             f"be divisible by the number of workers ({world_size})", c.batch_size)
    require(c.batch_size // world_size >= 2 or c.method == "simclr", "batch_size",
             f"give each of {world_size} workers at least 2 images", c.batch_size)
    if c.method == "moco":
        require(c.queue_length % c.keys_per_step == 0, "queue_length",
                 f"be a multiple of the keys enqueued per step ({c.keys_per_step} = global batch"
                 f"{' x 2 views (symmetric)' if c.symmetric else ''})", c.queue_length)
    if c.pretrain_subset:
        require(c.pretrain_subset >= c.batch_size, "pretrain_subset",
                 f"hold at least one global batch ({c.batch_size} images)", c.pretrain_subset)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One typed, documented flag per field of a config dataclass (``--field-name``; booleans get ``--no-``).

    Flags that are not given are absent from the parsed namespace, so values from a config file are only
    overridden by flags the user actually typed.
    """
    types = {"int": int, "float": float, "str": str}
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} (default: {f.default!r})"
        if f.type == "bool":
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=types[str(f.type)], default=argparse.SUPPRESS,
                                choices=f.metadata.get("choices"), help=help_text)


def dataclass_values(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The fields of ``cls`` that were given on the command line."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names}

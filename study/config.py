"""StudyConfig: what a study searches, on what data, with which resources; validated before Ray starts.

Values come from the dataclass defaults, then a YAML (``yaml.safe_load``) or TOML file given with ``--config``,
then command-line flags. The resolved config is printed and saved as ``study_config.json`` in the study folder;
launching into that folder again with a different config is refused, naming the differences.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from search_spaces import SearchSpace, load_space
from trainers.config import BACKBONE_NAMES, DATASET_NAMES, ConfigMixin, TrainConfig, check_field_types, require

SEARCHERS = ("tpe", "random", "grid")
SCHEDULERS = ("asha", "asha_promotion", "none")
TRIAL_MODES = ("auto", "in_process", "ray_train", "synthetic")
OBJECTIVES = ("linear_val_accuracy", "knn_val_accuracy")
# Training-set sizes, so "batch larger than the dataset" is refused without loading anything.
TRAIN_SPLIT_SIZES = {"fashion_mnist": 60000, "cifar10": 50000, "stl10": 105000}
MAX_NAME_LENGTH = 255  # the usual limit of one file name (ext4, XFS, APFS, NTFS)


def _f(default: Any, help: str, **kwargs: Any) -> Any:
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass(frozen=True)
class StudyConfig(ConfigMixin):
    """A hyperparameter study of contrastive pretraining; the defaults are the small default study."""

    name: str = _f("fmnist-contrastive", "study name: the study folder is <storage_path>/<name>")
    space: str = _f("contrastive", "search space: simclr, moco, contrastive, smoke or a path to a YAML file")
    dataset: str = _f("fashion_mnist", "dataset", choices=DATASET_NAMES)
    data_root: str = _f("", "dataset folder; empty = the Debian package folder or the download cache")
    backbone: str = _f("resnet_small", "encoder architecture", choices=BACKBONE_NAMES)
    epochs: int = _f(6, "pretraining epochs per trial")
    pretrain_subset: int = _f(2048, "pretraining images per trial (0 = the whole training split)")
    probe_train_subset: int = _f(5000, "labeled images that fit the probes (0 = all)")
    val_size: int = _f(5000, "validation images carved from the training split (the objective is measured here)")
    test_subset: int = _f(5000, "test images (0 = all); reported, never tuned on")
    monitor_bank_size: int = _f(2000, "per-epoch kNN monitor (ASHA's signal): labeled training images in its bank")
    monitor_query_size: int = _f(500, "per-epoch kNN monitor: validation images it classifies")
    num_trials: int = _f(24, "trials (configurations) to run; with grid search, the number of grid points")
    replicates: int = _f(1, "seeds per configuration (1 = one seed); the searcher sees their mean")
    workers_per_trial: int = _f(1, "Ray Train workers per trial (data-parallel)")
    cpus_per_worker: float = _f(0.0, "CPUs per Ray Train worker (torch uses that many threads); 0 = all the "
                                "cluster's CPUs for one trial at a time")
    gpus_per_worker: float = _f(0.0, "GPUs per Ray Train worker (0 = CPU training)")
    trial_mode: str = _f("auto", "how a trial trains: in_process (in the Tune trial itself, no separate worker "
                         "group: ~15 s less per trial), ray_train (a TorchTrainer per trial), auto = in_process "
                         "when workers_per_trial is 1; synthetic = no training, a known objective of the sampled "
                         "values (checks a cluster, the searcher and the results store in seconds)",
                         choices=TRIAL_MODES)
    max_concurrent_trials: int = _f(0, "0 = as many as the cluster's CPUs/GPUs allow without deadlock")
    searcher: str = _f("tpe", "search algorithm (Optuna TPE, random, or grid over choice spaces)", choices=SEARCHERS)
    scheduler: str = _f("asha_promotion", "early stopping on the per-epoch kNN monitor: asha_promotion (ASHA with "
                        "promotions: trials pause at each rung and those in its top 1/factor go on; "
                        "study/promotion.py), asha (Ray Tune's ASHAScheduler: decides once, as a trial reaches a "
                        "rung), or none", choices=SCHEDULERS)
    grace_epochs: int = _f(1, "ASHA: epochs every trial runs before its first rung")
    reduction_factor: int = _f(3, "ASHA: a trial goes on past a rung (grace x factor^k epochs) only if it is in the "
                               "top 1/factor of the trials that reached that rung")
    objective: str = _f("linear_val_accuracy", "what the searcher maximises (validation only)", choices=OBJECTIVES)
    baselines: bool = _f(True, "once per study, before the trials: the same probes on raw pixels and on a "
                         "random-init backbone (the reference points of every trial's accuracy)")
    storage_path: str = _f("studies", "folder (or pyarrow URI such as s3://bucket/prefix) holding study folders")
    address: str = _f("", "Ray cluster to join (auto, HOST:PORT); empty = start a local cluster")
    dashboard_host: str = _f("127.0.0.1", "local cluster: dashboard address (anything else is exposed; warned)")
    max_failures: int = _f(1, "retries of a failed trial (Tune) and of a failed worker group (Train)")
    seed: int = _f(0, "seed of the searcher and of the first replicate")

    def __post_init__(self) -> None:
        validate_study(self)

    @property
    def study_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"

    def search_space(self) -> SearchSpace:
        return load_space(self.space)

    def base_values(self, seed: int | None = None) -> dict[str, Any]:
        """The TrainConfig values every trial starts from; sampled values override them (not validated alone:
        e.g. the default batch may exceed a tiny pretraining subset that every sampled batch fits)."""
        return TrainConfig().to_dict() | {
            "dataset": self.dataset, "data_root": self.data_root, "backbone": self.backbone, "epochs": self.epochs,
            "pretrain_subset": self.pretrain_subset, "probe_train_subset": self.probe_train_subset,
            "val_size": self.val_size, "test_subset": self.test_subset, "baselines": False,
            "monitor_bank_size": self.monitor_bank_size, "monitor_query_size": self.monitor_query_size,
            "seed": self.seed if seed is None else seed, "device": "cuda" if self.gpus_per_worker else "cpu",
        }

    @property
    def in_process(self) -> bool:
        """Whether trials train inside the Tune trial (one worker) instead of a Ray Train worker group."""
        return self.trial_mode in ("in_process", "synthetic") or (self.trial_mode == "auto"
                                                                  and self.workers_per_trial == 1)

    def seeds(self) -> list[int]:
        return [self.seed + r for r in range(self.replicates)]


def validate_study(c: StudyConfig) -> None:
    """Every field's invariant, the search space, and every configuration the space can sample."""
    check_field_types(c)
    # The study folder is <storage_path>/<name>: a name that is one plain path component keeps every file the study
    # writes (configs, Parquet, Tune and Train folders) inside storage_path.
    require(is_plain_folder_name(c.name), "name",
             f"be a plain folder name (1-{MAX_NAME_LENGTH} characters; no '/', '\\' or control characters; "
             "not starting with '.')", c.name)
    require(c.storage_path.strip() != "", "storage_path",
             "be a folder or URI (empty would put the study at the filesystem root)", c.storage_path)
    require(c.reduction_factor >= 2, "reduction_factor", "be >= 2", c.reduction_factor)
    for name in ("epochs", "num_trials", "replicates", "workers_per_trial", "grace_epochs", "monitor_bank_size",
                 "monitor_query_size"):
        require(getattr(c, name) >= 1, name, "be >= 1", getattr(c, name))
    for name in ("max_concurrent_trials", "max_failures", "pretrain_subset", "probe_train_subset", "test_subset"):
        require(getattr(c, name) >= 0, name, "be >= 0", getattr(c, name))
    require(c.cpus_per_worker >= 0, "cpus_per_worker", "be >= 0 (0 = auto)", c.cpus_per_worker)
    require(c.gpus_per_worker >= 0, "gpus_per_worker", "be >= 0", c.gpus_per_worker)
    require(c.trial_mode != "in_process" or c.workers_per_trial == 1, "trial_mode",
             "be ray_train or auto when workers_per_trial > 1 (data-parallel workers need a worker group)",
             c.trial_mode)
    require(c.grace_epochs <= c.epochs, "grace_epochs", f"be <= epochs ({c.epochs})", c.grace_epochs)
    require(c.replicates == 1 or c.scheduler == "none", "scheduler",
             "be none when replicates > 1 (a trial runs its seeds one after the other)", c.scheduler)
    # A paused trial resumes from its in-process checkpoint, whose progress keeps the trial's running time; a
    # TorchTrainer trial would resume (from Train's checkpoints) but restart its worker group and its clock.
    require(c.scheduler != "asha_promotion" or c.in_process, "scheduler",
             "be asha or none when trials train in Ray Train worker groups (workers_per_trial > 1 or trial_mode "
             "ray_train): asha_promotion pauses and resumes in-process trials only", c.scheduler)
    space = c.search_space()
    if c.searcher == "grid":
        points = len(space.grid())
        require(c.num_trials == points, "num_trials", f"equal the {points} points of the grid of {space.name!r}",
                 c.num_trials)
    base = c.base_values()
    dataset_size = c.pretrain_subset or TRAIN_SPLIT_SIZES.get(c.dataset, 0) - c.val_size
    batches = next((p.choices for p in space.params if p.name == "batch_size"), (base["batch_size"],))
    for batch in batches:
        require(batch % c.workers_per_trial == 0, "batch_size",
                 f"be divisible by workers_per_trial ({c.workers_per_trial}) for every choice", batch)
        if dataset_size > 0:
            require(batch <= dataset_size, "batch_size", f"not exceed the {dataset_size} pretraining images", batch)
    space.check(base, world_size=c.workers_per_trial)


def is_plain_folder_name(name: str) -> bool:
    """One path component that cannot climb out of its parent folder or hide: no separators, '.', '..', controls."""
    return (0 < len(name) <= MAX_NAME_LENGTH and not name.startswith(".") and "/" not in name and "\\" not in name
            and name.isprintable())


def read_config_file(path: str) -> dict[str, Any]:
    """Values from a YAML (safe_load) or TOML file; the file must be a mapping of StudyConfig fields.

    Every way a file can be unusable (missing, unreadable, not UTF-8, not YAML/TOML, not a mapping) is a
    ValueError naming the file, like every invalid value.
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, ValueError) as error:  # ValueError: a NUL in the path, or bytes that are not UTF-8
        raise ValueError(f"config file {path!r} cannot be read: {error}") from None
    is_toml = Path(path).suffix == ".toml"
    try:
        data = tomllib.loads(text) if is_toml else yaml.safe_load(text)
    # TOMLDecodeError is a ValueError, as is an int of more than 4300 digits in YAML; RecursionError: absurd nesting
    except (ValueError, yaml.YAMLError, RecursionError) as error:
        raise ValueError(f"config file {path!r} is not valid {'TOML' if is_toml else 'YAML'}: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path!r} must hold a mapping of study fields, got {type(data).__name__}")
    return data


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (saved.get(k), wanted.get(k)) for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)}


__all__ = ["StudyConfig", "differences", "is_plain_folder_name", "read_config_file", "validate_study"]

"""The training loop: config -> data, model, optimizer -> epochs (metrics, checkpoints) -> probe evaluation.

No Ray here. The same :class:`Trainer` runs in one process (``python -m trainers.pretrain``), in a notebook,
in the tests, and inside each Ray Train worker (``trainers.distributed``), where ``torch.distributed`` is
already initialised: the trainer then shards the data, gathers SimCLR negatives and MoCo keys across ranks,
and only rank 0 evaluates and writes.
"""

from __future__ import annotations

import functools
import os
import pickle
import random
import re
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from trainers.backbones import build_backbone
from trainers.config import TrainConfig, validate
from trainers.data import (
    DataSplits,
    TransformedDataset,
    TwoViewDataset,
    contrastive_transform,
    eval_transform,
    load_splits,
)
from trainers.global_bn import convert_to_global_batchnorm
from trainers.losses import world
from trainers.methods import METHODS, ContrastiveMethod, training_step
from trainers.optim import LARS, warmup_cosine
from trainers.probe import evaluate_frozen, extract_features, fine_tune, knn_accuracy, raw_pixel_baseline


class DivergedError(RuntimeError):
    """The loss became NaN or infinite: the run cannot continue and its result is 'diverged'."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def load_data(config: TrainConfig) -> DataSplits:
    return _cached_splits(config.dataset, config.data_root or None, config.val_size, config.split_seed,
                          config.pretrain_subset or None, config.probe_train_subset or None, config.test_subset or None)


@functools.lru_cache(maxsize=1)
def _cached_splits(dataset: str, root: str | None, val_size: int, split_seed: int, pretrain_subset: int | None,
                   train_subset: int | None, test_subset: int | None) -> DataSplits:
    # A process that runs trial after trial (a reused Tune actor) reads and splits the dataset once. The splits
    # are in-memory tensors that nothing modifies, so sharing them between consecutive Trainers is safe.
    return load_splits(dataset, root, val_size=val_size, split_seed=split_seed, pretrain_subset=pretrain_subset,
                       train_subset=train_subset, test_subset=test_subset)


def build_method(config: TrainConfig, in_channels: int) -> ContrastiveMethod:
    """The method named by ``config.method`` on a fresh backbone (draws from the global torch RNG)."""
    backbone, feature_dim = build_backbone(config.backbone, in_channels=in_channels, cifar_stem=config.cifar_stem)
    common: dict[str, Any] = {
        "temperature": config.temperature,
        "projection_dim": config.projection_dim,
        "hidden_dim": config.projection_hidden_dim or None,
    }
    if config.method == "moco":
        common |= {
            "momentum": config.momentum,
            "queue_length": config.queue_length,
            "symmetric": config.symmetric,
            "shuffle_bn": config.bn_mode == "shuffle",
        }
    return METHODS[config.method](backbone, feature_dim, **common)


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return LARS(params, lr=config.lr, momentum=0.9, weight_decay=config.weight_decay)


def rng_state() -> dict[str, Any]:
    """RNG states as tensors and plain Python values, so ``torch.load(weights_only=True)`` can read them."""
    _, numpy_keys, numpy_pos, numpy_has_gauss, numpy_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [torch.from_numpy(np.asarray(numpy_keys, dtype=np.int64)), numpy_pos, numpy_has_gauss,
                  numpy_gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    keys, pos, has_gauss, gauss_value = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss_value))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file(s) and what to do."""


# What torch.load raises on a truncated, damaged or foreign file (measured on truncated, bit-flipped and random
# checkpoints in both torch formats): the zip reader's RuntimeError, the weights-only unpickler's UnpicklingError
# (also for any pickled object that is not plain data), and EOF/struct/index/key/value errors of the legacy reader.
UNREADABLE_CHECKPOINT_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, IndexError, struct.error,
                                pickle.UnpicklingError)
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# What Trainer.state_dict writes; a file without these is not a checkpoint of a run, whatever it unpickles to.
CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "epoch", "global_step", "history", "rng", "config")


def previous_checkpoint(path: Path) -> Path:
    """Where ``save_checkpoint(..., keep_previous=True)`` keeps the checkpoint it replaces (``checkpoint.prev.pt``)."""
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def checkpoint_files(path: Path) -> tuple[Path, Path]:
    """The newest checkpoint and the one before it, newest first."""
    return path, previous_checkpoint(path)


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable: without it, a power cut can undo the rename although the data was synced."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RecordingWriter:
    """A file for torch.save that keeps the OSError of a failed write: torch turns it into a RuntimeError that only
    says "unexpected pos 768 vs 662", hiding that the disk is full or the file too large."""

    def __init__(self, file: BinaryIO) -> None:
        self.file = file
        self.error: OSError | None = None

    def write(self, data: bytes) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = self.error or error
            raise

    def flush(self) -> None:
        self.file.flush()


def _torch_save(state: dict[str, Any], file: BinaryIO) -> None:
    writer = _RecordingWriter(file)
    try:
        torch.save(state, writer)
    except RuntimeError:
        if writer.error is not None:
            raise writer.error from None
        raise


def save_checkpoint(state: dict[str, Any], path: Path, *, keep_previous: bool = False) -> None:
    """Write atomically: a temporary file in the same folder, fsync, then rename over ``path``.

    With ``keep_previous`` the checkpoint being replaced is first renamed to ``previous_checkpoint(path)``, so
    the folder always holds at least one complete checkpoint: if the new one is lost or damaged later,
    :func:`load_latest_checkpoint` falls back to the previous one. A failed write (disk full, read-only folder)
    raises :class:`CheckpointError` naming ``path``, leaves no temporary file and keeps the existing files.
    """
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            _torch_save(state, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            os.replace(path, previous_checkpoint(path))
        os.replace(tmp, path)
        tmp = None
        _fsync_folder(path.parent)
    except (OSError, RuntimeError) as error:
        raise CheckpointError(f"could not write checkpoint {path}: {error}; the last complete checkpoint is "
                              "intact (free space or fix the folder's permissions, then resume)") from error
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Read one checkpoint file; a missing, truncated, damaged or foreign file is a CheckpointError naming it."""
    try:
        # weights_only: a checkpoint is data, never code, even if someone swapped the file.
        return torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE_CHECKPOINT_ERRORS as error:
        raise CheckpointError(f"{path} is not a readable checkpoint ({_reason(error)})") from error


def _reason(error: BaseException) -> str:
    """One line from torch.load's error: for a refused object the unpickler's verdict, not its advice to rerun
    with ``weights_only=False``."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    verdict = next((line.split(":", 1)[1].split(". Please")[0].strip() for line in lines
                    if line.startswith("WeightsUnpickler error:")), None)
    text = ANSI_ESCAPE.sub("", verdict or (lines[0] if lines else ""))  # torch prints some words in bold
    return f"{type(error).__name__}: {text}"


def _load_run_checkpoint(path: Path) -> dict[str, Any]:
    state = load_checkpoint(path)
    missing = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else list(CHECKPOINT_KEYS)
    if missing:
        raise CheckpointError(f"{path} is not a checkpoint of a run (missing {missing})")
    return state


def load_latest_checkpoint(path: Path) -> tuple[dict[str, Any], Path] | None:
    """The newest readable checkpoint among ``path`` and its previous version, and the file it came from.

    ``None`` when neither file exists (nothing to resume). A missing or unreadable newest file is skipped with a
    message saying which file and why (a crash while writing or rotating, a truncated copy); if files exist but
    none can be read, a CheckpointError names each of them and its problem.
    """
    problems: list[str] = []
    for candidate in checkpoint_files(path):
        if not candidate.exists():
            problems.append(f"{candidate} is missing")
            continue
        try:
            state = _load_run_checkpoint(candidate)
        except CheckpointError as error:
            problems.append(str(error))
            continue
        for problem in problems:
            print(f"skipped: {problem}; resuming from the older checkpoint {candidate}", file=sys.stderr, flush=True)
        return state, candidate
    if not any(candidate.exists() for candidate in checkpoint_files(path)):
        return None
    raise CheckpointError("no readable checkpoint to resume from: " + "; ".join(problems)
                          + ". Move the damaged files away to start the run again.")


class Trainer:
    """One pretraining run. ``train_epoch`` advances by one epoch; ``state_dict`` is a complete checkpoint."""

    def __init__(
        self,
        config: TrainConfig,
        *,
        splits: DataSplits | None = None,
        device: torch.device | None = None,
        wrap_model: Callable[[nn.Module], nn.Module] | None = None,
    ) -> None:
        self.rank, self.world_size = world()
        validate(config, world_size=self.world_size)
        self.config = config
        self.device = device or resolve_device(config.device)
        self.splits = splits or load_data(config)
        info = self.splits.info
        if len(self.splits.pretrain) < config.batch_size:
            raise ValueError(
                f"batch_size must not exceed the {len(self.splits.pretrain)} pretraining images, "
                f"got {config.batch_size}"
            )

        seed_everything(config.seed)  # identical initial weights (and MoCo queue) on every rank
        method = build_method(config, info.channels)
        if config.bn_mode == "sync" and self.world_size > 1:
            method = convert_to_global_batchnorm(method)
        # channels_last suits tensor-core GPUs. On CPU it was ~20% faster here but its oneDNN backward differed
        # from the contiguous one by ~20x the float32 noise of this loss, so CPU keeps the default layout.
        self.memory_format = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.method: ContrastiveMethod = method.to(self.device, memory_format=self.memory_format)
        self.model: nn.Module = wrap_model(self.method) if wrap_model else self.method

        pairs = TwoViewDataset(
            self.splits.pretrain,
            contrastive_transform(info, crop_scale=(config.crop_scale_min, 1.0), blur_p=config.blur_probability),
        )
        self.local_batch = config.batch_size // self.world_size
        self._generator = torch.Generator()
        self.sampler: DistributedSampler | RandomSampler
        if self.world_size > 1:
            self.sampler = DistributedSampler(pairs, shuffle=True, seed=config.seed, drop_last=True)
        else:
            self.sampler = RandomSampler(pairs, generator=self._generator)
        self.loader = DataLoader(
            pairs,
            batch_size=self.local_batch,
            sampler=self.sampler,
            drop_last=True,  # MoCo enqueues exactly one global batch of keys per step
            num_workers=config.loader_workers,
            generator=self._generator,
            pin_memory=self.device.type == "cuda",
        )
        self.steps_per_epoch = len(self.loader)
        self.optimizer = build_optimizer(config, self.method)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            warmup_cosine(config.warmup_epochs * self.steps_per_epoch, config.epochs * self.steps_per_epoch),
        )
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.history: list[dict[str, float]] = []

        to_eval = eval_transform(info)
        self.probe_sets = {
            split: TransformedDataset(getattr(self.splits, split), to_eval) for split in ("train", "val", "test")
        }

    # --- checkpoint state --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "history": self.history,
            "rng": rng_state(),
            "config": self.config.to_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = TrainConfig.from_dict(state["config"])
        if saved != self.config:
            changed = {k: (v, getattr(self.config, k)) for k, v in saved.to_dict().items()
                       if getattr(self.config, k) != v}
            raise ValueError(f"checkpoint was written by a different configuration: {changed} (saved, now)")
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = state["epoch"]
        self.global_step = state["global_step"]
        self.history = list(state["history"])
        set_rng_state(state["rng"])

    # --- training ----------------------------------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Data order and augmentations depend only on (seed, rank, epoch), so a run resumed from any epoch's
        # checkpoint sees exactly the batches an uninterrupted run sees, on every rank.
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(self.epoch)
        epoch_seed = (self.config.seed * 1_000_003 + self.epoch) * 1009 + self.rank
        self._generator.manual_seed(epoch_seed)
        torch.manual_seed(epoch_seed)
        for view1, view2, _ in self.loader:
            yield tuple(  # type: ignore[misc]
                v.to(self.device, non_blocking=True, memory_format=self.memory_format) for v in (view1, view2)
            )

    def _all_finite(self, loss: torch.Tensor) -> bool:
        """Whether the loss is finite on every rank: all ranks must stop at the same step, or the others hang."""
        finite = torch.isfinite(loss).to(torch.int32)
        if self.world_size > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite)

    def train_epoch(self) -> dict[str, float]:
        """Train one epoch and return its metrics (averaged over steps and ranks); rank 0 adds the monitor."""
        self.model.train()
        sums: dict[str, torch.Tensor] = {}
        steps, wait, start = 0, 0.0, time.perf_counter()
        batches = self._batches()
        while True:
            fetch = time.perf_counter()
            batch = next(batches, None)
            wait += time.perf_counter() - fetch
            if batch is None:
                break
            output = training_step(self.model, *batch, self.optimizer)
            loss = output.loss.detach()
            if not self._all_finite(loss):
                raise DivergedError(f"loss became non-finite ({loss.item()} here) at epoch {self.epoch + 1}, "
                                    f"step {self.global_step}")
            self.scheduler.step()
            self.global_step += 1
            steps += 1
            for name, value in {"loss": loss, **output.metrics}.items():
                sums[name] = sums.get(name, 0.0) + value.float()
        elapsed = time.perf_counter() - start
        names = sorted(sums)
        means = torch.stack([sums[n] for n in names]) / max(steps, 1)
        if self.world_size > 1:
            dist.all_reduce(means)
            means /= self.world_size
        self.epoch += 1
        metrics = {n: float(v) for n, v in zip(names, means)}
        metrics |= {
            "epoch": self.epoch,
            "lr": self.scheduler.get_last_lr()[0],
            "epoch_time_s": elapsed,
            "images_per_second": steps * self.config.batch_size / elapsed,
            "data_wait_fraction": wait / elapsed,
        }
        metrics |= self.method.epoch_diagnostics()
        if self.rank == 0 and self.config.monitor_bank_size:
            monitor_start = time.perf_counter()
            metrics["knn_monitor_accuracy"] = self.knn_monitor()
            metrics["monitor_time_s"] = time.perf_counter() - monitor_start
        self.history.append(metrics)
        return metrics

    def knn_monitor(self) -> float:
        """kNN accuracy of the current encoder: a bank of labeled training images, queries from validation."""
        bank = self.probe_sets["train"]
        queries = self.probe_sets["val"]
        bank = Subset(bank, range(min(self.config.monitor_bank_size, len(bank))))
        queries = Subset(queries, range(min(self.config.monitor_query_size, len(queries))))
        encoder = self.method.backbone
        return knn_accuracy(
            extract_features(encoder, bank, device=self.device),
            extract_features(encoder, queries, device=self.device),
            num_classes=self.splits.info.num_classes,
            k=self.config.knn_k,
            temperature=self.config.knn_temperature,
        )

    # --- evaluation --------------------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Probes on the pretrained encoder, and the same probes on raw pixels and a random-init encoder."""
        c, sets = self.config, self.probe_sets
        num_classes = self.splits.info.num_classes
        probe_kwargs: dict[str, Any] = {"num_classes": num_classes, "device": self.device}
        results: dict[str, float] = {}
        if c.probe:
            results |= evaluate_frozen(self.method.backbone, sets["train"], sets["val"], sets["test"],
                                       knn_k=c.knn_k, knn_temperature=c.knn_temperature, **probe_kwargs)
        if c.baselines:
            results |= raw_pixel_baseline(sets["train"], sets["val"], sets["test"], **probe_kwargs)
            torch.manual_seed(c.seed)  # the same draw as this run's initial weights
            random_backbone, _ = build_backbone(c.backbone, in_channels=self.splits.info.channels,
                                                cifar_stem=c.cifar_stem)
            random_init = evaluate_frozen(random_backbone.to(self.device), sets["train"], sets["val"],
                                          sets["test"], knn_k=c.knn_k, knn_temperature=c.knn_temperature,
                                          **probe_kwargs)
            results |= {f"random_init_{k}": v for k, v in random_init.items()}
        if c.finetune_epochs:
            feature_dim = self.method.projection_head[0].in_features  # no second backbone just for its width
            results |= fine_tune(self.method.backbone, feature_dim, sets["train"], sets["val"], sets["test"],
                                 epochs=c.finetune_epochs, seed=c.seed, **probe_kwargs)
        return results

    def fit(self, on_epoch: Callable[[Trainer, dict[str, float]], None] | None = None) -> dict[str, float]:
        """Train the remaining epochs (calling ``on_epoch`` after each), then evaluate on rank 0."""
        while self.epoch < self.config.epochs:
            metrics = self.train_epoch()
            if on_epoch is not None:
                on_epoch(self, metrics)
        final = self.evaluate() if self.rank == 0 else {}
        if self.history:
            final |= {"final_loss": self.history[-1]["loss"], "epochs_done": self.epoch}
        return final



Report = Callable[[dict[str, Any], bool], None]
"""``report(metrics, with_checkpoint)``: hands a result to whoever runs the trainer (Ray Train, Tune, a log);
``with_checkpoint`` asks it to save ``trainer.state_dict()`` along with the result."""


def run_to_end(trainer: Trainer, report: Report, *, after_epoch: Callable[[Trainer], None] | None = None) -> None:
    """Train the remaining epochs, report each with a checkpoint, then evaluate on rank 0 and report the end.

    Every rank calls ``report`` the same number of times (Ray Train uses reports as barriers). A diverged run
    (non-finite loss on any rank; all ranks raise at the same step) is not an error for the caller to retry (it
    would diverge again): it ends with one report marked ``status: diverged`` with its reason. That report carries
    a checkpoint like the others, because Ray Train's ``Result.metrics`` are those of the last checkpointed report.
    """
    identity = {"seed": trainer.config.seed}
    metrics: dict[str, Any] = dict(trainer.history[-1]) if trainer.history else {}
    try:
        while trainer.epoch < trainer.config.epochs:
            metrics = trainer.train_epoch() | identity | {"is_final": False}
            if after_epoch is not None:
                after_epoch(trainer)
            report(metrics, True)
    except DivergedError as error:
        report({**metrics, **identity, "is_final": True, "status": "diverged", "failure_reason": str(error),
                "epochs_done": trainer.epoch}, True)
        return
    start = time.perf_counter()
    final = trainer.evaluate() if trainer.rank == 0 else {}
    report({**metrics, **final, **identity, "epochs_done": trainer.epoch, "final_loss": metrics.get("loss"),
            "evaluation_time_s": time.perf_counter() - start, "is_final": True, "status": "completed"}, True)

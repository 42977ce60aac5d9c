"""The Ray Train glue (Train V2 API), and the only module of ``trainers`` that imports Ray.

Each Ray Train worker runs :func:`train_loop_per_worker`, which builds the same :class:`trainers.loop.Trainer` a
single process uses. Ray has already initialised ``torch.distributed`` (gloo on CPU, nccl on GPU), so the trainer
shards the data, all-gathers SimCLR negatives with gradient and MoCo keys into one queue identical on every rank.
After every epoch all workers report their metrics; rank 0 attaches a complete checkpoint (model, momentum
encoder, queue and pointer, optimizer, scheduler, RNG states, epoch). A (re)started worker group resumes from
``ray.train.get_checkpoint()``. At the end rank 0 runs the probes once and reports them as the final metrics.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from trainers.config import TrainConfig, validate
from trainers.loop import CheckpointError, Trainer, load_checkpoint, run_to_end, save_checkpoint
from trainers.runtime import keep_freed_memory

CHECKPOINT_FILE = "checkpoint.pt"
T = TypeVar("T")


def _report(trainer: Trainer, metrics: dict[str, Any], with_checkpoint: bool) -> None:
    """Every rank reports (Train V2 requires it); rank 0 attaches the checkpoint."""
    if trainer.rank != 0 or not with_checkpoint:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(trainer.state_dict(), Path(folder) / CHECKPOINT_FILE)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(folder))


def build_worker_trainer(config: TrainConfig) -> Trainer:
    """A Trainer on this worker's device, DDP-wrapped when there are several workers, restored if possible."""

    def wrap(model: Any) -> Any:
        # The MoCo queue is kept identical by construction (every rank enqueues the same gathered keys), so
        # DDP need not broadcast buffers every step (the queue alone can be tens of MB).
        return ray.train.torch.prepare_model(
            model, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False}
        )

    trainer = Trainer(config, device=ray.train.torch.get_device(), wrap_model=wrap)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        trainer.load_state_dict(restore(checkpoint, lambda folder: load_checkpoint(folder / CHECKPOINT_FILE)))
    return trainer


def restore(checkpoint: Checkpoint, read: Callable[[Path], T]) -> T:
    """``read(folder)`` of ``checkpoint``, or, if that fails because a file in it is missing or damaged (a crash
    while it was written or uploaded), of the newest older checkpoint of the same run that reads (Ray Train and
    Tune keep the last two, named so that they sort by age). Every skipped one is named, with its problem."""
    problems: list[str] = []
    for candidate in [checkpoint, *_older_checkpoints(checkpoint)]:
        try:
            with candidate.as_directory() as folder:
                value = read(Path(folder))
        except (CheckpointError, OSError, ValueError) as error:  # ValueError: e.g. a truncated JSON file
            problems.append(f"{candidate.path}: {error}")
            continue
        for problem in problems:
            print(f"skipped checkpoint {problem}; resuming from {candidate.path}", file=sys.stderr, flush=True)
        return value
    raise CheckpointError("no readable checkpoint to resume from: " + "; ".join(problems))


def _older_checkpoints(checkpoint: Checkpoint) -> list[Checkpoint]:
    parent, name = checkpoint.path.rstrip("/").rsplit("/", 1)
    siblings = checkpoint.filesystem.get_file_info(pafs.FileSelector(parent))
    older = sorted((info.path for info in siblings if info.type == pafs.FileType.Directory
                    and info.base_name.startswith("checkpoint_") and info.base_name < name), reverse=True)
    return [Checkpoint(path, filesystem=checkpoint.filesystem) for path in older]


def run_worker(loop_config: dict[str, Any], *, after_epoch: Callable[[Trainer], None] | None = None) -> None:
    """The body of every worker; ``after_epoch`` runs after an epoch's training, before its report."""
    # Ray sets OMP_NUM_THREADS to the integer part of the worker's CPUs; use every CPU it was given.
    torch.set_num_threads(max(1, round(loop_config.get("cpus_per_worker", torch.get_num_threads()))))
    keep_freed_memory()  # no page faults for each step's large tensors (trainers/runtime.py)
    trainer = build_worker_trainer(TrainConfig.from_dict(loop_config["train"]))
    # The final report carries a checkpoint too: Train V2's Result.metrics are those of the last checkpointed one.
    run_to_end(trainer, lambda metrics, with_checkpoint: _report(trainer, metrics, with_checkpoint),
               after_epoch=after_epoch)


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    run_worker(loop_config)


def make_torch_trainer(
    config: TrainConfig,
    *,
    workers: int,
    storage_path: str,
    name: str,
    use_gpu: bool = False,
    cpus_per_worker: float = 1.0,
    max_failures: int = 0,
    callbacks: Sequence[Any] = (),
    placement_strategy: str = "PACK",
    loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    loop_extras: dict[str, Any] | None = None,
) -> TorchTrainer:
    """A ``TorchTrainer`` for ``config`` on ``workers`` workers (``config.batch_size`` is the global batch).

    ``name`` must depend only on the run's identity: Ray Train resumes a run whose ``storage_path/name`` exists.
    Multi-node clusters need ``storage_path`` on storage every node sees (NFS, or a URI such as ``s3://...``).
    ``loop`` replaces the worker function (it receives ``{"train": config dict, **loop_extras}``).
    """
    validate(config, world_size=workers)
    resources = {"CPU": cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    return TorchTrainer(
        loop,
        train_loop_config={"train": config.to_dict(), "cpus_per_worker": cpus_per_worker, **(loop_extras or {})},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy=placement_strategy),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=list(callbacks),
        ),
    )

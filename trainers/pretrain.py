"""``python -m trainers.pretrain``: one pretraining run with probe evaluation, in this process or on Ray Train.

Every field of :class:`trainers.config.TrainConfig` is a flag (``--help`` lists them with their defaults).
The run folder holds ``config.json``, ``metrics.jsonl`` (one line per epoch), ``checkpoint.pt`` (written
atomically after every epoch), ``checkpoint.prev.pt`` (the epoch before, kept in case the newest file is lost or
damaged) and ``results.json`` (final probe accuracies). Its default name depends only on the configuration, so
running the same command with ``--resume`` continues where it stopped, from the newest readable checkpoint.
With ``--workers N`` the run is data-parallel on N Ray Train workers (``--address`` joins an existing cluster);
Ray Train then keeps the checkpoints in the run folder and restarts failed workers from them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from trainers.config import TrainConfig, add_dataclass_arguments, dataclass_values, validate
from trainers.loop import CheckpointError, Trainer, checkpoint_files, load_latest_checkpoint, save_checkpoint
from trainers.runtime import keep_freed_memory

CHECKPOINT = "checkpoint.pt"
DAMAGED_CHECKPOINT = "checkpoint.damaged.pt"


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    add_dataclass_arguments(parser, TrainConfig)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(**dataclass_values(TrainConfig, args))


def default_run_dir(config: TrainConfig) -> Path:
    """``runs/<method>-<dataset>-<hash of the config>``: the same config always maps to the same folder."""
    digest = hashlib.sha256(config.to_json().encode()).hexdigest()[:10]
    return Path("runs") / f"{config.method}-{config.dataset}-{digest}"


def write_text(path: Path, text: str) -> None:
    """Write atomically (temporary file + rename); no temporary file is left behind if the write fails."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def run(config: TrainConfig, run_dir: Path, *, resume: bool = False) -> dict[str, float]:
    """Train (or continue) the run in ``run_dir`` and return its final metrics."""
    checkpoint = run_dir / CHECKPOINT
    if any(path.exists() for path in checkpoint_files(checkpoint)) and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or pick another "
                              "--run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    # Temporary files of a writer that was killed mid-write: never read, and only this process writes the folder.
    for stale in run_dir.glob(f"{CHECKPOINT}.*.tmp"):
        stale.unlink(missing_ok=True)
    trainer = Trainer(config)
    latest = load_latest_checkpoint(checkpoint) if resume else None
    if latest is not None:
        state, source = latest
        trainer.load_state_dict(state)
        print(f"resumed from {source} after epoch {trainer.epoch}", flush=True)
        if source != checkpoint and checkpoint.exists():
            # Set the damaged newest file aside (kept for inspection): the next save would otherwise rotate it
            # into checkpoint.prev.pt, over the good checkpoint this run just resumed from.
            damaged = run_dir / DAMAGED_CHECKPOINT
            checkpoint.replace(damaged)
            print(f"moved the unreadable {checkpoint} to {damaged}", file=sys.stderr, flush=True)
    write_json(run_dir / "config.json", config.to_dict())
    # metrics.jsonl is rebuilt from the checkpoint's history: epochs after it (lost with a newer checkpoint, or
    # written just before a crash) are trained again and must not appear twice.
    metrics_file = run_dir / "metrics.jsonl"
    write_text(metrics_file, "".join(json.dumps(m, sort_keys=True) + "\n" for m in trainer.history))

    def on_epoch(trainer: Trainer, metrics: dict[str, float]) -> None:
        save_checkpoint(trainer.state_dict(), checkpoint, keep_previous=True)
        with metrics_file.open("a") as f:
            f.write(json.dumps(metrics, sort_keys=True) + "\n")
        shown = ("loss", "knn_monitor_accuracy", "positive_cosine", "negative_cosine", "uniformity",
                 "queue_key_consistency", "images_per_second")
        print(f"epoch {metrics['epoch']:>3}/{config.epochs} "
              + " ".join(f"{k}={metrics[k]:.4g}" for k in shown if k in metrics), flush=True)

    final = trainer.fit(on_epoch)
    write_json(run_dir / "results.json", final)
    return final


def run_on_ray(
    config: TrainConfig,
    run_dir: Path,
    *,
    workers: int,
    address: str | None,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    resume: bool = False,
) -> dict[str, float]:
    """The same run, data-parallel on ``workers`` Ray Train workers (this machine, or the cluster at ``address``).

    Ray Train keeps its checkpoints under ``run_dir``; it must be on storage every node sees for multi-node runs.
    """
    import ray

    from trainers.distributed import make_torch_trainer

    if run_dir.exists() and any(run_dir.iterdir()) and not resume:
        raise FileExistsError(f"{run_dir} already holds a run; pass --resume to continue it or pick another "
                              "--run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / "config.json", config.to_dict())
    if address:
        ray.init(address=address)
    else:  # a local cluster: dashboard on loopback only, Ray's token authentication left on
        # address="local": always a new cluster, never one that happens to run on this machine.
        context = ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1")
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)
    trainer = make_torch_trainer(config, workers=workers, storage_path=str(run_dir.resolve().parent),
                                 name=run_dir.name, use_gpu=use_gpu, cpus_per_worker=cpus_per_worker,
                                 max_failures=max_failures)
    result = trainer.fit()
    final = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    write_json(run_dir / "results.json", final)
    return final


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainers.pretrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    parser.add_argument("--run-dir", type=Path, default=None,
                        help="output folder (default: runs/<method>-<dataset>-<config hash>)")
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its checkpoint")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ray_flags = parser.add_argument_group("data-parallel on Ray Train (--workers >= 1)")
    ray_flags.add_argument("--workers", type=int, default=0,
                           help="Ray Train workers; 0 = train in this process without Ray (default: 0)")
    ray_flags.add_argument("--address", default=None,
                           help="join this Ray cluster (e.g. auto or HEAD_IP:6379); default: start a local one")
    ray_flags.add_argument("--use-gpu", action="store_true", help="one GPU per worker (nccl)")
    ray_flags.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs per worker (default: 1)")
    ray_flags.add_argument("--max-failures", type=int, default=2,
                           help="worker-group restarts from the last checkpoint before giving up (default: 2)")
    args = parser.parse_args(argv)
    if args.workers < 0:
        parser.error(f"--workers must be >= 0, got {args.workers}")
    try:
        config = config_from_args(args)
        validate(config, world_size=max(args.workers, 1))
    except ValueError as error:
        parser.error(str(error))
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # no page faults for each step's large tensors (trainers/runtime.py)
    run_dir = args.run_dir or default_run_dir(config)
    print(f"config:\n{config.to_json()}\nrun folder: {run_dir}", flush=True)
    try:
        if args.workers:
            final = run_on_ray(config, run_dir, workers=args.workers, address=args.address, use_gpu=args.use_gpu,
                               cpus_per_worker=args.cpus_per_worker, max_failures=args.max_failures,
                               resume=args.resume)
        else:
            final = run(config, run_dir, resume=args.resume)
    except CheckpointError as error:  # the message names the files and what to do; a traceback adds nothing
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("final metrics:")
    for name, value in sorted(final.items()):
        print(f"  {name:40s} {value:.4f}" if isinstance(value, float) else f"  {name:40s} {value}")
    print(f"results: {run_dir / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One Tune trial: sampled values -> TrainConfig -> a training run per seed -> one final report.

Two ways to train, the same ``trainers.loop.run_to_end`` either way (same data order, same numbers on CPU):

- ``in_process`` (one worker; the default then): the trial function itself builds the ``Trainer`` and reports
  each epoch to Tune with a checkpoint (``tune.report``), so a trial costs no worker-group start-up. A retried
  trial resumes from ``tune.get_checkpoint()``, which also holds the rows of the seeds it had finished.
- ``ray_train``: per seed a ``TorchTrainer`` (Train V2 pattern) whose per-epoch reports reach Tune through
  ``TuneReportCallback``. Its Train runs are named by the trial id and seed only, so a retried trial resumes them
  from their checkpoints.

A third mode, ``synthetic``, trains nothing: it reports a known objective of the sampled values through the same
protocol, to check a cluster, the searcher and the results store in seconds (and to load-test them).

Either way ASHA decides on the per-epoch reports, and a diverged run is not an error: it ends with status
``diverged`` and the worst objective (0), never a NaN that would leave an Optuna trial running. After its seeds
the trial reports once more, with ``is_final`` and one row per seed for the results store.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
import ray
import torch
from ray import tune

from study.config import StudyConfig
from trainers.config import TrainConfig
from trainers.runtime import keep_freed_memory, release_freed_memory

# The training modules (the trainer with torchvision, Ray Train) are imported by the functions that train, so that
# a synthetic trial's process starts without them (seconds less per trial process; eight start at once in a load
# test on two cores).
if TYPE_CHECKING:
    from trainers.loop import Trainer

WORST_OBJECTIVE = 0.0  # accuracies lie in [0, 1]
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))
PROGRESS_FILE = "trial_progress.json"  # rows of finished seeds; start, pauses and save time of the current one


def versions() -> dict[str, str]:
    return {"torch_version": torch.__version__, "ray_version": ray.__version__,
            "optuna_version": optuna.__version__, "python_version": platform.python_version()}


def train_configs(study: StudyConfig, sampled: dict[str, Any]) -> list[TrainConfig]:
    """The TrainConfig of each seed of a trial (sampled values applied through the space's derivations)."""
    space = study.search_space()
    configs = []
    for seed in study.seeds():
        base = study.base_values(seed)
        configs.append(TrainConfig(**(base | space.derive(sampled, base))))
    return configs


def trial_row(study: StudyConfig, trial_id: str, config: TrainConfig, sampled: dict[str, Any],
              final: dict[str, Any], started: float, cpus_per_worker: float, paused_s: float = 0.0) -> dict[str, Any]:
    """One trials.parquet row: the configuration, derived quantities, outcome and provenance.

    ``wall_time_s`` is the time since ``started`` less ``paused_s``, the time the trial spent stopped between a
    checkpoint and its restart (paused at a rung by the promotion scheduler, or retried after a failure)."""
    status = final.get("status", "completed")
    objective = final.get(study.objective) if status == "completed" else WORST_OBJECTIVE
    return {
        **config.to_dict(),
        "study_name": study.name, "trial_id": trial_id, "status": status,
        "failure_reason": final.get("failure_reason"),
        "base_lr": sampled.get("base_lr"), "queued_batches": sampled.get("queued_batches"),
        "global_batch": config.batch_size, "world_size": study.workers_per_trial, "effective_lr": config.lr,
        "negatives_per_positive": config.negatives_per_positive,
        "objective": objective,
        # Final metrics, except names of config fields: the last epoch reports its current "lr" (0 at the end of
        # the cosine schedule), which must not overwrite the configured learning rate.
        **{k: v for k, v in final.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in TRAIN_FIELDS},
        "nodes": len({n["NodeID"] for n in ray.nodes() if n["Alive"]}),
        "node_id": ray.get_runtime_context().get_node_id(), "workers": study.workers_per_trial,
        "cpus_per_worker": cpus_per_worker, "gpus_per_worker": study.gpus_per_worker,
        "wall_time_s": time.time() - started - paused_s,
        "started_at": started, "finished_at": time.time(),  # seconds since the epoch; stored as UTC timestamps
        **versions(),
    }


def _train_with_ray_train(study: StudyConfig, trial_id: str, config: TrainConfig,
                          cpus_per_worker: float) -> dict[str, Any]:
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.distributed import make_torch_trainer

    trainer = make_torch_trainer(
        config, workers=study.workers_per_trial, storage_path=f"{study.study_dir}/train",
        name=f"{trial_id}-seed{config.seed}", use_gpu=study.gpus_per_worker > 0,
        cpus_per_worker=cpus_per_worker, max_failures=study.max_failures,
        callbacks=[TuneReportCallback()],
    )
    return dict(trainer.fit().metrics)


def _run_seed_in_process(trainer: Trainer, progress: dict[str, Any]) -> dict[str, Any]:
    """One seed's run to its end; each epoch's report carries the trainer state and ``progress``."""
    from trainers.distributed import CHECKPOINT_FILE
    from trainers.loop import run_to_end, save_checkpoint

    final: dict[str, Any] = {}

    def report(metrics: dict[str, Any], with_checkpoint: bool) -> None:
        if metrics.get("is_final"):
            final.update(metrics)  # not checkpointed: the last epoch's checkpoint covers it (a retry re-evaluates)
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as folder:
            save_checkpoint(trainer.state_dict(), Path(folder) / CHECKPOINT_FILE)
            _write_progress(Path(folder), progress)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))

    run_to_end(trainer, report)
    return final


def _rows_in_process(study: StudyConfig, trial_id: str, sampled: dict[str, Any], configs: list[TrainConfig],
                     cpus: float) -> list[dict[str, Any]]:
    """Train every seed in this process, resuming from the trial's Tune checkpoint when it is a retry."""
    from trainers.distributed import CHECKPOINT_FILE, restore
    from trainers.loop import Trainer, load_checkpoint

    torch.set_num_threads(max(1, round(cpus)))  # Tune sets OMP_NUM_THREADS to the integer part of the trial's CPUs
    keep_freed_memory()  # no page faults for each step's large tensors (trainers/runtime.py)
    release_freed_memory()  # a reused trial process: what the previous trial freed goes back to the kernel
    progress = _new_progress()
    state: dict[str, Any] | None = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        progress, state = restore(checkpoint, lambda folder: (_read_progress(folder),
                                                              load_checkpoint(folder / CHECKPOINT_FILE)))
    for config in configs[len(progress["rows"]):]:
        trainer = Trainer(config)
        if state is not None:
            trainer.load_state_dict(state)  # refuses a state written by another configuration
            state = None
        final = _run_seed_in_process(trainer, progress)
        progress["rows"].append(trial_row(study, trial_id, config, sampled, final, progress["started"], cpus,
                                          progress["paused_s"]))
        progress |= {"started": time.time(), "paused_s": 0.0}
    return progress["rows"]


def _new_progress() -> dict[str, Any]:
    return {"rows": [], "started": time.time(), "paused_s": 0.0}


def _write_progress(folder: Path, progress: dict[str, Any]) -> None:
    (folder / PROGRESS_FILE).write_text(json.dumps(progress | {"saved_at": time.time()}, default=str))


def _read_progress(folder: Path) -> dict[str, Any]:
    """A checkpoint's progress, with the time since it was written counted as paused (Tune restores a trial from
    its last checkpoint after a pause at a rung or a failure)."""
    progress = json.loads((folder / PROGRESS_FILE).read_text())
    stopped = max(0.0, time.time() - progress.pop("saved_at", time.time()))
    return progress | {"paused_s": progress.get("paused_s", 0.0) + stopped}


def synthetic_objective(config: TrainConfig) -> float:
    """The ``synthetic`` trial mode's known truth: a peak at temperature 0.2 (log scale), nothing else matters."""
    return 0.9 - 0.1 * math.log10(config.temperature / 0.2) ** 2


def _rows_synthetic(study: StudyConfig, trial_id: str, sampled: dict[str, Any], configs: list[TrainConfig],
                    cpus: float) -> list[dict[str, Any]]:
    """No training: per-epoch reports (each with a small checkpoint of the progress, so that a paused or retried
    trial goes on from its last epoch) and a final row, through the same protocol as a real trial."""
    progress = _new_progress() | {"epoch": 0}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            progress = _read_progress(Path(folder))
    for config in configs[len(progress["rows"]):]:
        accuracy = synthetic_objective(config)
        for epoch in range(progress["epoch"] + 1, config.epochs + 1):
            metrics = {"epoch": epoch, "seed": config.seed, "is_final": False, "loss": 10.0 / epoch,
                       "knn_monitor_accuracy": accuracy * epoch / config.epochs}
            progress["epoch"] = epoch
            with tempfile.TemporaryDirectory() as folder:
                _write_progress(Path(folder), progress)
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))
        final = {"epoch": config.epochs, "seed": config.seed, "loss": 10.0 / config.epochs, "is_final": True,
                 "knn_monitor_accuracy": accuracy,
                 "status": "completed", "epochs_done": config.epochs, "final_loss": 10.0 / config.epochs,
                 "linear_val_accuracy": accuracy, "knn_val_accuracy": accuracy}
        progress["rows"].append(trial_row(study, trial_id, config, sampled, final, progress["started"], cpus,
                                          progress["paused_s"]))
        progress |= {"started": time.time(), "paused_s": 0.0, "epoch": 0}
    return progress["rows"]


def run_trial(sampled: dict[str, Any], *, study: dict[str, Any], cpus_per_worker: float) -> None:
    """Tune's trainable (``tune.with_parameters(run_trial, study=..., cpus_per_worker=...)``)."""
    study_config = StudyConfig.from_dict(study)
    trial_id = tune.get_context().get_trial_id()
    configs = train_configs(study_config, sampled)
    if study_config.trial_mode == "synthetic":
        rows = _rows_synthetic(study_config, trial_id, sampled, configs, cpus_per_worker)
    elif study_config.in_process:
        rows = _rows_in_process(study_config, trial_id, sampled, configs, cpus_per_worker)
    else:
        rows = []
        for config in configs:
            started = time.time()
            final = _train_with_ray_train(study_config, trial_id, config, cpus_per_worker)
            rows.append(trial_row(study_config, trial_id, config, sampled, final, started, cpus_per_worker))
    objectives = [row["objective"] for row in rows]
    tune.report({"is_final": True, "objective": sum(objectives) / len(objectives),
                 "trial_rows": json.dumps(rows, default=str)})

"""One Tune trial: sampled values -> TrainConfig -> a Ray Train run per seed -> one final report.

The trial function runs in a Tune trial actor. For each seed it builds a ``TorchTrainer`` (Train V2 pattern) whose
per-epoch reports reach Tune through ``TuneReportCallback`` (ASHA decides on them). Its Train runs are named by the
trial id and seed only, so a retried trial resumes them from their checkpoints. A diverged run is not an error: it
ends with status ``diverged`` and the worst objective (0), never a NaN that would leave an Optuna trial running.
After its seeds it reports once more, with ``is_final`` and one row per seed for the results store.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import time
from typing import Any

import optuna
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from study.config import StudyConfig
from trainers.config import TrainConfig
from trainers.distributed import make_torch_trainer

WORST_OBJECTIVE = 0.0  # accuracies lie in [0, 1]
TRAIN_FIELDS = frozenset(f.name for f in dataclasses.fields(TrainConfig))


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
              final: dict[str, Any], started: float) -> dict[str, Any]:
    """One trials.parquet row: the configuration, derived quantities, outcome and provenance."""
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
        "nodes": len({n["NodeID"] for n in ray.nodes() if n["Alive"]}), "workers": study.workers_per_trial,
        "wall_time_s": time.time() - started,
        "started_at": started, "finished_at": time.time(),  # seconds since the epoch; stored as UTC timestamps
        **versions(),
    }


def run_trial(sampled: dict[str, Any], *, study: dict[str, Any], cpus_per_worker: float) -> None:
    """Tune's trainable (``tune.with_parameters(run_trial, study=..., cpus_per_worker=...)``)."""
    study_config = StudyConfig.from_dict(study)
    trial_id = tune.get_context().get_trial_id()
    rows, objectives = [], []
    for config in train_configs(study_config, sampled):
        started = time.time()
        trainer = make_torch_trainer(
            config, workers=study_config.workers_per_trial, storage_path=f"{study_config.study_dir}/train",
            name=f"{trial_id}-seed{config.seed}", use_gpu=study_config.gpus_per_worker > 0,
            cpus_per_worker=cpus_per_worker, max_failures=study_config.max_failures,
            callbacks=[TuneReportCallback()],
        )
        final = dict(trainer.fit().metrics)
        row = trial_row(study_config, trial_id, config, sampled, final, started)
        rows.append(row)
        objectives.append(row["objective"])
    row_json = json.dumps(rows, default=str)
    tune.report({"is_final": True, "objective": sum(objectives) / len(objectives), "trial_rows": row_json})

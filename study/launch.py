"""``python -m study.launch``: a hyperparameter study of SimCLR/MoCo with Ray Tune + Optuna, results in Parquet.

With no arguments: the default study (space ``contrastive``: both methods, 24 trials, up to 6 epochs on 2,048
Fashion-MNIST images each, ASHA on the per-epoch kNN monitor with rungs at epochs 1 and 3), on a local Ray cluster
whose dashboard listens on 127.0.0.1 (its URL is printed). Every field of StudyConfig is a flag (``--help``);
``--config FILE`` reads them from YAML or TOML first. ``--resume <study dir>`` continues an interrupted study:
finished trials are kept and not rerun, unfinished ones continue from their checkpoints, the searcher continues its
history.

Results: ``<study dir>/trials.parquet`` and ``epochs.parquet`` (see ``study.results``), written as trials finish.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.tune.utils import flatten_dict
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from search_spaces import SearchSpace
from study import results, storage
from study.config import StudyConfig, differences, read_config_file
from study.promotion import PromotionASHA
from study.trial import WORST_OBJECTIVE, run_trial, train_configs, trial_row
from trainers.config import TrainConfig, add_dataclass_arguments, dataclass_values
from trainers.loop import CheckpointError, Trainer

CONFIG_FILE = "study_config.json"
BASELINES_FILE = "baselines.json"
PENDING_TRIALS_ENV = "TUNE_MAX_PENDING_TRIALS_PG"
RUNGS_FILE = "promotion_rungs.json"  # the asha_promotion scheduler's state (Tune does not checkpoint schedulers)
MONITOR_METRIC = "knn_monitor_accuracy"  # ASHA's signal: reported by every trial after each epoch
TRIAL_DRIVER_CPU = 0.01  # a trial's own function only waits on its TorchTrainer


class StudySearch(OptunaSearch):
    """OptunaSearch that only ever tells Optuna a trial's final, finite objective.

    Per-epoch results carry no objective (skipped); a trial stopped early by ASHA is told as PRUNED and a failed
    one as FAIL, so no Optuna trial is left RUNNING and no NaN reaches the sampler.

    With ``max_active``, it also limits the trials that run or wait to start, not counting paused ones (the
    promotion scheduler pauses trials at rungs and tells it, ``on_pause``/``on_unpause``): Tune's
    ConcurrencyLimiter counts a paused trial as running, so with trials paused at rungs it would stop proposing.

    With ``study_dir`` and ``num_trials``, a resumed study neither repeats nor exceeds its trials. Tune snapshots its
    experiment (trials and this searcher) every 10 s or more, while the results store records a trial the moment it
    ends: a trial suggested and finished after the last snapshot is in the results but unknown to the restored run,
    whose sampler (restored with its random state) suggests the same values again. After a restore, a suggestion
    with the values of such a recorded trial is not handed to Tune: Optuna is told the recorded outcome (as the
    trial's own end told it) and asked again. The study's count includes those trials (``Searcher.FINISHED`` at
    ``num_trials``); any left when it is reached take the next suggestions in the order they started.
    """

    def __init__(self, *args: Any, max_active: int = 0, study_dir: str | None = None, num_trials: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_active = max_active
        self._active: set[str] = set()
        self._paused: set[str] = set()
        self.study_dir = study_dir
        self.num_trials = num_trials
        self._unreplayed: list[pd.DataFrame] | None = []  # None: read the results store at the next suggest

    def __setstate__(self, state: dict[str, Any]) -> None:
        # A study started before these existed resumes without them (its Tuner pickled the searcher then).
        defaults = {"max_active": 0, "_active": set(), "_paused": set(), "study_dir": None, "num_trials": 0,
                    "_unreplayed": []}
        self.__dict__.update(defaults | state)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self._unreplayed = None  # this process resumes the study: compare with the results store first

    def _finished_since_snapshot(self) -> list[pd.DataFrame]:
        """The recorded trials (their rows, one per seed) this searcher never suggested, oldest first."""
        if self.study_dir is None:
            return []
        trials, _ = results.load(self.study_dir)
        unknown = trials[~trials["trial_id"].isin(list(self._ot_trials))]
        starts = unknown.groupby("trial_id")["started_at"].min().sort_values()
        return [unknown[unknown["trial_id"] == trial_id] for trial_id in starts.index]

    def _recorded_with(self, suggestion: dict[str, Any]) -> pd.DataFrame | None:
        """The first unreplayed trial whose recorded values are the suggestion's (None if none)."""
        params = flatten_dict(suggestion)
        for rows in self._unreplayed or []:
            first = rows.iloc[0]
            compared = {k: v for k, v in params.items() if k in rows.columns and not pd.isna(first[k])}
            if compared and all(first[k] == v for k, v in compared.items()):
                return rows
        return None

    def _tell_recorded(self, optuna_key: str, rows: pd.DataFrame) -> None:
        """Tell the Optuna trial asked under ``optuna_key`` the outcome of the recorded trial ``rows``."""
        assert self._unreplayed is not None
        self._unreplayed = [other for other in self._unreplayed if other is not rows]
        trial_id = str(rows["trial_id"].iloc[0])
        self._ot_trials[trial_id] = self._ot_trials.pop(optuna_key)  # Optuna's record under the trial's own id
        statuses = set(rows["status"])
        if "failed" in statuses:
            self.on_trial_complete(trial_id, None, error=True)
        elif "early-stopped" in statuses:
            self.on_trial_complete(trial_id, None)  # PRUNED, as ASHA's stop was told
        else:  # completed (seeds that diverged count with the worst objective, as run_trial reports)
            self.on_trial_complete(trial_id, {"is_final": True, self.metric: float(rows["objective"].mean())})

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._unreplayed is None:
            self._unreplayed = self._finished_since_snapshot()
        while True:
            if self.num_trials and len(self._ot_trials) + len(self._unreplayed) >= self.num_trials:
                while self._unreplayed:  # recorded trials not suggested again yet: they take the next suggestions
                    key = f"replay-{len(self._ot_trials)}"
                    recorded = self._recorded_with(super().suggest(key))
                    if recorded is not None:
                        self._tell_recorded(key, recorded)
                        continue
                    # A sampler that does not repeat itself: Optuna learns nothing from a suggestion that never ran.
                    dropped = self._unreplayed.pop(0)
                    print(f"WARNING: trial {dropped['trial_id'].iloc[0]} finished after Tune's last snapshot and its "
                          "values were not suggested again; the searcher does not learn from it",
                          file=sys.stderr, flush=True)
                    self.on_trial_complete(key, None, error=True)
                return Searcher.FINISHED
            if self.max_active and len(self._active - self._paused) >= self.max_active:
                return None  # Tune asks again later
            suggestion = super().suggest(trial_id)
            recorded = self._recorded_with(suggestion) if isinstance(suggestion, dict) else None
            if recorded is None:
                break
            self._tell_recorded(trial_id, recorded)  # it ran already: ask again for this Tune trial
        if isinstance(suggestion, dict):
            self._active.add(trial_id)
        return suggestion

    def on_pause(self, trial_id: str) -> None:
        self._paused.add(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self._paused.discard(trial_id)

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None, error: bool = False) -> None:
        self._active.discard(trial_id)
        self._paused.discard(trial_id)
        final = result if result and result.get("is_final") and self.metric in result else None
        if final is not None and not math.isfinite(final[self.metric]):
            final = {**final, self.metric: WORST_OBJECTIVE}
        super().on_trial_complete(trial_id, final, error)


class ResultsCallback(tune.Callback):
    """Writes each trial's rows to the results store as soon as the trial ends, whatever the ending."""

    def __init__(self, study: StudyConfig, baselines: dict[str, float], cpus_per_worker: float) -> None:
        self.study = study
        self.baselines = baselines
        self.cpus_per_worker = cpus_per_worker
        self.epochs: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}

    def get_state(self) -> dict[str, Any]:
        # Saved by Tune with the searcher's state: a resumed study keeps the epochs that its unfinished trials
        # (running, or paused at a rung) reported before the interruption; they go on from the same snapshot.
        return {"epochs": self.epochs}

    def set_state(self, state: dict[str, Any]) -> None:
        self.epochs = state["epochs"]

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict[str, Any], **info: Any) -> None:
        if "epoch" in result and "seed" in result and not result.get("is_final"):
            # Keyed by (seed, epoch): an epoch redone after a worker restart replaces the earlier report.
            row = {k: result.get(k) for k in results.EPOCH_METRICS}
            self.epochs.setdefault(trial.trial_id, {})[(int(result["seed"]), int(result["epoch"]))] = row

    def _epoch_rows(self, trial_id: str) -> list[dict[str, Any]]:
        return [{"study_name": self.study.name, "trial_id": trial_id, "seed": seed, "epoch": epoch, **row}
                for (seed, epoch), row in sorted(self.epochs.get(trial_id, {}).items())]

    def _write(self, trial: Any, status: str, reason: str | None = None) -> None:
        last = trial.last_result or {}
        if status == "completed" and "trial_rows" in last:
            rows = json.loads(last["trial_rows"])
        else:
            epochs = self.epochs.get(trial.trial_id, {})
            rows = []
            for config in train_configs(self.study, trial.config):
                done = [e for (s, e) in epochs if s == config.seed]
                final = {"status": status, "failure_reason": reason, "epochs_done": max(done, default=0)}
                if done:
                    final["final_loss"] = epochs[(config.seed, max(done))]["loss"]
                started = time.time() - float(last.get("time_total_s", 0.0))  # Tune's running time of the trial
                row = trial_row(self.study, trial.trial_id, config, trial.config, final, started,
                                self.cpus_per_worker)
                rows.append(row | {"node_id": None})  # built here, in the launcher: the trial's node is unknown
        rows = [row | self.baselines for row in rows]
        results.record(self.study.study_dir, rows, self._epoch_rows(trial.trial_id))
        self.epochs.pop(trial.trial_id, None)  # on disk now; the saved state holds unfinished trials only

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        self._write(trial, "completed" if last.get("is_final") else "early-stopped")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = None
        if getattr(trial, "error_file", None) and Path(trial.error_file).exists():
            reason = Path(trial.error_file).read_text()[-2000:]
        self._write(trial, "failed", reason or "the trial raised an error (see the Tune logs)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or TOML file with StudyConfig fields (flags override it)")
    parser.add_argument("--resume", metavar="STUDY_DIR", help="continue the interrupted study in this folder")
    parser.add_argument("--expose-dashboard", action="store_true",
                        help="allow --dashboard-host other than 127.0.0.1 (anyone who reaches it can run code)")
    parser.add_argument("--report", action=argparse.BooleanOptionalAction, default=True,
                        help="end with the analysis report in <study dir>/report (default); --no-report skips it "
                             "(python -m study.analyze <study dir> writes it later)")
    add_dataclass_arguments(parser, StudyConfig)
    return parser


def resolve_config(args: argparse.Namespace) -> StudyConfig:
    """Defaults < --config file < flags; with --resume, the saved config (flags may not change it)."""
    given = dataclass_values(StudyConfig, args)
    if args.resume:
        saved_file = storage.join(args.resume, CONFIG_FILE)
        if not storage.exists(saved_file):
            raise ValueError(f"--resume {args.resume}: no {CONFIG_FILE} there, so it is not a study folder")
        saved = storage.read_json(saved_file)
        changed = differences(saved, saved | given)
        if changed:
            raise ValueError(f"--resume cannot change the study's configuration: {changed} (saved, given)")
        return StudyConfig.from_dict(saved)
    file_values = read_config_file(args.config) if args.config else {}
    return StudyConfig.from_dict(file_values | given)


def prepare_study_dir(study: StudyConfig, *, resume: bool) -> str:
    """Create the study folder, or refuse to reuse one whose configuration differs (no silent overwrite)."""
    study_dir = study.study_dir
    saved_file = storage.join(study_dir, CONFIG_FILE)
    if storage.exists(saved_file):
        changed = differences(storage.read_json(saved_file), study.to_dict())
        if changed:
            raise ValueError(f"{study_dir} holds a study with another configuration; differences (saved, new): "
                             f"{changed}. Choose another --name or --storage-path.")
        if not resume:
            raise ValueError(f"{study_dir} already holds this study; continue it with --resume {study_dir}")
    storage.write_json(saved_file, study.to_dict())
    return study_dir


def compute_baselines(study: StudyConfig) -> dict[str, float]:
    """Raw-pixel and random-init probe accuracies, once per study (they do not depend on the trials); none when
    the study is run without them (``baselines=False``)."""
    if study.trial_mode == "synthetic" or not study.baselines:  # synthetic: nothing is trained, nothing compared
        return {}
    cached = storage.join(study.study_dir, BASELINES_FILE)
    if storage.exists(cached):
        return storage.read_json(cached)
    smallest_batch = min(next((p.choices for p in study.search_space().params if p.name == "batch_size"), [256]))
    config = TrainConfig(**(study.base_values() | {"probe": False, "baselines": True, "batch_size": smallest_batch}))
    values = {k: v for k, v in Trainer(config).evaluate().items() if not k.endswith("weight_decay")}
    storage.write_json(cached, values)
    return values


def driver_cpus(study: StudyConfig) -> float:
    """CPUs of the trial function itself: all of an in-process trial's, a sliver for one that waits on Train."""
    return 0.0 if study.in_process else TRIAL_DRIVER_CPU


def worker_cpus(study: StudyConfig) -> float:
    """``cpus_per_worker``, or with 0 (auto) the whole cluster's CPUs shared by one trial's workers."""
    if study.cpus_per_worker:
        return study.cpus_per_worker
    return (ray.cluster_resources().get("CPU", 0.0) - driver_cpus(study)) / study.workers_per_trial


def trial_resources(study: StudyConfig) -> dict[str, float]:
    """What Tune reserves for a trial function: an in-process trial trains there; otherwise Train's workers
    reserve their own resources and the function only waits."""
    if not study.in_process:
        return {"CPU": TRIAL_DRIVER_CPU}
    return {"CPU": worker_cpus(study)} | ({"GPU": study.gpus_per_worker} if study.gpus_per_worker else {})


def concurrency(study: StudyConfig) -> int:
    """Trials that can run at once without deadlock: each holds its driver's CPU *and* its workers' CPUs/GPUs."""
    available = ray.cluster_resources()
    cpus, gpus = available.get("CPU", 0.0), available.get("GPU", 0.0)
    per_trial_cpu = driver_cpus(study) + study.workers_per_trial * worker_cpus(study)
    fit = math.floor(cpus / per_trial_cpu + 1e-9)
    if study.gpus_per_worker:
        fit = min(fit, math.floor(gpus / (study.workers_per_trial * study.gpus_per_worker) + 1e-9))
    if fit < 1:
        raise ValueError(f"a trial needs {per_trial_cpu:g} CPUs and {study.workers_per_trial * study.gpus_per_worker:g}"
                         f" GPUs but the cluster has {cpus:g} CPUs and {gpus:g} GPUs: lower workers_per_trial or "
                         "cpus_per_worker/gpus_per_worker")
    if study.max_concurrent_trials:
        fit = min(fit, study.max_concurrent_trials)
    return fit


@dataclass(frozen=True)
class DefineByRun:
    """Optuna's define-by-run space function (a picklable object: Tune checkpoints the searcher with it)."""

    space: SearchSpace

    def __call__(self, trial: Any) -> None:
        self.space.sample(trial)


def make_searcher(study: StudyConfig, space: SearchSpace, max_active: int = 0) -> StudySearch:
    import optuna

    define_by_run = DefineByRun(space)
    if study.searcher == "grid":
        return StudySearch(space=define_by_run, metric="objective", mode="max", max_active=max_active,
                           sampler=optuna.samplers.RandomSampler(seed=study.seed), points_to_evaluate=space.grid(),
                           study_dir=study.study_dir, num_trials=study.num_trials)
    sampler = (optuna.samplers.TPESampler(seed=study.seed) if study.searcher == "tpe"
               else optuna.samplers.RandomSampler(seed=study.seed))
    return StudySearch(space=define_by_run, metric="objective", mode="max", max_active=max_active, sampler=sampler,
                       study_dir=study.study_dir, num_trials=study.num_trials)


@ray.remote(num_cpus=0)
def _read_token(location: str) -> str | None:
    try:
        return storage.read_json(location)
    except (OSError, ValueError):
        return None


def check_storage_is_shared(study_dir: str) -> None:
    """Refuse a study whose folder some node of the cluster cannot see: its trials would write their checkpoints
    and Tune its results where the launcher never looks, and a retried trial would not find its checkpoint."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2:
        return
    token = secrets.token_hex(8)
    probe = storage.join(study_dir, f".shared-storage-check-{token}.json")
    storage.write_json(probe, token)
    try:
        seen = ray.get([_read_token.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"],
                                                                                               soft=False))
                        .remote(probe) for node in nodes])
    finally:
        fs, path = storage.filesystem(probe)
        fs.delete_file(path)
    blind = [f"{node['NodeManagerAddress']} (node {node['NodeID'][:12]})" for node, value in zip(nodes, seen)
             if value != token]
    if blind:
        raise ValueError(f"the study folder {study_dir} is not visible from every node of the cluster: "
                         f"{', '.join(blind)} cannot read a file the launcher wrote there. A multi-node study needs "
                         "--storage-path on storage every node sees (NFS, or a URI such as s3://bucket/studies)")


def start_ray(study: StudyConfig, *, expose_dashboard: bool) -> None:
    if study.address:
        ray.init(address=study.address)
        return
    if study.dashboard_host != "127.0.0.1":
        if not expose_dashboard:
            raise ValueError(f"dashboard_host {study.dashboard_host!r} needs expose_dashboard=True")
        print(f"WARNING: the Ray dashboard listens on {study.dashboard_host}; anyone who reaches it can run code",
              file=sys.stderr)
    # Token authentication: Ray 2.60 turns it on for a new local cluster (and makes ~/.ray/auth_token) unless
    # RAY_AUTH_MODE says otherwise; the launcher refuses to start an unauthenticated cluster.
    if os.environ.get("RAY_AUTH_MODE", "token") != "token":
        raise ValueError(f"RAY_AUTH_MODE={os.environ['RAY_AUTH_MODE']!r}: the launcher starts local clusters only "
                         "with Ray's token authentication (unset RAY_AUTH_MODE or set it to 'token')")
    # address="local": always a new cluster, never one that happens to run on this machine.
    context = ray.init(address="local", include_dashboard=True, dashboard_host=study.dashboard_host)
    print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)


def best_table(study_dir: str, top: int = 10) -> str:
    trials, _ = results.load(study_dir)
    if trials.empty:
        return "no finished trials"
    columns = ["trial_id", "method", "status", "temperature", "batch_size", "lr", "momentum", "queue_length",
               "negatives_per_positive", "epochs_done", "linear_val_accuracy", "linear_test_accuracy",
               "knn_val_accuracy", "random_init_linear_val_accuracy", "raw_pixel_linear_val_accuracy"]
    shown = trials.sort_values("objective", ascending=False, na_position="last").head(top)[columns]
    return shown.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def make_scheduler(study: StudyConfig) -> ASHAScheduler | PromotionASHA | None:
    """The study's early stopping on the per-epoch kNN monitor, or ``None`` (every trial runs to the end).

    Rungs at grace x factor^k epochs below the last. ``asha``: Ray Tune's ASHAScheduler, with
    ``stop_last_trials=False`` so that a trial that reaches the last epoch is never stopped before its final probe
    evaluation. ``asha_promotion``: trials pause at each rung and the top 1/factor are promoted
    (``study.promotion``; its rungs are kept in the study folder for a resume). ``study.replay`` drives the same
    schedulers over a recorded study to ask what they would have stopped.
    """
    if study.scheduler == "asha_promotion":
        return PromotionASHA(metric=MONITOR_METRIC, time_attr="epoch", max_t=study.epochs,
                             grace_period=study.grace_epochs, reduction_factor=study.reduction_factor,
                             max_trials=study.num_trials, state_file=storage.join(study.study_dir, RUNGS_FILE))
    if study.scheduler != "asha":
        return None
    return ASHAScheduler(time_attr="epoch", metric=MONITOR_METRIC, mode="max", max_t=study.epochs,
                         grace_period=study.grace_epochs, reduction_factor=study.reduction_factor,
                         stop_last_trials=False)


def run_study(study: StudyConfig, *, resume: bool = False, expose_dashboard: bool = False,
              report: bool = True) -> str:
    """Everything after validation: folder, Ray, baselines, the Tuner (fresh or restored), the best trials, and
    (``report``) the analysis report."""
    study_dir = prepare_study_dir(study, resume=resume)
    print(f"study config:\n{study.to_json()}\nstudy folder: {study_dir}", flush=True)
    if "://" not in study.storage_path:  # trials run in other working folders: give them absolute paths
        study = dataclasses.replace(study, storage_path=str(Path(study.storage_path).resolve()))
        study_dir = study.study_dir
    space = study.search_space()
    # Our reports mix per-epoch results (ASHA's metric) and one final result (the searcher's); both consumers
    # skip results that lack their metric, so Tune's strict per-result check is switched off for this process.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    start_ray(study, expose_dashboard=expose_dashboard)
    own_pending_setting: str | None = None
    try:
        check_storage_is_shared(study_dir)
        baselines = compute_baselines(study)
        trainable = tune.with_resources(
            tune.with_parameters(run_trial, study=study.to_dict(), cpus_per_worker=worker_cpus(study)),
            trial_resources(study),
        )
        tune_path = storage.join(study_dir, "tune")
        pauses = study.scheduler == "asha_promotion"
        limit = concurrency(study)
        if pauses and PENDING_TRIALS_ENV not in os.environ:
            # As many trials may wait for resources as with ConcurrencyLimiter (Tune's auto without it: 1).
            os.environ[PENDING_TRIALS_ENV] = own_pending_setting = str(limit)
        callbacks = [ResultsCallback(study, baselines, worker_cpus(study))]
        if resume and tune.Tuner.can_restore(tune_path):
            # The restored run config keeps its pickled callbacks (our ResultsCallback) and the searcher state.
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, restart_errored=False)
        else:
            tuner = tune.Tuner(
                trainable,
                # A scheduler that pauses trials has the searcher limit the active ones (StudySearch).
                tune_config=tune.TuneConfig(search_alg=make_searcher(study, space, limit if pauses else 0),
                                            scheduler=make_scheduler(study), num_samples=study.num_trials,
                                            max_concurrent_trials=None if pauses else limit,
                                            # In-process trials: the next trial runs in the finished trial's
                                            # process (torch imported, dataset cached), not in a new actor.
                                            reuse_actors=study.in_process),
                run_config=tune.RunConfig(name="tune", storage_path=study_dir, callbacks=callbacks,
                                          failure_config=tune.FailureConfig(max_failures=study.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=2), verbose=1),
            )
        tuner.fit()
    finally:
        if own_pending_setting is not None:
            os.environ.pop(PENDING_TRIALS_ENV, None)
        ray.shutdown()
    print(f"\nbest trials (objective: {study.objective}):\n{best_table(study_dir)}")
    files = " and ".join(storage.join(study_dir, name) for name in (results.TRIALS_FILE, results.EPOCHS_FILE))
    print(f"\nresults: {files}  (study.results.load({study_dir!r}) -> pandas)")
    if report:
        report_study(study_dir)
    else:
        print(f"\nno analysis report (--no-report); python -m study.analyze {study_dir} writes it", flush=True)
    return study_dir


def report_study(study_dir: str) -> None:
    """The analysis report of the finished study; a study whose analysis fails has still finished."""
    from study import analyze  # matplotlib, scikit-learn: imported when a report is written, not by every launch

    try:
        local = study_dir.removeprefix("file://") if "://" not in study_dir.removeprefix("file://") else None
        folder = analyze.write_report([study_dir], f"{local}/{analyze.REPORT_DIR}" if local else None)
    except analyze.NothingToAnalyse as reason:
        print(f"\nno analysis report: {reason}", flush=True)
    except Exception as error:  # the trials are safe in Parquet; the report can be redone with study.analyze
        print(f"\nWARNING: the analysis failed ({type(error).__name__}: {error}); rerun it with "
              f"python -m study.analyze {study_dir}", file=sys.stderr, flush=True)
    else:
        print(f"\nanalysis report: {folder}/report.html (and report.md; python -m study.analyze {study_dir})",
              flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        study = resolve_config(args)
    except ValueError as error:
        parser.error(str(error))
    if study.dashboard_host != "127.0.0.1" and not study.address and not args.expose_dashboard:
        parser.error(f"dashboard_host {study.dashboard_host!r} exposes the Ray dashboard (and its job API) beyond this "
                     "machine; pass --expose-dashboard to confirm")
    try:
        run_study(study, resume=bool(args.resume), expose_dashboard=args.expose_dashboard, report=args.report)
    except (ValueError, results.ResultsError, storage.StorageError, CheckpointError) as error:
        # Bad input, or a study file that cannot be read or written (the message names it; finished trials are
        # safe in Parquet and --resume continues once the cause is fixed).
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: Tune pickles the searcher, its space and our callback with
    # the study, and they must unpickle as study.launch.* in any process that resumes or inspects it.
    from study.launch import main as launch_main

    sys.exit(launch_main())

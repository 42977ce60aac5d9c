"""The study end to end with real Ray Tune, Ray Train and Optuna; bad input refused before Ray starts; resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
from ray.tune.search import Searcher
from ray.tune.utils import flatten_dict

from study import analyze, results
from study.config import StudyConfig
from study.launch import BASELINES_FILE, RUNGS_FILE, StudySearch, main, make_searcher, prepare_study_dir, run_study
from study.trial import WORST_OBJECTIVE

HAS_FMNIST = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists()
needs_data = pytest.mark.skipif(not HAS_FMNIST, reason="needs the Debian package dataset-fashion-mnist")

SMOKE = {"space": "smoke", "epochs": 2, "pretrain_subset": 256, "probe_train_subset": 300, "val_size": 300,
         "test_subset": 300, "cpus_per_worker": 1.0, "scheduler": "none"}
# Only the end-to-end smoke test runs the baselines and the analysis report (the default path): the other studies
# here are about trials, resume and equality, and switch both off (--no-baselines, --no-report), which the
# equality and killed-launcher tests check.
BASELINE_COLUMNS = ["raw_pixel_linear_val_accuracy", "raw_pixel_linear_test_accuracy",
                    "random_init_linear_val_accuracy", "random_init_linear_test_accuracy",
                    "random_init_knn_val_accuracy", "random_init_knn_test_accuracy"]


def _flags(values: dict) -> list[str]:
    flags = []
    for key, value in values.items():
        flag = key.replace("_", "-")
        flags += ([f"--{flag}" if value else f"--no-{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)])
    return flags


@pytest.mark.parametrize(("flags", "message"), [
    (["--space", "nope"], "space must be one of"),
    (["--dataset", "mnist"], "argument --dataset: invalid choice: 'mnist'"),
    (["--objective", "linear_test_accuracy"], "argument --objective: invalid choice"),
    (["--pretrain-subset", "40", "--space", "smoke"], "batch_size must not exceed the 40 pretraining images, got 64"),
    (["--workers-per-trial", "3", "--space", "smoke", "--scheduler", "asha"],
     "batch_size must be divisible by workers_per_trial (3)"),
    (["--workers-per-trial", "2"], "scheduler must be asha or none when trials train in Ray Train worker groups"),
    (["--replicates", "2"], "scheduler must be none when replicates > 1"),
    (["--searcher", "grid"], "grid search needs only choice parameters"),
    (["--name", "../escape"], "name must be a plain folder name"),
    (["--dashboard-host", "0.0.0.0"], "pass --expose-dashboard to confirm"),
])
def test_bad_configurations_fail_before_ray_starts(flags: list[str], message: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    try:
        code = main([*flags, "--storage-path", str(tmp_path)])
    except SystemExit as exit_:
        code = exit_.code
    assert code != 0
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()


def test_bad_space_file_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    space = tmp_path / "space.yaml"
    space.write_text("name: mine\nparams:\n  temperature: {choice: [0.1, 0.0]}\n")
    with pytest.raises(SystemExit):
        main(["--space", str(space), "--storage-path", str(tmp_path)])
    assert "temperature must be > 0 (and finite), got 0.0" in capsys.readouterr().err


def test_existing_study_with_another_configuration_is_refused(tmp_path: Path) -> None:
    first = StudyConfig(storage_path=str(tmp_path), name="s", epochs=3)  # not the default: the test outlives it
    prepare_study_dir(first, resume=False)
    with pytest.raises(ValueError, match=r"another configuration; differences \(saved, new\): \{'epochs': \(3, 5\)\}"):
        prepare_study_dir(StudyConfig(storage_path=str(tmp_path), name="s", epochs=5), resume=False)
    with pytest.raises(ValueError, match="already holds this study; continue it with --resume"):
        prepare_study_dir(first, resume=False)


@needs_data
@pytest.mark.timeout(600)
def test_smoke_study_end_to_end(tmp_path: Path) -> None:
    # A pyarrow URI as storage (file:// here; s3:// on a cluster) exercises the non-local path code.
    study = StudyConfig(name="smoke", storage_path=f"file://{tmp_path}", num_trials=3, **SMOKE)
    study_dir = run_study(study)
    assert study_dir == f"file://{tmp_path}/smoke"
    trials, epochs = results.load(study_dir)
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert set(trials["status"]) == {"completed"}
    assert len(epochs) == 3 * 2 and not epochs.duplicated(["trial_id", "seed", "epoch"]).any()
    for column in ("objective", "linear_val_accuracy", "linear_test_accuracy", "knn_val_accuracy",
                   "raw_pixel_linear_val_accuracy", "random_init_linear_val_accuracy", "final_loss"):
        assert trials[column].map(math.isfinite).all(), column
    assert (trials["objective"] == trials["linear_val_accuracy"]).all()
    assert (trials["lr"] > 0).all() and (trials["lr"] == trials["effective_lr"]).all()
    assert epochs["loss"].map(math.isfinite).all()
    for _, row in trials.iterrows():
        if row["method"] == "moco":
            assert row["queue_length"] % row["batch_size"] == 0 and row["negatives_per_positive"] == row["queue_length"]
        else:
            assert math.isnan(row["momentum"]) and math.isnan(row["queue_length"])
            assert row["negatives_per_positive"] == 2 * row["batch_size"] - 2
    saved = json.loads((tmp_path / "smoke" / "study_config.json").read_text())
    assert saved == study.to_dict()
    # The launcher ends with the analysis report; the analysis command works on the same real study.
    assert "data:image/png;base64," in (tmp_path / "smoke" / "report" / "report.html").read_text()
    assert analyze.main([study_dir, "--out", str(tmp_path / "again")]) == 0
    assert {"report.md", "report.html", "learning_curves.png"} <= {p.name for p in (tmp_path / "again").iterdir()}


@needs_data
@pytest.mark.timeout(900)
@pytest.mark.parametrize("scheduler", ["none", "asha_promotion"])
def test_killed_launcher_resumes_without_losing_or_repeating_trials(tmp_path: Path, scheduler: str) -> None:
    # asha_promotion: trials pause at epoch 1, so the kill finds paused trials, the resume requeues them, and the
    # scheduler's rungs and the epochs reported before the kill must come back.
    flags = [*_flags(SMOKE | {"num_trials": 3, "max_concurrent_trials": 1, "baselines": False,
                              "scheduler": scheduler}), "--name", "killed", "--storage-path", str(tmp_path)]
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    # Tune snapshots the experiment at its first step and then every TUNE_GLOBAL_CHECKPOINT_S (auto: 10 s or more;
    # here an hour, unless a trial's checkpoints force one), so the trial recorded first can finish after the
    # snapshot the resume starts from: the resumed searcher must not suggest it again (StudySearch).
    first_env = env | {"TUNE_GLOBAL_CHECKPOINT_S": "3600"}
    launcher = subprocess.Popen([sys.executable, "-m", "study.launch", *flags], env=first_env,
                                start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    trials_file = tmp_path / "killed" / results.TRIALS_FILE
    deadline = time.monotonic() + 400
    while not trials_file.exists() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(1)
    assert trials_file.exists(), "the first trial never finished"
    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher and the local Ray cluster it started
    launcher.wait()
    subprocess.run([str(Path(sys.executable).with_name("ray")), "stop", "--force"], capture_output=True)
    finished_before = set(results.load(str(tmp_path / "killed"))[0]["trial_id"])
    assert 1 <= len(finished_before) < 3

    resumed = subprocess.run([sys.executable, "-m", "study.launch", "--resume", str(tmp_path / "killed"),
                              "--no-report"], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no analysis report (--no-report)" in resumed.stdout and not (tmp_path / "killed" / "report").exists()
    trials, epochs = results.load(str(tmp_path / "killed"))
    assert len(trials) == 3 and trials["trial_id"].is_unique
    assert finished_before <= set(trials["trial_id"])
    assert not epochs.duplicated(["trial_id", "seed", "epoch"]).any()
    for row in trials.itertuples():  # every epoch of every trial, including those reported before the kill
        assert sorted(epochs.loc[epochs["trial_id"] == row.trial_id, "epoch"]) == list(range(1, row.epochs_done + 1))
    assert "best trials" in resumed.stdout
    searcher = StudySearch()  # the searcher's own record, as the resumed Tune run saved it
    searcher.restore_from_dir(str(tmp_path / "killed" / "tune"))
    told = searcher._ot_study.trials
    completed = trials[trials["status"] == "completed"]
    assert len(told) == 3 and len(completed) >= 1  # each result once
    assert [t.state for t in told].count(optuna.trial.TrialState.COMPLETE) == len(completed)
    assert {t.state for t in told} <= {optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED}
    assert sorted(t.value for t in told if t.value is not None) == pytest.approx(sorted(completed["objective"]))
    if scheduler == "none":
        assert len(completed) == 3
    else:  # every trial reached the rung at epoch 1, across the kill
        assert len(json.loads((tmp_path / "killed" / RUNGS_FILE).read_text())["results"]["1"]) == 3


@pytest.mark.parametrize("running_first", [False, True])
@pytest.mark.parametrize(("status", "state"), [("completed", optuna.trial.TrialState.COMPLETE),
                                             ("early-stopped", optuna.trial.TrialState.PRUNED),
                                             ("failed", optuna.trial.TrialState.FAIL)])
def test_a_resumed_searcher_replays_trials_that_finished_after_its_snapshot(
        tmp_path: Path, status: str, state: optuna.trial.TrialState, running_first: bool) -> None:
    # Tune snapshots the searcher every 10 s or more; the results store records a trial as it ends. After the
    # snapshot (trial "a"), trial "rec" is suggested and recorded, and with running_first a trial "run" that was
    # still running at the kill was suggested before it. The restored searcher must suggest "run" again, must not
    # suggest "rec" again (the killed-launcher test above met that once), must tell Optuna the outcome of "rec",
    # and must stop at num_trials counting it.
    study = StudyConfig(name="replay", storage_path=str(tmp_path), num_trials=3)
    space = study.search_space()
    before = make_searcher(study, space)
    before.suggest("a")
    snapshot = str(tmp_path / "searcher-state.pkl")
    before.save(snapshot)
    config_run = before.suggest("run") if running_first else None
    config_rec = before.suggest("rec")
    objective = 0.25 if status == "completed" else WORST_OBJECTIVE
    rows = [{"study_name": study.name, "trial_id": "rec", "seed": seed, "status": status, "objective": objective,
             "started_at": pd.Timestamp("2026-11-30", tz="UTC"), **flatten_dict(config_rec)} for seed in (0, 1)]
    results.record(study.study_dir, rows, [])
    before.on_trial_complete("rec", {"is_final": True, "objective": objective} if status == "completed" else None,
                             error=status == "failed")
    third = config_rec if running_first else before.suggest("third")  # the uninterrupted searcher's third trial

    resumed = make_searcher(study, space)
    resumed.restore(snapshot)
    if running_first:
        assert resumed.suggest("x") == config_run  # the running trial runs again
    else:
        assert resumed.suggest("x") == third != config_rec  # "rec" is not suggested again
    assert resumed.suggest("y") == Searcher.FINISHED  # a, x and rec: the study's three trials
    told = resumed._ot_study.trials
    assert len(told) == 3 and told[1 + running_first].state == state
    assert [t.params for t in told] == [t.params for t in before._ot_study.trials][:3]
    if status == "completed":
        assert told[1 + running_first].value == pytest.approx(0.25)
    assert "rec" in resumed._ot_trials and "x" in resumed._ot_trials
    fresh = make_searcher(study, space)  # a study that was not restored reads nothing and replays nothing
    assert fresh.suggest("a") == before._ot_study.trials[0].params and len(fresh._ot_trials) == 1


@needs_data
@pytest.mark.timeout(900)
def test_in_process_trials_equal_ray_train_trials_and_reruns_repeat(tmp_path: Path, shared_cluster: str) -> None:
    # Three studies with one seed: in-process trials, the same again, and TorchTrainer trials. The searcher must
    # sample the same configurations and every run must produce the same numbers (CPU, one thread per trial).
    outcome = {}
    for name, mode in (("a", "in_process"), ("b", "in_process"), ("c", "ray_train")):
        # One trial per study keeps this test short; the killed-trial tests compare two more studies the same way.
        study = StudyConfig(name=name, storage_path=str(tmp_path), num_trials=1, trial_mode=mode, baselines=False,
                            address=shared_cluster, **SMOKE)
        run_study(study, report=False)
        trials, epochs = results.load(study.study_dir)
        assert set(trials["status"]) == {"completed"} and len(epochs) == 2
        # Without baselines and report: no baselines computed or stored, no report folder.
        assert trials[BASELINE_COLUMNS].isna().all().all()
        assert not (tmp_path / name / BASELINES_FILE).exists() and not (tmp_path / name / "report").exists()
        order = trials.sort_values(["method", "temperature"])["trial_id"].tolist()
        rank = {trial_id: i for i, trial_id in enumerate(order)}
        trials = trials.assign(trial=trials["trial_id"].map(rank)).sort_values("trial").reset_index(drop=True)
        epochs = epochs.assign(trial=epochs["trial_id"].map(rank)).sort_values(["trial", "epoch"])
        outcome[name] = (trials, epochs.reset_index(drop=True))
    config_columns = ["method", "temperature", "batch_size", "lr", "momentum", "queue_length", "seed"]
    numbers = ["objective", "linear_val_accuracy", "linear_test_accuracy", "knn_val_accuracy", "final_loss"]
    epoch_numbers = ["loss", "knn_monitor_accuracy", "alignment", "uniformity"]
    reference_trials, reference_epochs = outcome["a"]
    for name in ("b", "c"):
        trials, epochs = outcome[name]
        pd.testing.assert_frame_equal(trials[config_columns + numbers], reference_trials[config_columns + numbers])
        pd.testing.assert_frame_equal(epochs[["trial", "epoch", *epoch_numbers]],
                                      reference_epochs[["trial", "epoch", *epoch_numbers]])

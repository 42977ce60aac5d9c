"""Faults injected for real into running studies: SIGKILL of the Tune trial process and of a Ray Train worker,
a run that diverges. Real Ray, real Optuna, real processes; the outcome is compared with an undisturbed study.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import optuna
import pandas as pd
import pytest

from study import results
from study.config import StudyConfig
from study.launch import StudySearch, run_study

pytestmark = [
    pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").exists(),
                       reason="needs the Debian package dataset-fashion-mnist"),
    pytest.mark.timeout(600),
]

ONE_TRIAL = {"space": "smoke", "epochs": 3, "pretrain_subset": 256, "probe_train_subset": 300, "val_size": 300,
             "test_subset": 300, "cpus_per_worker": 1.0, "scheduler": "none", "num_trials": 1, "max_failures": 1,
             "baselines": False}  # baselines and the analysis report play no part in these faults: both off
COMPARED = ["method", "temperature", "batch_size", "lr", "momentum", "queue_length", "status", "epochs_done",
            "objective", "linear_val_accuracy", "linear_test_accuracy", "knn_val_accuracy", "final_loss"]


class Killer(threading.Thread):
    """SIGKILLs the first process whose title starts with ``title`` once ``ready()`` holds (polled)."""

    def __init__(self, title: str, ready: Callable[[], bool]) -> None:
        super().__init__(daemon=True)
        self.title, self.ready = title, ready
        self.killed: list[int] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set() and not self.killed:
            if self.ready():
                pid = _pid_with_title(self.title)
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
                    self.killed.append(pid)
            time.sleep(0.05)


def _pid_with_title(title: str) -> int | None:
    """A process whose title (Ray sets ``ray::<actor class>.<method>``) starts with ``title``, from /proc."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(title.encode()):
                    return int(entry.name)
            except OSError:  # the process ended meanwhile
                continue
    return None


@pytest.fixture
def killer_cleanup() -> Iterator[list[Killer]]:
    killers: list[Killer] = []
    yield killers
    for killer in killers:
        killer.stop.set()


def _run(tmp_path: Path, address: str, name: str, **overrides: object
         ) -> tuple[StudyConfig, pd.DataFrame, pd.DataFrame]:
    """The one-trial study (with ``overrides``) on the module's cluster; its trials and epochs."""
    study = StudyConfig(name=name, storage_path=str(tmp_path), address=address, **(ONE_TRIAL | overrides))
    run_study(study, report=False)
    trials, epochs = results.load(study.study_dir)
    return study, trials, epochs


def _optuna_trials(study: StudyConfig) -> list[optuna.trial.FrozenTrial]:
    """The searcher's own record, as Tune saved it with the experiment."""
    searcher = StudySearch()
    searcher.restore_from_dir(f"{study.study_dir}/tune")
    return searcher._ot_study.trials


def _run_killing(tmp_path: Path, address: str, killers: list[Killer], name: str, mode: str, title: str,
                 checkpoint_pattern: str) -> tuple[StudyConfig, pd.DataFrame, pd.DataFrame]:
    """The one-trial study in ``mode``, SIGKILLing the process titled ``title`` once a checkpoint matching
    ``checkpoint_pattern`` (inside the study folder) exists."""
    killer = Killer(title, lambda: any((tmp_path / name).glob(checkpoint_pattern)))
    killers.append(killer)
    killer.start()
    outcome = _run(tmp_path, address, name, trial_mode=mode)
    assert killer.killed, f"no {title} process was killed"
    return outcome


def test_killed_trials_resume_and_equal_an_undisturbed_study(tmp_path: Path, shared_cluster: str,
                                                             killer_cleanup: list[Killer]) -> None:
    _, reference, reference_epochs = _run(tmp_path, shared_cluster, "reference")
    assert list(reference["status"]) == ["completed"]

    # 1. The Tune trial process itself (an in-process trial) is SIGKILLed during epoch 2: Tune retries the trial,
    #    which resumes from its epoch-1 checkpoint.
    study, trials, epochs = _run_killing(tmp_path, shared_cluster, killer_cleanup, "trial-killed", "in_process",
                                         "ray::ImplicitFunc", "tune/run_trial_*/checkpoint_000000")
    _assert_same_outcome(trials, epochs, reference, reference_epochs)
    optuna_trials = _optuna_trials(study)
    assert len(optuna_trials) == 1  # one trial, not one per attempt
    assert optuna_trials[0].state == optuna.trial.TrialState.COMPLETE
    assert optuna_trials[0].value == pytest.approx(reference["objective"].iloc[0])

    # 2. A Ray Train worker of a TorchTrainer trial is SIGKILLed after its first checkpoint: Train restarts the
    #    worker group from that checkpoint; the trial and its numbers are unchanged.
    study, trials, epochs = _run_killing(tmp_path, shared_cluster, killer_cleanup, "worker-killed", "ray_train",
                                         "ray::RayTrainWorker", "train/*-seed0/checkpoint_*")
    _assert_same_outcome(trials, epochs, reference, reference_epochs)
    assert [t.state for t in _optuna_trials(study)] == [optuna.trial.TrialState.COMPLETE]


def _assert_same_outcome(trials: pd.DataFrame, epochs: pd.DataFrame, reference: pd.DataFrame,
                         reference_epochs: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(trials[COMPARED].reset_index(drop=True), reference[COMPARED].reset_index(drop=True))
    assert list(epochs["epoch"]) == [1, 2, 3]  # exactly one row per epoch: the redone epoch replaced, none lost
    columns = ["epoch", "loss", "knn_monitor_accuracy", "uniformity"]
    pd.testing.assert_frame_equal(epochs[columns].reset_index(drop=True),
                                  reference_epochs[columns].reset_index(drop=True))


def test_a_diverging_trial_is_recorded_and_the_study_goes_on(tmp_path: Path, shared_cluster: str) -> None:
    # Two SimCLR trials on two data-parallel workers, grid-searched: one learning rate trains, the other is so large
    # that the loss becomes non-finite. Both ranks must stop at the same step (the test would hang otherwise).
    space = tmp_path / "diverge.yaml"
    space.write_text("name: diverge\nversion: 1\nlr_scaling: none\nparams:\n  method: {choice: [simclr]}\n"
                     "  temperature: {choice: [0.2]}\n  batch_size: {choice: [64]}\n"
                     "  base_lr: {choice: [0.1, 1.0e+12]}\n")
    study, trials, _ = _run(tmp_path, shared_cluster, "diverge", space=str(space), searcher="grid", num_trials=2,
                                 workers_per_trial=2, cpus_per_worker=0.99, epochs=2)
    by_lr = trials.set_index("lr")
    assert by_lr.loc[0.1, "status"] == "completed" and math.isfinite(by_lr.loc[0.1, "linear_val_accuracy"])
    diverged = by_lr.loc[1.0e12]
    assert diverged["status"] == "diverged" and "non-finite" in diverged["failure_reason"]
    assert diverged["objective"] == 0.0  # finite: the searcher never sees a NaN
    states = {t.params["base_lr"]: (t.state, t.value) for t in _optuna_trials(study)}
    assert states[1.0e12] == (optuna.trial.TrialState.COMPLETE, 0.0)
    assert states[0.1][0] == optuna.trial.TrialState.COMPLETE and states[0.1][1] > 0.1

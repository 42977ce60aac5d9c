"""Load: a 200-trial study through the real launcher (Tune + Optuna + ASHA with promotions + results store), synthetic
trials."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from study import results
from study.launch import RUNGS_FILE

TRIALS = 200


@pytest.mark.timeout(900)
def test_a_200_trial_study_completes_with_every_row_and_bounded_memory(tmp_path: Path) -> None:
    flags = ["--name", "load", "--storage-path", str(tmp_path), "--trial-mode", "synthetic", "--space", "contrastive",
             "--num-trials", str(TRIALS), "--epochs", "2", "--grace-epochs", "1", "--cpus-per-worker", "0.25",
             "--no-report"]  # the launcher, Tune, Optuna, the scheduler (trials pause at epoch 1) and the results
    # store under load; not the analysis
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.monotonic()
    launcher = subprocess.run([sys.executable, "-m", "study.launch", *flags], capture_output=True, text=True,
                              timeout=850)
    wall = time.monotonic() - start
    assert launcher.returncode == 0, launcher.stderr[-3000:]
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far, in MiB
    trials, epochs = results.load(str(tmp_path / "load"))
    assert len(trials) == TRIALS and trials["trial_id"].is_unique
    assert set(trials["status"]) <= {"completed", "early-stopped"}
    assert not epochs.duplicated(["trial_id", "seed", "epoch"]).any()
    assert set(epochs["trial_id"]) == set(trials["trial_id"])
    completed = trials[trials["status"] == "completed"]
    per_trial = epochs.groupby("trial_id").size()
    assert len(completed) >= TRIALS // 3 and (per_trial[completed["trial_id"]] == 2).all()  # top third of a rung
    assert (per_trial.drop(completed["trial_id"]) == 1).all()
    rungs = json.loads((tmp_path / "load" / RUNGS_FILE).read_text())
    assert len(rungs["results"]["1"]) == TRIALS and sorted(rungs["promoted"]["1"]) == sorted(completed["trial_id"])
    # The launcher's memory stays bounded (rows are streamed to Parquet as trials end, not accumulated).
    assert before <= 2048 * 1024 and peak_mib < 2048, f"launcher peak RSS {peak_mib:.0f} MiB"
    print(f"\n{TRIALS} synthetic trials in {wall:.0f} s ({wall / TRIALS:.2f} s per trial, 8 at a time); "
          f"launcher peak RSS {peak_mib:.0f} MiB")

"""Study efficiency: the share of a study's wall time spent training and evaluating, per trial mode.

The same small study (same seed, so the same sampled configurations) runs once per trial mode through the real
launcher path, ``study.launch.run_study`` (local Ray cluster, Tune + Optuna, results store):

* ``in_process``: each 1-worker trial trains inside its Tune trial (the default for one worker);
* ``ray_train``: each trial starts a 1-worker ``TorchTrainer`` (a worker group per trial).

Busy time is what the trainers measure themselves, read back from the study's Parquet files: every epoch's
training loop (``epoch_time_s``) and kNN monitor (``monitor_time_s``), and each trial's final probes
(``evaluation_time_s``). The study's baselines are computed once, before both runs, and given to both (they do not
depend on the trial mode). Everything else in the wall time of ``run_study`` is overhead: Ray start-up, trial
actors, data loading and model construction per trial, Tune's bookkeeping, checkpoints, results writes, shutdown.
With ``cpus_per_worker`` 0 (auto) one trial has the whole machine, so trials run one after another and
``(wall - busy) / trials`` is the fixed cost per trial (Ray start-up and shutdown amortised in it).

Run (about 10 minutes on 2 cores with the defaults; ``--quick``: 2 trials of 1 epoch, about 3 minutes):

    .venv/bin/python benchmarks/bench_study_efficiency.py
    .venv/bin/python benchmarks/bench_study_efficiency.py --trials 4 --epochs 2 --pretrain-subset 3072
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import _common

from study import results, storage
from study.config import StudyConfig
from study.launch import BASELINES_FILE, compute_baselines, run_study

MODES = ("in_process", "ray_train")


def busy_seconds(study_dir: str) -> tuple[float, int, int]:
    """Training + monitor + evaluation seconds the trainers measured; trials and completed trials."""
    trials, epochs = results.load(study_dir)
    busy = float(epochs["epoch_time_s"].sum() + epochs["monitor_time_s"].fillna(0).sum()
                 + trials["evaluation_time_s"].fillna(0).sum())
    return busy, len(trials), int((trials["status"] == "completed").sum())


def run_mode(base: StudyConfig, mode: str, root: Path, baselines: dict[str, float]) -> dict[str, float]:
    study = StudyConfig.from_dict(base.to_dict() | {"name": f"efficiency-{mode}", "trial_mode": mode,
                                                    "storage_path": str(root)})
    storage.write_json(storage.join(study.study_dir, BASELINES_FILE), baselines)
    start = time.perf_counter()
    run_study(study)
    wall = time.perf_counter() - start
    busy, trials, completed = busy_seconds(study.study_dir)
    return {"wall": wall, "busy": busy, "trials": trials, "completed": completed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--pretrain-subset", type=int, default=3072)
    parser.add_argument("--space", default="contrastive")
    parser.add_argument("--quick", action="store_true", help="2 trials of 1 epoch on 1,024 images")
    args = parser.parse_args()
    if args.quick:
        args.trials, args.epochs, args.pretrain_subset = 2, 1, 1024
    root = Path(tempfile.mkdtemp(prefix="bench-study-"))
    base = StudyConfig(space=args.space, num_trials=args.trials, epochs=args.epochs, grace_epochs=1,
                       pretrain_subset=args.pretrain_subset, scheduler="none", storage_path=str(root))
    try:
        start = time.perf_counter()
        baselines = compute_baselines(StudyConfig.from_dict(base.to_dict() | {"name": "baselines"}))
        baseline_s = time.perf_counter() - start
        measured = {mode: run_mode(base, mode, root, baselines) for mode in MODES}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\n{_common.machine_note()}")
    print(f"study: space {args.space}, {args.trials} trials x {args.epochs} epochs on {args.pretrain_subset} "
          f"Fashion-MNIST images, probes on {base.probe_train_subset}/{base.val_size}/{base.test_subset} images, "
          f"ASHA off, one trial at a time; baselines computed once beforehand in {baseline_s:.0f} s\n")
    rows = []
    for mode, m in measured.items():
        overhead = m["wall"] - m["busy"]
        rows.append([mode, f"{m['completed']:.0f}/{m['trials']:.0f}", f"{m['wall']:.0f} s", f"{m['busy']:.0f} s",
                     f"{m['busy'] / m['wall']:.3f}", f"{overhead / m['trials']:.1f} s",
                     f"{m['busy'] / m['trials']:.0f} s"])
    print(_common.markdown_table(["trial mode", "completed", "study wall time", "training + evaluation",
                                  "efficiency (busy / wall)", "fixed cost per trial", "busy per trial"], rows))
    in_process, ray_train = measured["in_process"], measured["ray_train"]
    print(f"\nin_process / ray_train wall time: {in_process['wall'] / ray_train['wall']:.2f}x")


if __name__ == "__main__":
    main()

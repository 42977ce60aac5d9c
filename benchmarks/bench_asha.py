"""Does early stopping pay? The default study with ASHA and the same study without early stopping.

Both studies are ``python -m study.launch``'s defaults (space ``contrastive``, 24 trials, 6 epochs on 2,048
Fashion-MNIST images, ASHA rungs at epochs 1 and 3 (reduction factor 3), TPE with seed 0), run one after the
other through ``study.launch.run_study``; only ``scheduler`` differs. TPE samples its first trials at random,
so the studies start from the same configurations and diverge once their histories differ (ASHA tells Optuna
about pruned trials).

Reported for each: the best validation linear-probe accuracy (the objective), its test accuracy, compute
(sum over trials of wall time x CPUs per worker, from the rows) and the study's wall time; and the ratios. The
target (issue #7): ASHA within 1 point of the no-early-stopping study at no more than half its compute. The
studies run one after the other, so the machine's speed can differ between them: the epochs that both trained
identically (same configuration, same epoch index) give how much, and the compute ratio is also printed divided
by that factor (``machine_speed_factor``).

Last, the same ASHA scheduler is replayed on the no-early-stopping study's recorded curves (``study.replay``), in
the recorded order and in 1,000 random orders: asynchronous ASHA's savings depend on the order trials arrive in,
and the replay shows where this run's order falls.

The two study folders are kept (default ``studies/bench-asha-*``): analyse them with ``python -m study.analyze``.
``--early-stopping asha_promotion`` compares ASHA with promotions (``study/promotion.py``) instead of Ray's ASHA; a
folder that already holds the finished no-early-stopping study of the same configuration (an earlier run with the
same ``--storage-path`` and ``--seed``) is reused, not rerun.

Run (about 55 minutes on 2 cores; the study without early stopping is most of it):

    .venv/bin/python benchmarks/bench_asha.py
    .venv/bin/python benchmarks/bench_asha.py --storage-path /tmp/asha --epochs 2     # a smaller variant
    .venv/bin/python benchmarks/bench_asha.py --storage-path studies/asha-seed1 --seed 1   # another draw
    .venv/bin/python benchmarks/bench_asha.py --storage-path studies/asha-seed1 --seed 1 --early-stopping asha_promotion
"""

from __future__ import annotations

import argparse
import time

import _common
import pandas as pd

from study import replay, results, storage
from study.config import SCHEDULERS, StudyConfig
from study.launch import BASELINES_FILE, CONFIG_FILE, compute_baselines, run_study

Rows = tuple[pd.DataFrame, pd.DataFrame]  # a study's (trials, epochs), as results.load returns them


def summary(rows: Rows, wall: float) -> dict[str, float]:
    trials, epochs = rows
    completed = trials[trials["status"] == "completed"]
    best = completed.loc[completed["objective"].idxmax()]
    compute_h = float((trials["wall_time_s"] * trials["workers"] * trials["cpus_per_worker"]).sum()) / 3600
    return {"best_val": float(best["linear_val_accuracy"]), "best_test": float(best["linear_test_accuracy"]),
            "best_trial": best["trial_id"], "completed": len(completed), "trials": len(trials),
            "compute_h": compute_h, "wall_min": wall / 60,
            # Counts, not seconds: what early stopping saved whatever the machine's speed was during each study.
            "epochs": len(epochs), "evaluations": int(completed["evaluation_time_s"].notna().sum()),
            "epoch_s": float(epochs["epoch_time_s"].mean())}


def finished(study: StudyConfig) -> bool:
    """Whether the study folder holds this very configuration with all its trials finished."""
    saved = storage.join(study.study_dir, CONFIG_FILE)
    if not storage.exists(saved) or storage.read_json(saved) != study.to_dict():
        return False
    trials, _ = results.load(study.study_dir)
    return len(trials) == study.num_trials


def machine_speed_factor(asha: Rows, none: Rows) -> tuple[float, int]:
    """How much longer the same work took during the ASHA study than during the other: the median, over the epochs
    that both studies trained with the same configuration at the same epoch index (TPE's seeded start gives both
    studies the same first configurations, and training is deterministic), of ASHA's epoch time over none's.
    Returns the factor (1.0: the machine ran at the same speed) and the number of such epochs.

    The studies run one after the other, so the machine's speed can differ between them. Dividing the measured
    compute ratio by this factor removes that and nothing else: which configurations each study trained, and so
    how expensive its epochs were, is the searcher's doing and stays in. It is a rough correction: it is measured
    on the studies' shared first configurations only, and the speed also drifts within a study."""
    per_study = []
    for trials, epochs in (asha, none):
        config = pd.util.hash_pandas_object(trials.loc[:, "method":"device"], index=False)  # its TrainConfig
        keyed = epochs.assign(config=epochs["trial_id"].map(dict(zip(trials["trial_id"], config))))
        per_study.append(keyed.drop_duplicates(["config", "epoch"])[["config", "epoch", "epoch_time_s"]])
    same = per_study[0].merge(per_study[1], on=["config", "epoch"], suffixes=("_asha", "_none"))
    if same.empty:
        return float("nan"), 0
    return float((same["epoch_time_s_asha"] / same["epoch_time_s_none"]).median()), len(same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage-path", default="studies")
    parser.add_argument("--epochs", type=int, default=StudyConfig().epochs)
    parser.add_argument("--num-trials", type=int, default=StudyConfig().num_trials)
    parser.add_argument("--seed", type=int, default=StudyConfig().seed,
                        help="the studies' seed (searcher and training); another seed is another draw of trial order")
    parser.add_argument("--early-stopping", choices=[s for s in SCHEDULERS if s != "none"],
                        default=StudyConfig().scheduler,
                        help="the scheduler compared with none (default: the study's default, ASHA with promotions; "
                             "asha: Ray Tune's ASHA)")
    args = parser.parse_args()
    base = StudyConfig(storage_path=args.storage_path, epochs=args.epochs, num_trials=args.num_trials, seed=args.seed)
    start = time.perf_counter()
    baselines = compute_baselines(StudyConfig.from_dict(base.to_dict() | {"name": "bench-asha-baselines"}))
    baseline_s = time.perf_counter() - start
    measured, study_dirs, loaded = {}, {}, {}
    for scheduler in (args.early_stopping, "none"):
        name = "bench-asha-asha" if scheduler == "asha" else f"bench-asha-{scheduler}"  # the first name kept
        study = StudyConfig.from_dict(base.to_dict() | {"name": name, "scheduler": scheduler})
        if finished(study):  # e.g. the no-early-stopping study of an earlier run with the same seed
            print(f"{study.study_dir}: a finished study of this configuration, reused", flush=True)
            loaded[scheduler] = results.load(study.study_dir)
            trials = loaded[scheduler][0]
            wall = (trials["finished_at"].max() - trials["started_at"].min()).total_seconds()
        else:
            storage.write_json(storage.join(study.study_dir, BASELINES_FILE), baselines)
            start = time.perf_counter()
            run_study(study)
            wall = time.perf_counter() - start
            loaded[scheduler] = results.load(study.study_dir)  # read once, for the summary and the speed factor
        measured[scheduler] = summary(loaded[scheduler], wall)
        study_dirs[scheduler] = study.study_dir
    print(f"\n{_common.machine_note()}")
    print(f"default study ({base.num_trials} trials, {base.epochs} epochs on {base.pretrain_subset} images, TPE seed "
          f"{base.seed}); baselines computed once beforehand in {baseline_s:.0f} s and shared\n")
    rows = [[name, f"{m['completed']}/{m['trials']}", m["best_trial"], f"{m['best_val']:.4f}", f"{m['best_test']:.4f}",
             f"{m['compute_h']:.3f}", f"{m['wall_min']:.1f}", m["epochs"], m["evaluations"], f"{m['epoch_s']:.1f}"]
            for name, m in measured.items()]
    print(_common.markdown_table(["scheduler", "completed", "best trial", "best val linear", "its test linear",
                                  "compute (CPU-h)", "wall (min)", "epochs trained", "final evaluations",
                                  "mean epoch (s)"], rows))
    asha, none = measured[args.early_stopping], measured["none"]
    print(f"\nASHA - none, best validation accuracy: {(asha['best_val'] - none['best_val']) * 100:+.2f} points; "
          f"ASHA compute / none compute: {asha['compute_h'] / none['compute_h']:.2f}; "
          f"wall time ratio: {asha['wall_min'] / none['wall_min']:.2f}; epochs trained: "
          f"{asha['epochs'] / none['epochs']:.2f}; final evaluations: {asha['evaluations'] / none['evaluations']:.2f}")
    factor, shared = machine_speed_factor(loaded[args.early_stopping], loaded["none"])
    print(f"the same epochs (same configuration and epoch index, {shared} of them) took {factor:.2f}x as long in the "
          f"ASHA study: ASHA compute / none compute at the same machine speed: "
          f"{asha['compute_h'] / none['compute_h'] / factor:.2f}")
    print("(compute and wall time are seconds measured on a shared machine; the epoch and evaluation counts are "
          "what early stopping saved independently of its speed: compare the mean epoch times before trusting the "
          "first two)")
    # Asynchronous ASHA's savings depend on the order trials arrive in; the same scheduler replayed on the
    # no-early-stopping study's curves shows where this run's order falls (study/replay.py).
    print("\nReplay of the same scheduler on the no-early-stopping study's recorded curves (python -m study.replay):")
    replay.main([study_dirs["none"], "--orders", "1000", "--scheduler", args.early_stopping])


if __name__ == "__main__":
    main()

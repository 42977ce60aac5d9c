"""Does early stopping pay? The default study with ASHA and the same study without early stopping.

Both studies are ``python -m study.launch``'s defaults (space ``contrastive``, 24 trials, 6 epochs on 2,048
Fashion-MNIST images, ASHA rungs at epochs 1 and 3 (reduction factor 3), TPE with seed 0), run one after the
other through ``study.launch.run_study``; only
``scheduler`` differs. TPE samples its first trials at random, so the studies start from the same configurations
and diverge once their histories differ (ASHA tells Optuna about pruned trials).

Reported for each: the best validation linear-probe accuracy (the objective), its test accuracy, compute
(sum over trials of wall time x CPUs per worker, from the rows) and the study's wall time; and the ratios. The
target (issue #7): ASHA within 1 point of the no-early-stopping study at no more than half its compute.

Last, the same ASHA scheduler is replayed on the no-early-stopping study's recorded curves (``study.replay``), in
the recorded order and in 1,000 random orders: asynchronous ASHA's savings depend on the order trials arrive in,
and the replay shows where this run's order falls.

The two study folders are kept (default ``studies/bench-asha-*``): analyse them with ``python -m study.analyze``.

Run (about 55 minutes on 2 cores; the study without early stopping is most of it):

    .venv/bin/python benchmarks/bench_asha.py
    .venv/bin/python benchmarks/bench_asha.py --storage-path /tmp/asha --epochs 2     # a smaller variant
    .venv/bin/python benchmarks/bench_asha.py --storage-path studies/asha-seed1 --seed 1   # another draw
"""

from __future__ import annotations

import argparse
import time

import _common

from study import replay, results, storage
from study.config import StudyConfig
from study.launch import BASELINES_FILE, compute_baselines, run_study


def summary(study_dir: str, wall: float) -> dict[str, float]:
    trials, epochs = results.load(study_dir)
    completed = trials[trials["status"] == "completed"]
    best = completed.loc[completed["objective"].idxmax()]
    compute_h = float((trials["wall_time_s"] * trials["workers"] * trials["cpus_per_worker"]).sum()) / 3600
    return {"best_val": float(best["linear_val_accuracy"]), "best_test": float(best["linear_test_accuracy"]),
            "best_trial": best["trial_id"], "completed": len(completed), "trials": len(trials),
            "compute_h": compute_h, "wall_min": wall / 60,
            # Counts, not seconds: what early stopping saved whatever the machine's speed was during each study.
            "epochs": len(epochs), "evaluations": int(completed["evaluation_time_s"].notna().sum()),
            "epoch_s": float(epochs["epoch_time_s"].mean()),
            # Seconds inside trials, split by kind, for equal_speed_ratio.
            "epochs_total_s": float((epochs["epoch_time_s"] + epochs["monitor_time_s"].fillna(0.0)).sum()),
            "evaluations_total_s": float(trials["evaluation_time_s"].fillna(0.0).sum()),
            "trials_total_s": float(trials["wall_time_s"].sum())}


def equal_speed_ratio(asha: dict[str, float], none: dict[str, float]) -> float:
    """ASHA / none compute if both studies had run at the same speed: each study's epochs (training + monitor)
    and final evaluations costed at the two studies' pooled mean seconds per epoch and per evaluation, plus its own
    remaining trial time (start-up, reporting). Both studies give every trial the same CPUs, so trial seconds
    compare as CPU-seconds do. A miss here is early stopping's; a miss only in the measured ratio is the machine's
    speed differing between the two studies (they run one after the other)."""
    kinds = ("epochs", "evaluations")
    pooled = {kind: (asha[f"{kind}_total_s"] + none[f"{kind}_total_s"]) / max(asha[kind] + none[kind], 1)
              for kind in kinds}

    def cost(m: dict[str, float]) -> float:
        other = m["trials_total_s"] - sum(m[f"{kind}_total_s"] for kind in kinds)
        return sum(m[kind] * pooled[kind] for kind in kinds) + other

    return cost(asha) / cost(none)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage-path", default="studies")
    parser.add_argument("--epochs", type=int, default=StudyConfig().epochs)
    parser.add_argument("--num-trials", type=int, default=StudyConfig().num_trials)
    parser.add_argument("--seed", type=int, default=StudyConfig().seed,
                        help="the studies' seed (searcher and training); another seed is another draw of trial order")
    args = parser.parse_args()
    base = StudyConfig(storage_path=args.storage_path, epochs=args.epochs, num_trials=args.num_trials, seed=args.seed)
    start = time.perf_counter()
    baselines = compute_baselines(StudyConfig.from_dict(base.to_dict() | {"name": "bench-asha-baselines"}))
    baseline_s = time.perf_counter() - start
    measured, study_dirs = {}, {}
    for scheduler in ("asha", "none"):
        study = StudyConfig.from_dict(base.to_dict() | {"name": f"bench-asha-{scheduler}", "scheduler": scheduler})
        storage.write_json(storage.join(study.study_dir, BASELINES_FILE), baselines)
        start = time.perf_counter()
        run_study(study)
        measured[scheduler] = summary(study.study_dir, time.perf_counter() - start)
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
    asha, none = measured["asha"], measured["none"]
    print(f"\nASHA - none, best validation accuracy: {(asha['best_val'] - none['best_val']) * 100:+.2f} points; "
          f"ASHA compute / none compute: {asha['compute_h'] / none['compute_h']:.2f}; "
          f"wall time ratio: {asha['wall_min'] / none['wall_min']:.2f}; epochs trained: "
          f"{asha['epochs'] / none['epochs']:.2f}; final evaluations: {asha['evaluations'] / none['evaluations']:.2f}")
    print(f"ASHA compute / none compute at equal speed (epochs and evaluations at both studies' pooled mean times): "
          f"{equal_speed_ratio(asha, none):.2f}")
    print("(compute and wall time are seconds measured on a shared machine; the epoch and evaluation counts are "
          "what early stopping saved independently of its speed: compare the mean epoch times before trusting the "
          "first two)")
    # Asynchronous ASHA's savings depend on the order trials arrive in; the same scheduler replayed on the
    # no-early-stopping study's curves shows where this run's order falls (study/replay.py).
    print("\nReplay of the same ASHA on the no-early-stopping study's recorded curves (python -m study.replay):")
    replay.main([study_dirs["none"], "--orders", "1000"])


if __name__ == "__main__":
    main()

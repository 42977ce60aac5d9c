"""``python -m study.replay STUDY_DIR``: what early stopping would have stopped in a study that ran every trial to
the end.

A study run with ``--scheduler none`` records each trial's kNN monitor after every epoch, the time of every epoch
(training and monitor), the time of the final evaluation and the trial's wall time. A trial's curve does not depend
on the scheduler (the same configuration and seed train the same way; the results store shows it), so a scheduler
can be fed those curves to see which trials it would have stopped, after which epoch, and at what cost: ASHA with
promotions (the launcher's default; ``study.promotion.Rungs``, one trial slot) or Ray Tune's ASHA scheduler
(``--scheduler asha``, built by the launcher's own ``study.launch.make_scheduler``, fed one trial after the other):

    cost(trial stopped after e epochs) = start-up + its first e epochs (training + monitor)
                                         + the final evaluation if it reached the last epoch

where start-up = wall time - every epoch - evaluation, as recorded; CPU-seconds = seconds x workers x CPUs each.

Asynchronous ASHA decides on the order in which trials reach a rung: with Ray's ASHA the first trial at a rung
always passes it, and with a few trials every best-so-far trial does. One study's ratio is one draw from that
order. So the replay runs the recorded order and many random orders of the same trials, and prints how the compute
ratio and the best objective among the trials that would have finished are distributed.

Not captured: the searcher. In a real study Optuna is told each stopped trial as pruned, and TPE ranks pruned
trials below every finished one (its "good" group is the best finished trials), so the searcher's history and its
later configurations differ from the recorded ones (``benchmarks/bench_asha.py`` runs both studies for real).

    python -m study.replay studies/asha-seed10/bench-asha-none
    python -m study.replay studies/asha-v4/bench-asha-none --scheduler asha --reduction-factor 4 --orders 2000
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from study import results, storage
from study.config import StudyConfig
from study.launch import CONFIG_FILE, MONITOR_METRIC, make_scheduler
from study.promotion import Rungs, milestones


@dataclass(frozen=True)
class Curve:
    """One finished trial as the replay needs it (costs in CPU-seconds)."""

    trial_id: str
    monitor: tuple[float, ...]  # kNN monitor accuracy after epochs 1..E
    epoch_costs: tuple[float, ...]  # training + monitor of each epoch
    evaluation_cost: float  # final probes
    startup_cost: float  # everything else in the trial's wall time
    objective: float

    def cost(self, epochs: int) -> float:
        finished = epochs == len(self.epoch_costs)
        return self.startup_cost + sum(self.epoch_costs[:epochs]) + (self.evaluation_cost if finished else 0.0)


@dataclass(frozen=True)
class Replay:
    stopped_after: dict[str, int]  # trial id -> epochs it would have trained
    cost: float  # CPU-seconds
    full_cost: float  # CPU-seconds of the recorded study
    finished: int  # trials that would have reached the last epoch (and their final evaluation)
    best_objective: float  # among those (nan if none)

    @property
    def cost_ratio(self) -> float:
        return self.cost / self.full_cost

    @property
    def epochs(self) -> int:
        return sum(self.stopped_after.values())


def load_curves(study_dir: str) -> tuple[StudyConfig, list[Curve]]:
    """The study's config and its trials in the order they started; refuses studies that stopped trials early."""
    config_file = storage.join(study_dir, CONFIG_FILE)
    if not storage.exists(config_file):
        raise ValueError(f"{study_dir}: no {CONFIG_FILE}, so it is not a study folder")
    study = StudyConfig.from_dict(storage.read_json(config_file))
    trials, epochs = results.load(study_dir)
    if trials.empty:
        raise ValueError(f"{study_dir}: no finished trials to replay")
    unfinished = trials.loc[(trials["status"] != "completed") | (trials["epochs_done"] != trials["epochs"]),
                            "trial_id"].tolist()
    if unfinished:
        raise ValueError(f"{study_dir}: trials {unfinished} did not run every epoch; the replay needs a study run "
                         "to the end (--scheduler none)")
    seeds = epochs.groupby("trial_id")["seed"].nunique()
    if (seeds > 1).any():
        raise ValueError(f"{study_dir}: trials with several seeds (replicates > 1) are not supported by the replay")
    per_trial = dict(tuple(epochs.sort_values("epoch").groupby("trial_id")))  # one pass, not one filter per trial
    curves = []
    for row in trials.sort_values("started_at").itertuples(index=False):
        own = per_trial.get(row.trial_id, epochs.iloc[:0])
        if own["epoch"].tolist() != list(range(1, int(row.epochs) + 1)) or own[MONITOR_METRIC].isna().any():
            raise ValueError(f"{study_dir}: trial {row.trial_id} lacks the monitor of some epochs")
        cpus = float(row.workers) * float(row.cpus_per_worker)
        epoch_seconds = (own["epoch_time_s"] + own["monitor_time_s"].fillna(0.0)).to_numpy()
        evaluation = float(row.evaluation_time_s) if pd.notna(row.evaluation_time_s) else 0.0
        startup = max(0.0, float(row.wall_time_s) - float(epoch_seconds.sum()) - evaluation)
        curves.append(Curve(row.trial_id, tuple(own[MONITOR_METRIC].astype(float)),
                            tuple(float(s) * cpus for s in epoch_seconds), evaluation * cpus, startup * cpus,
                            float(row.objective)))
    return study, curves


def replay(curves: Sequence[Curve], study: StudyConfig) -> Replay:
    """What the study's scheduler (``asha`` or ``asha_promotion``) would have trained of the curves, arriving in
    this order, with one trial at a time."""
    schedule = replay_promotion if study.scheduler == "asha_promotion" else replay_asha
    stopped_after = schedule(curves, study)
    finished = [c.objective for c in curves if stopped_after[c.trial_id] == len(c.monitor)]
    return Replay(stopped_after=stopped_after,
                  cost=sum(c.cost(stopped_after[c.trial_id]) for c in curves),
                  full_cost=sum(c.cost(len(c.monitor)) for c in curves), finished=len(finished),
                  best_objective=max(finished) if finished else math.nan)


def replay_promotion(curves: Sequence[Curve], study: StudyConfig) -> dict[str, int]:
    """``study.promotion.Rungs`` as the scheduler uses it, one trial slot: when a trial stops or pauses, the best
    promotable paused trial resumes, else the next curve starts, and at the end the ``last_call``. A resume is
    charged nothing (a restore from the rung's checkpoint: seconds, against a trial's start-up and epochs)."""
    rungs = Rungs(milestones(study.grace_epochs, study.reduction_factor, study.epochs), study.reduction_factor,
                  len(curves))
    by_id = {c.trial_id: c for c in curves}
    trained = {c.trial_id: 0 for c in curves}
    arrivals = iter(curves)
    while True:
        promotion = next(iter(rungs.promotable()), None)
        curve = next(arrivals, None) if promotion is None else None
        if promotion is None and curve is None:
            promotion = rungs.last_call()
            if promotion is None:
                return trained
        if promotion is not None:
            rungs.promote(promotion[1], promotion[0])
            curve = by_id[promotion[1]]
        assert curve is not None
        # Train to the next rung; go on past it while promoted at once.
        for epoch in range(trained[curve.trial_id] + 1, len(curve.monitor) + 1):
            trained[curve.trial_id] = epoch
            at_rung = epoch in rungs.milestones
            if at_rung and rungs.arrive(curve.trial_id, epoch, curve.monitor[epoch - 1]) != "continue":
                break


def replay_asha(curves: Sequence[Curve], study: StudyConfig) -> dict[str, int]:
    """Ray Tune's ASHAScheduler, built by the launcher, fed the curves one trial after the other."""
    scheduler = make_scheduler(dataclasses.replace(study, scheduler="asha"))
    assert scheduler is not None
    stopped_after: dict[str, int] = {}
    for curve in curves:
        trial = Trial("replay", stub=True, trial_id=curve.trial_id)
        scheduler.on_trial_add(None, trial)
        trained = len(curve.monitor)
        for epoch, value in enumerate(curve.monitor, start=1):
            if scheduler.on_trial_result(None, trial, {"epoch": epoch, MONITOR_METRIC: value}) == TrialScheduler.STOP:
                trained = epoch
                break
        if trained < len(curve.monitor):
            scheduler.on_trial_remove(None, trial)
        else:
            scheduler.on_trial_complete(None, trial, {"epoch": trained, MONITOR_METRIC: curve.monitor[-1]})
        stopped_after[curve.trial_id] = trained
    return stopped_after


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study.replay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study_dir", help="a study folder run with --scheduler none")
    parser.add_argument("--scheduler", choices=("asha_promotion", "asha"), default="asha_promotion",
                        help="ASHA with promotions (the launcher's default, study/promotion.py) or Ray Tune's ASHA")
    parser.add_argument("--grace-epochs", type=int, default=None, help="default: the study's")
    parser.add_argument("--reduction-factor", type=int, default=None, help="default: the study's")
    parser.add_argument("--orders", type=int, default=1000, help="random orders of the trials to replay")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random orders")
    parser.add_argument("--within", type=float, default=0.01,
                        help="how far below the study's best objective still counts as reaching it (default 1 point)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.orders < 1:
        raise SystemExit(f"--orders must be >= 1, got {args.orders}")
    recorded, curves = load_curves(args.study_dir)
    # Validated like a launcher's config (grace <= epochs, reduction factor >= 2), before any replay.
    changes = {name: value for name, value in (("grace_epochs", args.grace_epochs),
                                                ("reduction_factor", args.reduction_factor)) if value is not None}
    study = StudyConfig.from_dict(recorded.to_dict() | changes | {"scheduler": args.scheduler})
    best = max(c.objective for c in curves)
    kind = "ASHA with promotions" if args.scheduler == "asha_promotion" else "Ray Tune's ASHA"
    print(f"{args.study_dir}: {len(curves)} trials of {study.epochs} epochs, best objective {best:.4f}; {kind} with "
          f"grace {study.grace_epochs} epoch(s), reduction factor {study.reduction_factor}, one trial at a time\n")
    first = replay(curves, study)
    print(f"recorded order: {first.finished}/{len(curves)} finished, {first.epochs}/{len(curves) * study.epochs} "
          f"epochs, compute {first.cost_ratio:.2f}x, best objective {first.best_objective:.4f}")
    print("stopped after epoch: " + ", ".join(f"{t} {e}" for t, e in first.stopped_after.items()))
    rng = np.random.default_rng(args.seed)
    draws = [replay([curves[i] for i in rng.permutation(len(curves))], study) for _ in range(args.orders)]
    ratios = np.array([d.cost_ratio for d in draws])
    reached = np.array([d.best_objective >= best - args.within for d in draws])  # nan compares False
    q10, q50, q90 = np.quantile(ratios, [0.1, 0.5, 0.9])
    print(f"\n{args.orders} random orders: compute ratio mean {ratios.mean():.2f}, median {q50:.2f} (10-90%: "
          f"{q10:.2f}-{q90:.2f}); <= 0.5x in {np.mean(ratios <= 0.5):.0%}; best objective within "
          f"{args.within * 100:g} point(s) of {best:.4f} in {reached.mean():.0%}; both in "
          f"{np.mean(reached & (ratios <= 0.5)):.0%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

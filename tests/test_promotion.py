"""ASHA with promotions: the rung bookkeeping against its definition, and a real Tune study that pauses and resumes."""

from __future__ import annotations

import json
import math
import pickle
import random
from pathlib import Path

import optuna
import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from study import results
from study.config import StudyConfig
from study.launch import RUNGS_FILE, StudySearch, make_searcher, run_study
from study.promotion import PromotionASHA, Rungs, milestones


def test_milestones_are_the_rungs_below_the_last_epoch() -> None:
    assert milestones(1, 3, 6) == (1, 3)
    assert milestones(1, 3, 9) == (1, 3)
    assert milestones(1, 3, 10) == (1, 3, 9)
    assert milestones(2, 2, 16) == (2, 4, 8)
    assert milestones(4, 3, 4) == ()
    no_rungs = Rungs((), 3, 10)  # every trial runs to the end
    assert no_rungs.promotable() == [] and no_rungs.waiting() == [] and no_rungs.last_call() is None


def reference_promotable(arrivals: dict[int, list[tuple[str, float]]], promoted: dict[int, set[str]],
                         factor: int) -> list[tuple[int, str]]:
    """Li et al. 2020, get_job: from the highest rung down, the top floor(n / factor) not yet promoted."""
    found = []
    for milestone in sorted(arrivals, reverse=True):
        order = sorted(range(len(arrivals[milestone])),
                       key=lambda i: (-arrivals[milestone][i][1] if not math.isnan(arrivals[milestone][i][1])
                                      else math.inf, i))
        top = [arrivals[milestone][i][0] for i in order[:len(order) // factor]]
        found += [(milestone, t) for t in top if t not in promoted[milestone]]
    return found


@pytest.mark.parametrize("seed", range(40))
def test_one_worker_schedule_follows_the_definition_and_never_revives_a_hopeless_trial(seed: int) -> None:
    rng = random.Random(seed)
    factor = rng.choice([2, 3, 4])
    rungs_at = milestones(1, factor, factor ** 2 + 1)
    trials = rng.randint(1, 30)
    rungs = Rungs(rungs_at, factor, trials)
    arrivals: dict[int, list[tuple[str, float]]] = {m: [] for m in rungs_at}
    promoted: dict[int, set[str]] = {m: set() for m in rungs_at}
    values = {f"t{i}": [rng.choice([rng.random(), 0.5, math.nan]) for _ in rungs_at] for i in range(trials)}
    hopeless: set[str] = set()
    started = 0
    at: dict[str, int] = {}  # the rung index each running trial reaches next

    def arrive(trial_id: str) -> None:
        milestone = rungs_at[at[trial_id]]
        value = values[trial_id][at[trial_id]]
        rungs.record(trial_id, milestone, value)
        arrivals[milestone].append((trial_id, value))

    def promote(milestone: int, trial_id: str) -> None:  # it trains on to the next rung, if there is one
        rungs.promote(trial_id, milestone)
        promoted[milestone].add(trial_id)
        at[trial_id] = rungs_at.index(milestone) + 1
        if at[trial_id] < len(rungs_at):
            arrive(trial_id)

    while True:
        expected = reference_promotable(arrivals, promoted, factor)
        assert rungs.promotable() == expected
        for milestone, trial_id in expected:
            assert trial_id not in hopeless, f"{trial_id} was declared hopeless and is promotable at {milestone}"
        dead_now = {trial_id for milestone, trial_id in rungs.waiting() if rungs.is_dead(trial_id, milestone)}
        assert rungs.hopeless() == dead_now  # the scheduler's one-pass sweep agrees
        hopeless |= dead_now
        if expected:  # one worker: promote first, as get_job does
            promote(*expected[0])
        elif started < trials:
            trial_id = f"t{started}"
            started += 1
            at[trial_id] = 0
            arrive(trial_id)
        elif (last := rungs.last_call()) is not None:  # the end of the study, nothing has passed the last rung
            milestone, trial_id = last
            assert trial_id not in hopeless and trial_id == rungs.ranked(milestone)[0]
            promote(milestone, trial_id)
        else:
            break
    assert rungs.promoted[rungs_at[-1]], "no trial passed the last rung"
    # In the end each rung promoted at least the top floor(n / factor) of what reached it.
    for milestone in rungs_at:
        n = len(arrivals[milestone])
        assert len(promoted[milestone]) >= n // factor
        assert set(rungs.ranked(milestone)[:n // factor]) <= promoted[milestone]
    # And the state survives JSON (the resume path).
    restored = Rungs.from_dict(json.loads(json.dumps(rungs.to_dict())))
    assert json.dumps(restored.to_dict()) == json.dumps(rungs.to_dict())
    assert restored.promotable() == rungs.promotable() and restored.sizes() == rungs.sizes()


def test_sizes_and_hopeless_trials_of_a_small_example() -> None:
    rungs = Rungs((1, 3), 3, 6)
    for trial_id, value in [("a", 0.5), ("b", 0.9), ("c", 0.1)]:
        rungs.record(trial_id, 1, value)
    assert rungs.sizes()[1] == 6  # three more trials may arrive
    assert rungs.promotable() == [(1, "b")]
    # At most 6 results, so at most the top 2 ever go on: c (third) never will, a (second) still may.
    assert rungs.is_dead("c", 1) and not rungs.is_dead("a", 1)
    for trial_id, value in [("d", 0.6), ("e", 0.7)]:
        rungs.record(trial_id, 1, value)
    assert [rungs.is_dead(t, 1) for t in "abcde"] == [True, False, True, True, False]
    rungs.record("f", 1, math.nan)  # a diverged trial ranks last
    assert rungs.ranked(1)[-1] == "f" and rungs.promotable() == [(1, "b"), (1, "e")]
    assert rungs.sizes() == {1: 6, 3: 2}  # only b and e can reach epoch 3


def test_the_scheduler_keeps_its_rungs_across_a_resume_and_pauses_requeued_trials(tmp_path: Path) -> None:
    state_file = str(tmp_path / RUNGS_FILE)
    scheduler = PromotionASHA(metric="m", time_attr="epoch", max_t=6, grace_period=1, reduction_factor=3,
                              max_trials=6, state_file=state_file)
    trials = {name: Trial("run_trial", stub=True, trial_id=name) for name in "abcd"}
    decide = scheduler.on_trial_result  # Tune's controller is not needed for these calls
    # 6 trials at most, factor 3: at most the top 2 ever go on from epoch 1.
    assert decide(None, trials["a"], {"epoch": 1, "m": 0.5}) == TrialScheduler.PAUSE
    assert decide(None, trials["b"], {"epoch": 1, "m": 0.6}) == TrialScheduler.PAUSE
    assert decide(None, trials["c"], {"epoch": 1, "m": 0.9}) == TrialScheduler.CONTINUE  # top 1 of 3: at once
    assert decide(None, trials["d"], {"epoch": 1, "m": 0.3}) == TrialScheduler.STOP  # fourth: hopeless
    assert decide(None, trials["c"], {"epoch": 2, "m": 0.9}) == TrialScheduler.CONTINUE  # between rungs
    assert decide(None, trials["c"], {"epoch": 1, "m": 0.9}) == TrialScheduler.CONTINUE  # retried: passed already
    # Tuner.restore unpickles the scheduler as it was created: the rungs come back from the state file.
    fresh = PromotionASHA(metric="m", time_attr="epoch", max_t=6, grace_period=1, reduction_factor=3, max_trials=6,
                          state_file=str(tmp_path / "unused.json"))
    fresh.__dict__["_state_file"] = state_file
    restored = pickle.loads(pickle.dumps(fresh))  # noqa: S301 (our own object, as Tune pickles it)
    assert restored.rungs.to_dict() == scheduler.rungs.to_dict()
    # A resumed study runs its paused trials again, without a promotion: b (second) pauses, a (third) stops.
    assert restored.on_trial_result(None, trials["b"], {"epoch": 2, "m": 0.6}) == TrialScheduler.PAUSE
    assert restored.on_trial_result(None, trials["a"], {"epoch": 2, "m": 0.6}) == TrialScheduler.STOP


def test_the_searcher_limits_active_trials_but_not_paused_ones() -> None:
    study = StudyConfig(searcher="random")
    searcher = make_searcher(study, study.search_space(), max_active=1)
    assert isinstance(searcher.suggest("a"), dict)
    assert searcher.suggest("b") is None  # "a" runs
    searcher.on_pause("a")
    assert isinstance(searcher.suggest("b"), dict)
    searcher.on_unpause("a")
    assert searcher.suggest("c") is None  # "a" and "b" run
    searcher.on_trial_complete("b")
    searcher.on_trial_complete("a")
    assert isinstance(searcher.suggest("c"), dict)
    # A searcher pickled by a study that started before the limit existed resumes without one.
    state = {k: v for k, v in searcher.__dict__.items() if k not in ("max_active", "_active", "_paused")}
    old = StudySearch.__new__(StudySearch)
    old.__setstate__(state)
    assert old.max_active == 0 and isinstance(old.suggest("d"), dict)


@pytest.mark.timeout(600)
def test_a_study_pauses_at_rungs_and_promotes_the_best(tmp_path: Path, shared_cluster: str) -> None:
    study = StudyConfig(name="promotion", storage_path=str(tmp_path), trial_mode="synthetic", space="contrastive",
                        num_trials=9, epochs=4, grace_epochs=1, reduction_factor=3, scheduler="asha_promotion",
                        searcher="random", cpus_per_worker=1.0, address=shared_cluster)
    run_study(study, report=False)
    trials, epochs = results.load(study.study_dir)
    assert len(trials) == 9 and trials["trial_id"].is_unique
    rungs = Rungs.from_dict(json.loads((tmp_path / "promotion" / RUNGS_FILE).read_text()))
    assert rungs.milestones == (1, 3) and len(rungs.results[1]) == 9
    # Every trial's epochs are reported once each, from 1 on, across its pauses; it passed a rung only if promoted.
    for row in trials.itertuples():
        own = sorted(epochs.loc[epochs["trial_id"] == row.trial_id, "epoch"])
        assert own == list(range(1, row.epochs_done + 1))
        assert (row.epochs_done > 1) == (row.trial_id in rungs.promoted[1])
        assert (row.epochs_done > 3) == (row.trial_id in rungs.promoted[3])
        assert (row.status == "completed") == (row.epochs_done == 4)
        assert 0 < row.wall_time_s
    # The synthetic monitor ranks trials as their objective does, so the best configuration runs to the end.
    distance = (trials["temperature"] / 0.2).map(math.log10).abs()  # synthetic_objective peaks at 0.2
    completed = trials[trials["status"] == "completed"]
    assert trials.loc[distance.idxmin(), "trial_id"] in set(completed["trial_id"])
    assert 1 <= len(completed) < 9 and set(rungs.ranked(1)[:3]) <= set(rungs.promoted[1])
    # Optuna was told every trial once: the finished ones with their objective, the others as pruned.
    searcher = StudySearch()
    searcher.restore_from_dir(str(tmp_path / "promotion" / "tune"))
    states = [t.state for t in searcher._ot_study.trials]
    assert states.count(optuna.trial.TrialState.COMPLETE) == len(completed)
    assert states.count(optuna.trial.TrialState.PRUNED) == 9 - len(completed)


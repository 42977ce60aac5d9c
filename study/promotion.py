"""ASHA with promotions (Li et al. 2020, "A System for Massively Parallel Hyperparameter Tuning", Algorithm 2).

Ray Tune's ``ASHAScheduler`` decides once, as a trial arrives at a rung: it goes on if it is in the top 1/factor
of the results that rung holds *so far*. The first trial at a rung always passes, and while a rung holds few
results every best-so-far trial does; a searcher whose proposals improve as the study goes on keeps producing
best-so-far trials, so many run to the end (``benchmarks/bench_asha.py``: 8-10 of 24 in most draws).

This scheduler pauses a trial at each rung instead. When a trial slot is free it resumes (promotes) the best
trial of the highest rung that is in the top ``floor(n / factor)`` of the ``n`` results its rung holds and has not
been promoted, else it starts a new trial. A trial thus passes a rung by ranking in its top 1/factor, never by
arriving early. (Promotion is still asynchronous: a trial promoted while its rung held few results stays promoted,
so a rung can pass more than 1/factor in the end; 12-13 of 24 passed the first rung in the measured studies.)
Two additions for a study of finite size:

- A paused trial can never be promoted once ``floor(max_size / factor)`` trials rank above it, where ``max_size``
  bounds the results its rung can ever hold (``Rungs.sizes``: with 24 trials, the bottom rung's is 24). Such a
  trial is stopped at once, so the searcher hears of it (Optuna: PRUNED) instead of waiting for the study's end.
- When the searcher has no more trials and nothing runs or waits, and no trial has passed the last rung, the best
  trial waiting at the highest rung goes on (``Rungs.last_call``: a small study still finishes its best trial);
  then the paused trials left are stopped and the study ends.

The bookkeeping (``Rungs``) is plain Python: ``study.replay`` drives it over recorded curves, the Tune glue
(``PromotionASHA``) stays thin, and the state is written to a JSON file after every change so that a resumed study
keeps its rungs (Tune does not checkpoint schedulers). A paused trial pauses after its rung's checkpoint; Tune's
``time_total_s`` and the trial rows count running time only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from study import storage


def milestones(grace_period: int, reduction_factor: int, max_t: int) -> tuple[int, ...]:
    """Rungs at grace x factor^k below max_t (reaching max_t is the end of a trial, not a rung), as in Ray's ASHA."""
    rungs, epoch = [], grace_period
    while epoch < max_t:
        rungs.append(epoch)
        epoch *= reduction_factor
    return tuple(rungs)


@dataclass
class Rungs:
    """Who reached which rung with what value, and who was promoted from it; no Ray in here.

    ``results[m]`` maps trial id -> value at milestone ``m`` in arrival order (ties rank the earlier first);
    a NaN value (a diverged trial) ranks last.
    """

    milestones: tuple[int, ...]
    reduction_factor: int
    max_trials: int
    results: dict[int, dict[str, float]] = field(default_factory=dict)
    promoted: dict[int, list[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for milestone in self.milestones:
            self.results.setdefault(milestone, {})
            self.promoted.setdefault(milestone, [])

    def sizes(self) -> dict[int, int]:
        """The most results each rung can ever hold: those it holds, plus the trials that may still arrive (not yet
        at the rung below, promoted from it and on their way, or waiting there and not dead). An upper bound, not
        floor(trials / factor^k): asynchronous promotion can pass more than 1/factor of a rung in the end."""
        sizes: dict[int, int] = {}
        may_arrive = self.max_trials - len(self.results[self.milestones[0]])
        for milestone, above in zip(self.milestones, (*self.milestones[1:], None)):
            sizes[milestone] = len(self.results[milestone]) + may_arrive
            if above is not None:
                ranked = self.ranked(milestone)[:max(1, sizes[milestone] // self.reduction_factor)]  # as is_dead
                may_arrive += sum(t not in self.results[above] for t in self.promoted[milestone])
                may_arrive += sum(t not in self.promoted[milestone] for t in ranked)
        return sizes

    def ranked(self, milestone: int) -> list[str]:
        arrivals = self.results[milestone]
        order = {trial_id: i for i, trial_id in enumerate(arrivals)}
        return sorted(arrivals, key=lambda t: (-_score(arrivals[t]), order[t]))

    def record(self, trial_id: str, milestone: int, value: float) -> None:
        self.results[milestone][trial_id] = float(value)

    def promotable(self) -> list[tuple[int, str]]:
        """(milestone, trial id) that may go on now: the highest rung first, the best first within a rung."""
        found = []
        for milestone in reversed(self.milestones):
            top = self.ranked(milestone)[:len(self.results[milestone]) // self.reduction_factor]
            found += [(milestone, t) for t in top if t not in self.promoted[milestone]]
        return found

    def promote(self, trial_id: str, milestone: int) -> None:
        self.promoted[milestone].append(trial_id)

    def arrive(self, trial_id: str, milestone: int, value: float) -> str:
        """Record a trial that reached a rung and decide: ``continue`` (promoted at once: no pause and restore),
        ``stop`` (it can never be promoted) or ``pause``."""
        self.record(trial_id, milestone, value)
        if (milestone, trial_id) in self.promotable():
            self.promote(trial_id, milestone)
            return "continue"
        return "stop" if self.is_dead(trial_id, milestone) else "pause"

    def is_dead(self, trial_id: str, milestone: int) -> bool:
        """Whether it can never be promoted from this rung: it needs a rank below floor(n / factor), and later
        arrivals only add trials above or below it while n cannot pass ``sizes()``. The best of a rung is never
        dead: ``last_call`` may promote it."""
        rank = self.ranked(milestone).index(trial_id)
        return rank > 0 and rank >= self.sizes()[milestone] // self.reduction_factor

    def hopeless(self) -> set[str]:
        """The waiting trials for which ``is_dead`` holds, in one pass (the scheduler sweeps them often)."""
        sizes = self.sizes()
        dead: set[str] = set()
        for milestone in self.milestones:
            first_dead = max(1, sizes[milestone] // self.reduction_factor)
            dead |= {t for t in self.ranked(milestone)[first_dead:] if t not in self.promoted[milestone]}
        return dead

    def last_call(self) -> tuple[int, str] | None:
        """At the end of a study, when nothing can be promoted and no trial is left to start: while no trial has
        passed the last rung, the best trial waiting at the highest rung that holds one goes on. Without it, a
        study of fewer than factor^(rungs) trials would finish none (e.g. 5 trials, factor 3: the rung at epoch 3
        holds at most 1)."""
        if not self.milestones or self.promoted[self.milestones[-1]]:
            return None
        for milestone in reversed(self.milestones):
            waiting = [t for t in self.ranked(milestone) if t not in self.promoted[milestone]]
            if waiting:
                return milestone, waiting[0]
        return None

    def waiting(self) -> list[tuple[int, str]]:
        """(milestone, trial id) of trials that reached their last rung so far and were not promoted from it."""
        highest: dict[str, int] = {}
        for milestone in self.milestones:
            for trial_id in self.results[milestone]:
                highest[trial_id] = milestone
        return [(m, t) for t, m in highest.items() if t not in self.promoted[m]]

    def to_dict(self) -> dict[str, Any]:
        return {"milestones": list(self.milestones), "reduction_factor": self.reduction_factor,
                "max_trials": self.max_trials, "results": {str(m): r for m, r in self.results.items()},
                "promoted": {str(m): p for m, p in self.promoted.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rungs:
        return cls(milestones=tuple(data["milestones"]), reduction_factor=data["reduction_factor"],
                   max_trials=data["max_trials"], results={int(m): r for m, r in data["results"].items()},
                   promoted={int(m): p for m, p in data["promoted"].items()})


def _score(value: float) -> float:
    return -math.inf if math.isnan(value) else value


class PromotionASHA(FIFOScheduler):
    """Tune's side of ``Rungs``: PAUSE at a rung, promote in ``choose_trial_to_run``, STOP what cannot go on.

    ``metric`` is maximised (``mode="max"`` only: the study's monitor is an accuracy). The searcher is told of
    pauses (``on_pause``/``on_unpause``, as Ray's BOHB searcher is by its HyperBand scheduler) so that it can keep
    paused trials out of its concurrency limit.
    """

    def __init__(self, *, metric: str, time_attr: str, max_t: int, grace_period: int, reduction_factor: int,
                 max_trials: int, state_file: str | None = None) -> None:
        super().__init__()
        self._metric, self._mode = metric, "max"
        self._supports_buffered_results = False  # decide on every epoch's report as it comes
        self._time_attr = time_attr
        self._state_file = state_file
        if state_file and storage.exists(state_file):
            self.rungs = Rungs.from_dict(storage.read_json(state_file))  # a resumed study keeps its rungs
        else:
            self.rungs = Rungs(milestones(grace_period, reduction_factor, max_t), reduction_factor, max_trials)
        self._resuming: set[str] = set()  # promoted while paused, not yet running again

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return metric in (None, self._metric) and mode in (None, self._mode)

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Tuner.restore unpickles the scheduler as it was when the study started: reload the rungs it kept since.
        self.__dict__.update(state)
        if self._state_file and storage.exists(self._state_file):
            self.rungs = Rungs.from_dict(storage.read_json(self._state_file))
        self._resuming = set()

    def _save(self) -> None:
        if self._state_file:
            storage.write_json(self._state_file, self.rungs.to_dict())

    def on_trial_result(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> str:
        self._resuming.discard(trial.trial_id)
        milestone = result.get(self._time_attr)
        waiting_at = dict((t, m) for m, t in self.rungs.waiting()).get(trial.trial_id)
        if waiting_at is not None and milestone is not None and milestone > waiting_at:
            # A resumed study: Tune requeues paused trials as pending, and this one ran on without a promotion.
            decision = "stop" if self.rungs.is_dead(trial.trial_id, waiting_at) else "pause"
        elif (milestone not in self.rungs.milestones or self._metric not in result
              or trial.trial_id in self.rungs.promoted[milestone]):  # (a retried trial re-reporting a rung it passed)
            return TrialScheduler.CONTINUE
        else:
            decision = self.rungs.arrive(trial.trial_id, milestone, result[self._metric])
            self._save()
        if decision == "pause":
            _notify(tune_controller, "on_pause", trial.trial_id)
        return {"continue": TrialScheduler.CONTINUE, "stop": TrialScheduler.STOP,
                "pause": TrialScheduler.PAUSE}[decision]

    def choose_trial_to_run(self, tune_controller: Any) -> Trial | None:
        trials = {t.trial_id: t for t in tune_controller.get_trials()}
        for trial_id in self._resuming:  # idempotent: the promotion chosen before, until it runs
            if trials.get(trial_id) is not None and trials[trial_id].status == Trial.PENDING:
                return trials[trial_id]
        paused = {t: trial for t, trial in trials.items() if trial.status == Trial.PAUSED}
        for milestone, trial_id in self.rungs.promotable():
            if trial_id in paused:
                return self._promote(tune_controller, paused[trial_id], milestone)
        last = self._end_or_stop_hopeless(tune_controller, paused)
        return last or next((t for t in trials.values() if t.status == Trial.PENDING), None)

    def _promote(self, tune_controller: Any, trial: Trial, milestone: int) -> Trial:
        self.rungs.promote(trial.trial_id, milestone)
        self._save()
        self._resuming.add(trial.trial_id)
        _notify(tune_controller, "on_unpause", trial.trial_id)
        return trial

    def _end_or_stop_hopeless(self, tune_controller: Any, paused: dict[str, Trial]) -> Trial | None:
        """Stop paused trials that can never be promoted. At the study's end (nothing to start, nothing running):
        the ``last_call`` trial goes on if there is one, else every paused trial left is stopped."""
        busy = any(t.status in (Trial.PENDING, Trial.RUNNING) for t in tune_controller.get_trials())
        ended = tune_controller.search_alg.is_finished() and not busy
        last = self.rungs.last_call() if ended else None
        if last is not None and last[1] in paused:
            return self._promote(tune_controller, paused[last[1]], last[0])
        hopeless = self.rungs.hopeless() if paused else set()
        for _, trial_id in self.rungs.waiting():
            if trial_id in paused and (ended or trial_id in hopeless):
                tune_controller.stop_trial(paused[trial_id])  # the searcher hears on_trial_complete
        return None

    def on_trial_remove(self, tune_controller: Any, trial: Trial) -> None:
        self._resuming.discard(trial.trial_id)

    def on_trial_complete(self, tune_controller: Any, trial: Trial, result: dict[str, Any]) -> None:
        self._resuming.discard(trial.trial_id)

    def debug_string(self) -> str:
        sizes = ", ".join(f"epoch {m}: {len(self.rungs.results[m])} reached, {len(self.rungs.promoted[m])} promoted"
                          for m in self.rungs.milestones)
        return f"ASHA with promotions ({sizes})"


def _notify(tune_controller: Any, hook: str, trial_id: str) -> None:
    """Call the searcher's on_pause/on_unpause, looking through Tune's wrappers (SearchGenerator, limiters)."""
    searcher = getattr(tune_controller, "search_alg", None)
    while searcher is not None:
        if hasattr(searcher, hook):
            getattr(searcher, hook)(trial_id)
            return
        searcher = getattr(searcher, "searcher", None)

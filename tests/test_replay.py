"""The ASHA replay: Ray Tune's own scheduler and ASHA with promotions fed recorded curves; costs and refusals on a
written results store."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from study import replay, results, storage
from study.config import StudyConfig
from study.launch import CONFIG_FILE

EPOCH_S, MONITOR_S, EVALUATION_S, STARTUP_S = 8.0, 2.0, 5.0, 2.0


def _curve(trial_id: str, monitor: list[float], objective: float) -> replay.Curve:
    return replay.Curve(trial_id, tuple(monitor), (EPOCH_S + MONITOR_S,) * len(monitor), EVALUATION_S, STARTUP_S,
                        objective)


def test_replay_follows_asynchronous_successive_halving() -> None:
    # Grace 1, factor 3, 6 epochs: rungs after epochs 1 and 3. A trial goes on past a rung only if its monitor is
    # at least the 2/3 quantile (linear interpolation) of the values recorded there before it; the first passes.
    curves = [
        _curve("first", [0.5, 0.5, 0.5, 0.5, 0.5, 0.5], 0.70),  # alone at both rungs: runs to the end
        _curve("low", [0.4, 0.9, 0.9, 0.9, 0.9, 0.9], 0.90),  # 0.4 < 0.5 at epoch 1: stopped there
        _curve("late", [0.6, 0.5, 0.45, 0.9, 0.9, 0.9], 0.95),  # 0.6 >= q(0.4, 0.5)=0.467; then 0.45 < 0.5
        _curve("middle", [0.47, 0.9, 0.9, 0.9, 0.9, 0.9], 0.99),  # 0.47 < q(0.4, 0.5, 0.6) = 0.533
        _curve("best", [0.7, 0.7, 0.7, 0.7, 0.7, 0.7], 0.80),  # top at both rungs
    ]
    assert np.isclose(np.quantile([0.4, 0.5], 2 / 3), 0.4 + 0.1 * 2 / 3)  # the quantiles the comments use
    assert np.isclose(np.quantile([0.4, 0.5, 0.6], 2 / 3), 0.5 + 0.1 / 3)
    study = StudyConfig(epochs=6, grace_epochs=1, reduction_factor=3, scheduler="asha")
    result = replay.replay(curves, study)
    assert result.stopped_after == {"first": 6, "low": 1, "late": 3, "middle": 1, "best": 6}
    assert result.finished == 2 and result.best_objective == 0.80 and result.epochs == 17
    full_trial = STARTUP_S + 6 * (EPOCH_S + MONITOR_S) + EVALUATION_S
    assert result.full_cost == pytest.approx(5 * full_trial)
    assert result.cost == pytest.approx(2 * full_trial + 2 * (STARTUP_S + 10.0) + STARTUP_S + 30.0)
    assert result.cost_ratio == pytest.approx(result.cost / result.full_cost)


def test_replay_depends_on_the_order_and_on_the_reduction_factor() -> None:
    curves = [_curve(f"t{i}", [0.1 * i] * 6, 0.1 * i) for i in range(1, 7)]  # every trial better than the last
    rising = replay.replay(curves, StudyConfig(epochs=6, reduction_factor=3, scheduler="asha"))
    assert set(rising.stopped_after.values()) == {6}  # each is the best so far: nothing is stopped
    falling = replay.replay(curves[::-1], StudyConfig(epochs=6, reduction_factor=3, scheduler="asha"))
    assert falling.stopped_after == {"t6": 6, **{f"t{i}": 1 for i in range(1, 6)}}
    assert falling.best_objective == pytest.approx(0.6) and falling.finished == 1
    # Factor 2, 6 epochs: rungs after 1, 2 and 4. Worst first: every later trial passes every rung.
    two = replay.replay(curves, StudyConfig(epochs=6, reduction_factor=2, scheduler="asha"))
    assert two.finished == 6


def test_replay_of_asha_with_promotions() -> None:
    # The first test's curves: 5 trials, rungs after epochs 1 and 3, factor 3. A trial pauses at a rung and goes on
    # once it is in the top floor(n / 3) of the n results there; "best" passes epoch 3 only by the last call (the
    # rung holds 2 results, floor(2 / 3) = 0).
    curves = [
        _curve("first", [0.5] * 6, 0.70),  # paused at epoch 1, never in the top 1 of 3, 4 or 5
        _curve("low", [0.4] + [0.9] * 5, 0.90),  # second of 2 at epoch 1 with at most 5 to come: stopped
        _curve("late", [0.6, 0.5, 0.45, 0.9, 0.9, 0.9], 0.95),  # top of 3 at epoch 1; paused at 3, then beaten
        _curve("middle", [0.47] + [0.9] * 5, 0.99),
        _curve("best", [0.7] * 6, 0.80),
    ]
    study = StudyConfig(epochs=6, grace_epochs=1, reduction_factor=3, scheduler="asha_promotion")
    result = replay.replay(curves, study)
    assert result.stopped_after == {"first": 1, "low": 1, "late": 3, "middle": 1, "best": 6}
    assert result.finished == 1 and result.best_objective == 0.80 and result.epochs == 12
    assert result.cost == pytest.approx(5 * STARTUP_S + 12 * (EPOCH_S + MONITOR_S) + EVALUATION_S)
    # Rising curves, where Ray's ASHA stops nothing: with promotions the first trials wait and are overtaken.
    rising = [_curve(f"t{i}", [0.1 * i] * 6, 0.1 * i) for i in range(1, 7)]
    assert replay.replay(rising, study).stopped_after == {"t1": 1, "t2": 1, "t3": 3, "t4": 3, "t5": 6, "t6": 6}


def _write_study(root: Path, statuses: dict[str, str], *, cpus: float = 2.0) -> str:
    study = StudyConfig(name="recorded", storage_path=str(root), epochs=3, scheduler="none")
    storage.write_json(storage.join(study.study_dir, CONFIG_FILE), study.to_dict())
    trial_rows: list[dict[str, Any]] = []
    epoch_rows: list[dict[str, Any]] = []
    for index, (trial_id, status) in enumerate(statuses.items()):
        done = 3 if status == "completed" else 1
        trial_rows.append({"study_name": study.name, "trial_id": trial_id, "status": status, "epochs": 3,
                           "epochs_done": done, "objective": 0.8 + 0.01 * index, "workers": 1,
                           "cpus_per_worker": cpus, "wall_time_s": 50.0, "evaluation_time_s": 6.0,
                           "seed": 0, "started_at": 1_800_000_000.0 - index})  # listed last-started first
        epoch_rows += [{"study_name": study.name, "trial_id": trial_id, "seed": 0, "epoch": e,
                        "knn_monitor_accuracy": 0.5 + 0.01 * e, "epoch_time_s": 10.0, "monitor_time_s": 3.0}
                       for e in range(1, done + 1)]
    results.record(study.study_dir, trial_rows, epoch_rows)
    return study.study_dir


def test_load_curves_reads_costs_in_cpu_seconds_in_starting_order(tmp_path: Path) -> None:
    study_dir = _write_study(tmp_path, {"a": "completed", "b": "completed"})
    study, curves = replay.load_curves(study_dir)
    assert study.epochs == 3 and [c.trial_id for c in curves] == ["b", "a"]
    b = curves[0]
    assert b.monitor == pytest.approx((0.51, 0.52, 0.53))
    assert b.epoch_costs == pytest.approx((26.0,) * 3)  # (10 s + 3 s) x 2 CPUs
    assert b.evaluation_cost == pytest.approx(12.0) and b.startup_cost == pytest.approx(2 * (50 - 39 - 6))
    assert b.cost(3) == pytest.approx(100.0) and b.cost(1) == pytest.approx(10.0 + 26.0)
    assert b.objective == pytest.approx(0.81)


def test_studies_that_stopped_trials_are_refused_by_name(tmp_path: Path) -> None:
    study_dir = _write_study(tmp_path, {"a": "completed", "b": "early-stopped"})
    with pytest.raises(ValueError, match=r"trials \['b'\] did not run every epoch.*--scheduler none"):
        replay.load_curves(study_dir)
    with pytest.raises(ValueError, match="not a study folder"):
        replay.load_curves(str(tmp_path / "nowhere"))


def test_main_prints_the_recorded_order_and_the_random_orders(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    study_dir = _write_study(tmp_path, {"a": "completed", "b": "completed", "c": "completed"})
    assert replay.main([study_dir, "--orders", "20", "--reduction-factor", "2", "--scheduler", "asha"]) == 0
    out = capsys.readouterr().out
    assert "3 trials of 3 epochs" in out and "reduction factor 2" in out and "Ray Tune's ASHA" in out
    # Equal curves: ASHA stops none (a tie is not below the cutoff), so the replay costs what the study did.
    assert "recorded order: 3/3 finished, 9/9 epochs, compute 1.00x" in out
    assert "20 random orders: compute ratio mean 1.00" in out
    # With promotions (the default; rungs at epochs 1 and 2): equal monitors rank by arrival, so b and c stop at
    # epoch 1 (second and third of at most 3 results, of which floor(3 / 2) = 1 goes on), and a, alone at epoch
    # 2, finishes by the last call.
    assert replay.main([study_dir, "--orders", "20", "--reduction-factor", "2"]) == 0
    out = capsys.readouterr().out
    assert "ASHA with promotions" in out and "recorded order: 1/3 finished, 5/9 epochs" in out
    with pytest.raises(ValueError, match="grace_epochs"):
        replay.main([study_dir, "--grace-epochs", "4"])

"""The study analysis on synthetic studies whose truth is known: the objective peaks at temperature 0.2 (on a log
scale) and does not depend on batch size, learning rate or method. No Ray, no training."""

from __future__ import annotations

import math
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scipy import stats

from study import analyze, results, storage
from study.config import StudyConfig
from trainers.config import TrainConfig

PEAK = 0.2


def _accuracy(temperature: float, noise: float) -> float:
    return 0.85 - 0.3 * math.log10(temperature / PEAK) ** 2 + noise


def _row(name: str, trial_id: str, config: TrainConfig, status: str, objective: float | None,
         **values: Any) -> dict[str, Any]:
    accuracy = objective if status == "completed" else None
    return config.to_dict() | {
        "study_name": name, "trial_id": trial_id, "status": status, "objective": objective if accuracy else 0.0,
        "global_batch": config.batch_size, "world_size": 1, "workers": 1, "nodes": 1, "effective_lr": config.lr,
        "negatives_per_positive": config.negatives_per_positive, "epochs_done": config.epochs,
        "linear_val_accuracy": accuracy, "linear_test_accuracy": None if accuracy is None else accuracy - 0.004,
        "knn_val_accuracy": None if accuracy is None else accuracy - 0.1,
        "random_init_linear_val_accuracy": 0.78, "raw_pixel_linear_val_accuracy": 0.83,
        "wall_time_s": 100.0, "started_at": 1_800_000_000.0 + 200 * int(trial_id[1:], 16),
        "finished_at": 1_800_000_100.0 + 200 * int(trial_id[1:], 16),
    } | values


def _epoch_rows(name: str, trial_id: str, config: TrainConfig, epochs: int) -> list[dict[str, Any]]:
    moco = config.method == "moco"
    return [{"study_name": name, "trial_id": trial_id, "seed": config.seed, "epoch": e, "loss": 6.0 - e,
             "knn_monitor_accuracy": 0.5 + 0.02 * e, "alignment": config.temperature, "uniformity": -2 * e / 3,
             "queue_key_consistency": (1 - 0.5 * (1 - config.momentum)) if moco else None,
             "queue_key_age": 8.0 if moco else None} for e in range(1, epochs + 1)]


def write_study(root: Path, name: str, *, trials_per_method: int = 20, seed: int = 0,
                extra_statuses: bool = True) -> Path:
    """A study folder (study_config.json + Parquet) with ``trials_per_method`` completed trials of each method on a
    log-spaced temperature grid, random batch sizes, learning rates, momenta and queues, plus (with
    ``extra_statuses``) two early-stopped, one failed and one diverged trial."""
    rng = np.random.default_rng(seed)
    study_dir = root / name
    storage.write_json(str(study_dir / analyze.CONFIG_FILE), StudyConfig(name=name, storage_path=str(root)).to_dict())
    temperatures = np.geomspace(0.03, 1.0, trials_per_method)
    trial_rows, epoch_rows = [], []
    index = 0
    for method in ("simclr", "moco"):
        for temperature in rng.permutation(temperatures):
            batch = int(rng.choice([64, 128, 256]))
            base_lr = float(np.exp(rng.uniform(np.log(0.03), np.log(1.0))))
            queued = int(rng.choice([1, 4, 16, 64]))
            momentum = float(rng.choice([0.0, 0.9, 0.99, 0.999]))
            config = TrainConfig(method=method, batch_size=batch, lr=base_lr * batch / 256,
                                 temperature=float(temperature), momentum=momentum, queue_length=queued * batch,
                                 epochs=3)
            trial_id = f"t{index:03x}"
            index += 1
            trial_rows.append(_row(name, trial_id, config, "completed", _accuracy(temperature, rng.normal(0, 0.003)),
                                   base_lr=base_lr, queued_batches=queued))
            epoch_rows += _epoch_rows(name, trial_id, config, 3)
    if extra_statuses:
        config = TrainConfig(method="moco", batch_size=64, queue_length=256, epochs=3, temperature=0.05)
        for status, epochs in (("early-stopped", 1), ("early-stopped", 2), ("failed", 1), ("diverged", 2)):
            trial_id = f"t{index:03x}"
            index += 1
            reason = {"failed": "Failure # 1\nTraceback (most recent call last):\n  File \"x.py\", line 1\n"
                                "RuntimeError: worker died (out of memory)\n",
                      "diverged": "loss became NaN at step 17"}.get(status)
            trial_rows.append(_row(name, trial_id, config, status, None, epochs_done=epochs, failure_reason=reason))
            epoch_rows += _epoch_rows(name, trial_id, config, epochs)
    results.record(str(study_dir), trial_rows, epoch_rows)
    return study_dir


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_study(tmp_path_factory.mktemp("studies"), "synthetic")


@pytest.fixture(scope="module")
def loaded(synthetic: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return results.load(str(synthetic))


def test_importance_ranks_temperature_first_overall_and_per_method(loaded: tuple[pd.DataFrame, pd.DataFrame],
                                                                   synthetic: Path) -> None:
    trials, _ = loaded
    configs = analyze.load_studies([str(synthetic)]).configs
    table, notes = analyze.importance_table(trials, study_configs=configs)
    assert notes == []
    assert set(table["scope"]) == {"all", "simclr", "moco"}
    for scope, rows in table.groupby("scope"):
        assert rows.sort_values("rank")["param"].iloc[0] == "temperature", (scope, rows)
        assert rows["importance"].sum() == pytest.approx(1.0)
    # Conditional parameters: MoCo's momentum and queue are searched only for MoCo, method only across methods.
    assert {"momentum", "queued_batches"} <= set(table.loc[table["scope"] == "moco", "param"])
    assert not {"momentum", "queued_batches"} & set(table.loc[table["scope"] != "moco", "param"])
    assert "method" in set(table.loc[table["scope"] == "all", "param"])
    # Seeded: the same numbers twice.
    again = analyze.importance(trials, "moco", study_configs=configs)
    pd.testing.assert_frame_equal(again, analyze.importance(trials, "moco", study_configs=configs))


def test_importance_without_a_study_config_uses_the_varying_columns(loaded: tuple[pd.DataFrame, pd.DataFrame]
                                                                    ) -> None:
    trials, _ = loaded
    table = analyze.importance(trials, "simclr")  # no study configs: parameters inferred from the data
    assert table["param"].iloc[0] == "temperature"
    assert "lr" not in set(table["param"]) and "base_lr" in set(table["param"])  # lr is derived from base_lr


def test_too_few_trials_give_a_note_not_a_crash(loaded: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    trials, _ = loaded
    few = trials[trials["trial_id"].isin(trials["trial_id"].unique()[:5])]
    with pytest.raises(analyze.NotEnoughData, match="needs at least"):
        analyze.importance(few)
    table, notes = analyze.importance_table(few)
    assert table.empty and notes and all("needs at least" in n for n in notes)


def test_sensitivity_peaks_in_the_bin_of_the_true_optimum(loaded: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    trials, _ = loaded
    table = analyze.sensitivity(trials, "temperature")
    assert list(table.columns) == analyze.SENSITIVITY_COLUMNS
    for method, rows in table.groupby("method"):
        assert len(rows) == 5 and rows["count"].sum() == 20  # 5 log bins over the 20 completed trials
        best = rows.loc[rows["mean"].idxmax()]
        assert best["low"] <= PEAK <= best["high"], (method, rows)
        assert math.isclose(best["center"], math.sqrt(best["low"] * best["high"]))  # log bins: geometric centre
    edges = sorted(set(table["low"]) | set(table["high"]))
    assert np.allclose(np.diff(np.log(edges)), np.log(1 / 0.03) / 5)  # equal widths on the log scale


def test_discrete_parameters_get_one_bin_per_value(loaded: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    trials, _ = loaded
    batch = analyze.sensitivity(trials, "batch_size")
    assert set(batch["bin"].astype(str)) <= {"64", "128", "256"}
    momentum = analyze.sensitivity(trials, "momentum")
    assert set(momentum["method"]) == {"moco"} and set(momentum["bin"].astype(str)) <= {"0", "0.9", "0.99", "0.999"}
    negatives = analyze.sensitivity(trials, "negatives_per_positive")
    assert set(negatives["method"]) == {"simclr", "moco"}
    assert analyze.sensitivity(trials, "no_such_param").empty


def test_interaction_shows_the_temperature_peak_in_every_batch_row(loaded: tuple[pd.DataFrame, pd.DataFrame]
                                                                   ) -> None:
    trials, _ = loaded
    means = analyze.interaction(trials, "temperature", "batch_size", bins=4)
    counts = analyze.interaction(trials, "temperature", "batch_size", bins=4, agg="count")
    assert int(np.nansum(counts.to_numpy())) == 40
    assert list(means.index.astype(str)) == ["64", "128", "256"]
    peak_column = means.mean(axis=0).idxmax()
    low, high = (float(v) for v in str(peak_column).split("–"))
    assert low <= PEAK <= high
    one_batch = trials[trials["batch_size"] == 64]
    with pytest.raises(analyze.NotEnoughData, match="at least 2 of each"):
        analyze.interaction(one_batch, "temperature", "batch_size", method="simclr")


def test_seeds_give_mean_std_and_t_interval(tmp_path: Path) -> None:
    values = {"a": [0.80, 0.82, 0.83], "b": [0.70, 0.74], "c": [0.60]}
    rows = []
    for trial, accuracies in values.items():
        for seed, accuracy in enumerate(accuracies):
            config = TrainConfig(method="simclr", batch_size=128, temperature=0.1, seed=seed)
            rows.append(_row("seeds", f"t{ord(trial):x}", config, "completed", accuracy))
    config = TrainConfig(method="simclr", batch_size=128, temperature=0.1, seed=3)
    rows.append(_row("seeds", f"t{ord('a'):x}", config, "diverged", None))  # no accuracy: not in the mean
    results.record(str(tmp_path), rows, [])
    trials, _ = results.load(str(tmp_path))
    board = analyze.leaderboard(trials, top=5).set_index("trial_id")
    for trial, accuracies in values.items():
        row = board.loc[f"t{ord(trial):x}"]
        assert row["seeds"] == len(accuracies)
        assert row["linear_val_accuracy"] == pytest.approx(statistics.mean(accuracies))
        if len(accuracies) == 1:
            assert math.isnan(row["linear_val_accuracy_std"]) and math.isnan(row["linear_val_accuracy_ci_low"])
            continue
        std = statistics.stdev(accuracies)
        low, high = stats.t.interval(0.95, len(accuracies) - 1, loc=statistics.mean(accuracies),
                                     scale=std / math.sqrt(len(accuracies)))
        assert row["linear_val_accuracy_std"] == pytest.approx(std)
        assert (row["linear_val_accuracy_ci_low"], row["linear_val_accuracy_ci_high"]) == pytest.approx((low, high))
        assert row["gain_over_random_init"] == pytest.approx(statistics.mean(accuracies) - 0.78)
        assert row["gain_over_raw_pixels"] == pytest.approx(statistics.mean(accuracies) - 0.83)
    assert list(board.index) == [f"t{ord(t):x}" for t in "abc"]  # ranked by mean objective
    shown = analyze.display_leaderboard(board.reset_index(), several_studies=False)
    assert re.fullmatch(r"0\.817 ± 0\.015 \[0\.779, 0\.855\]", shown.loc[0, "val linear"])


def test_accounting_and_failures(loaded: tuple[pd.DataFrame, pd.DataFrame], synthetic: Path) -> None:
    trials, _ = loaded
    configs = analyze.load_studies([str(synthetic)]).configs
    row = analyze.accounting(trials, configs).iloc[0]
    assert (row["trials"], row["runs"], row["completed"], row["early-stopped"], row["failed"], row["diverged"]) == \
        (44, 44, 40, 2, 1, 1)
    assert row["early_stopped_share"] == pytest.approx(2 / 44)
    assert row["worker_hours"] == pytest.approx(44 * 100 / 3600)
    assert math.isnan(row["cpu_hours"]) and "auto" in row["compute_note"]  # cpus_per_worker 0 in the config
    assert row["gpu_hours"] == 0
    assert row["wall_time_h"] == pytest.approx((200 * 43 + 100) / 3600)
    with_cpus = {"synthetic": configs["synthetic"] | {"cpus_per_worker": 2.0, "gpus_per_worker": 0.5}}
    row = analyze.accounting(trials, with_cpus).iloc[0]
    assert row["cpu_hours"] == pytest.approx(2 * 44 * 100 / 3600)
    assert row["gpu_hours"] == pytest.approx(0.5 * 44 * 100 / 3600)
    failed = analyze.failures(trials).set_index("status")
    assert failed.loc["failed", "reason"] == "RuntimeError: worker died (out of memory)"
    assert failed.loc["diverged", "reason"] == "loss became NaN at step 17"
    assert analyze.summarise_reason("x" * 500, width=20) == "x" * 19 + "…"


def test_curves_and_diagnostics_tables(loaded: tuple[pd.DataFrame, pd.DataFrame]) -> None:
    trials, epochs = loaded
    curves = analyze.learning_curves(trials, epochs)
    assert len(curves) == len(epochs) and curves["method"].notna().all()
    assert curves.loc[curves["status"] != "completed", "objective"].isna().all()  # placeholders are not accuracies
    last = analyze.last_epoch(trials, epochs)
    assert len(last) == 44
    assert last.loc[last["status"] == "completed", "epoch"].eq(3).all()
    moco = last[last["method"] == "moco"]
    assert np.allclose(moco["queue_key_consistency"], 1 - 0.5 * (1 - moco["momentum"]))


def _figures_named(markdown: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)


def test_command_writes_a_self_contained_report(synthetic: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze.main([str(synthetic), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "Leaderboard" in out and "temperature" in out and "Hyperparameter importance" in out
    report = synthetic / "report"
    markdown = (report / "report.md").read_text()
    page = (report / "report.html").read_text()
    figures = _figures_named(markdown)
    assert set(figures) == set(analyze.FIGURES)  # this study supports every figure
    for name in figures:
        assert (report / name).read_bytes().startswith(b"\x89PNG")
    assert page.count("data:image/png;base64,") == len(figures)
    assert not re.search(r"(src|href)=['\"](https?:|//|[^'\"d#])", page)  # nothing but data URIs to fetch
    assert "RuntimeError: worker died" in markdown  # failures are listed with their reason
    leaderboard = markdown.split("## Leaderboard")[1].split("## ")[0]
    assert leaderboard.count("| simclr") + leaderboard.count("| SimCLR") == 3


def test_several_studies_and_a_file_uri(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    first = write_study(tmp_path, "first", trials_per_method=6, seed=1, extra_statuses=False)
    second = write_study(tmp_path, "second", trials_per_method=6, seed=2)
    studies = analyze.load_studies([str(first), f"file://{second}"])
    assert set(studies.trials["study_name"]) == {"first", "second"} and len(studies.trials) == 12 + 16
    assert set(studies.configs) == {"first", "second"}
    # Trial ids repeat across the two studies; configurations are keyed by (study, trial).
    assert len(analyze.configurations(studies.trials)) == 28
    out = analyze.write_report([str(first), f"file://{second}"], str(tmp_path / "both"))
    markdown = (out / "report.md").read_text()
    assert out == tmp_path / "both" and "first" in markdown and "second" in markdown
    for name in _figures_named(markdown):
        assert (out / name).exists()
    # A URI alone: the report goes to ./report-<name>, never next to the remote study.
    monkeypatch.chdir(tmp_path / "both")
    assert analyze.main([f"file://{second}"]) == 0
    assert (tmp_path / "both" / "report-second" / "report.html").exists()
    assert not (second / "report").exists()
    capsys.readouterr()


def test_the_same_study_twice_is_told_apart(synthetic: Path) -> None:
    studies = analyze.load_studies([str(synthetic), f"file://{synthetic}"])
    assert studies.trials["study_name"].nunique() == 2 and len(studies.trials) == 88


def _no_traceback(err: str) -> None:
    assert "Traceback" not in err


def test_empty_study_folder_exits_1_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "nothing to analyse" in err and "no finished trial" in err
    _no_traceback(err)
    assert not (tmp_path / "report").exists()


def test_all_failed_study_exits_1_naming_the_reasons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = TrainConfig(method="simclr", batch_size=64)
    reason = "Traceback (most recent call last):\n  ...\nValueError: batch_size must be ...\n"
    results.record(str(tmp_path), [_row("broken", f"t{i:03x}", config, "failed", None, failure_reason=reason)
                                   for i in range(3)], [])
    assert analyze.main([str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "nothing to analyse" in err and "3 failed" in err and "ValueError: batch_size must be" in err
    _no_traceback(err)


def test_missing_folder_and_unreadable_results_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert analyze.main([str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "no such study folder" in err
    _no_traceback(err)
    (tmp_path / results.TRIALS_FILE).write_bytes(b"not parquet")
    assert analyze.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is not a readable Parquet file" in err
    _no_traceback(err)
    (tmp_path / results.TRIALS_FILE).unlink()
    (tmp_path / analyze.CONFIG_FILE).write_text("{not json")
    assert analyze.main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "study_config.json is not valid JSON" in err
    _no_traceback(err)


@settings(max_examples=60, deadline=None, derandomize=True)
@example(values=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 0.5], param="batch_size")  # once: 2**-1 with numpy ints
@given(values=st.lists(st.floats(min_value=1e-4, max_value=1e5), min_size=1, max_size=40),
       param=st.sampled_from(["temperature", "batch_size", "negatives_per_positive", "momentum", "crop_scale_min"]))
def test_every_value_lies_in_its_bin(values: list[float], param: str) -> None:
    series = pd.Series(values, index=range(10, 10 + len(values)))
    binned = analyze.bin_values(series, param, bins=5, max_levels=8)
    assert list(binned.index) == list(series.index) and binned["bin"].notna().all()
    tolerance = 1e-9 * series.abs().max()
    assert ((binned["low"] - tolerance <= series) & (series <= binned["high"] + tolerance)).all()
    assert binned["bin"].cat.categories.is_unique and binned["bin"].nunique() <= max(8, len(set(values)))
    # Bins are ordered like the values they hold.
    codes = binned["bin"].cat.codes
    assert (codes[series.sort_values().index].diff().dropna() >= 0).all()

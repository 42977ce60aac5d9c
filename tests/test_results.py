"""The Parquet results store: explicit schemas, upserts by key, atomic writes, clear errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from study import results
from trainers.config import TrainConfig


def _trial(trial_id: str, seed: int = 0, **values) -> dict:
    config = TrainConfig(method=values.pop("method", "moco"), batch_size=64, queue_length=256, seed=seed)
    return config.to_dict() | {"study_name": "s", "trial_id": trial_id, "status": "completed",
                               "objective": 0.8, "global_batch": 64, "negatives_per_positive": 256,
                               "started_at": 1_700_000_000.0, "finished_at": "2026-11-28T09:00:00+00:00"} | values


def _epochs(trial_id: str, n: int, seed: int = 0, loss: float = 5.0) -> list[dict]:
    return [{"study_name": "s", "trial_id": trial_id, "seed": seed, "epoch": e, "loss": loss - e,
             "knn_monitor_accuracy": 0.5} for e in range(1, n + 1)]


def test_roundtrip_with_documented_schema(tmp_path: Path) -> None:
    results.record(str(tmp_path), [_trial("a"), _trial("b", method="simclr")], _epochs("a", 2) + _epochs("b", 3))
    trials, epochs = results.load(str(tmp_path))
    assert list(trials.columns) == results.TRIALS_SCHEMA.names
    assert list(epochs.columns) == results.EPOCHS_SCHEMA.names
    assert len(trials) == 2 and len(epochs) == 5
    simclr = trials.set_index("trial_id").loc["b"]
    assert pd.isna(simclr["momentum"]) and pd.isna(simclr["queue_length"])  # MoCo-only: null for SimCLR
    assert trials.set_index("trial_id").loc["a", "queue_length"] == 256
    assert str(trials["started_at"].dtype).startswith("datetime64") and trials["batch_size"].dtype == "int64"
    metadata = pq.read_schema(tmp_path / results.TRIALS_FILE).metadata
    assert metadata[b"schema_version"] == b"1"
    assert pd.read_parquet(tmp_path / results.EPOCHS_FILE).shape == (5, len(results.EPOCHS_SCHEMA))


def test_upsert_replaces_by_key_and_never_duplicates(tmp_path: Path) -> None:
    results.record(str(tmp_path), [_trial("a")], _epochs("a", 2))
    results.record(str(tmp_path), [_trial("a", objective=0.9)], _epochs("a", 3, loss=9.0))  # a retry
    results.record(str(tmp_path), [_trial("a", seed=1)], _epochs("a", 1, seed=1))  # another seed
    trials, epochs = results.load(str(tmp_path))
    assert sorted(zip(trials.trial_id, trials.seed)) == [("a", 0), ("a", 1)]
    assert trials.set_index("seed").loc[0, "objective"] == 0.9
    assert not epochs.duplicated(["trial_id", "seed", "epoch"]).any() and len(epochs) == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_non_finite_values_become_null_and_statuses_are_checked(tmp_path: Path) -> None:
    results.record(str(tmp_path), [_trial("a", final_loss=float("nan"), status="diverged")], [])
    trials, _ = results.load(str(tmp_path))
    assert pd.isna(trials.loc[0, "final_loss"]) and trials.loc[0, "status"] == "diverged"
    with pytest.raises(ValueError, match="status must be one of"):
        results.record(str(tmp_path), [_trial("b", status="done")], [])


def test_empty_study_loads_empty_frames(tmp_path: Path) -> None:
    trials, epochs = results.load(str(tmp_path))
    assert trials.empty and list(trials.columns) == results.TRIALS_SCHEMA.names and epochs.empty


def test_truncated_or_foreign_files_are_named(tmp_path: Path) -> None:
    results.record(str(tmp_path), [_trial("a")], _epochs("a", 1))
    data = (tmp_path / results.TRIALS_FILE).read_bytes()
    (tmp_path / results.TRIALS_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(results.ResultsError, match=r"trials\.parquet is not a readable Parquet file"):
        results.load(str(tmp_path))
    pd.DataFrame({"x": [1]}).to_parquet(tmp_path / results.TRIALS_FILE)
    with pytest.raises(results.ResultsError, match="schema version"):
        results.load(str(tmp_path))


def test_a_failed_write_keeps_the_previous_file(tmp_path: Path) -> None:
    results.record(str(tmp_path), [_trial("a")], [])
    before = (tmp_path / results.TRIALS_FILE).read_bytes()
    with pytest.raises(ValueError, match="must not be null"):
        results.record(str(tmp_path), [_trial("b") | {"trial_id": None}], [])
    assert (tmp_path / results.TRIALS_FILE).read_bytes() == before


def _foreign_table(path: Path) -> None:
    pd.DataFrame({"x": [1]}).to_parquet(path)  # pandas metadata only: someone else's table


def _other_version(path: Path) -> None:
    schema = results.TRIALS_SCHEMA.with_metadata({"schema_version": "2", "table": "trials"})
    pq.write_table(schema.empty_table(), path)


def _epochs_table_as_trials(path: Path) -> None:
    results.record(str(path.parent / "other"), [], _epochs("a", 1))
    path.write_bytes((path.parent / "other" / results.EPOCHS_FILE).read_bytes())


def _random_bytes(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 40)


@pytest.mark.parametrize(("damage", "message"), [
    (_random_bytes, r"trials\.parquet is not a readable Parquet file"),
    (_foreign_table, r"trials\.parquet is a Parquet file but not a results table of contrastive-study"),
    (_other_version, r"trials\.parquet has schema version '2', this code reads version 1"),
    (_epochs_table_as_trials, r"trials\.parquet holds the table 'epochs', not 'trials'"),
])
def test_a_damaged_or_foreign_file_is_named_and_never_overwritten(tmp_path: Path, damage, message: str) -> None:
    results.record(str(tmp_path), [_trial("a")], [])
    damage(tmp_path / results.TRIALS_FILE)
    before = (tmp_path / results.TRIALS_FILE).read_bytes()
    with pytest.raises(results.ResultsError, match=message + r".*move it away"):
        results.load(str(tmp_path))
    # A write would read the file to upsert into it: it refuses rather than replacing unknown rows with ours.
    with pytest.raises(results.ResultsError, match=message):
        results.record(str(tmp_path), [_trial("b")], [])
    assert (tmp_path / results.TRIALS_FILE).read_bytes() == before


def test_a_temporary_file_left_by_a_crash_is_ignored_and_replaced(tmp_path: Path) -> None:
    results.record(str(tmp_path), [_trial("a")], _epochs("a", 1))
    for name in (results.TRIALS_FILE, results.EPOCHS_FILE):  # a crash mid-write: half a file, or garbage
        (tmp_path / f"{name}.tmp").write_bytes(b"PAR1 half a file")
    trials, epochs = results.load(str(tmp_path))
    assert list(trials.trial_id) == ["a"] and len(epochs) == 1
    results.record(str(tmp_path), [_trial("b")], _epochs("b", 2))
    trials, epochs = results.load(str(tmp_path))
    assert sorted(trials.trial_id) == ["a", "b"] and len(epochs) == 3
    assert not list(tmp_path.glob("*.tmp"))

"""The study's results store: the only module that reads or writes its Parquet files.

``trials.parquet`` has one row per (trial, seed): the study, the trial, every TrainConfig field as a typed column,
derived quantities (global batch, world size, effective lr, negatives per positive), status and failure reason,
probe accuracies, the study's baselines, throughput, library versions and timestamps. ``epochs.parquet`` has one
row per (trial, seed, epoch). Both have explicit pyarrow schemas and carry ``schema_version`` in their metadata.

Rows are upserted by key as trials finish: each write replaces the file atomically (temporary file + rename),
so readers never see a partial file and a crash never loses a finished trial. Only the study's launcher writes,
from one process. Works on local paths and on pyarrow filesystem URIs (``s3://bucket/studies/x``)::

    trials, epochs = study.results.load("studies/my-study")   # or pandas.read_parquet(".../trials.parquet")

Faults, and what happens:

- A results file that is truncated, not Parquet, another table or of another schema version is never skipped or
  overwritten: reading it (and so the next write) raises :class:`ResultsError` naming the file, the problem and
  what to do (move it away). Skipping it would silently drop finished trials from the analysis, and overwriting
  it would lose them for good.
- A write that fails (disk full, read-only folder, lost permissions) raises :class:`ResultsError` naming the file;
  the previous file is intact and no temporary file is left, so the same call succeeds once the cause is fixed.
- A temporary file left by a crash (``trials.parquet.tmp``) is never read, and the next write replaces it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from study.storage import filesystem
from trainers.config import TrainConfig

SCHEMA_VERSION = 1
TRIALS_FILE = "trials.parquet"
EPOCHS_FILE = "epochs.parquet"
STATUSES = ("completed", "early-stopped", "failed", "diverged")

_ARROW_TYPES = {"int": pa.int64(), "float": pa.float64(), "bool": pa.bool_(), "str": pa.string()}
# MoCo-only fields are null in SimCLR rows: they mean nothing there.
MOCO_ONLY = ("momentum", "queue_length", "symmetric", "queued_batches")

_TRIAL_FIELDS: list[pa.Field] = [
    pa.field("study_name", pa.string(), nullable=False),
    pa.field("trial_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("failure_reason", pa.string()),
    *[pa.field(f.name, _ARROW_TYPES[str(f.type)]) for f in dataclasses.fields(TrainConfig)],
    pa.field("base_lr", pa.float64()),
    pa.field("queued_batches", pa.int64()),
    pa.field("global_batch", pa.int64()),
    pa.field("world_size", pa.int64()),
    pa.field("effective_lr", pa.float64()),
    pa.field("negatives_per_positive", pa.int64()),
    pa.field("epochs_done", pa.int64()),
    pa.field("final_loss", pa.float64()),
    pa.field("objective", pa.float64()),
    *[pa.field(name, pa.float64()) for name in (
        "linear_val_accuracy", "linear_test_accuracy", "linear_weight_decay", "knn_val_accuracy",
        "knn_test_accuracy", "finetune_val_accuracy", "finetune_test_accuracy",
        "random_init_linear_val_accuracy", "random_init_linear_test_accuracy", "random_init_knn_val_accuracy",
        "random_init_knn_test_accuracy", "raw_pixel_linear_val_accuracy", "raw_pixel_linear_test_accuracy",
        "wall_time_s", "evaluation_time_s", "images_per_second")],
    pa.field("nodes", pa.int64()),
    pa.field("node_id", pa.string()),  # the Ray node of the trial's own process (in-process trials train there)
    pa.field("workers", pa.int64()),
    pa.field("cpus_per_worker", pa.float64()),  # as resolved for the cluster (the study's 0 = auto is not kept)
    pa.field("gpus_per_worker", pa.float64()),
    *[pa.field(name, pa.string()) for name in ("torch_version", "ray_version", "optuna_version", "python_version")],
    pa.field("started_at", pa.timestamp("us", tz="UTC")),
    pa.field("finished_at", pa.timestamp("us", tz="UTC")),
]
TRIALS_SCHEMA = pa.schema(_TRIAL_FIELDS, metadata={"schema_version": str(SCHEMA_VERSION), "table": "trials"})
TRIAL_KEY = ("trial_id", "seed")

EPOCH_METRICS = (
    "loss", "knn_monitor_accuracy", "positive_cosine", "negative_cosine", "alignment", "uniformity",
    "embedding_std", "queue_fill", "queue_key_age", "queue_key_consistency", "lr", "epoch_time_s",
    "monitor_time_s", "images_per_second", "data_wait_fraction",
)
EPOCHS_SCHEMA = pa.schema(
    [pa.field("study_name", pa.string(), nullable=False), pa.field("trial_id", pa.string(), nullable=False),
     pa.field("seed", pa.int64(), nullable=False), pa.field("epoch", pa.int64(), nullable=False),
     *[pa.field(name, pa.float64()) for name in EPOCH_METRICS]],
    metadata={"schema_version": str(SCHEMA_VERSION), "table": "epochs"},
)
EPOCH_KEY = ("trial_id", "seed", "epoch")


class ResultsError(RuntimeError):
    """A results file is unreadable or not ours; the message names it."""


def _coerce(value: Any, type_: pa.DataType) -> Any:
    """Python value for an Arrow column: non-finite floats become null, integral floats become ints."""
    if value is None:
        return None
    if pa.types.is_floating(type_):
        value = float(value)
        return value if math.isfinite(value) else None
    if pa.types.is_integer(type_):
        if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
            return None
        return int(value)
    if pa.types.is_boolean(type_):
        return bool(value)
    if pa.types.is_string(type_):
        return str(value)
    if pa.types.is_timestamp(type_):
        if isinstance(value, (int, float)):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str):
            return datetime.fromisoformat(value)
    return value


def to_table(rows: Iterable[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts; unknown keys ignored, missing ones null) as a table with exactly ``schema``."""
    rows = list(rows)
    columns = {f.name: [_coerce(r.get(f.name), f.type) for r in rows] for f in schema}
    for f in schema:
        if not f.nullable and any(v is None for v in columns[f.name]):
            raise ValueError(f"column {f.name} of table {schema.metadata[b'table'].decode()} must not be null")
    return pa.Table.from_pydict(columns, schema=schema)


def _read(fs: pafs.FileSystem, path: str, schema: pa.Schema) -> pa.Table:
    try:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return schema.empty_table()
        table = pq.read_table(path, filesystem=fs)
    except (pa.ArrowInvalid, OSError) as error:
        raise ResultsError(f"{path} is not a readable Parquet file ({error}); move it away to continue") from None
    metadata = table.schema.metadata or {}
    version, name = metadata.get(b"schema_version"), metadata.get(b"table")
    if version is None or name is None:
        raise ResultsError(f"{path} is a Parquet file but not a results table of contrastive-study (no schema version"
                           " or table name in its metadata); move it away to continue")
    if version != str(SCHEMA_VERSION).encode():
        raise ResultsError(f"{path} has schema version {version.decode(errors='replace')!r}, this code reads "
                           f"version {SCHEMA_VERSION}: read it with the version that wrote it, or move it away")
    if name != schema.metadata[b"table"]:
        raise ResultsError(f"{path} holds the table {name.decode(errors='replace')!r}, not "
                           f"{schema.metadata[b'table'].decode()!r}; move it away to continue")
    # Columns added after a file was written (nullable ones only) read as nulls: older studies stay readable.
    for field in schema:
        if field.name not in table.column_names and field.nullable:
            table = table.append_column(field.name, pa.nulls(table.num_rows, field.type))
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise ResultsError(f"{path} lacks the columns {missing}; it was not written by this tool")
    try:
        return table.select(schema.names).cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:  # a column of another type
        raise ResultsError(f"{path} has columns of other types than schema version {SCHEMA_VERSION} ({error}); "
                           "move it away to continue") from None


def _remove_if_present(fs: pafs.FileSystem, path: str) -> None:
    """Best effort: cleaning up must never hide the error that made it necessary."""
    try:
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_file(path)
    except OSError:
        pass


def _sync_local(fs: pafs.FileSystem, path: str) -> None:
    """fsync a local file before it is renamed into place (object stores commit on close)."""
    if isinstance(fs, pafs.LocalFileSystem):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_atomically(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    """Replace ``path`` with ``table``: readers see the old file or the new one, never half of one.

    A failed write raises ResultsError naming ``path``; the old file is untouched and the temporary one removed.
    A temporary file left by a crash is simply overwritten.
    """
    temporary = f"{path}.tmp"
    try:
        pq.write_table(table, temporary, filesystem=fs)
        _sync_local(fs, temporary)
        fs.move(temporary, path)  # a rename on local disks
    except OSError as error:  # pyarrow's IO errors (disk full, permission denied) are OSErrors
        _remove_if_present(fs, temporary)
        raise ResultsError(f"could not write {path}: {error}; the previous file is intact, and the write can be "
                           "repeated once space or permissions are fixed") from None
    except BaseException:
        _remove_if_present(fs, temporary)
        raise


def _upsert(fs: pafs.FileSystem, path: str, schema: pa.Schema, key: tuple[str, ...], rows: list[dict]) -> None:
    new = to_table(rows, schema)
    old = _read(fs, path, schema)
    if old.num_rows:
        new_keys = {tuple(r[k] for k in key) for r in new.select(list(key)).to_pylist()}
        keep = [tuple(r[k] for k in key) not in new_keys for r in old.select(list(key)).to_pylist()]
        old = old.filter(pa.array(keep, type=pa.bool_()))
    _write_atomically(fs, path, pa.concat_tables([old, new]))


def record(study_dir: str, trial_rows: list[dict[str, Any]], epoch_rows: list[dict[str, Any]]) -> None:
    """Insert or replace the rows of finished trials (by trial and seed) and their epochs."""
    fs, root = filesystem(study_dir)
    try:
        fs.create_dir(root, recursive=True)
    except OSError as error:
        raise ResultsError(f"could not create the study folder {root}: {error}") from None
    for row in trial_rows:
        if row.get("status") not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {row.get('status')!r}")
        if row.get("method") == "simclr":
            for name in MOCO_ONLY:
                row[name] = None
    if epoch_rows:
        _upsert(fs, f"{root}/{EPOCHS_FILE}", EPOCHS_SCHEMA, EPOCH_KEY, epoch_rows)
    if trial_rows:  # trials last: a trial row never exists without its epochs
        _upsert(fs, f"{root}/{TRIALS_FILE}", TRIALS_SCHEMA, TRIAL_KEY, trial_rows)


def load(study_dir: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(trials, epochs)`` of a study as pandas DataFrames (empty, with the documented columns, if none yet)."""
    fs, root = filesystem(study_dir)
    trials = _read(fs, f"{root}/{TRIALS_FILE}", TRIALS_SCHEMA)
    epochs = _read(fs, f"{root}/{EPOCHS_FILE}", EPOCHS_SCHEMA)
    return trials.to_pandas(), epochs.to_pandas()

"""``python -m study.analyze``: what a finished study says, as tables in the terminal and a report folder.

    python -m study.analyze studies/fmnist-contrastive              # -> studies/fmnist-contrastive/report/
    python -m study.analyze studies/a studies/b --out ab-report --top 3
    python -m study.analyze s3://bucket/studies/x                   # remote input -> ./report-x/

The report folder holds ``report.md``, a self-contained ``report.html`` (figures embedded as base64 PNG data
URIs) and the PNG figures. Several studies are analysed together (their rows concatenated; ``study_name`` tells
them apart). Exit codes: 0 report written, 1 nothing to analyse (no finished trial, or none completed),
2 a study folder is missing or its results are unreadable.

Every table of the report is one call on the DataFrames that ``study.results.load`` returns::

    import study.results
    from study import analyze

    trials, epochs = study.results.load("studies/fmnist-contrastive")
    analyze.leaderboard(trials, top=5)              # best configurations per method, gains over the baselines,
                                                    # mean ± std and 95% t-interval where a trial has several seeds
    analyze.configurations(trials)                  # one row per configuration, seeds aggregated
    analyze.sensitivity(trials, "temperature")      # objective per (log) bin of temperature, per method
    analyze.sensitivity(trials, "negatives_per_positive")   # does a MoCo queue buy what a SimCLR batch buys?
    analyze.interaction(trials, "temperature", "batch_size", method="simclr")   # mean objective, bin x value
    analyze.importance(trials, method="moco")       # fANOVA importance of each hyperparameter that varies; with
                                                    # study_configs=analyze.load_studies([...]).configs: the space's
    table, notes = analyze.importance_table(trials) # all methods together and each method; notes of skipped ones
    analyze.learning_curves(trials, epochs)         # epochs with each run's method, status and settings
    analyze.last_epoch(trials, epochs)              # each run's last epoch: queue staleness, alignment, ...
    analyze.accounting(trials, analyze.load_studies(["studies/fmnist-contrastive"]).configs)
    analyze.failures(trials)                        # failed and diverged runs with a one-line reason

From Python: ``analyze.write_report(["studies/x"])`` writes the report folder and returns it (the launcher's
hook); ``analyze.main([...])`` is the command, exit code and all.

What counts as a measurement: only runs with status ``completed`` carry probe accuracies. Early-stopped, failed and
diverged runs store the objective 0, a placeholder the searcher needed; the analysis treats it as missing, so
every accuracy table is about completed runs (and ASHA's early stops bias them towards the better settings).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import html
import math
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from search_spaces import SpaceError, load_space
from study import plots, results, storage
from trainers.config import TrainConfig

# The study folder's files, as study.launch names them (not imported from there: it imports Ray).
CONFIG_FILE = "study_config.json"
REPORT_DIR = "report"
KEY = ["study_name", "trial_id"]  # a configuration; trial ids are only unique within one study
RUN_KEY = [*KEY, "seed"]  # one run of a configuration
METRICS = ("objective", "linear_val_accuracy", "linear_test_accuracy", "knn_val_accuracy", "knn_test_accuracy",
           "finetune_val_accuracy", "finetune_test_accuracy")
BASELINE_COLUMNS = ("random_init_linear_val_accuracy", "random_init_linear_test_accuracy",
                    "random_init_knn_val_accuracy", "random_init_knn_test_accuracy",
                    "raw_pixel_linear_val_accuracy", "raw_pixel_linear_test_accuracy")
DERIVED_COLUMNS = ("base_lr", "queued_batches", "global_batch", "world_size", "effective_lr",
                   "negatives_per_positive", "nodes", "workers")
SETTINGS = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed") + DERIVED_COLUMNS
LOG_PARAMS = plots.LOG_PARAMS | {"queue_length", "negatives_per_positive"}  # binned on a log scale
CONTINUOUS_PARAMS = plots.LOG_PARAMS | {"crop_scale_min", "blur_probability"}  # sampled from ranges: always binned
# Shown when a study's search space is unknown, in this order, if they vary.
DEFAULT_SENSITIVITY = ("temperature", "batch_size", "base_lr", "lr", "weight_decay", "momentum", "queue_length")
MIN_IMPORTANCE_TRIALS = 8  # below this, a random forest's variance decomposition is noise
OBJECTIVE_LABELS = {"linear_val_accuracy": "val. linear-probe accuracy", "knn_val_accuracy": "val. kNN accuracy"}
FIGURES = ("negatives.png", "sensitivity.png", "interaction.png", "importance.png", "learning_curves.png",
           "diagnostics.png")


class NotEnoughData(ValueError):
    """An analysis the data cannot support; the message says why (the report shows it as a note)."""


class NothingToAnalyse(RuntimeError):
    """No finished trial, or none completed: there is no accuracy to analyse (exit code 1)."""


class StudyNotFound(FileNotFoundError):
    """A study folder that does not exist (exit code 2)."""


class UnreadableStudyFile(ValueError):
    """A study's ``study_config.json`` that is not JSON (exit code 2)."""


# ---------------------------------------------------------------------------------------------------- loading


@dataclass(frozen=True)
class Studies:
    """Rows of one or more studies, concatenated, with each study's ``study_config.json`` (``{}`` if absent)."""

    trials: pd.DataFrame
    epochs: pd.DataFrame
    configs: dict[str, dict[str, Any]]
    locations: dict[str, str]


def _study_name(location: str, trials: pd.DataFrame, config: Mapping[str, Any]) -> str:
    if not trials.empty:
        return str(trials["study_name"].iloc[0])
    return str(config.get("name") or location.rstrip("/").rsplit("/", 1)[-1])


def load_studies(locations: Sequence[str]) -> Studies:
    """Read each study folder (local path or pyarrow URI) through ``study.results.load``.

    Raises ``StudyNotFound`` for a folder that does not exist, ``results.ResultsError`` for unreadable Parquet
    files and ``UnreadableStudyFile`` for a ``study_config.json`` that is not JSON.
    Two folders holding the same study name (a copy of a study) are told apart by their location.
    """
    trial_frames, epoch_frames = [], []
    configs: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for location in locations:
        if not storage.exists(location):
            raise StudyNotFound(f"{location}: no such study folder")
        trials, epochs = results.load(location)
        config_file = storage.join(location, CONFIG_FILE)
        try:
            config = storage.read_json(config_file) if storage.exists(config_file) else {}
        except ValueError as error:
            raise UnreadableStudyFile(f"{config_file} is not valid JSON ({error}); fix or remove it") from None
        name = _study_name(location, trials, config)
        if name in where:
            renamed = f"{name} [{location}]"
            trials = trials.assign(study_name=trials["study_name"].where(trials["study_name"] != name, renamed))
            epochs = epochs.assign(study_name=epochs["study_name"].where(epochs["study_name"] != name, renamed))
            name = renamed
        for study_name in {name, *trials["study_name"].unique()}:
            configs[study_name] = config
            where[study_name] = location
        trial_frames.append(trials)
        epoch_frames.append(epochs)
    return Studies(_concat(trial_frames), _concat(epoch_frames), configs, where)


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    # Empty frames are left out: concatenating them would make pandas guess dtypes of all-null columns.
    filled = [f for f in frames if not f.empty]
    return pd.concat(filled, ignore_index=True) if filled else frames[0]


# ---------------------------------------------------------------------------------------------- configurations


def measured(trials: pd.DataFrame) -> pd.DataFrame:
    """The rows with accuracies only where a run completed (the objective 0 of other runs is a placeholder)."""
    done = trials["status"].eq("completed")
    return trials.assign(**{m: trials[m].where(done) for m in METRICS if m in trials})


def _mean_interval(grouped: Any, column: str, level: float) -> pd.DataFrame:
    """Mean, sample std, count and a two-sided t-interval of the mean (n - 1 degrees of freedom) per group."""
    mean, std, n = grouped[column].mean(), grouped[column].std(ddof=1), grouped[column].count()
    factor = pd.Series(stats.t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)), index=n.index).where(n >= 2)
    half = factor * std / np.sqrt(n)
    return pd.DataFrame({column: mean, f"{column}_std": std.where(n >= 2), f"{column}_ci_low": mean - half,
                         f"{column}_ci_high": mean + half, f"{column}_n": n})


def configurations(trials: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per configuration (study, trial): its settings and, over its seeds, each metric's mean.

    For every metric of ``METRICS`` (``objective``, ``linear_val_accuracy``, ...) the columns are the mean over
    completed seeds, ``<metric>_std`` (sample std, ddof 1), ``<metric>_ci_low`` / ``_ci_high`` (``level``
    t-interval of the mean) and ``<metric>_n``; std and interval are NaN with fewer than 2 seeds. ``status`` is
    the status of the seeds (``completed+diverged`` when they differ), ``seeds`` how many ran.
    """
    columns = [*KEY, "status", "seeds", *[c for c in SETTINGS if c in trials], *BASELINE_COLUMNS]
    grouped = measured(trials).groupby(KEY, sort=False)
    settings = grouped[[c for c in (*SETTINGS, *BASELINE_COLUMNS) if c in trials]].first()
    status = grouped["status"].agg(lambda s: "+".join(sorted(set(s))))
    out = settings.assign(status=status, seeds=grouped.size(), epochs_done=grouped["epochs_done"].max())
    out = out.join([_mean_interval(grouped, m, level) for m in METRICS if m in trials])
    return out.reset_index()[[*columns, *[c for c in out.columns if c not in columns]]]


def completed_configurations(trials: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """``configurations`` restricted to those with at least one completed seed (an objective to analyse)."""
    configs = configurations(trials, level)
    return configs[configs["objective"].notna()].reset_index(drop=True)


LEADERBOARD_SETTINGS = ("temperature", "batch_size", "lr", "momentum", "queue_length", "negatives_per_positive")
LEADERBOARD_METRICS = ("linear_val_accuracy", "linear_test_accuracy", "knn_val_accuracy")


def leaderboard(trials: pd.DataFrame, top: int = 5, level: float = 0.95) -> pd.DataFrame:
    """The ``top`` configurations of each method by objective (validation; test accuracy is only reported).

    Columns: study and trial, method, ``status`` (of its seeds, e.g. ``completed+diverged``), the main settings,
    ``seeds`` (completed seeds: the others carry no accuracy), for the validation and test
    linear probe and validation kNN the mean with ``_std`` and ``_ci_low``/``_ci_high`` (``level`` t-interval
    over seeds; NaN with one seed), and ``gain_over_random_init`` / ``gain_over_raw_pixels``: validation linear
    accuracy minus the same probe on the randomly initialised backbone / on raw pixels of the same study.
    """
    configs = completed_configurations(trials, level)
    ranked = configs.sort_values(["method", "objective"], ascending=[True, False], kind="stable")
    best = ranked.groupby("method", sort=False).head(top)
    best = best.assign(seeds=best["objective_n"],
                       gain_over_random_init=best["linear_val_accuracy"] - best["random_init_linear_val_accuracy"],
                       gain_over_raw_pixels=best["linear_val_accuracy"] - best["raw_pixel_linear_val_accuracy"])
    metric_columns = [f"{m}{suffix}" for m in LEADERBOARD_METRICS for suffix in ("", "_std", "_ci_low", "_ci_high")]
    columns = [*KEY, "method", "status", *LEADERBOARD_SETTINGS, "seeds", "objective", *metric_columns,
               "gain_over_random_init", "gain_over_raw_pixels"]
    return best[columns].reset_index(drop=True)


# ------------------------------------------------------------------------------------------------- sensitivity


def _format_value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, (float, np.floating)) else str(value)


def bin_values(values: pd.Series, param: str, *, bins: int = 5, max_levels: int = 8) -> pd.DataFrame:
    """The bin of each non-null value: ``bin`` (ordered label), ``low``, ``high``, ``center``.

    A continuous parameter (temperature, learning rates, weight decay: sampled from a range) and any numeric one
    with more than ``max_levels`` distinct values gets ``bins`` equal-width bins between its smallest and largest
    value, on a log scale for log-scaled parameters, where ``center`` is the geometric mean of the edges; sizes
    (batch, queue, negatives per positive) with that many values are binned to the nearest power of two instead.
    Others (batch size, momentum, queue length, a choice) get one bin per value.
    """
    present = values.dropna()
    numeric = pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present)
    distinct = np.sort(present.unique()) if numeric else sorted(present.astype(str).unique())
    continuous = numeric and len(distinct) > 1 and (param in CONTINUOUS_PARAMS or len(distinct) > max_levels)
    if not continuous:
        keys = present if numeric else present.astype(str)
        codes = keys.map({v: i for i, v in enumerate(distinct)}).to_numpy(dtype=int)
        labels = [_format_value(v) for v in distinct]
        if len(set(labels)) < len(labels):  # %g merged two values: show them in full
            labels = [repr(v) for v in distinct]
        number = present.astype(float) if numeric else pd.Series(np.nan, index=present.index)
        return pd.DataFrame({"bin": pd.Categorical.from_codes(codes, categories=labels, ordered=True),
                             "low": number, "high": number, "center": number}, index=present.index)
    low, high = float(distinct[0]), float(distinct[-1])
    if param in plots.LOG2_PARAMS and low > 0:
        return _octave_bins(present)
    log = param in LOG_PARAMS and low > 0
    edges = np.geomspace(low, high, bins + 1) if log else np.linspace(low, high, bins + 1)
    index = np.clip(np.searchsorted(edges, present.to_numpy(dtype=float), side="right") - 1, 0, bins - 1)
    labels = [f"{edges[i]:.3g}–{edges[i + 1]:.3g}" for i in range(bins)]
    lows, highs = edges[index], edges[index + 1]
    centers = np.sqrt(lows * highs) if log else (lows + highs) / 2
    return pd.DataFrame({"bin": pd.Categorical.from_codes(index, categories=labels, ordered=True),
                         "low": lows, "high": highs, "center": centers}, index=present.index)


def _octave_bins(present: pd.Series) -> pd.DataFrame:
    """Sizes (batch, queue, negatives) binned to the nearest power of two: SimCLR's 2B - 2 = 254 negatives and a
    MoCo queue of 256 share the bin "≈256" (edges 2^(k ± 1/2)); a label without ≈ holds exact powers only."""
    values = present.to_numpy(dtype=float)
    power = np.round(np.log2(values)).astype(int)
    powers = np.unique(power)
    exact = {k: bool(np.all(values[power == k] == 2.0**k)) for k in powers}
    # 2.0**k, not 2**k: numpy refuses integer powers with a negative exponent (sizes below 1 in odd data).
    names = {k: f"{2.0**k:,.0f}" if k >= 0 else f"{2.0**k:g}" for k in powers}
    labels = [names[k] if exact[k] else f"≈{names[k]}" for k in powers]
    codes = np.searchsorted(powers, power)
    return pd.DataFrame({"bin": pd.Categorical.from_codes(codes, categories=labels, ordered=True),
                         "low": 2.0 ** (power - 0.5), "high": 2.0 ** (power + 0.5), "center": 2.0**power},
                        index=present.index)


SENSITIVITY_COLUMNS = ["method", "param", "bin", "low", "high", "center", "count", "mean", "std", "max"]


def sensitivity(trials: pd.DataFrame, param: str, *, bins: int = 5, max_levels: int = 8) -> pd.DataFrame:
    """The objective against one hyperparameter, per method: for each bin of ``param`` (see ``bin_values``;
    bins are shared by the methods) the number of completed configurations and their mean, std and max
    objective. Empty bins are left out; an unknown or never-set parameter gives an empty table."""
    configs = completed_configurations(trials)
    if param not in configs or configs[param].isna().all():
        return pd.DataFrame(columns=SENSITIVITY_COLUMNS)
    binned = bin_values(configs[param], param, bins=bins, max_levels=max_levels)
    data = binned.join(configs[["method", "objective"]])
    table = data.groupby(["method", "bin"], observed=True, sort=True).agg(
        low=("low", "first"), high=("high", "first"), center=("center", "first"), count=("objective", "size"),
        mean=("objective", "mean"), std=("objective", "std"), max=("objective", "max"))
    return table.reset_index().assign(param=param)[SENSITIVITY_COLUMNS]


def interaction(trials: pd.DataFrame, x: str = "temperature", y: str = "batch_size", *, method: str | None = None,
                bins: int = 4, max_levels: int = 8, agg: str = "mean") -> pd.DataFrame:
    """A pivot of the objective (``agg``: mean, max or count) per bin of ``x`` (columns) and value of ``y`` (rows)
    over the completed configurations of ``method`` (all if None). Raises ``NotEnoughData`` when either axis has
    fewer than 2 distinct bins: a heat map of one row or column says nothing about an interaction."""
    configs = completed_configurations(trials)
    if method is not None:
        configs = configs[configs["method"] == method]
    configs = configs.dropna(subset=[c for c in (x, y) if c in configs])
    scope = f"{method or 'all methods'}"
    if x not in configs or y not in configs or configs.empty:
        raise NotEnoughData(f"{x} × {y} ({scope}): no completed trial sets both")
    bx = bin_values(configs[x], x, bins=bins, max_levels=max_levels)["bin"]
    by = bin_values(configs[y], y, bins=bins, max_levels=max_levels)["bin"]
    nx, ny = bx.nunique(), by.nunique()
    if nx < 2 or ny < 2:
        raise NotEnoughData(f"{x} × {y} ({scope}): the completed trials cover {nx} bin(s) of {x} and {ny} of {y}; "
                            "a heat map needs at least 2 of each")
    data = pd.DataFrame({x: bx, y: by, "objective": configs["objective"]})
    return data.pivot_table(index=y, columns=x, values="objective", aggfunc=agg, observed=True)


# -------------------------------------------------------------------------------------------------- importance


def _space_kinds(config: Mapping[str, Any]) -> dict[str, str] | None:
    """``{param: kind}`` of the study's search space, or None when it cannot be loaded here (a YAML file that
    lives on another machine, an old name)."""
    name = config.get("space")
    if not name:
        return None
    try:
        return {p.name: p.kind for p in load_space(str(name)).params}
    except (SpaceError, ValueError, OSError):
        return None


def _varying(configs: pd.DataFrame) -> dict[str, str]:
    """Fallback when the space is unknown: the TrainConfig fields (and sampled inputs) that vary, minus those
    derived from another varying one (lr from base_lr, K from the number of queued batches)."""
    candidates = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed"] + ["base_lr", "queued_batches"]
    varying = [c for c in candidates if c in configs and configs[c].dropna().astype(str).nunique() > 1]
    if "base_lr" in varying:
        varying = [c for c in varying if c != "lr"]
    if "queued_batches" in varying:
        varying = [c for c in varying if c != "queue_length"]
    return dict.fromkeys(varying, "")


def searched_params(trials: pd.DataFrame, study_configs: Mapping[str, Mapping[str, Any]] | None = None
                    ) -> dict[str, str]:
    """``{param: kind}`` of the searched hyperparameters: the parameters of each study's search space (the
    ``space`` of its ``study_config.json``, through ``search_spaces.load_space``), or, where the space is unknown,
    the configuration columns that vary (kind ``""``: inferred from the data)."""
    params: dict[str, str] = {}
    configs = configurations(trials)
    for name in configs["study_name"].unique():
        kinds = _space_kinds((study_configs or {}).get(name, {}))
        params |= kinds if kinds is not None else _varying(configs[configs["study_name"] == name])
    return params


def _python(value: Any) -> Any:
    """Optuna wants plain Python values (a numpy int64 is not ``in`` a list of ints after JSON round trips)."""
    return value.item() if isinstance(value, np.generic) else value


def infer_distribution(param: str, values: pd.Series, kind: str = "", max_levels: int = 8) -> Any:
    """The Optuna distribution that covers the observed values: categorical for choices and for few distinct
    values (batch size, momentum, method), a log float range for log-scaled parameters, else a float or int range.
    None when the parameter does not vary (nothing to attribute to it)."""
    import optuna

    present = values.dropna()
    distinct = sorted({_python(v) for v in present})
    if len(distinct) < 2:
        return None
    numeric = pd.api.types.is_numeric_dtype(present) and not pd.api.types.is_bool_dtype(present)
    if kind == "choice" or not numeric or (not kind and len(distinct) <= max_levels and param not in LOG_PARAMS):
        return optuna.distributions.CategoricalDistribution(distinct)
    low, high = float(distinct[0]), float(distinct[-1])
    if kind == "int" or (not kind and pd.api.types.is_integer_dtype(present)):
        return optuna.distributions.IntDistribution(int(low), int(high))
    return optuna.distributions.FloatDistribution(low, high, log=(kind == "loguniform" or param in LOG_PARAMS)
                                                  and low > 0)


def _evaluator(name: str, seed: int) -> Any:
    import optuna

    if name == "fanova":
        return optuna.importance.FanovaImportanceEvaluator(seed=seed)
    if name == "ped-anova":
        return optuna.importance.PedAnovaImportanceEvaluator()
    raise ValueError(f"evaluator must be fanova or ped-anova, got {name!r}")


def importance(trials: pd.DataFrame, method: str | None = None, *, params: Mapping[str, str] | None = None,
               study_configs: Mapping[str, Mapping[str, Any]] | None = None, evaluator: str = "fanova",
               seed: int = 0) -> pd.DataFrame:
    """How much of the objective's variance each searched hyperparameter explains, over the completed
    configurations of ``method`` (all methods if None): Optuna's fANOVA (seeded; or ``ped-anova``) on an
    in-memory study with one trial per configuration (its mean objective over seeds).

    Columns ``param``, ``importance`` (normalised to sum to 1), ``rank``, ``trials``. A parameter counts only where
    every configuration of the scope sets it: MoCo's momentum and queue are null for SimCLR, so they appear per
    method, not across methods. Raises ``NotEnoughData`` with fewer than ``MIN_IMPORTANCE_TRIALS``
    configurations, a constant objective or no varying parameter.
    """
    import optuna

    scope = method or "all methods"
    configs = completed_configurations(trials)
    if method is not None:
        configs = configs[configs["method"] == method]
    if len(configs) < MIN_IMPORTANCE_TRIALS:
        raise NotEnoughData(f"importance ({scope}): {len(configs)} completed trial(s); fANOVA needs at least "
                            f"{MIN_IMPORTANCE_TRIALS} to say more than noise")
    if configs["objective"].nunique() < 2:
        raise NotEnoughData(f"importance ({scope}): the objective is the same in every trial")
    kinds = dict(params) if params is not None else searched_params(trials, study_configs)
    distributions = {}
    for param, kind in kinds.items():
        if param in configs and (method is None or param != "method") and configs[param].notna().all():
            distribution = infer_distribution(param, configs[param], kind)
            if distribution is not None:
                distributions[param] = distribution
    if not distributions:
        raise NotEnoughData(f"importance ({scope}): no searched parameter varies across its trials")
    frozen = [optuna.trial.create_trial(params={p: _python(row[p]) for p in distributions},
                                        distributions=distributions, value=float(row["objective"]))
              for _, row in configs.iterrows()]
    values = _evaluate(frozen, list(distributions), _evaluator(evaluator, seed))
    ranked = sorted(values.items(), key=lambda item: -item[1])
    return pd.DataFrame({"param": [p for p, _ in ranked], "importance": [v for _, v in ranked],
                         "rank": range(1, len(ranked) + 1), "trials": len(configs)})


def _evaluate(frozen: list[Any], params: list[str], evaluator: Any) -> dict[str, float]:
    import optuna

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "A new study created in memory" is not news here
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study = optuna.create_study(direction="maximize")
            study.add_trials(frozen)
            return optuna.importance.get_param_importances(study, evaluator=evaluator, params=params)
    finally:
        optuna.logging.set_verbosity(verbosity)


def importance_scopes(trials: pd.DataFrame) -> list[str | None]:
    """All methods together (None) when a study has more than one, then each method."""
    methods = sorted(trials.loc[trials["status"] == "completed", "method"].dropna().unique())
    return ([None] if len(methods) > 1 else []) + list(methods)


def importance_table(trials: pd.DataFrame, *, study_configs: Mapping[str, Mapping[str, Any]] | None = None,
                     evaluator: str = "fanova", seed: int = 0) -> tuple[pd.DataFrame, list[str]]:
    """``importance`` for all methods together and for each method, as one long table with a ``scope`` column
    (``all`` or the method), and the notes of the scopes the data could not support."""
    tables, notes = [], []
    params = searched_params(trials, study_configs) if not trials.empty else {}
    for method in importance_scopes(trials):
        try:
            table = importance(trials, method, params=params, evaluator=evaluator, seed=seed)
        except NotEnoughData as note:
            notes.append(str(note))
            continue
        tables.append(table.assign(scope=method or "all"))
    columns = ["scope", "param", "importance", "rank", "trials"]
    return (pd.concat(tables, ignore_index=True)[columns] if tables else pd.DataFrame(columns=columns)), notes


# ---------------------------------------------------------------------------------------- curves, diagnostics


RUN_INFO = ("method", "status", "temperature", "batch_size", "lr", "momentum", "queue_length",
            "negatives_per_positive", "objective")


def learning_curves(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Every epoch row with its run's method, status, settings and objective (NaN unless completed), sorted by
    run and epoch: ``curves.pivot_table(index="epoch", columns="trial_id", values="loss")`` is one plot away."""
    info = measured(trials)[[*RUN_KEY, *RUN_INFO]]
    curves = epochs.merge(info, on=RUN_KEY, how="inner")  # epochs of a run without a trial row are not finished
    return curves.sort_values([*RUN_KEY, "epoch"]).reset_index(drop=True)


def last_epoch(trials: pd.DataFrame, epochs: pd.DataFrame) -> pd.DataFrame:
    """Each run's last recorded epoch: MoCo's queue staleness (``queue_key_consistency``: mean cosine between
    stored keys and the same images re-encoded now, 1 = fresh; ``queue_key_age`` in optimizer steps) next to
    its momentum, and alignment / uniformity next to the temperature. Early-stopped runs end at an earlier epoch."""
    curves = learning_curves(trials, epochs)
    return curves.groupby(RUN_KEY, sort=False).tail(1).reset_index(drop=True)


# -------------------------------------------------------------------------------------------------- accounting


def _resource(config: Mapping[str, Any], name: str) -> float:
    value = config.get(name)
    return float(value) if isinstance(value, (int, float)) else math.nan


def accounting(trials: pd.DataFrame, study_configs: Mapping[str, Mapping[str, Any]] | None = None) -> pd.DataFrame:
    """One row per study: trials (configurations) and runs (trial x seed), runs by status, the share stopped
    early, compute and wall time.

    ``worker_hours`` = sum over runs of wall time x Train workers; ``cpu_hours`` / ``gpu_hours`` = sum over runs
    of wall time x workers x the CPUs / GPUs per worker that the run's row records (as resolved on the cluster).
    Rows written before those columns existed fall back to ``study_config.json``; there ``cpus_per_worker`` 0
    ("auto": the whole machine, size unrecorded) leaves ``cpu_hours`` NaN and ``compute_note`` says so.
    ``wall_time_h``: last finish minus first start.
    """
    rows = []
    for name, runs in trials.groupby("study_name", sort=True):
        config = (study_configs or {}).get(name, {})
        counts = runs["status"].value_counts()
        workers = runs["workers"].fillna(runs["world_size"]).fillna(1)
        worker_hours = float((runs["wall_time_s"].fillna(0) * workers).sum()) / 3600
        cpus, gpus = _resource(config, "cpus_per_worker"), _resource(config, "gpus_per_worker")
        if runs["cpus_per_worker"].notna().all():  # rows record the resolved resources (the config may say auto)
            worker_cpus, worker_gpus = runs["cpus_per_worker"], runs["gpus_per_worker"].fillna(0)
            cpu_hours = float((runs["wall_time_s"].fillna(0) * workers * worker_cpus).sum()) / 3600
            gpu_hours = float((runs["wall_time_s"].fillna(0) * workers * worker_gpus).sum()) / 3600
            cpus, gpus = float(worker_cpus.mean()), float(worker_gpus.mean())
        else:
            cpu_hours = worker_hours * cpus if cpus > 0 else math.nan
            gpu_hours = worker_hours * gpus if not math.isnan(gpus) else math.nan
        note = ""
        if math.isnan(cpu_hours) and cpus == 0:
            note = "cpus_per_worker 0 (auto: each trial had the whole machine); CPU-hours unknown, see worker-hours"
        elif math.isnan(cpu_hours):
            note = "no study_config.json: CPU/GPU per worker unknown, see worker-hours"
        rows.append({
            "study_name": name, "trials": runs["trial_id"].nunique(), "runs": len(runs),
            **{status: int(counts.get(status, 0)) for status in results.STATUSES},
            "early_stopped_share": counts.get("early-stopped", 0) / len(runs),
            "worker_hours": worker_hours, "cpus_per_worker": cpus,
            "cpu_hours": cpu_hours, "gpus_per_worker": gpus, "gpu_hours": gpu_hours,
            "wall_time_h": (runs["finished_at"].max() - runs["started_at"].min()).total_seconds() / 3600,
            "started": runs["started_at"].min(), "finished": runs["finished_at"].max(), "compute_note": note,
        })
    return pd.DataFrame(rows, columns=ACCOUNTING_COLUMNS)


ACCOUNTING_COLUMNS = ["study_name", "trials", "runs", *results.STATUSES, "early_stopped_share", "worker_hours",
                      "cpus_per_worker", "cpu_hours", "gpus_per_worker", "gpu_hours", "wall_time_h", "started",
                      "finished", "compute_note"]
# An exception line of a traceback ("ValueError: ..."): what a Tune error file's last lines say went wrong.
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure)\b.*")


def summarise_reason(reason: Any, width: int = 160) -> str:
    """One line of a failure reason: the last exception line of a traceback, else the first line; truncated."""
    if not isinstance(reason, str) or not reason.strip():
        return ""
    lines = [line.strip() for line in reason.strip().splitlines() if line.strip()]
    exceptions = [line for line in lines if _EXCEPTION_LINE.match(line)]
    line = exceptions[-1] if exceptions else lines[0]
    return line if len(line) <= width else line[: width - 1] + "…"


def failures(trials: pd.DataFrame, width: int = 160) -> pd.DataFrame:
    """The failed and diverged runs: study, trial, seed, method, status, epochs done and a one-line reason."""
    bad = trials[trials["status"].isin(["failed", "diverged"])]
    return bad.assign(reason=bad["failure_reason"].map(lambda r: summarise_reason(r, width)))[
        [*RUN_KEY, "method", "status", "epochs_done", "reason"]].reset_index(drop=True)


# ----------------------------------------------------------------------------------------------------- report


@dataclass
class Table:
    caption: str
    frame: pd.DataFrame  # already formatted for reading (strings)


@dataclass
class Figure:
    file: str
    caption: str
    png: bytes


@dataclass
class Section:
    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)


@dataclass
class Report:
    title: str
    sections: list[Section]


def _display(frame: pd.DataFrame, digits: int = 4) -> pd.DataFrame:
    """Strings for reading: floats with ``digits`` significant digits, missing values as blanks, UTC times."""
    shown = pd.DataFrame(index=frame.index)
    for column in frame.columns:
        values = frame[column]
        if column == "method":
            shown[column] = values.map(lambda v: plots.method_label(v) if isinstance(v, str) else "")
        elif pd.api.types.is_datetime64_any_dtype(values):
            shown[column] = values.dt.strftime("%Y-%m-%d %H:%M UTC").fillna("")
        elif pd.api.types.is_float_dtype(values) and bool((values.dropna() % 1 == 0).all()) and values.notna().any():
            shown[column] = values.map(lambda v: "" if pd.isna(v) else f"{v:.0f}")  # K, queued batches: integers
        elif pd.api.types.is_float_dtype(values):
            shown[column] = values.map(lambda v: "" if pd.isna(v) else f"{v:.{digits}g}")
        else:
            shown[column] = values.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                                       else str(v))
    return shown.reset_index(drop=True)


def _with_interval(row: pd.Series, metric: str) -> str:
    value = row[metric]
    if pd.isna(value):
        return ""
    if pd.isna(row[f"{metric}_std"]):
        return f"{value:.3f}"
    return f"{value:.3f} ± {row[f'{metric}_std']:.3f} [{row[f'{metric}_ci_low']:.3f}, {row[f'{metric}_ci_high']:.3f}]"


def display_leaderboard(board: pd.DataFrame, *, several_studies: bool) -> pd.DataFrame:
    """The leaderboard with short headers, accuracies as ``mean ± std [95% CI]`` when there are several seeds."""
    shown = pd.DataFrame({
        **({"study": board["study_name"]} if several_studies else {}),
        "trial": board["trial_id"], "method": board["method"].map(plots.method_label),
        "τ": board["temperature"].map(lambda v: f"{v:.3g}"), "batch": board["batch_size"].map(str),
        "lr": board["lr"].map(lambda v: f"{v:.3g}"),
        "m": board["momentum"].map(lambda v: "" if pd.isna(v) else f"{v:g}"),
        "K": board["queue_length"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}"),
        "neg/pos": board["negatives_per_positive"].map(lambda v: "" if pd.isna(v) else f"{v:.0f}"),
        **({"status": board["status"]} if (board["status"] != "completed").any() else {}),
        "seeds": board["seeds"].map(str),
        "val linear": board.apply(_with_interval, axis=1, metric="linear_val_accuracy"),
        "test linear": board.apply(_with_interval, axis=1, metric="linear_test_accuracy"),
        "val kNN": board.apply(_with_interval, axis=1, metric="knn_val_accuracy"),
        "vs random init": board["gain_over_random_init"].map(lambda v: "" if pd.isna(v) else f"{v:+.3f}"),
        "vs raw pixels": board["gain_over_raw_pixels"].map(lambda v: "" if pd.isna(v) else f"{v:+.3f}"),
    })
    return shown.reset_index(drop=True)


def _objective_label(configs: Mapping[str, Mapping[str, Any]]) -> tuple[str, str]:
    """The objective's column and axis label; several studies with different objectives share a neutral one."""
    objectives = {c.get("objective", "linear_val_accuracy") for c in configs.values()} or {"linear_val_accuracy"}
    if len(objectives) > 1:
        return "objective", "objective (validation accuracy)"
    objective = objectives.pop()
    return objective, OBJECTIVE_LABELS.get(objective, objective)


def _baselines(trials: pd.DataFrame, objective: str) -> dict[str, float]:
    """Baselines of the objective's probe, drawn only when every study has the same value (else per study)."""
    columns = {"linear_val_accuracy": {"raw pixels": "raw_pixel_linear_val_accuracy",
                                       "random-init backbone": "random_init_linear_val_accuracy"},
               "knn_val_accuracy": {"random-init backbone": "random_init_knn_val_accuracy"}}.get(objective, {})
    out = {}
    for name, column in columns.items():
        values = trials[column].dropna().unique()
        if len(values) == 1:
            out[name] = float(values[0])
    return out


def sensitivity_params(trials: pd.DataFrame, study_configs: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The parameters worth a sensitivity panel: the searched ones (K instead of the number of queued batches,
    lr next to base_lr since it is what the optimizer got), or the usual ones that vary; never ``method``."""
    searched = list(searched_params(trials, study_configs))
    if searched:
        named = [("queue_length" if p == "queued_batches" else p) for p in searched if p != "method"]
        if "base_lr" in named:
            named.insert(named.index("base_lr") + 1, "lr")
    else:
        named = list(DEFAULT_SENSITIVITY)
    configs = completed_configurations(trials)
    return [p for p in dict.fromkeys(named) if p in configs and configs[p].dropna().nunique() > 1]


class _Builder:
    """Builds the report's sections from loaded studies; tables and figures come from the public functions."""

    def __init__(self, studies: Studies, top: int) -> None:
        self.studies = studies
        self.trials, self.epochs, self.configs = studies.trials, studies.epochs, studies.configs
        self.top = top
        self.completed = completed_configurations(self.trials)
        self.objective, self.ylabel = _objective_label(self.configs)
        self.baselines = _baselines(self.trials, self.objective)
        self.several = self.trials["study_name"].nunique() > 1

    def build(self) -> Report:
        names = ", ".join(sorted(self.trials["study_name"].unique()))
        sections = [self.overview(), self.leaderboard(), self.negatives(), self.sensitivity(), self.interactions(),
                    self.importance(), self.curves()]
        return Report(title=f"Study analysis: {names}", sections=sections)

    def overview(self) -> Section:
        section = Section("Study accounting")
        for name in sorted(self.trials["study_name"].unique()):
            config = self.configs.get(name, {})
            if config:
                section.text.append(
                    f"**{name}** ({self.studies.locations.get(name, '')}): space `{config.get('space')}`, "
                    f"{config.get('num_trials')} trials x {config.get('replicates', 1)} seed(s), "
                    f"{config.get('epochs')} epochs on {config.get('pretrain_subset')} {config.get('dataset')} "
                    f"images, searcher {config.get('searcher')}, scheduler {config.get('scheduler')}, "
                    f"objective {config.get('objective')}.")
        table = accounting(self.trials, self.configs)
        section.text.append("Runs are trial x seed. Compute: worker-hours = wall time x Train workers, summed over "
                            "runs; CPU-/GPU-hours multiply by the study's CPUs/GPUs per worker.")
        notes = sorted(set(table["compute_note"]) - {""})
        section.text += notes
        section.tables.append(Table("Trials by status and compute", _display(table.drop(columns="compute_note"))))
        failed = failures(self.trials)
        if not failed.empty:
            section.tables.append(Table("Failed and diverged runs", _display(failed)))
        return section

    def leaderboard(self) -> Section:
        section = Section("Leaderboard")
        board = leaderboard(self.trials, top=self.top)
        section.text.append(
            f"The best {self.top} configurations of each method by the objective ({self.ylabel}); test accuracy is "
            "reported, never used for a choice. Gains are validation linear-probe accuracy minus the same probe on "
            "the randomly initialised backbone and on raw pixels of the same study.")
        if self.baselines:
            section.text.append("Baselines: " + ", ".join(f"{k} {v:.3f}" for k, v in self.baselines.items()) + ".")
        if (board["seeds"] > 1).any():
            section.text.append("With several seeds: mean ± sample std [95% t-interval of the mean, n − 1 dof].")
        section.tables.append(Table("Best configurations per method", display_leaderboard(
            board, several_studies=self.several)))
        return section

    def negatives(self) -> Section:
        section = Section("Negatives per positive: does a MoCo queue buy what a SimCLR batch buys?")
        table = sensitivity(self.trials, "negatives_per_positive")
        if table.empty:
            section.text.append("No completed trial records negatives per positive.")
            return section
        section.text.append("SimCLR contrasts each positive with the 2B − 2 other views of its batch, MoCo with the "
                            "K keys of its queue; one axis for both asks whether the queue's cheap negatives are "
                            "worth as much as a larger batch's.")
        for method, rows in table.groupby("method"):
            best = rows.loc[rows["mean"].idxmax()]
            section.text.append(f"{plots.method_label(method)}: best mean {best['mean']:.3f} at {best['bin']} "
                                f"negatives ({int(best['count'])} trial(s)); negatives tried: "
                                f"{', '.join(str(b) for b in rows['bin'])}.")
        section.tables.append(Table("Objective per negatives-per-positive value", _display(
            table.drop(columns=["param", "center"]))))
        figure = plots.negatives_figure(self.completed, table, ylabel=self.ylabel, baselines=self.baselines)
        section.figures.append(Figure("negatives.png", "Objective against negatives per positive, both methods on "
                                      "one log2 axis", plots.png(figure)))
        return section

    def sensitivity(self) -> Section:
        section = Section("Sensitivity to each hyperparameter")
        params = sensitivity_params(self.trials, self.configs)
        if not params:
            section.text.append("No searched hyperparameter varies across the completed trials.")
            return section
        section.text.append("Completed configurations only (mean over seeds); continuous parameters in equal bins "
                            "(log bins for log-scaled ones), discrete ones per value; count, mean, std and max "
                            "objective per bin and method.")
        tables = {p: sensitivity(self.trials, p) for p in params}
        combined = pd.concat(tables.values(), ignore_index=True).drop(columns=["center"])
        section.tables.append(Table("Objective per bin of each hyperparameter", _display(combined)))
        names = ", ".join(sorted(self.trials["study_name"].unique()))
        figure = plots.sensitivity_figure(self.completed, tables, ylabel=self.ylabel, baselines=self.baselines,
                                          title=f"{self.ylabel} against each searched hyperparameter ({names})")
        section.figures.append(Figure("sensitivity.png", "Objective against each hyperparameter; lines: mean per "
                                      "bin", plots.png(figure)))
        return section

    def interactions(self) -> Section:
        section = Section("Interaction: temperature × batch size")
        panels: dict[str, tuple[pd.DataFrame, pd.DataFrame]] = {}
        for method in sorted(self.completed["method"].dropna().unique()):
            try:
                means = interaction(self.trials, "temperature", "batch_size", method=method)
            except NotEnoughData as note:
                section.text.append(f"Skipped: {note}.")
                continue
            counts = interaction(self.trials, "temperature", "batch_size", method=method, agg="count")
            panels[method] = (means, counts.reindex_like(means))
            section.tables.append(Table(f"{plots.method_label(method)}: mean objective per temperature bin "
                                        "(columns) and batch size (rows)", _display(means.reset_index())))
        if panels:
            figure = plots.interaction_figure(panels, x="temperature", y="batch_size", zlabel=self.ylabel)
            section.figures.append(Figure("interaction.png", "Mean objective per temperature bin and batch size",
                                          plots.png(figure)))
        return section

    def importance(self) -> Section:
        section = Section("Hyperparameter importance (fANOVA)")
        table, notes = importance_table(self.trials, study_configs=self.configs)
        section.text.append("Optuna's fANOVA (seeded random forest) on the completed configurations, per method "
                            "and over all methods; MoCo-only parameters count only within MoCo. Early-stopped "
                            "trials are left out, so this is importance among the trials ASHA kept.")
        section.text += [f"Skipped: {note}." for note in notes]
        if not table.empty:
            wide = table.pivot_table(index="param", columns="scope", values="importance", sort=False)
            section.tables.append(Table("Importance (share of the objective's variance) per scope",
                                        _display(wide.reset_index(), digits=2)))
            figure = plots.importance_figure(table, evaluator="fANOVA")
            section.figures.append(Figure("importance.png", "fANOVA importance per scope", plots.png(figure)))
        return section

    def curves(self) -> Section:
        section = Section("Learning curves and representation diagnostics")
        curves = learning_curves(self.trials, self.epochs)
        if curves.empty:
            section.text.append("No epoch rows were recorded.")
            return section
        section.figures.append(Figure("learning_curves.png", "Loss and kNN monitor per epoch, one line per run",
                                      plots.png(plots.learning_curves_figure(curves))))
        last = last_epoch(self.trials, self.epochs)
        section.text.append("Last recorded epoch of each run: MoCo's queue staleness (queue_key_consistency, 1 = "
                            "keys as good as fresh) against momentum; alignment and uniformity (Wang & Isola 2020) "
                            "against temperature.")
        columns = [*([] if not self.several else ["study_name"]), "trial_id", "seed", "method", "status", "epoch",
                   "temperature", "momentum", "queue_length", "queue_key_consistency", "queue_key_age", "alignment",
                   "uniformity", "knn_monitor_accuracy"]
        section.tables.append(Table("Diagnostics at each run's last epoch", _display(last[columns])))
        section.figures.append(Figure("diagnostics.png", "Queue staleness against momentum, alignment and "
                                      "uniformity against temperature", plots.png(plots.diagnostics_figure(last))))
        return section


def _nothing_message(studies: Studies, locations: Sequence[str]) -> str | None:
    """Why there is nothing to analyse, or None when at least one run completed."""
    trials = studies.trials
    where = ", ".join(locations)
    if trials.empty:
        return f"nothing to analyse: {where} holds no finished trial yet (no rows in {results.TRIALS_FILE})"
    if trials["status"].eq("completed").any():
        return None
    counts = ", ".join(f"{n} {status}" for status, n in trials["status"].value_counts().items())
    message = f"nothing to analyse: none of the {len(trials)} runs in {where} completed ({counts})"
    reasons = failures(trials)["reason"]
    reasons = [r for r in dict.fromkeys(reasons) if r][:3]
    if reasons:
        message += "; failure reasons: " + " | ".join(reasons)
    return message


def build_report(study_dirs: Sequence[str], top: int = 5) -> Report:
    """Load the studies and build every section. Raises ``StudyNotFound``, ``results.ResultsError`` or
    ``NothingToAnalyse`` (with a message for the user)."""
    studies = load_studies(study_dirs)
    message = _nothing_message(studies, study_dirs)
    if message:
        raise NothingToAnalyse(message)
    return _Builder(studies, top).build()


# ------------------------------------------------------------------------------------------------- rendering


def _markdown_cell(value: str) -> str:
    return value.replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of a DataFrame of strings."""
    header = "| " + " | ".join(_markdown_cell(str(c)) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = ["| " + " | ".join(_markdown_cell(str(v)) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def render_markdown(report: Report) -> str:
    parts = [f"# {report.title}"]
    for section in report.sections:
        parts.append(f"## {section.title}")
        parts += section.text
        for table in section.tables:
            parts += [f"**{table.caption}**", markdown_table(table.frame)]
        parts += [f"![{figure.caption}]({figure.file})" for figure in section.figures]
    return "\n\n".join(parts) + "\n"


_HTML_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1200px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f0f0f0; }
img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.9em; }
"""


def _html_text(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", escaped)  # the only markdown the texts use
    return re.sub(r"`(.+?)`", r"<code>\1</code>", escaped)


def render_html(report: Report) -> str:
    """One self-contained page: figures are inlined as base64 PNG data URIs, nothing is fetched."""
    parts = [f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>"
             f"<style>{_HTML_STYLE}</style></head><body>", f"<h1>{html.escape(report.title)}</h1>"]
    for section in report.sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        parts += [f"<p>{_html_text(text)}</p>" for text in section.text]
        for table in section.tables:
            parts.append(f"<p><strong>{html.escape(table.caption)}</strong></p>")
            parts.append(table.frame.to_html(index=False, border=0, escape=True))
        for figure in section.figures:
            data = base64.b64encode(figure.png).decode("ascii")
            parts.append(f"<figure><img alt='{html.escape(figure.caption)}' src='data:image/png;base64,{data}'>"
                         f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def render_text(report: Report, out_dir: Path | None = None, max_rows: int = 30) -> str:
    """The terminal version: every table as plain text (the first ``max_rows`` rows; all of them are in the
    report); figures by their path."""
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 80):
        parts = [report.title, "=" * len(report.title)]
        for section in report.sections:
            parts += ["", section.title, "-" * len(section.title)]
            parts += [re.sub(r"\*\*|`", "", text) for text in section.text]
            for table in section.tables:
                parts += ["", f"{table.caption}:", table.frame.head(max_rows).to_string(index=False)]
                if len(table.frame) > max_rows:
                    parts.append(f"... {len(table.frame) - max_rows} more rows in report.md")
            if out_dir is not None:
                parts += [f"figure: {out_dir / figure.file}" for figure in section.figures]
    return "\n".join(parts)


def default_out_dir(study_dirs: Sequence[str]) -> Path:
    """``<first study dir>/report`` for a local folder; ``./report-<name>`` for a URI (never written remotely)."""
    first = study_dirs[0]
    if "://" in first:
        return Path(f"report-{first.rstrip('/').rsplit('/', 1)[-1]}")
    return Path(first) / REPORT_DIR


def save_report(report: Report, out_dir: Path) -> Path:
    """Write report.md, report.html and the PNGs into ``out_dir``; figures of an earlier run that this one did not
    draw are removed (only our own figure names are touched)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = {figure.file for section in report.sections for figure in section.figures}
    for name in set(FIGURES) - drawn:
        (out_dir / name).unlink(missing_ok=True)
    for section in report.sections:
        for figure in section.figures:
            (out_dir / figure.file).write_bytes(figure.png)
    (out_dir / "report.md").write_text(render_markdown(report), encoding="utf-8")
    (out_dir / "report.html").write_text(render_html(report), encoding="utf-8")
    return out_dir


def write_report(study_dirs: Sequence[str], out_dir: str | None = None, *, top: int = 5) -> Path:
    """Analyse the studies and write the report folder (default ``default_out_dir``); returns the folder.

    Raises ``StudyNotFound``, ``results.ResultsError`` or ``NothingToAnalyse`` with a message for the user.
    """
    report = build_report(list(study_dirs), top=top)
    return save_report(report, Path(out_dir) if out_dir else default_out_dir(study_dirs))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study.analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", nargs="+", metavar="STUDY", help="study folder or pyarrow URI (s3://, file://)")
    parser.add_argument("--out", help="report folder (default: <first study>/report; ./report-<name> for a URI)")
    parser.add_argument("--top", type=int, default=5, help="configurations per method in the leaderboard")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top < 1:
        print(f"error: --top must be >= 1, got {args.top}", file=sys.stderr)
        return 2
    try:
        report = build_report(args.studies, top=args.top)
        out_dir = save_report(report, Path(args.out) if args.out else default_out_dir(args.studies))
    except NothingToAnalyse as error:
        print(str(error), file=sys.stderr)
        return 1
    except (results.ResultsError, UnreadableStudyFile, OSError) as error:  # OSError: missing folder, storage, --out
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(render_text(report, out_dir))
    print(f"\nreport: {out_dir / 'report.md'} and {out_dir / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

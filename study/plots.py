"""Figures of a study's analysis (matplotlib, Agg backend): each function takes tables of ``study.analyze`` and
returns a ``matplotlib.figure.Figure``; ``png(figure)`` gives its PNG bytes and closes it.

Conventions, so that every figure reads at a glance: SimCLR is blue and MoCo orange everywhere; log-scaled
parameters (temperature, learning rates, weight decay) get log axes, sizes (batch, queue, negatives) log2 axes
with integer ticks; momentum is drawn on a log scale of 1 - m, so 0.9, 0.99, 0.999 are evenly spaced and m = 0
(1 - m = 1) sits at the right end; the raw-pixel and random-init baselines of the same probe are dashed lines.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display needed, and no GUI backend is ever picked up from the environment

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator

METHOD_COLORS = {"simclr": "tab:blue", "moco": "tab:orange"}
METHOD_LABELS = {"simclr": "SimCLR", "moco": "MoCo"}
LOG_PARAMS = frozenset({"temperature", "lr", "base_lr", "effective_lr", "weight_decay"})
LOG2_PARAMS = frozenset({"batch_size", "global_batch", "queue_length", "queued_batches", "negatives_per_positive"})
PARAM_LABELS = {
    "temperature": "temperature τ",
    "lr": "learning rate (scaled for the batch)",
    "effective_lr": "learning rate (scaled for the batch)",
    "base_lr": "base learning rate (per 256 images)",
    "weight_decay": "weight decay",
    "batch_size": "batch size (images)",
    "global_batch": "global batch (images)",
    "queue_length": "MoCo queue length K (keys)",
    "queued_batches": "MoCo queue (batches queued)",
    "negatives_per_positive": "negatives per positive (SimCLR 2B−2, MoCo K)",
    "momentum": "MoCo key-encoder momentum m",
}
BASELINE_STYLES = {"raw pixels": ("0.35", "--"), "random-init backbone": ("0.6", ":")}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, str(method))


def method_color(method: str, index: int = 0) -> str:
    return METHOD_COLORS.get(method, f"C{(index + 2) % 10}")


def param_label(param: str) -> str:
    """Axis label: the parameter's meaning and unit, plus the scale of the axis."""
    label = PARAM_LABELS.get(param, param)
    if param == "momentum":
        return f"{label} (log scale of 1 − m; m = 0 at the right)"
    if param in LOG_PARAMS:
        return f"{label}, log scale"
    if param in LOG2_PARAMS:
        return f"{label}, log2 scale"
    return label


def param_x(param: str, values: pd.Series | np.ndarray) -> np.ndarray:
    """Where values sit on the parameter's axis: 1 - m for momentum (so its log scale spreads 0.9, 0.99, ...)."""
    x = np.asarray(values, dtype=float)
    return 1.0 - x if param == "momentum" else x


def _integer_label(value: float, _position: float = 0.0) -> str:
    return f"{value:,.0f}" if value >= 1 else f"{value:g}"


def _spaced(ticks: np.ndarray, min_log2_gap: float = 0.25) -> np.ndarray:
    """Sorted positive ticks without neighbours closer than ``min_log2_gap`` octaves, whose labels would overlap
    (SimCLR's 254 negatives next to MoCo's K = 256)."""
    kept: list[float] = []
    for tick in np.sort(ticks):
        if not kept or np.log2(tick / kept[-1]) >= min_log2_gap:
            kept.append(float(tick))
    return np.asarray(kept)


def set_param_axis(ax: plt.Axes, param: str, values: Sequence[float] | np.ndarray) -> None:
    """Scale, ticks and label of an x axis that shows ``param`` (values already passed through ``param_x``)."""
    present = np.unique(np.asarray(values, dtype=float)[np.isfinite(np.asarray(values, dtype=float))])
    ax.set_xlabel(param_label(param))
    if param == "momentum":
        ax.set_xscale("log")
        ticks = present[present > 0]
        ax.xaxis.set_major_locator(FixedLocator(ticks))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"m={1 - x:.4g}"))
        if len(ticks):  # room either side, so end points are not drawn on the frame
            ax.set_xlim(ticks.min() / 2.5, ticks.max() * 2.5)
    elif param in LOG2_PARAMS and len(present) and present.min() > 0:
        ax.set_xscale("log", base=2)
        if len(present) <= 8:  # the values themselves are the most readable ticks
            ax.xaxis.set_major_locator(FixedLocator(_spaced(present)))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_major_formatter(FuncFormatter(_integer_label))
        if len(present):
            ax.set_xlim(present.min() / 1.6, present.max() * 1.6)
    elif param in LOG_PARAMS and len(present) and present.min() > 0:
        ax.set_xscale("log")
        # 1-2-5 ticks as plain numbers: matplotlib's default labels minor ticks as overlapping 2x10^-1, 3x10^-1...
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _p: f"{x:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _baselines(ax: plt.Axes, baselines: Mapping[str, float], values: pd.Series | np.ndarray) -> None:
    """Baselines as horizontal lines, with y limits that show them and the data (axhline alone may sit on the
    frame, where it cannot be seen)."""
    for name, value in baselines.items():
        color, style = BASELINE_STYLES.get(name, ("0.5", "-."))
        ax.axhline(value, color=color, linestyle=style, linewidth=1.2, zorder=1)
    shown = np.concatenate([np.asarray(values, dtype=float), np.asarray(list(baselines.values()), dtype=float)])
    shown = shown[np.isfinite(shown)]
    if len(shown):
        low, high = shown.min(), shown.max()
        pad = max(0.08 * (high - low), 0.005)
        ax.set_ylim(low - pad, high + pad)


def _legend_handles(methods: Sequence[str], baselines: Mapping[str, float], *, mean_line: bool) -> list[Line2D]:
    handles = [Line2D([], [], color=method_color(m, i), marker="o", linestyle="-" if mean_line else "",
                      label=method_label(m) + (" (line: mean per bin)" if mean_line else ""))
               for i, m in enumerate(methods)]
    for name, value in baselines.items():
        color, style = BASELINE_STYLES.get(name, ("0.5", "-."))
        handles.append(Line2D([], [], color=color, linestyle=style, label=f"{name} baseline ({value:.3f})"))
    return handles


def _grid(panels: int, ncols: int = 3, width: float = 5.2, height: float = 3.9) -> tuple[Figure, list[plt.Axes]]:
    ncols = max(1, min(ncols, panels))
    nrows = math.ceil(panels / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows + 0.8), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def _scatter_and_means(ax: plt.Axes, configs: pd.DataFrame, param: str, table: pd.DataFrame, metric: str,
                       methods: Sequence[str]) -> None:
    """Each configuration as a dot; the mean per bin (from the sensitivity table) as a line per method."""
    for i, method in enumerate(methods):
        rows = configs[(configs["method"] == method) & configs[param].notna()]
        if rows.empty:
            continue
        color = method_color(method, i)
        ax.scatter(param_x(param, rows[param]), rows[metric], s=26, color=color, alpha=0.75,
                   edgecolor="white", linewidth=0.5, zorder=3)
        bins = table[table["method"] == method]
        if len(bins) > 1 and bins["center"].notna().all():
            ax.plot(param_x(param, bins["center"]), bins["mean"], color=color, linewidth=1.8, zorder=2)


def sensitivity_figure(configs: pd.DataFrame, tables: Mapping[str, pd.DataFrame], *, ylabel: str,
                       baselines: Mapping[str, float], title: str) -> Figure:
    """One panel per parameter: the objective of each completed configuration, colored by method, with the
    mean per bin as a line and the baselines as dashed lines."""
    params = list(tables)
    methods = sorted(configs["method"].dropna().unique())
    fig, axes = _grid(len(params))
    for ax, param in zip(axes, params):
        _scatter_and_means(ax, configs, param, tables[param], "objective", methods)
        _baselines(ax, baselines, configs.loc[configs[param].notna(), "objective"])
        set_param_axis(ax, param, param_x(param, configs[param].dropna()))
        shown = configs[param].notna().sum()
        ax.set_title(f"{PARAM_LABELS.get(param, param)}  (n = {shown})", fontsize=11)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=13)
    fig.legend(handles=_legend_handles(methods, baselines, mean_line=True), loc="lower center",
               ncol=min(4, len(methods) + len(baselines)), frameon=False)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    return fig


def negatives_figure(configs: pd.DataFrame, table: pd.DataFrame, *, ylabel: str,
                     baselines: Mapping[str, float]) -> Figure:
    """SimCLR and MoCo on one log2 axis of negatives per positive: does a MoCo queue buy what a batch buys?"""
    param = "negatives_per_positive"
    methods = sorted(configs["method"].dropna().unique())
    fig, ax = plt.subplots(figsize=(8, 5))
    _scatter_and_means(ax, configs, param, table, "objective", methods)
    _baselines(ax, baselines, configs.loc[configs[param].notna(), "objective"])
    set_param_axis(ax, param, configs[param].dropna())
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    ax.set_title("Does a MoCo queue buy what a SimCLR batch buys?\n"
                 "accuracy against negatives per positive (SimCLR: 2B−2 in the batch, MoCo: K in the queue)",
                 fontsize=11)
    fig.legend(handles=_legend_handles(methods, baselines, mean_line=True), loc="lower center", fontsize=9,
               ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


def interaction_figure(panels: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]], *, x: str, y: str,
                       zlabel: str) -> Figure:
    """Heat maps of the mean objective per (x bin, y value), one per method; each cell says mean and count."""
    fig, axes = _grid(len(panels), ncols=2, width=6.2, height=4.6)
    finite = [m.to_numpy(dtype=float) for m, _ in panels.values()]
    low = min(np.nanmin(v) for v in finite)
    high = max(np.nanmax(v) for v in finite)
    image = None
    for ax, (method, (means, counts)) in zip(axes, panels.items()):
        values = means.to_numpy(dtype=float)
        image = ax.imshow(values, origin="lower", aspect="auto", cmap="viridis", vmin=low, vmax=high)
        ax.set_xticks(range(means.shape[1]), [str(c) for c in means.columns], rotation=30, ha="right")
        ax.set_yticks(range(means.shape[0]), [str(r) for r in means.index])
        for (row, col), value in np.ndenumerate(values):
            if np.isfinite(value):
                n = counts.iloc[row, col]
                light = value < low + 0.5 * (high - low)  # white text on the dark end of viridis
                ax.text(col, row, f"{value:.3f}\nn={int(n)}", ha="center", va="center", fontsize=8,
                        color="white" if light else "black")
        ax.set_xlabel(f"{PARAM_LABELS.get(x, x)} bin" + (" (log bins)" if x in LOG_PARAMS else ""))
        ax.set_ylabel(PARAM_LABELS.get(y, y))
        ax.set_title(method_label(method), fontsize=11)
    if image is not None:
        fig.colorbar(image, ax=axes, label=zlabel, shrink=0.9)
    fig.suptitle(f"{PARAM_LABELS.get(x, x)} × {PARAM_LABELS.get(y, y)}: mean {zlabel} per cell (blank: no trial)",
                 fontsize=12)
    return fig


def importance_figure(table: pd.DataFrame, *, evaluator: str) -> Figure:
    """Grouped horizontal bars: each parameter's importance in each scope (all methods together, each method),
    parameters ordered by their largest importance."""
    scopes = list(dict.fromkeys(table["scope"]))
    order = table.groupby("param")["importance"].max().sort_values().index.tolist()
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(order) * max(1, len(scopes)) ** 0.5 + 2.2))
    height = 0.8 / len(scopes)
    for i, scope in enumerate(scopes):
        rows = table[table["scope"] == scope].set_index("param")
        offsets = [order.index(p) + (len(scopes) - 1 - i - (len(scopes) - 1) / 2) * height for p in rows.index]
        color = method_color(scope) if scope in METHOD_COLORS else "0.45"
        name = "all methods" if scope == "all" else method_label(scope)
        ax.barh(offsets, rows["importance"], height=height, color=color,
                label=f"{name} ({int(rows['trials'].iloc[0])} trials)")
        for y, value in zip(offsets, rows["importance"]):
            ax.text(value + 0.01, y, f"{value:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(order)), [PARAM_LABELS.get(p, p) for p in order])
    ax.set_xlim(0, 1.1)
    ax.set_xlabel(f"{evaluator} importance (share of the objective's variance; each scope sums to 1)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(loc="lower right", fontsize=9)
    ax.set_title("Hyperparameter importance (MoCo-only parameters exist only in the MoCo scope)", fontsize=11)
    fig.tight_layout()
    return fig


def learning_curves_figure(curves: pd.DataFrame) -> Figure:
    """Loss and kNN monitor accuracy per epoch, one line per run (trial x seed), colored by method; runs that
    ASHA stopped early are dashed and end in a cross."""
    methods = sorted(curves["method"].dropna().unique())
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    panels = (("loss", "contrastive loss (nats)"), ("knn_monitor_accuracy", "kNN monitor accuracy (validation)"))
    runs = curves.groupby(["study_name", "trial_id", "seed"]).ngroups
    alpha = 0.8 if runs <= 20 else max(0.25, 0.8 * math.sqrt(20 / runs))  # many runs: fainter lines, visible bundles
    for ax, (metric, label) in zip(axes, panels):
        for (_study, _trial, _seed), run in curves.groupby(["study_name", "trial_id", "seed"], sort=False):
            method = run["method"].iloc[0]
            stopped = run["status"].iloc[0] != "completed"
            color = method_color(method, methods.index(method) if method in methods else 0)
            ax.plot(run["epoch"], run[metric], color=color, alpha=alpha, linewidth=1.4, marker="o", markersize=3,
                    linestyle="--" if stopped else "-")
            if stopped:
                ax.plot(run["epoch"].iloc[-1], run[metric].iloc[-1], marker="x", color=color, markersize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("Training loss (SimCLR and MoCo losses have different scales)", fontsize=10)
    axes[1].set_title("kNN monitor each epoch (ASHA's signal)", fontsize=10)
    handles = [Line2D([], [], color=method_color(m, i), label=method_label(m)) for i, m in enumerate(methods)]
    handles.append(Line2D([], [], color="0.4", linestyle="--", marker="x", label="stopped early / not completed"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle("Learning curves, one line per run", fontsize=12)
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    return fig


def _diagnostic_panel(ax: plt.Axes, rows: pd.DataFrame, param: str, metric: str, methods: Sequence[str]) -> None:
    for i, method in enumerate(methods):
        part = rows[(rows["method"] == method) & rows[param].notna() & rows[metric].notna()]
        if part.empty:
            continue
        done = part["status"] == "completed"
        color = method_color(method, i)
        ax.scatter(param_x(param, part.loc[done, param]), part.loc[done, metric], color=color, s=30, alpha=0.8,
                   zorder=3)
        ax.scatter(param_x(param, part.loc[~done, param]), part.loc[~done, metric], facecolor="none",
                   edgecolor=color, s=30, zorder=3)
    set_param_axis(ax, param, param_x(param, rows[param].dropna()))
    ax.grid(True, alpha=0.3)


def diagnostics_figure(last: pd.DataFrame) -> Figure:
    """The last epoch of each run: MoCo's queue staleness against momentum, alignment and uniformity against
    temperature (filled: completed runs; hollow: runs that stopped early, measured at an earlier epoch)."""
    methods = sorted(last["method"].dropna().unique())
    moco = last[(last["method"] == "moco") & last["queue_key_consistency"].notna() & last["momentum"].notna()]
    panels = ([("momentum", "queue_key_consistency", "queue key consistency (cosine; 1 = fresh keys)",
                "MoCo queue staleness")] if not moco.empty else [])
    panels += [("temperature", "alignment", "alignment (lower = positives closer)", "Alignment"),
               ("temperature", "uniformity", "uniformity (lower = more uniform)", "Uniformity")]
    fig, axes = _grid(len(panels), ncols=3, width=5.0, height=4.0)
    for ax, (param, metric, ylabel, title) in zip(axes, panels):
        rows = moco if metric == "queue_key_consistency" else last
        _diagnostic_panel(ax, rows, param, metric, methods)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=11)
    handles = [Line2D([], [], color=method_color(m, i), marker="o", linestyle="", label=method_label(m))
               for i, m in enumerate(methods)]
    handles.append(Line2D([], [], color="0.4", marker="o", markerfacecolor="none", linestyle="",
                          label="stopped early (earlier epoch)"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.suptitle("Representation diagnostics at each run's last epoch", fontsize=12)
    fig.tight_layout(rect=(0, 0.08, 1, 0.94))
    return fig


def png(fig: Figure, dpi: int = 110) -> bytes:
    """The figure as PNG bytes; the figure is closed (pyplot keeps every open figure alive otherwise)."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buffer.getvalue()

"""Training runs side by side: which settings won, by how much, and how fast they got there.

Each run folder written by `main.py fit` holds config.json (the arguments it ran with) and metrics.csv (one row
per finished epoch, with the cumulative training time). This module reads only those two files, so runs still
training, runs cut short and runs from another machine compare the same way: on the epochs they have.

The table shows the usual columns plus only the settings that differ between the runs; a setting all runs
share explains nothing about their difference. Time-to-accuracy (first training time at which validation
accuracy reaches `at`) compares runs of different lengths and schedules fairly, where final accuracy cannot.
"""
from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .layout import METRICS, atomic_write, atomic_write_text, save_figure
from .run_folder import read_config

REQUIRED_COLUMNS = ("epoch", "valid_loss", "accuracy", "elapsed")
NUMERIC_COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "top5", "time", "elapsed")
FIXED_SETTINGS = ("schedule", "lr", "epochs", "bs")  # always in the table, so never repeated as "differing"
_MISSING = object()


def read_run(run_dir: str | Path) -> tuple[dict, pd.DataFrame]:
    """(config, metrics) of one run folder; a clear one-line ValueError when the folder is not one."""
    d = Path(run_dir)
    config = read_config(d)  # NotARunFolder, a ValueError too, for a folder that is not one
    if not (d / METRICS).is_file():
        raise ValueError(f"{d}: not a run folder (no metrics.csv)")
    try:
        metrics = pd.read_csv(d / METRICS)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{d}: metrics.csv is empty (not even a header)") from None
    except pd.errors.ParserError as e:
        raise ValueError(f"{d}: metrics.csv is not a valid CSV ({str(e).splitlines()[0]})") from None
    lacking = [c for c in REQUIRED_COLUMNS if c not in metrics.columns]
    if lacking:
        raise ValueError(f"{d}: metrics.csv lacks column(s) {', '.join(lacking)}")
    for c in NUMERIC_COLUMNS:
        if c in metrics.columns:  # '#na#' or a half-written last line becomes NaN rather than an error
            metrics[c] = pd.to_numeric(metrics[c], errors="coerce")
    if "top5" not in metrics.columns:
        metrics["top5"] = np.nan
    return config, metrics


def _labels(dirs: list[Path]) -> list[str]:
    """Folder names, or parent/name where two runs share a name (runs/a/base vs runs/b/base)."""
    if len({d.resolve() for d in dirs}) < len(dirs):
        raise ValueError("the same run folder is given more than once")
    names = [d.name for d in dirs]
    if len(set(names)) == len(names):
        return names
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def _key(v) -> str:
    return "<missing>" if v is _MISSING else json.dumps(v, sort_keys=True, default=str)


def _names_own_folder(values: list, dirs: list[Path]) -> bool:
    """True for an argument like `out` whose value is each run's own folder: it differs by construction."""
    return all(isinstance(v, str) and v and Path(v).name == d.name for v, d in zip(values, dirs))


def _differing_settings(args: list[dict], dirs: list[Path]) -> list[str]:
    keys = list(dict.fromkeys(k for a in args for k in a))  # first-seen order, as the runs wrote them
    out = []
    for k in keys:
        values = [a.get(k, _MISSING) for a in args]
        if len({_key(v) for v in values}) > 1 and not _names_own_folder(values, dirs):
            out.append(k)
    return out


def _cell(v):
    if v is _MISSING or v is None:
        return None
    return json.dumps(v) if isinstance(v, (list, dict)) else v


def _warn_on_dataset_mismatch(configs: list[dict], labels: list[str]) -> None:
    shas = {lab: (c.get("dataset") or {}).get("wnids_sha1") for c, lab in zip(configs, labels)}
    known = {lab: s for lab, s in shas.items() if s}
    if len(set(known.values())) > 1:
        listed = ", ".join(f"{lab}={s[:10]}" for lab, s in known.items())
        warnings.warn(f"runs were trained on different datasets (dataset.wnids_sha1: {listed}); comparing anyway",
                      stacklevel=3)


def _summarise(metrics: pd.DataFrame, at: float) -> dict:
    acc, top5, elapsed = metrics["accuracy"], metrics["top5"], metrics["elapsed"]
    row = {"epochs_done": len(metrics), "best_top1": acc.max(), "final_top1": acc.iloc[-1] if len(acc) else np.nan,
           "best_top5": top5.max(), "final_top5": top5.iloc[-1] if len(top5) else np.nan,
           "best_epoch": None, "time_to_best": np.nan, "time_to_at": np.nan}
    if acc.notna().any():
        best = acc.idxmax()  # the first epoch reaching the maximum
        row["best_epoch"], row["time_to_best"] = metrics.at[best, "epoch"], elapsed[best]
    reached = metrics.index[acc >= at]
    if len(reached):
        row["time_to_at"] = elapsed[reached[0]]
    return row


def _check_args(run_dirs, at: float) -> list[Path]:
    if isinstance(run_dirs, (str, Path)):
        run_dirs = [run_dirs]
    dirs = [Path(d) for d in run_dirs]
    if not dirs:
        raise ValueError("no run folders given: name at least one")
    if isinstance(at, bool) or not (isinstance(at, (int, float)) and 0 < at <= 1):
        raise ValueError(f"at is an accuracy between 0 and 1 (e.g. 0.5), got {at!r}")
    return dirs


def _at_column(at: float) -> str:
    return f"time_to_{at:g}"


def _load(run_dirs: Iterable[str | Path], at: float):
    """Everything compare_runs and the plot need: labels, metrics, the table and the legend texts."""
    dirs = _check_args(run_dirs, at)
    loaded = [read_run(d) for d in dirs]
    configs, metrics = [c for c, _ in loaded], [m for _, m in loaded]
    labels = _labels(dirs)
    _warn_on_dataset_mismatch(configs, labels)
    args = [c.get("args", {}) for c in configs]
    differing = _differing_settings(args, dirs)
    extra = [k for k in differing if k not in FIXED_SETTINGS]

    rows = []
    for label, a, m in zip(labels, args, metrics):
        s = _summarise(m, at)
        row = {"run": label, **{k: _cell(a.get(k, _MISSING)) for k in FIXED_SETTINGS}}
        row.update(s)
        row[_at_column(at)] = row.pop("time_to_at")
        epochs = row["epochs"]
        row["finished"] = (s["epochs_done"] >= epochs) if isinstance(epochs, (int, float)) else None
        row.update({k: _cell(a.get(k, _MISSING)) for k in extra})
        rows.append(row)
    order = ["run", "schedule", "lr", "epochs", "epochs_done", "finished", "bs", "best_top1", "final_top1",
             "best_top5", "final_top5", "best_epoch", "time_to_best", _at_column(at), *extra]
    table = pd.DataFrame(rows, columns=order)
    for c in ("epochs", "epochs_done", "bs", "best_epoch"):
        table[c] = pd.to_numeric(table[c], errors="coerce").astype("Int64")

    legends = []
    for label, a, row in zip(labels, args, rows):
        settings = ", ".join(f"{k}={a[k]}" if k in a else f"{k} unset" for k in differing)
        text = f"{label} ({settings})" if settings else label
        if row["finished"] is False:
            text += f" [{row['epochs_done']}/{row['epochs']} epochs]"
        legends.append(text)
    return labels, metrics, table, legends


def _time_unit(max_seconds: float) -> tuple[str, float]:
    if not max_seconds or math.isnan(max_seconds) or max_seconds < 180:
        return "s", 1.0
    return ("min", 60.0) if max_seconds < 3 * 3600 else ("h", 3600.0)


def _plot(metrics: list[pd.DataFrame], legends: list[str], at: float) -> Figure:
    unit, scale = _time_unit(max((m["elapsed"].max() for m in metrics if len(m)), default=0.0))
    cmap = plt.get_cmap("tab10" if len(metrics) <= 10 else "tab20")
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), layout="constrained")
    panels = [(0, "epoch", "accuracy"), (1, "elapsed", "accuracy"), (0, "epoch", "valid_loss"),
              (1, "elapsed", "valid_loss")]
    lines = []
    for ax, (col, x, y) in zip(axes.flat, panels):
        for i, m in enumerate(metrics):
            xs = m[x] / scale if x == "elapsed" else m[x]
            (line,) = ax.plot(xs, m[y], "-o", ms=3, lw=1.6, color=cmap(i % cmap.N))
            if y == "accuracy" and m[y].notna().any():
                best = m[y].idxmax()
                ax.plot(xs[best], m.at[best, y], "*", ms=13, color=line.get_color(), mec="black", mew=0.6)
            if ax is axes[0, 0]:
                lines.append(line)
        if y == "accuracy":
            ax.axhline(at, ls=":", color="gray", lw=1)
            ax.annotate(f"at={at:g}", (0.005, at), xycoords=("axes fraction", "data"), va="bottom", fontsize=8,
                        color="gray")
        ax.set_xlabel("epoch" if x == "epoch" else f"training time ({unit})")
        ax.set_ylabel("validation accuracy (top-1)" if y == "accuracy" else "validation loss")
        if x == "epoch":
            ax.xaxis.get_major_locator().set_params(integer=True)
        else:
            ax.set_xlim(left=0)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title("accuracy by epoch (star: best)")
    axes[0, 1].set_title("accuracy by training time")
    axes[1, 0].set_title("loss by epoch")
    axes[1, 1].set_title("loss by training time")
    fig.suptitle(f"{len(metrics)} run{'s' * (len(metrics) != 1)} compared", fontsize=13)
    fig.legend(lines, legends, loc="outside lower center", ncol=1 if max(map(len, legends)) > 60 else 2,
               fontsize=9, frameon=False)
    return fig


def compare_runs(run_dirs: Iterable[str | Path], at: float = 0.5) -> tuple[pd.DataFrame, Figure]:
    """One table row per run (see the module docstring) and a 4-panel figure of validation accuracy and loss
    against epoch and against training time. Accuracies are fractions; times are training seconds
    (metrics.csv `elapsed`); `time_to_<at>` is NaN where a run never reached `at`."""
    _, metrics, table, legends = _load(run_dirs, at)
    return table, _plot(metrics, legends, at)


def _md_cell(v, column: str) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float) and ("top1" in column or "top5" in column):
        return f"{v:.4f}"
    if isinstance(v, float) and column.startswith("time_to"):
        return f"{v:.1f}"
    return str(v).replace("|", "\\|")


def to_markdown(table: pd.DataFrame, at: float = 0.5) -> str:
    """The comparison table as GitHub markdown (pandas' to_markdown needs the optional `tabulate`)."""
    cols = list(table.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for _, r in table.iterrows():
        lines.append("| " + " | ".join(_md_cell(r[c], c) for c in cols) + " |")
    notes = [f"top1/top5: validation accuracy (fraction). time_to_best, {_at_column(at)}: training seconds until "
             f"the best epoch, and until validation top-1 first reached {at:g} (blank: never). "
             "best_epoch counts as metrics.csv does."]
    cut = table.loc[table["finished"] == False, "run"].tolist()  # noqa: E712 (None = unknown stays out)
    if cut:
        notes.append(f"Not finished (compared on the epochs done): {', '.join(cut)}.")
    return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def write_comparison(run_dirs: Iterable[str | Path], out: str | Path = "compare", at: float = 0.5) -> dict:
    """compare.png, compare.md and compare.csv in `out`; returns their paths and the table."""
    table, fig = compare_runs(run_dirs, at)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / "compare.png", "md": out / "compare.md", "csv": out / "compare.csv"}
    save_figure(fig, paths["png"])
    atomic_write_text(paths["md"], to_markdown(table, at))
    atomic_write(paths["csv"], lambda tmp: table.to_csv(tmp, index=False))
    return {**paths, "table": table}

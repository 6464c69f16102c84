"""What a range test leaves for a person: the plot, lr_find.png and lr_find.json, and the `find-lr` command.

The test itself, its curve and its rules are in `lr_range`; this module only draws and writes what it returns.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from .config import DEFAULT_SIZE, DEFAULT_STEM, RunConfig
from .data import tiny_imagenet_dls
from .layout import LR_FIND_JSON, LR_FIND_PNG, atomic_write_text, save_figure
from .learner import tiny_learner
from .lr_range import HELD_OUT_BATCHES, LRRangeResult, lr_range_test, smooth


def plot_lr_range(result: LRRangeResult) -> Figure:
    """The curve with every suggestion marked and labelled with its value, the suggested LR as a dashed line:
    log LR axis for fastai's exponential sweep, linear for Smith's."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lrs, losses = np.asarray(result.lrs, dtype=float), np.asarray(result.losses, dtype=float)
    log = result.mode == "fastai"
    if len(lrs):
        ax.plot(lrs, losses, color="C0", lw=1.2 if log else 0.8, alpha=1 if log else 0.5,
                label="training loss (smoothed)" if log else "held-out loss")
        if not log and len(lrs) >= 3:
            ax.plot(lrs, smooth(losses), color="C0", lw=1.8, label="held-out loss, moving average")
    x_of = np.log10 if log else (lambda v: v)
    marked = losses if log or len(lrs) < 3 else smooth(losses)   # smith's rule reads the smoothed curve
    for i, (name, lr) in enumerate(result.suggestions.items()):
        y = np.interp(x_of(lr), x_of(lrs), marked) if len(lrs) else np.nan
        ax.plot(lr, y, "o", ms=7, color=f"C{i + 1}", label=f"{name}: {lr:.2e}")
    ax.axvline(result.suggested_lr, color="k", ls="--", lw=1, label=f"suggested: {result.suggested_lr:.3g}")
    if log:
        ax.set_xscale("log")
    ax.set_xlabel("learning rate" + (" (log scale)" if log else ""))
    ax.set_ylabel("training loss (smoothed)" if log else "held-out loss")
    ax.set_title(f"LR range test ({result.mode}): suggested lr {result.suggested_lr:.3g}")
    ax.legend(loc="best", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_lr_range(result: LRRangeResult, out: str | Path) -> dict:
    """lr_find.png and lr_find.json in `out` (created if needed); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"png": out / LR_FIND_PNG, "json": out / LR_FIND_JSON}
    save_figure(plot_lr_range(result), paths["png"])
    payload = asdict(result)
    payload = {k: payload[k] for k in ("suggested_lr", "mode", "lrs", "losses", "suggestions", "reason", "warnings",
                                       "start_lr", "end_lr", "num_it")}
    atomic_write_text(paths["json"], json.dumps(payload, indent=2) + "\n")
    return paths


def find_lr(data: str | Path | None = None, bs: int = RunConfig.default("bs"), mode: str = RunConfig.default("lr_mode"),
            num_it: int = RunConfig.default("lr_num_it"), start_lr: float | None = None, end_lr: float | None = None,
            out: str | Path = "lr_find", size: int = DEFAULT_SIZE, stem: str = DEFAULT_STEM,
            precision: str = RunConfig.default("precision"), classes: int | None = None,
            train_per_class: int | None = None, val_batches: int = HELD_OUT_BATCHES) -> LRRangeResult:
    """`python main.py find-lr`: a range test on a fresh model, written to `out`. Its defaults are `fit --lr
    auto`'s (Smith's test, 2 held-out batches), so that it shows the pick a run would make."""
    dls = tiny_imagenet_dls(data, bs=bs, size=size, classes=classes, train_per_class=train_per_class)
    learn = tiny_learner(dls, stem=stem, precision=precision)
    result = lr_range_test(learn, mode=mode, num_it=num_it, start_lr=start_lr, end_lr=end_lr,
                           val_batches=val_batches)
    write_lr_range(result, out)
    return result

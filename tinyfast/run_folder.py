"""The run folder, the one owner of what is in it: create and claim it, read and write its config, metrics,
checkpoint and best weights (atomically, through `tinyfast.layout`), and open a finished one. `fit`, `load_run`,
`export`, `compare` and `report` read a run through this module, so a run folder is parsed in one place and a
folder that is not one gets the same one-line answer everywhere.

RUN_DIR/ holds config.json (the exact command, every argument, versions, the dataset, a budget's plan and
outcome), summary.txt, metrics.csv (a row per epoch), curves.png, schedule.png (the LR and momentum actually
applied), model.pth (the best weights), learner.pkl (`load_learner`-able), checkpoint.pth (to resume),
interrupted.pth, log.txt, and what the review commands add (README, "What a run folder holds").
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from datetime import datetime
from pathlib import Path

import torch

from .errors import RunError
from .layout import (CHECKPOINT, CONFIG, CURVES, METRICS, MODEL, SCHEDULE, atomic_save, atomic_write_text,
                     save_figure, write_failure)

# time and elapsed: wall seconds of the epoch and of the run so far, validation and checkpoints included;
# train_seconds: of the training phase only (the first to the last training batch), what img/s and a
# time-to-accuracy should be counted in, comparable with a benchmark's training loop
METRIC_COLUMNS = ("epoch", "train_loss", "valid_loss", "accuracy", "top5", "time", "elapsed", "train_seconds")
CLAIM = ".claimed"  # created with O_EXCL in a new run folder: of two runs started on one --out, one gets it
CHECKPOINT_KEYS = ("model", "opt", "epoch", "dl_rng", "py_rng", "np_rng", "torch_rng", "rows", "lrs", "moms", "lr")
WRITTEN_BY_FIT = "pass a folder written by `python main.py fit`"


class NotARunFolder(RunError, ValueError):
    """A folder that is not a run folder, or one whose config.json cannot be read: one line naming it."""


# ---------------------------------------------------------------------------------------------------------
# A new run
# ---------------------------------------------------------------------------------------------------------
def new_run_dir(out: Path | str | None) -> Path:
    """`runs/<timestamp>` by default; an existing, non-empty folder is never overwritten, and of two runs started
    at the same moment on one folder exactly one claims it (an exclusive create of `CLAIM`), the other refuses."""
    run_dir = Path(out) if out is not None else Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise RunError(f"{run_dir} already exists and is not empty: choose another --out, or add --resume to "
                       f"continue it")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        os.close(os.open(run_dir / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        raise RunError(f"{run_dir} was just claimed by another run started at the same moment: choose another "
                       f"--out") from None
    except OSError as e:  # a read-only --out, a full disk, someone else's folder
        raise write_failure(run_dir, e) from None
    return run_dir


def dataset_info(dls) -> dict:
    vocab = list(dls.vocab)
    return {"root": str(Path(dls.root).resolve()), "classes": len(vocab), "n_train": len(dls.train_ds),
            "n_valid": len(dls.valid_ds), "wnids_sha1": hashlib.sha1("\n".join(vocab).encode()).hexdigest()}


# ---------------------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------------------
def read_config(run_dir: Path | str) -> dict:
    """config.json as written by `fit`, or a one-line NotARunFolder that names the folder and what is wrong."""
    d = Path(run_dir)
    if not d.is_dir():
        raise NotARunFolder(f"{d}: not a run folder (no such directory)")
    if not (d / CONFIG).is_file():
        raise NotARunFolder(f"{d}: not a run folder (no config.json): {WRITTEN_BY_FIT}")
    try:
        config = json.loads((d / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise NotARunFolder(f"{d}: config.json is not valid JSON ({e.msg}, line {e.lineno})") from None
    except OSError as e:
        raise NotARunFolder(f"{d}: config.json is unreadable ({e.strerror or e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("args", {}), dict):
        raise NotARunFolder(f"{d}: config.json must be an object with an 'args' object")
    return config


def write_config(run_dir: Path | str, config: dict) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(config, indent=2) + "\n")


def update_config(run_dir: Path | str, **changes) -> None:
    """config.json with the top-level keys `changes` gives replaced."""
    write_config(run_dir, {**read_config(run_dir), **changes})


# ---------------------------------------------------------------------------------------------------------
# metrics.csv, model.pth, checkpoint.pth
# ---------------------------------------------------------------------------------------------------------
def read_metrics(run_dir: Path | str) -> list[dict]:
    with open(Path(run_dir) / METRICS) as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def write_metrics(run_dir: Path | str, rows: list[dict]) -> None:
    lines = [",".join(METRIC_COLUMNS)] + [",".join(str(r.get(c, "nan")) for c in METRIC_COLUMNS)  # older rows
                                          for r in rows]
    atomic_write_text(Path(run_dir) / METRICS, "\n".join(lines) + "\n")


def save_model(run_dir: Path | str, state_dict: dict) -> None:
    atomic_save(state_dict, Path(run_dir) / MODEL)


def read_model(run_dir: Path | str) -> dict:
    """model.pth's state_dict on the CPU (saved from rank 0's GPU, perhaps), or a one-line RunError."""
    path = Path(run_dir) / MODEL
    if not path.exists():
        raise RunError(f"{run_dir} has no model.pth yet (did its first epoch finish?)")
    return torch.load(path, map_location="cpu")


def save_checkpoint(run_dir: Path | str, state: dict) -> None:
    atomic_save(state, Path(run_dir) / CHECKPOINT)


def read_checkpoint(run_dir: Path) -> dict:
    """checkpoint.pth, or a one-line RunError saying what is wrong, what is still intact and what to do. Reading
    changes nothing in the folder."""
    path = run_dir / CHECKPOINT
    try:
        start = torch.load(path, weights_only=False, map_location="cpu")
        missing = [k for k in CHECKPOINT_KEYS if k not in start] if isinstance(start, dict) else ["all"]
        if missing:
            raise ValueError(f"it lacks {', '.join(missing)}")
    except Exception as e:
        intact = []
        if (run_dir / MODEL).exists():
            intact.append("model.pth (the best weights)")
        try:
            intact.append(f"metrics.csv ({len(read_metrics(run_dir))} epochs)")
        except Exception:
            pass
        raise RunError(f"cannot resume: {path} is unreadable or incomplete ({e.__class__.__name__}: "
                       f"{str(e).splitlines()[0][:120] if str(e) else 'no detail'}); nothing in {run_dir} was changed"
                       + (f", and {' and '.join(intact)} {'are' if len(intact) > 1 else 'is'} intact"
                          f" (`python main.py evaluate {run_dir}` works)" if intact else "")
                       + "; start again with a new --out") from None
    return start


def latest_run(runs: Path = Path("runs")) -> Path:
    found = sorted((p.parent for p in runs.glob("*/checkpoint.pth")), key=lambda p: p.stat().st_mtime)
    if not found:
        raise RunError(f"no run with a checkpoint under {runs}/: pass --out RUN_DIR with --resume")
    return found[-1]


# ---------------------------------------------------------------------------------------------------------
# Its plots
# ---------------------------------------------------------------------------------------------------------
def plot_curves(rows: list[dict]):
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ep = [r["epoch"] for r in rows]
    ax1.plot(ep, [r["train_loss"] for r in rows], "o-", label="train loss")
    ax1.plot(ep, [r["valid_loss"] for r in rows], "o-", label="valid loss")
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax2.plot(ep, [r["accuracy"] for r in rows], "o-", label="top-1")
    ax2.plot(ep, [r["top5"] for r in rows], "o-", label="top-5")
    ax2.set(xlabel="epoch", ylabel="val accuracy", title="Validation accuracy", ylim=(0, 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig


def plot_schedule(lrs: list[float], moms: list[float]):
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    ax1.plot(lrs)
    ax1.set(xlabel="training step", ylabel="learning rate", title="Learning rate applied")
    ax2.plot(moms, color="C1")
    ax2.set(xlabel="training step", ylabel="momentum", title="Momentum applied")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def write_plots(run_dir: Path, rows: list[dict], lrs: list[float], moms: list[float]) -> None:
    """curves.png and schedule.png, from the rows and the LR/momentum trace so far."""
    if rows:
        save_figure(plot_curves(rows), run_dir / CURVES, dpi=100)
    if lrs:
        save_figure(plot_schedule(lrs, moms), run_dir / SCHEDULE, dpi=100)

"""report.md: one page per run folder linking every plot and table the commands wrote there.

Each command that writes into a run folder (fit, evaluate, interpret, gradcam) calls `write_report`, so the
page always shows what exists, and says which command fills what is still missing.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .run_folder import NotARunFolder, read_config, read_metrics
from .layout import (CONFUSION, CONFUSION_FULL, CURVES, EVALUATION, GRADCAM_JSON, LR_FIND_JSON, LR_FIND_PNG,
                     METRICS, MOST_CONFUSED, PER_CLASS, RELIABILITY, REPORT, SCHEDULE, SUMMARY, TOP_LOSSES,
                     atomic_write_text, gradcam_figure_name)


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _run_config(run_dir: Path) -> dict:
    """config.json, through its owner; {} where there is none (evaluate and interpret may write elsewhere)."""
    try:
        return read_config(run_dir)
    except NotARunFolder:
        return {}


def _run_metrics(run_dir: Path) -> list[dict]:
    try:
        return read_metrics(run_dir)
    except (OSError, ValueError):
        return []


def _csv_rows(path: Path, n: int) -> list[dict]:
    try:
        with open(path) as f:
            return [row for _, row in zip(range(n), csv.DictReader(f))]
    except OSError:
        return []


def _table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(_fmt(r[c]) for c in cols) + " |" for r in rows]
    return out + [""]


def _fmt(v) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return str(int(f)) if f.is_integer() else f"{f:.4g}"


def _image(run_dir: Path, name: str, alt: str, missing: str) -> list[str]:
    if (run_dir / name).exists():
        return [f"![{alt}]({name})", ""]
    return [f"_{alt}: not yet — {missing}_", ""]


def write_report(run_dir: Path | str) -> Path:
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    args = cfg.get("args", {})
    metrics = _run_metrics(run_dir)
    name = run_dir.name
    lines = [f"# Run `{name}`", ""]
    if cfg:
        lines += [f"Command: `{cfg.get('command', '?')}`  ", f"Device: {cfg.get('device', '?')}; started {cfg.get('started', '?')}; "
                  f"dataset: {cfg.get('dataset', {}).get('classes', '?')} classes at `{cfg.get('dataset', {}).get('root', '?')}`", ""]
        keys = ("epochs", "bs", "lr", "lr_picked", "schedule", "wd", "mom", "label_smoothing", "size", "stem", "precision", "seed")
        lines += _table([{k: args[k] for k in keys if k in args}])
    if metrics:
        best = max(metrics, key=lambda r: float(r["accuracy"]))
        last = metrics[-1]
        lines += [f"**Best val top-1 {float(best['accuracy']):.4f}** (top-5 {float(best['top5']):.4f}) at epoch {best['epoch']}; "
                  f"last epoch {last['epoch']}: top-1 {float(last['accuracy']):.4f}; {float(last['elapsed']):.0f} s of training. "
                  f"Per-epoch figures: [{METRICS}]({METRICS}); model: [{SUMMARY}]({SUMMARY}).", ""]
    lines += ["## Training", ""]
    lines += _image(run_dir, CURVES, "loss and accuracy curves", "`python main.py fit`")
    lines += _image(run_dir, SCHEDULE, "learning rate and momentum applied", "`python main.py fit`")
    lines += ["## Learning-rate range test", ""]
    lr = _json(run_dir / LR_FIND_JSON)
    if lr:
        lines += [f"Mode `{lr.get('mode')}`: suggested LR **{lr.get('suggested_lr'):.3g}** — {lr.get('reason', '')}", ""]
    lines += _image(run_dir, LR_FIND_PNG, "LR range test", "`python main.py find-lr --out RUN_DIR` or `fit --lr auto`")
    lines += ["## Evaluation", ""]
    ev = _json(run_dir / EVALUATION)
    if ev:
        lines += _table([{k: v for k, v in ev.items() if not isinstance(v, (dict, list))}])
        lines += [f"Worst classes ([{PER_CLASS}]({PER_CLASS})):", ""] + _table(_csv_rows(run_dir / PER_CLASS, 10))
    else:
        lines += ["_not yet — `python main.py evaluate RUN_DIR`_", ""]
    lines += _image(run_dir, RELIABILITY, "reliability diagram", "`python main.py evaluate RUN_DIR`")
    lines += ["## Top losses and confusions", ""]
    lines += _image(run_dir, TOP_LOSSES, "top losses", "`python main.py interpret RUN_DIR`")
    lines += _image(run_dir, CONFUSION, "confusion among the most confused classes", "`python main.py interpret RUN_DIR`")
    if (run_dir / MOST_CONFUSED).exists():
        lines += [f"Most confused pairs ([{MOST_CONFUSED}]({MOST_CONFUSED})):", ""] + _table(_csv_rows(run_dir / MOST_CONFUSED, 10))
    if (run_dir / CONFUSION_FULL).exists():
        lines += [f"Full confusion matrix: [{CONFUSION_FULL}]({CONFUSION_FULL})", ""]
    lines += ["## Where the model looks (Grad-CAM)", ""]
    lines += _image(run_dir, gradcam_figure_name("gradcam", first=True), "Grad-CAM", "`python main.py gradcam RUN_DIR`")
    cam = _json(run_dir / GRADCAM_JSON)
    if cam:  # {method: its localisation scores}, as `tinyfast.cam_report.gradcam` writes it
        rows = [r for r in cam.values() if isinstance(r, dict)]
        lines += ["Localisation against the val boxes (pointing game: the CAM's maximum inside the box; "
                  "energy: the CAM's mass inside the box; baseline: the box's share of the image):", ""] + _table(rows)
    report = run_dir / REPORT
    atomic_write_text(report, "\n".join(lines) + "\n")
    return report

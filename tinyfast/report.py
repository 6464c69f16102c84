"""report.md: one page per run folder linking every plot and table the commands wrote there.

Each command that writes into a run folder (fit, evaluate, interpret, gradcam) calls `write_report`, so the
page always shows what exists, and says which command fills what is still missing.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path


def _json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


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
    cfg = _json(run_dir / "config.json") or {}
    args = cfg.get("args", {})
    metrics = _csv_rows(run_dir / "metrics.csv", 10_000)
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
                  f"Per-epoch figures: [metrics.csv](metrics.csv); model: [summary.txt](summary.txt).", ""]
    lines += ["## Training", ""]
    lines += _image(run_dir, "curves.png", "loss and accuracy curves", "`python main.py fit`")
    lines += _image(run_dir, "schedule.png", "learning rate and momentum applied", "`python main.py fit`")
    lines += ["## Learning-rate range test", ""]
    lr = _json(run_dir / "lr_find.json")
    if lr:
        lines += [f"Mode `{lr.get('mode')}`: suggested LR **{lr.get('suggested_lr'):.3g}** — {lr.get('reason', '')}", ""]
    lines += _image(run_dir, "lr_find.png", "LR range test", "`python main.py find-lr --out RUN_DIR` or `fit --lr auto`")
    lines += ["## Evaluation", ""]
    ev = _json(run_dir / "evaluation.json")
    if ev:
        lines += _table([{k: v for k, v in ev.items() if not isinstance(v, (dict, list))}])
        lines += ["Worst classes ([per_class.csv](per_class.csv)):", ""] + _table(_csv_rows(run_dir / "per_class.csv", 10))
    else:
        lines += ["_not yet — `python main.py evaluate RUN_DIR`_", ""]
    lines += _image(run_dir, "reliability.png", "reliability diagram", "`python main.py evaluate RUN_DIR`")
    lines += ["## Top losses and confusions", ""]
    lines += _image(run_dir, "top_losses.png", "top losses", "`python main.py interpret RUN_DIR`")
    lines += _image(run_dir, "confusion.png", "confusion among the most confused classes", "`python main.py interpret RUN_DIR`")
    if (run_dir / "most_confused.csv").exists():
        lines += ["Most confused pairs ([most_confused.csv](most_confused.csv)):", ""] + _table(_csv_rows(run_dir / "most_confused.csv", 10))
    if (run_dir / "confusion_full.png").exists():
        lines += ["Full confusion matrix: [confusion_full.png](confusion_full.png)", ""]
    lines += ["## Where the model looks (Grad-CAM)", ""]
    lines += _image(run_dir, "gradcam.png", "Grad-CAM", "`python main.py gradcam RUN_DIR`")
    cam = _json(run_dir / "gradcam.json")
    if cam:
        scores = cam.get("scores", cam)
        rows = list(scores.values()) if isinstance(scores, dict) else scores
        rows = [r for r in rows if isinstance(r, dict)]
        lines += ["Localisation against the val boxes (pointing game: the CAM's maximum inside the box; "
                  "energy: the CAM's mass inside the box; baseline: the box's share of the image):", ""] + _table(rows)
    report = run_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report

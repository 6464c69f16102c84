"""Where things are, and how they are written: the one owner of every path rule.

* The TinyImageNet folder: which split an image is in, its class and its annotated box, read off its path
  alone (`val/images/<file>` is validation, `train/<wnid>/images/<file>` training, as the official zip lays
  them out). The files that hold the labels and boxes are read by `tinyfast.dataset`; this module only says
  which one applies to an image.
* The run folder: the name of every file a command writes into it (`fit`, `find-lr`, `evaluate`,
  `interpret`, `gradcam`, `export`, `report`). A file is added to a run folder by naming it here first.
* Writing: every file a kill must not leave half-written goes through `atomic_save` / `atomic_write_text`
  (write a temporary name beside it, then rename), and every figure through `save_figure`, which closes it,
  so that a long session of plots does not pile figures up in pyplot.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from .dataset import read_train_boxes  # the reader of the boxes files (dataset.py imports nothing of tinyfast)

__all__ = ["is_val", "train_wnid", "dataset_label", "dataset_box", "relocate",
           "atomic_save", "atomic_write_text", "atomic_write", "save_figure", "gradcam_figure_name"]

# ---------------------------------------------------------------------------------------------------------
# The run folder's files
# ---------------------------------------------------------------------------------------------------------
CONFIG = "config.json"                 # fit's arguments, the exact command, versions, the outcome
METRICS = "metrics.csv"                # one row per epoch
MODEL = "model.pth"                    # the weights of the best epoch (EMA weights with --ema)
CHECKPOINT = "checkpoint.pth"          # model + optimizer + epoch, to resume
INTERRUPTED = "interrupted.pth"        # the weights at a Ctrl-C
LEARNER = "learner.pkl"                # `load_learner`-able
SUMMARY = "summary.txt"                # fastai's `Learner.summary`
CURVES = "curves.png"
SCHEDULE = "schedule.png"
TTA = "tta.json"
LOG = "log.txt"                        # what the commands printed (tinyfast.runlog)
LR_FIND_PNG, LR_FIND_JSON = "lr_find.png", "lr_find.json"
EVALUATION = "evaluation.json"
PER_CLASS = "per_class.csv"
RELIABILITY, RELIABILITY_TEMPERATURE = "reliability.png", "reliability_temperature.png"
TOP_LOSSES = "top_losses.png"
CONFUSION, CONFUSION_FULL = "confusion.png", "confusion_full.png"
MOST_CONFUSED = "most_confused.csv"
GRADCAM_JSON = "gradcam.json"
MODEL_JSON = "model.json"              # what `export` wrote, and how to feed it
REPORT = "report.md"


def gradcam_figure_name(method: str, first: bool) -> str:
    """`gradcam.png` for the first method asked for, `gradcam_<method>.png` for the others ("gradcam++" ->
    `gradcam_gradcampp.png`): the first is the one report.md shows whatever the method."""
    return "gradcam.png" if first else f"gradcam_{re.sub(r'[^a-z0-9]+', '', method.lower().replace('+', 'p'))}.png"


# ---------------------------------------------------------------------------------------------------------
# The TinyImageNet folder
# ---------------------------------------------------------------------------------------------------------
def is_val(path: Path | str) -> bool:
    """The official split: `val/images/*` is validation, `train/*/images/*` training (never a random split)."""
    return Path(path).parent.parent.name == "val"


def train_wnid(path: Path | str) -> str | None:
    """The class of a training image, `train/<wnid>/images/<file>`; None for a path of another shape."""
    path = Path(path)
    if path.parent.name == "images" and path.parent.parent.parent.name == "train":
        return path.parent.parent.name
    return None


def _under(path: Path, folder: Path) -> bool:
    return path.resolve().parent == folder.resolve()


def dataset_label(path: Path | str, root: Path | str | None, val_annotations: dict) -> str | None:
    """The wnid of a dataset image (val: `val_annotations.txt`, given as read by `read_val_annotations`;
    train: its class folder), None for an image outside the dataset."""
    path = Path(path)
    if root is not None and _under(path, Path(root) / "val" / "images"):
        return val_annotations.get(path.name, (None,))[0]
    return train_wnid(path)


def dataset_box(path: Path | str, root: Path | str | None, val_annotations: dict) -> tuple[int, int, int, int] | None:
    """The annotated box (x0, y0, x1, y1, inclusive pixels) of a dataset image: val from its annotations,
    train from its class's `<wnid>_boxes.txt`; None outside the dataset."""
    if root is None:
        return None
    path, root = Path(path), Path(root)
    if _under(path, root / "val" / "images"):
        return val_annotations.get(path.name, (None, None))[1]
    wnid = train_wnid(path)
    if wnid is not None and _under(path, root / "train" / wnid / "images"):
        return read_train_boxes(root, wnid).get(path.name)
    return None


def relocate(item: Path | str, root: Path | str | None) -> Path:
    """A dataset image's path under another dataset root (a run evaluated on a moved copy of the data)."""
    item = Path(item)
    if root is None:
        return item
    parts = item.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] in ("val", "train", "test"):
            return Path(root).joinpath(*parts[i:])
    return Path(root) / item.name


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------
def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path | str, write: Callable[[Path], None]) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a kill mid-write leaves the previous file
    (or none) in place, never half of one, and no temporary file behind."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_save(obj, path: Path | str) -> None:
    """torch.save, atomically (`atomic_write`)."""
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def save_figure(fig, path: Path | str, dpi: int = 110) -> Path:
    """Save a matplotlib figure and close it, even when saving fails."""
    import matplotlib.pyplot as plt
    try:
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)
    return Path(path)

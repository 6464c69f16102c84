"""Where things are, and how they are written: the one owner of every path rule.

* The TinyImageNet folder: which split an image is in, its class and its annotated box, read off its path
  alone (`val/images/<file>` is validation, `train/<wnid>/images/<file>` training, as the official zip lays
  them out). The files that hold the labels and boxes are read by `tinyfast.dataset`; this module only says
  which one applies to an image.
* The run folder: the name of every file a command writes into it (`fit`, `find-lr`, `evaluate`,
  `interpret`, `gradcam`, `export`, `report`). A file is added to a run folder by naming it here first.
* Writing: every file tinyfast writes goes through `atomic_write` (`atomic_save`, `atomic_write_text`,
  `save_figure`): a temporary name beside it, then a rename, so a kill, a full disk or an I/O error never leaves
  half a file, and a file that was good stays good. A failed write is one line (`write_failure`): the path, the
  space needed and left, what to do. `save_figure` also closes the figure, so that a long session of plots does
  not pile figures up in pyplot.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from .errors import RunError
from .dataset import read_train_boxes  # the reader of the boxes files (dataset.py imports nothing of tinyfast)

__all__ = ["is_val", "train_wnid", "dataset_label", "dataset_box", "relocate", "atomic_save", "atomic_write_text",
           "atomic_write", "save_figure", "write_failure", "free_bytes", "gradcam_figure_name"]

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
SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def free_bytes(path: Path | str) -> int | None:
    """The bytes free on the file system that holds `path` (or its nearest existing parent); None if unknown."""
    path = Path(path).absolute()
    for folder in [path, *path.parents]:
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n < 10 * 2**20 else f"{n / 2**20:.0f} MiB"


WRITE_ELSEWHERE = "write elsewhere (--out)"


def write_failure(path: Path | str, error: BaseException, needed: int | None = None,
                  elsewhere: str = WRITE_ELSEWHERE) -> RunError:
    """The one line for a file that could not be written: which file, why, the space it needed and the space
    left where it was going, and what to do. torch's writer loses the errno (a RuntimeError from its zip writer):
    a full file system is then told by the space left."""
    path, free = Path(path), free_bytes(path)
    code = getattr(error, "errno", None)
    full = code in SPACE_ERRNOS or (isinstance(error, RuntimeError) and free is not None
                                     and free < max(needed or 0, 2**20))
    space = (f" ({_mib(needed)} needed, " if needed else " (") + (f"{_mib(free)} left there)" if free is not None else
                                                                  "space left unknown)")
    if full:
        return RunError(f"no space left to write {path}{space}: free some space there, or {elsewhere}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return RunError(f"cannot write {path}: {error.strerror or error} (a read-only or someone else's folder): "
                        f"{elsewhere}")
    if code == errno.EIO:
        return RunError(f"cannot write {path}: input/output error (a failing disk, or a network file system that "
                        f"went away): check the disk, or {elsewhere}")
    reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:160]
    return RunError(f"cannot write {path}: {reason}")


def atomic_write(path: Path | str, write: Callable[[Path], None], needed: int | None = None,
                 elsewhere: str = WRITE_ELSEWHERE) -> None:
    """`write(tmp)` to a temporary name beside `path`, then rename: a kill mid-write leaves the previous file
    (or none) in place, never half of one, and no temporary file behind. A write that fails (a full disk, a
    read-only folder, an I/O error) is a one-line RunError (`write_failure`), with the previous file intact."""
    path = Path(path)
    tmp = _tmp(path)
    try:
        write(tmp)
        os.replace(tmp, path)
        return
    except (OSError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and not _is_torch_write_error(e):
            raise
        failure = e
    finally:
        with contextlib.suppress(OSError):  # on a disk that went away even this fails: the error below says so
            tmp.unlink(missing_ok=True)
    raise write_failure(path, failure, needed, elsewhere) from None  # after the unlink: the space really left


def _is_torch_write_error(error: RuntimeError) -> bool:
    text = str(error)
    return "inline_container" in text or "file write failed" in text or "iostream error" in text


def atomic_save(obj, path: Path | str) -> None:
    """torch.save, atomically (`atomic_write`), serialised in memory first: the write is then plain file I/O,
    whose errors keep their errno (torch's own writer turns a full disk into "unexpected pos"), and the message
    can say how many bytes it needed."""
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getbuffer()
    atomic_write(path, lambda tmp: tmp.write_bytes(data), needed=len(data))


def atomic_write_text(path: Path | str, text: str) -> None:
    data = text.encode("utf-8")
    atomic_write(path, lambda tmp: tmp.write_bytes(data), needed=len(data))


def save_figure(fig, path: Path | str, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (`atomic_write`) and close it, even when saving fails."""
    import matplotlib.pyplot as plt
    path = Path(path)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png"))
    finally:
        plt.close(fig)
    return path

"""What a trained model gets wrong: accuracy tables, confusions and the worst images, from ONE prediction pass.

fastai's `ClassificationInterpretation` runs `get_preds` again for every table it makes, and its confusion
matrix compares every prediction with every class pair: a classes x classes x N boolean tensor, 4e8 elements
for TinyImageNet's 200 classes x 10,000 val images. Here the val set is predicted once into `ValPredictions`
and every table and figure derives from those probabilities; the confusion matrix is one `bincount`.
`interpretation_from_predictions` hands the same pass to fastai's object for REPL users.

Losses are plain cross-entropy of the (possibly flip-averaged) probabilities, never the label-smoothed
training loss: a label-smoothed loss is not a measure of how wrong one prediction is, and it would differ
between a run trained with smoothing and one without.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.interpret import ClassificationInterpretation
from fastai.learner import Learner
from fastai.torch_core import noop
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure

from .calibration import calibration_summary
from .data import class_names, load_rgb
from .dataset import DatasetError
from .layout import (CONFUSION, CONFUSION_FULL, EVALUATION, MOST_CONFUSED, PER_CLASS, TOP_LOSSES, relocate,
                     atomic_write, atomic_write_text, save_figure)

__all__ = [
    "ValPredictions", "FlipInput", "predict_valid", "tta_accuracy", "evaluation_summary", "per_class_table", "confusion_matrix",
    "most_confused", "interpretation_from_predictions", "plot_top_losses", "plot_confusion",
    "plot_full_confusion", "evaluate", "interpret",
]


# ---------------------------------------------------------------------------------------------------------
# One prediction pass
# ---------------------------------------------------------------------------------------------------------
@dataclass
class ValPredictions:
    """The model's probabilities on every val image, with what is needed to name and show them.

    `losses` may be left out: they are then the cross-entropy of `probs` (`predict_valid` passes them in,
    computed in log space, so a confident mistake has a finite, exact loss rather than -log(0))."""
    probs: torch.Tensor                 # (N, C) float, rows sum to 1
    targets: torch.Tensor               # (N,) int64 class indices into vocab
    items: list                         # N val image paths, aligned with probs
    vocab: list[str]                    # C wnids
    names: list[str]                    # C human names aligned with vocab
    losses: torch.Tensor | None = None  # (N,) plain cross-entropy per image
    tta: bool = False

    def __post_init__(self):
        # plain tensors: fastai's TensorBase subclasses carry metadata and dispatch overhead we do not want
        self.probs = torch.as_tensor(self.probs).as_subclass(torch.Tensor).float()
        self.targets = torch.as_tensor(self.targets).as_subclass(torch.Tensor).long().flatten()
        n, c = self.probs.shape if self.probs.ndim == 2 else (None, None)
        if n is None or n != len(self.targets) or n != len(self.items):
            raise ValueError(f"probs {tuple(self.probs.shape)}, targets ({len(self.targets)},) and items "
                             f"({len(self.items)}) must describe the same N images")
        if c != len(self.vocab) or c != len(self.names):
            raise ValueError(f"probs have {c} classes but vocab has {len(self.vocab)} and names {len(self.names)}")
        if n and (self.targets.min() < 0 or self.targets.max() >= c):
            raise ValueError(f"targets must be class indices in [0, {c})")
        if self.losses is None:
            p = self.probs.gather(1, self.targets[:, None]).squeeze(1)
            self.losses = -p.clamp_min(torch.finfo(torch.float32).tiny).log()
        self.losses = torch.as_tensor(self.losses).as_subclass(torch.Tensor).float().flatten()

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def n_classes(self) -> int:
        return self.probs.shape[1]

    @cached_property
    def preds(self) -> torch.Tensor:
        return self.probs.argmax(1)

    @property
    def accuracy(self) -> float:
        return (self.preds == self.targets).float().mean().item()

    @property
    def top5(self) -> float:
        """Top-5 accuracy; top-C when there are fewer than 5 classes (as `tinyfast.learner.top5`)."""
        k = min(5, self.n_classes)
        return (self.probs.topk(k, dim=1).indices == self.targets[:, None]).any(1).float().mean().item()

    @property
    def loss(self) -> float:
        return self.losses.mean().item()


class FlipInput(Callback):
    """Mirror each input batch left-right before the model sees it: the second half of flip TTA, as a
    temporary `get_preds` callback. Deterministic, unlike fastai's `Learner.tta`, which re-applies the random
    training augmentation."""
    order = 0  # before FastDevice (autocast, channels_last), which then treats the flipped batch as usual

    def before_batch(self):
        self.learn.xb = (self.xb[0].flip(-1),) + tuple(self.xb[1:])


def predict_valid(learn: Learner, tta: bool = False, dl=None) -> ValPredictions:
    """Predict `learn.dls.valid` (or a labelled `dl`, e.g. `dls.test_dl(paths, with_labels=True)`) once.

    tta: also predict every image mirrored and average the two softmaxes (two passes, no randomness).
    Logits are gathered raw and turned into log-probabilities in fp32 here, whatever precision the model
    ran in, so losses stay finite and exact for confident mistakes."""
    dl = learn.dls.valid if dl is None else dl
    if len(dl.dataset) == 0:
        raise DatasetError("no validation images to predict")
    logits, targets = learn.get_preds(dl=dl, act=noop)[:2]
    if targets is None:
        raise ValueError("the DataLoader has no labels; build it with `dls.test_dl(items, with_labels=True)`")
    logp = F.log_softmax(logits.float(), dim=1)
    if tta:
        flipped = learn.get_preds(dl=dl, act=noop, cbs=[FlipInput()])[0]
        # log of the mean of the two softmaxes, in log space
        logp = torch.logsumexp(torch.stack([logp, F.log_softmax(flipped.float(), dim=1)]), dim=0) - math.log(2)
    targets = torch.as_tensor(targets).long().flatten()
    losses = -logp.gather(1, targets[:, None]).squeeze(1)
    return ValPredictions(probs=logp.exp(), targets=targets, items=list(dl.items), vocab=[str(v) for v in learn.dls.vocab],
                          names=class_names(learn.dls), losses=losses, tta=tta)


# ---------------------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------------------
def tta_accuracy(learn: Learner) -> dict:
    """Top-1 and top-5 of fastai's `tta` on the validation set: the mean of 4 augmented passes (the
    training split's transforms), blended with the plain pass (beta 0.25)."""
    from .learner import top5
    with learn.no_bar(), learn.no_logging():
        probs, targs = learn.tta(dl=learn.dls.valid)
    return {"accuracy": float((probs.argmax(1) == targs).float().mean()), "top5": float(top5(probs, targs))}


def evaluation_summary(p: ValPredictions) -> dict:
    """The headline numbers, JSON-ready."""
    return {"accuracy": p.accuracy, "top5": p.top5, "loss": p.loss, "n": len(p), "n_classes": p.n_classes,
            "errors": int((p.preds != p.targets).sum()), "tta": p.tta}


def confusion_matrix(p: ValPredictions) -> torch.Tensor:
    """C x C counts, rows actual, columns predicted: one bincount over `target * C + prediction`."""
    c = p.n_classes
    return torch.bincount(p.targets * c + p.preds, minlength=c * c).reshape(c, c)


def per_class_table(p: ValPredictions, cm: torch.Tensor | None = None) -> pd.DataFrame:
    """Accuracy per class, worst first (classes without val images last), with the class each one is most
    often mistaken for: the first place to look when a class does badly."""
    cm = confusion_matrix(p) if cm is None else cm
    support = cm.sum(1)
    correct = cm.diagonal()
    off = cm.clone().fill_diagonal_(-1)
    worst_count, worst = off.max(1)
    has_error = worst_count > 0
    df = pd.DataFrame({
        "wnid": p.vocab, "name": p.names,
        "accuracy": np.where(support.numpy() > 0, correct.numpy() / np.maximum(support.numpy(), 1), np.nan),
        "support": support.numpy(), "correct": correct.numpy(),
        "most_confused_with": [p.names[j] if e else "" for j, e in zip(worst.tolist(), has_error.tolist())],
        "confused_count": np.where(has_error.numpy(), worst_count.numpy(), 0),
    })
    return df.sort_values(["accuracy", "support"], ascending=[True, False], kind="stable",
                          na_position="last").reset_index(drop=True)


def most_confused(p: ValPredictions, min_val: int = 1, cm: torch.Tensor | None = None) -> pd.DataFrame:
    """fastai's `most_confused` (off-diagonal cells >= min_val, largest first, ties in row-major order) as a
    table with names."""
    if min_val < 1:
        raise ValueError(f"min_val must be >= 1, got {min_val}")
    cm = (confusion_matrix(p) if cm is None else cm).clone().fill_diagonal_(0).numpy()
    rows, cols = np.where(cm >= min_val)
    counts = cm[rows, cols]
    order = np.argsort(-counts, kind="stable")
    rows, cols, counts = rows[order], cols[order], counts[order]
    return pd.DataFrame({
        "actual_wnid": [p.vocab[i] for i in rows], "actual_name": [p.names[i] for i in rows],
        "predicted_wnid": [p.vocab[j] for j in cols], "predicted_name": [p.names[j] for j in cols],
        "count": counts.astype(np.int64),
    })


# ---------------------------------------------------------------------------------------------------------
# fastai's object, from the same pass
# ---------------------------------------------------------------------------------------------------------
class _PredictedInterpretation(ClassificationInterpretation):
    """fastai's ClassificationInterpretation whose confusion matrix comes from stored predictions, so that
    `confusion_matrix`, `most_confused` and `plot_confusion_matrix` neither re-predict nor build the
    C x C x N tensor. `top_losses`, `plot_top_losses`, `show_results` are fastai's own."""

    def __init__(self, learn: Learner, dl, p: ValPredictions):
        super().__init__(learn, dl, p.losses, act=None)
        self.predictions = p

    def confusion_matrix(self):
        return confusion_matrix(self.predictions).numpy()


def interpretation_from_predictions(learn: Learner, p: ValPredictions, dl=None) -> ClassificationInterpretation:
    """fastai's `ClassificationInterpretation` built from `p` instead of a new prediction pass.
    Its `losses` are `p.losses` (plain cross-entropy), so `top_losses()` ranks the images as our tables do.
    `dl` must be the DataLoader `p` was predicted from (default: the valid one)."""
    dl = learn.dls.valid if dl is None else dl
    if len(dl.dataset) != len(p):
        raise ValueError(f"the DataLoader has {len(dl.dataset)} items but the predictions cover {len(p)}")
    return _PredictedInterpretation(learn, dl, p)


# ---------------------------------------------------------------------------------------------------------
# Figures (returned, for the REPL; the file writers below save and close them)
# ---------------------------------------------------------------------------------------------------------
def _short(name: str, width: int = 24) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def plot_top_losses(p: ValPredictions, k: int = 16, root: Path | str | None = None, ncols: int = 4) -> Figure:
    """The k highest-loss images, each titled with the predicted class (red when wrong) and its probability,
    the actual class, and the loss. Images are drawn at their own resolution, blown up with nearest
    neighbour: at 64x64 any smoothing would blur exactly the detail one looks for.
    root: load the images from this dataset root instead of the recorded paths."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if len(p) == 0:
        raise ValueError("no predictions to plot")
    k = min(k, len(p))
    losses, idx = p.losses.topk(k)
    ncols = min(ncols, k)
    nrows = math.ceil(k / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.3 * ncols, 2.75 * nrows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i, loss in zip(axes.flat, idx.tolist(), losses.tolist()):
        pred, targ = int(p.preds[i]), int(p.targets[i])
        ax.imshow(load_rgb(relocate(p.items[i], root)), interpolation="nearest")
        ax.set_title(f"pred: {_short(p.names[pred])} ({p.probs[i, pred]:.2f})\n"
                     f"actual: {_short(p.names[targ])}\nloss {loss:.2f}  ·  {Path(p.items[i]).name}",
                     fontsize=8.5, color="firebrick" if pred != targ else "black", linespacing=1.3)
    fig.suptitle(f"Top {k} losses{' (flip TTA)' if p.tta else ''}: predicted class (its probability) / actual",
                 fontsize=11)
    fig.tight_layout()
    return fig


def confused_classes(p: ValPredictions, n_pairs: int = 10, cm: torch.Tensor | None = None) -> list[int]:
    """Class indices appearing in the `n_pairs` most confused (actual, predicted) pairs, in order of first
    appearance; ties broken as `most_confused` breaks them (row-major), so both name the same pairs."""
    if n_pairs < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    pairs = most_confused(p, cm=cm).head(n_pairs)
    index = {w: i for i, w in enumerate(p.vocab)}
    classes: list[int] = []
    for actual, predicted in zip(pairs["actual_wnid"], pairs["predicted_wnid"]):
        for c in (index[actual], index[predicted]):
            if c not in classes:
                classes.append(c)
    return classes


def plot_confusion(p: ValPredictions, n_pairs: int = 10) -> Figure:
    """The confusion matrix cut down to the classes in the `n_pairs` most confused pairs, labelled with names
    and counts. Confusions are coloured on their own scale; the diagonal (correct) is shown in grey so that it
    does not wash the mistakes out."""
    cm = confusion_matrix(p)
    classes = confused_classes(p, n_pairs, cm)
    if not classes:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, f"no confusions: all {len(p)} images classified correctly", ha="center", va="center")
        return fig
    sub = cm[classes][:, classes].numpy()
    m = len(classes)
    off = np.ma.masked_array(sub, mask=np.eye(m, dtype=bool))
    side = max(4.5, 0.45 * m + 3.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    ax.imshow(np.where(np.eye(m, dtype=bool), 1.0, np.nan), cmap="Greys", vmin=0, vmax=5, interpolation="nearest")
    im = ax.imshow(off, cmap="Reds", vmin=0, vmax=max(1, off.max()), interpolation="nearest")
    vmax = max(1, off.max())
    fs = 9 if m <= 12 else 7
    for r in range(m):
        for c in range(m):
            v = sub[r, c]
            if v == 0 and r != c:
                continue
            dark = r != c and v > 0.6 * vmax
            ax.text(c, r, str(v), ha="center", va="center", fontsize=fs, color="white" if dark else "black",
                    fontweight="bold" if r != c else "normal")
    labels = [_short(p.names[c], 26) for c in classes]
    ax.set_xticks(range(m), labels, rotation=50, ha="right", rotation_mode="anchor", fontsize=fs)
    ax.set_yticks(range(m), labels, fontsize=fs)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_xticks(np.arange(m + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(m + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="images (off-diagonal)")
    ax.set_title(f"The {n_pairs} most confused pairs ({m} classes; diagonal = correct, grey)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_full_confusion(p: ValPredictions) -> Figure:
    """Every class against every class, each row divided by its support, without labels (200 would be
    unreadable): structure shows as off-diagonal blocks of related classes. A square-root colour scale keeps
    rare confusions visible next to a diagonal near 1."""
    cm = confusion_matrix(p).double()
    rows = cm / cm.sum(1, keepdim=True).clamp_min(1)
    fig, ax = plt.subplots(figsize=(8.4, 7.4))
    im = ax.imshow(rows.numpy(), cmap="Blues", norm=PowerNorm(0.5, vmin=0, vmax=1), interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("predicted class (vocab order)")
    ax.set_ylabel("actual class (vocab order)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the actual class (sqrt scale)")
    ax.set_title(f"Confusion matrix, {p.n_classes} classes, {len(p)} images, accuracy {p.accuracy:.1%}", fontsize=11)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------
# File writers (the CLI commands)
# ---------------------------------------------------------------------------------------------------------
def _out_dir(out: Path | str) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is a file")
    out.mkdir(parents=True, exist_ok=True)
    return out


def evaluate(learn: Learner | None, out: Path | str, tta: bool = False, temperature: bool = False,
             p: ValPredictions | None = None) -> dict:
    """Write `evaluation.json` (the summary, plus calibration: ECE, NLL and, with `temperature`, the fitted
    temperature) and `per_class.csv`, and return the summary. Prints nothing: the CLI does.
    p: predictions already made (skips the prediction pass; `learn` is then not used)."""
    out_dir = _out_dir(out)
    p = predict_valid(learn, tta=tta) if p is None else p
    summary = evaluation_summary(p)
    calibration = calibration_summary(p.probs, p.targets, out=out_dir, temperature=temperature)
    summary.update({k: v for k, v in calibration.items() if k not in summary})  # "n" is in both
    table = per_class_table(p)
    atomic_write(out_dir / PER_CLASS, lambda tmp: table.to_csv(tmp, index=False))
    atomic_write_text(out_dir / EVALUATION, json.dumps(summary, indent=2, default=_json_default) + "\n")
    return summary


def _json_default(o):
    if isinstance(o, (np.generic, torch.Tensor)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def interpret(learn: Learner | None, out: Path | str, top_losses: int = 16, pairs: int = 10, tta: bool = False,
              root: Path | str | None = None, p: ValPredictions | None = None) -> dict:
    """One prediction pass, then `top_losses.png` (the `top_losses` worst images), `confusion.png` (the classes of
    the `pairs` most confused pairs), `confusion_full.png` and `most_confused.csv`. Returns the summary and
    the paths written. root: where the images are now, if the data moved since `learn` was built.
    p: predictions already made (skips the prediction pass; `learn` is then not used)."""
    out_dir = _out_dir(out)
    p = predict_valid(learn, tta=tta) if p is None else p
    cm = confusion_matrix(p)
    paths = {
        "top_losses": save_figure(plot_top_losses(p, k=top_losses, root=root), out_dir / TOP_LOSSES),
        "confusion": save_figure(plot_confusion(p, n_pairs=pairs), out_dir / CONFUSION),
        "confusion_full": save_figure(plot_full_confusion(p), out_dir / CONFUSION_FULL),
    }
    confused = most_confused(p, cm=cm)
    atomic_write(out_dir / MOST_CONFUSED, lambda tmp: confused.to_csv(tmp, index=False))
    paths["most_confused"] = out_dir / MOST_CONFUSED
    return {**evaluation_summary(p), "paths": {k: str(v) for k, v in paths.items()},
            "most_confused": confused.head(pairs).to_dict("records")}

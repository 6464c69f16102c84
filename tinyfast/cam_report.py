"""What a user sees of the class activation maps: a grid of val images with their maps, a score of how well
the maps find the annotated object, and the files `python main.py gradcam` writes. All of it is built on the
adapter over pytorch-grad-cam, `tinyfast.cam`.

TinyImageNet ships a box round the object of every val image, so a CAM can be scored, not only looked at
(`localisation_score`): the pointing game (is the CAM's peak inside the box?) and the share of the CAM's
energy inside the box, each next to the score a map with no idea where the object is would get.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import cv2
import matplotlib.pyplot as plt
import numpy as np
import torch
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastprogress.fastprogress import progress_bar
from matplotlib.figure import Figure
from PIL import Image
from torch import nn

from .cam import CAM_METHODS, cam_class, cam_overlay, compute_cams, denormalise, resolve_layer
from .data import check_images, class_names
from .dataset import DatasetError, read_val_annotations
from .layout import GRADCAM_JSON, atomic_write_text, dataset_box, dataset_label, gradcam_figure_name, save_figure
from .predict import inputs_and_probs, model_inputs

__all__ = ["gradcam_grid", "localisation_score", "gradcam", "box_in_input"]


# ---------------------------------------------------------------------------------------------------------
# The annotated boxes
# ---------------------------------------------------------------------------------------------------------
def _val_annotations(root: Path | None) -> dict:
    try:
        return read_val_annotations(root) if root is not None else {}
    except DatasetError:
        return {}


def box_in_input(path: Path, box, input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """An annotation box (inclusive pixels of the original image) in the model input's pixels: the input is
    the image squished to `input_hw`, and an input pixel is in the box when its centre is."""
    with Image.open(path) as im:
        w0, h0 = im.size
    h, w = input_hw
    sx, sy = w / w0, h / h0
    x0, y0, x1, y1 = box
    # input pixel j covers [j, j+1) and is inside when x0*sx <= j + 0.5 < (x1+1)*sx
    jx0, jy0 = int(np.ceil(x0 * sx - 0.5)), int(np.ceil(y0 * sy - 0.5))
    jx1, jy1 = int(np.ceil((x1 + 1) * sx - 0.5)) - 1, int(np.ceil((y1 + 1) * sy - 0.5)) - 1
    jx0, jy0 = min(max(jx0, 0), w - 1), min(max(jy0, 0), h - 1)
    return jx0, jy0, max(jx0, min(jx1, w - 1)), max(jy0, min(jy1, h - 1))


# ---------------------------------------------------------------------------------------------------------
# The grid
# ---------------------------------------------------------------------------------------------------------
def _pick(correct: np.ndarray, losses: np.ndarray, n: int) -> list[int]:
    """Half right, half wrong when there are enough of each: the most confident mistakes (fastai's
    top-losses idea: the instructive ones) and an even spread of the right ones."""
    right, wrong = np.flatnonzero(correct), np.flatnonzero(~correct)
    n_wrong = min(len(wrong), max(n - len(right), n // 2))
    n_right = min(len(right), n - n_wrong)
    wrong = wrong[np.argsort(-losses[wrong], kind="stable")][:n_wrong]
    right = right[np.linspace(0, len(right) - 1, n_right).round().astype(int)] if n_right else right[:0]
    return right.tolist() + wrong.tolist()


def gradcam_grid(learn: Learner, n: int = 16, method: str = "gradcam", layer: str | nn.Module | None = None,
                 images: Sequence[Path | str] | None = None) -> Figure:
    """A figure of `n` images, each shown plain and with the CAM of its *predicted* class over it, titled
    with the true class (when known), the prediction and its probability; green when right, red when wrong,
    the annotated box in white where there is one.

    Without `images`: val images (among the first 50 * n), half predicted right and half wrong where
    possible (the most confident mistakes, an even spread of the right ones). With `images`: those files,
    in order (up to `n`)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    images = images or None  # an empty list (a CLI option not given) means the val images
    cam_class(method)
    layer_name, _ = resolve_layer(learn.model, layer)
    names = class_names(learn.dls)
    root = getattr(learn.dls, "root", None)
    annotations = _val_annotations(root)
    if images is None:
        # the first 50 per image shown are plenty to find mistakes in, and spare a pass over all 10,000
        paths = [Path(p) for p in learn.dls.valid_ds.items][:50 * n]
        if not paths:
            raise DatasetError("the learner has no validation images to show")
        probs, targs = learn.get_preds(dl=learn.dls.test_dl(paths, with_labels=True))
        targs = targs.as_subclass(torch.Tensor).numpy()
        correct = probs.argmax(1).numpy() == targs
        losses = -np.log(probs[np.arange(len(probs)), targs].numpy().clip(1e-12))
        idx = _pick(correct, losses, n)
        paths, probs, labels = [paths[i] for i in idx], probs[idx], [int(targs[i]) for i in idx]
    else:
        paths = check_images(images)[:n]
        vocab = list(learn.dls.vocab)
        labels = [vocab.index(w) if (w := dataset_label(p, root, annotations)) in vocab else None for p in paths]
    x, probs = inputs_and_probs(learn, paths) if images is not None else (model_inputs(learn, paths), probs)
    preds = probs.argmax(1).numpy()
    cams = compute_cams(learn, x, targets=preds, method=method, layer=layer)
    rgb = denormalise(x)

    cols = min(4, len(paths))
    rows = int(np.ceil(len(paths) / cols))
    fig, axes = plt.subplots(rows, 2 * cols, figsize=(2 * cols * 1.9, rows * 2.5 + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (path, image, cam, pred, label) in enumerate(zip(paths, rgb, cams, preds, labels)):
        a_img, a_cam = axes[k // cols, 2 * (k % cols)], axes[k // cols, 2 * (k % cols) + 1]
        box = dataset_box(path, root, annotations)
        box = box_in_input(path, box, image.shape[:2]) if box is not None else None
        overlay = cam_overlay(image, cam, min_side=128, box=box)
        a_img.imshow(cv2.resize(image, overlay.shape[1::-1], interpolation=cv2.INTER_NEAREST))
        a_cam.imshow(overlay)
        p = float(probs[k, pred])
        title = f"pred: {names[pred][:28]} ({p:.2f})"
        colour = "black"
        if label is not None:
            title = f"true: {names[label][:28]}\n{title}"
            colour = "tab:green" if label == pred else "tab:red"
        else:
            title = f"{path.name[:28]}\n{title}"
        a_img.set_title(title, fontsize=9, color=colour, loc="left", x=0.0)
    fig.suptitle(f"{method} on {layer_name}, for the predicted class"
                 + ("  (green: right, red: wrong; white box: the annotated object)" if images is None else ""),
                 fontsize=10)
    fig.tight_layout(h_pad=1.0)
    return fig


# ---------------------------------------------------------------------------------------------------------
# Scoring
# ---------------------------------------------------------------------------------------------------------
def localisation_score(learn: Learner, method: str = "gradcam", limit: int | None = None,
                       layer: str | nn.Module | None = None, batch_size: int = 64, align: bool = True) -> dict:
    """How well the CAMs of the val images find the annotated object, for the TRUE class of each image (the
    question is whether the evidence for the labelled object sits on the object, right or wrong as the
    prediction may be).

    pointing_game: share of images whose CAM peak lies inside the box; energy_in_box: mean share of the
    CAM's mass inside the box (the CAM as `compute_cams` returns it: ReLU, aligned, min-max scaled).
    A map with no idea where the object is scores the box's share of the image on both, on average:
    `box_area_fraction` (= `pointing_baseline`) is that mean. An all-zero CAM (no positive evidence
    anywhere) is counted as such a uniform map, and `n_empty` says how many there were. Boxes are in the
    original image's pixels and are scaled to the model's input size."""
    cam_class(method)
    layer_name, _ = resolve_layer(learn.model, layer)
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    root = getattr(learn.dls, "root", None)
    if root is None:
        raise DatasetError("the learner's DataLoaders have no dataset root (dls.root): the val boxes are needed")
    annotations = read_val_annotations(root)
    vocab = list(learn.dls.vocab)
    paths = [Path(p) for p in learn.dls.valid_ds.items][:limit]
    if not paths:
        raise DatasetError("the learner has no validation images to score")
    hits, energies, areas, empty = [], [], [], 0
    chunks = range(0, len(paths), batch_size)
    shown = any(isinstance(cb, ProgressCallback) for cb in learn.cbs)   # not inside `learn.no_bar()` (--quiet)
    for i in progress_bar(chunks, leave=False) if shown else chunks:
        chunk = paths[i:i + batch_size]
        x = model_inputs(learn, chunk, bs=batch_size)
        targets = [vocab.index(annotations[p.name][0]) for p in chunk]
        cams = compute_cams(learn, x, targets=targets, method=method, layer=layer, batch_size=batch_size,
                            align=align)
        for path, cam in zip(chunk, cams):
            x0, y0, x1, y1 = box_in_input(path, annotations[path.name][1], cam.shape)
            inside = np.zeros(cam.shape, bool)
            inside[y0:y1 + 1, x0:x1 + 1] = True
            area = inside.mean()
            total = float(cam.sum())
            if total <= 0:
                empty += 1
                hits.append(area)
                energies.append(area)
            else:
                hits.append(float(inside.flat[int(cam.argmax())]))
                energies.append(float(cam[inside].sum()) / total)
            areas.append(area)
    area = float(np.mean(areas))
    return {"method": method, "layer": layer_name, "target": "true class", "aligned": align, "n": len(paths),
            "pointing_game": float(np.mean(hits)), "energy_in_box": float(np.mean(energies)),
            "box_area_fraction": area, "pointing_baseline": area, "n_empty": empty}


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def gradcam(learn: Learner, out: Path | str, n: int = 16, methods: Sequence[str] | str = ("gradcam",),
            layer: str | None = None, images: Sequence[Path | str] | None = None, score: bool = False,
            limit: int | None = None) -> dict:
    """Write `gradcam.png` (the first method's grid), `gradcam_<method>.png` for the others ("gradcam++" ->
    `gradcam_gradcampp.png`), and with `score` the localisation scores of every method to `gradcam.json`.
    Returns {"figures": {method: path}, "scores": {method: score dict} (with `score`), "json": path or None}."""
    methods = [methods] if isinstance(methods, str) else list(methods)
    if not methods:
        raise ValueError(f"give at least one CAM method; choose from: {', '.join(CAM_METHODS)}")
    for m in methods:  # every argument checked before the first (slow) figure
        cam_class(m)
    resolve_layer(learn.model, layer)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"figures": {}, "scores": {}, "json": None}
    for k, m in enumerate(dict.fromkeys(methods)):
        path = save_figure(gradcam_grid(learn, n=n, method=m, layer=layer, images=images),
                           out / gradcam_figure_name(m, first=k == 0))
        result["figures"][m] = path
        if score:
            result["scores"][m] = localisation_score(learn, method=m, limit=limit, layer=layer)
    if score:
        result["json"] = out / GRADCAM_JSON
        atomic_write_text(result["json"], json.dumps(result["scores"], indent=2) + "\n")
    return result

"""Predict any image file with a trained Learner, and show where the model looked.

Nothing here re-implements preprocessing: the Learner's own test pipeline (`dls.test_dl`) reads the file
with `load_rgb` (grayscale, palette, RGBA, CMYK all become RGB), squishes it to the training size with the
item transform `Resize(size, method="squish")` and normalises it on the device, exactly as for the val set.
What this module adds is the checking of the files up front, so that a bad path fails in one line naming
it, before any model work, and a readable result (wnid, human name, probability).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from fastai.learner import Learner

from .cam import cam_class, cam_overlay, compute_cams, resolve_layer
from .data import check_images, class_names, load_rgb

__all__ = ["predict_images", "cam_overlays", "save_cam_overlays", "model_inputs", "inputs_and_probs"]


def model_inputs(learn: Learner, paths: Sequence[Path], bs: int = 64) -> torch.Tensor:
    """The model inputs for `paths` through the Learner's own test pipeline (resize, normalise), in order."""
    dl = learn.dls.test_dl(list(paths), bs=bs)
    return torch.cat([b[0].as_subclass(torch.Tensor).cpu() for b in dl]) if len(paths) else torch.zeros(0, 3, 1, 1)


def inputs_and_probs(learn: Learner, paths: Sequence[Path]) -> tuple[torch.Tensor, torch.Tensor]:
    """The model inputs for `paths` (as `model_inputs`) and the class probabilities, from one pass of `get_preds`."""
    x, probs, _ = learn.get_preds(dl=learn.dls.test_dl(list(paths)), with_input=True)
    return x.as_subclass(torch.Tensor).contiguous(), probs.float()


def predict_images(learn: Learner, paths: Sequence[Path | str] | Path | str, topk: int = 5) -> list[dict]:
    """For each image, {"path": str, "top": [(wnid, name, probability), ...]}: the `topk` most probable
    classes, most probable first (`topk` is capped at the number of classes)."""
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    paths = check_images(paths)
    vocab, names = list(learn.dls.vocab), class_names(learn.dls)
    _, probs = inputs_and_probs(learn, paths)
    values, idx = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [{"path": str(p), "top": [(vocab[i], names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]}
            for p, vs, ix in zip(paths, values, idx)]


def cam_overlays(learn: Learner, paths: Sequence[Path | str] | Path | str, method: str = "gradcam",
                 layer: str | None = None) -> list[tuple[np.ndarray, int, float]]:
    """For each image, (overlay, class, probability): the CAM of its top-1 class over the image itself (the
    CAM is computed on the squished model input and stretched back to the image's own shape; small images
    enlarged to >= 256 px, big ones shrunk to <= 1024 px)."""
    cam_class(method)  # a bad method or layer fails before any model work
    resolve_layer(learn.model, layer)
    paths = check_images(paths)
    x, probs = inputs_and_probs(learn, paths)
    top = probs.argmax(1).numpy()
    cams = compute_cams(learn, x, targets=top, method=method, layer=layer)
    return [(cam_overlay(load_rgb(path), cam), int(k), float(p[k])) for path, cam, k, p in zip(paths, cams, top, probs)]


def save_cam_overlays(learn: Learner, paths: Sequence[Path | str] | Path | str, method: str = "gradcam",
                      layer: str | None = None) -> list[Path]:
    """Save `<image stem>_cam.png` next to each image: its `cam_overlays` picture, captioned with the
    prediction. Returns the files written, in the order of `paths`."""
    paths = check_images(paths)
    names = class_names(learn.dls)
    written = []
    for path, (overlay, k, p) in zip(paths, cam_overlays(learn, paths, method, layer)):
        overlay = _caption(overlay, f"{names[k]} ({p:.2f}), {method}")
        out = path.with_name(f"{path.stem}_cam.png")
        if not cv2.imwrite(str(out), cv2.cvtColor(overlay, cv2.COLOR_RGB2BGR)):
            raise OSError(f"could not write {out}")
        written.append(out)
    return written


def _caption(image: np.ndarray, text: str) -> np.ndarray:
    """`text` on a black strip under the image (shrunk until it fits the width)."""
    h, w = image.shape[:2]
    font, scale, thick = cv2.FONT_HERSHEY_SIMPLEX, 0.6, 1
    while scale > 0.3 and cv2.getTextSize(text, font, scale, thick)[0][0] > w - 10:
        scale -= 0.05
    (tw, th), base = cv2.getTextSize(text, font, scale, thick)
    strip = np.zeros((th + base + 12, w, 3), np.uint8)
    cv2.putText(strip, text, (5, th + 6), font, scale, (255, 255, 255), thick, cv2.LINE_AA)
    return np.vstack([image, strip])

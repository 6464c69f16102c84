"""A small, learnable stand-in for TinyImageNet, written in the official on-disk layout.

Why this exists: the real dataset is 250 MB and cannot be downloaded in tests or CI, yet the
loader, the training loop and the Grad-CAM checks must all run against the *exact* file layout
and annotation formats of the real thing.  This module draws one coloured shape per image on a
noisy, textured background and writes::

    tiny-imagenet-200/
        wnids.txt                                 one wnid per line
        words.txt                                 "wnid<TAB>human name", a superset of wnids
        train/<wnid>/images/<wnid>_<i>.JPEG
        train/<wnid>/<wnid>_boxes.txt             "<wnid>_<i>.JPEG<TAB>x0<TAB>y0<TAB>x1<TAB>y1"
        val/images/val_<i>.JPEG                   classes interleaved, like the real val set
        val/val_annotations.txt                   "val_<i>.JPEG<TAB>wnid<TAB>x0<TAB>y0<TAB>x1<TAB>y1"
        test/images/test_<i>.JPEG                 no labels

Design choices that the rest of the project relies on:

* A class is a (shape, colour[, texture]) triple, and the drawn object is the *only* class
  evidence: the background noise and the distractor lines/blobs are drawn from the same
  distribution for every class.  Hence a classifier must look inside the object box, which is
  what the Grad-CAM localisation checks measure.
* Boxes are inclusive pixel coordinates ``(x0, y0, x1, y1)`` of every pixel the object touches,
  like the real annotations.
* Each image is rendered from its own random generator, seeded by ``(seed, split, index)``
  (:func:`sample_rng`), so any single image can be re-rendered exactly, e.g. with the object
  left out (:func:`render_sample` with ``draw_object=False``) to test where the evidence lies.
* A few images are saved as single-channel ("L") JPEGs, as ~1.7% of the real ones are, so the
  loaders' RGB conversion gets exercised.

The module imports only numpy and OpenCV so that tests and the ``demo`` command stay cheap.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from .dataset import ROOT_NAME

__all__ = [
    "ROOT_NAME",
    "SHAPES",
    "COLOURS",
    "TEXTURES",
    "MAX_CLASSES",
    "Box",
    "ClassSpec",
    "class_spec",
    "class_wnid",
    "class_name",
    "sample_rng",
    "render_sample",
    "make_tiny_imagenet",
]

JPEG_QUALITY = 90

# Shapes are drawn to fill the object's box.  The most dissimilar come first, so that the small
# fixtures (the first 2-3 shapes) are learnable from a few dozen images per class.
SHAPES: tuple[str, ...] = ("circle", "cross", "triangle", "square", "ring", "star", "bars", "diamond")

# Saturated colours, clearly apart from the desaturated background (RGB).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 180, 45),
    "blue": (35, 65, 230),
    "yellow": (240, 220, 30),
    "magenta": (210, 40, 210),
    "cyan": (30, 210, 220),
    "orange": (250, 135, 20),
    "white": (248, 248, 248),
}

# Textures only come into play beyond len(SHAPES) * len(COLOURS) classes.
TEXTURES: tuple[str, ...] = ("solid", "striped", "checkered", "hatched")

# class_spec() fills the shape x colour grid in growing squares, which needs a square grid.
assert len(SHAPES) == len(COLOURS)

MAX_CLASSES = len(SHAPES) * len(COLOURS) * len(TEXTURES)  # 256 >= the real 200

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

# A few real, unrelated ImageNet lines so that words.txt is a strict superset of wnids.txt
# (the real file covers all 82k ImageNet synsets) and parsers meet commas in names.
_EXTRA_WORDS: tuple[tuple[str, str], ...] = (
    ("n00001740", "entity"),
    ("n00001930", "physical entity"),
    ("n00002137", "abstraction, abstract entity"),
    ("n00004258", "living thing, animate thing"),
    ("n00021939", "artifact, artefact"),
)


# --------------------------------------------------------------------------------------------
# Classes
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassSpec:
    """What makes a class: the shape drawn, its colour and its surface texture."""

    shape: str
    colour: str
    texture: str


def class_spec(label: int) -> ClassSpec:
    """Map a class index to a distinct (shape, colour, texture).

    The shape x colour grid is filled in growing squares: classes 0-3 are the 2x2 block
    {circle, cross} x {red, green}, classes 0-8 the 3x3 block, and so on.  So even with a few
    classes neither colour alone nor shape alone identifies the class, and the image's mean
    colour is a poor shortcut: a model has to find the object and read both its shape and its
    colour.  Textures come in once all 64 shape x colour pairs are used.
    """
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"class index {label} outside [0, {MAX_CLASSES})")
    n_cells = len(SHAPES) * len(COLOURS)
    texture, cell = divmod(label, n_cells)
    shell = math.isqrt(cell)  # cells shell**2 .. (shell+1)**2 - 1 complete a (shell+1)^2 block
    offset = cell - shell * shell
    if offset < shell:
        shape, colour = offset, shell  # the new colour's column, on the shapes seen so far
    else:
        shape, colour = shell, offset - shell  # the new shape's row, on all colours so far
    return ClassSpec(SHAPES[shape], list(COLOURS)[colour], TEXTURES[texture])


def class_wnid(label: int) -> str:
    """A real-looking, distinct wnid ("n" + 8 digits) for a class, increasing with the index.

    Increasing wnids mean sorted-wnid order (what fastai's vocab uses) equals class-index order.
    """
    if not 0 <= label < MAX_CLASSES:
        raise ValueError(f"class index {label} outside [0, {MAX_CLASSES})")
    return f"n0{1_000_000 + 30_011 * label:07d}"


def class_name(label: int) -> str:
    """Human name written to words.txt, e.g. "red circle" or "striped blue square"."""
    spec = class_spec(label)
    texture = "" if spec.texture == "solid" else f"{spec.texture} "
    return f"{texture}{spec.colour} {spec.shape}"


# --------------------------------------------------------------------------------------------
# Rendering one image
# --------------------------------------------------------------------------------------------

Box = tuple[int, int, int, int]
"""Inclusive pixel coordinates (x0, y0, x1, y1)."""

_SHIFT = 4  # cv2 sub-pixel precision: coordinates are passed as fixed point with 4 fraction bits
_ONE = 1 << _SHIFT


def _star(points: int = 5, outer: float = 0.5, inner: float = 0.2) -> list[tuple[float, float]]:
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, outer, inner)
    return [(0.5 + r * np.cos(a), 0.55 + r * np.sin(a)) for r, a in zip(radii, angles)]


# Polygons in the unit square (x right, y down).  Circle and ring are drawn as ellipses.
_POLYGONS: dict[str, list[list[tuple[float, float]]]] = {
    "square": [[(0, 0), (1, 0), (1, 1), (0, 1)]],
    "triangle": [[(0.5, 0), (1, 1), (0, 1)]],
    "cross": [[(0.34, 0), (0.66, 0), (0.66, 1), (0.34, 1)], [(0, 0.34), (1, 0.34), (1, 0.66), (0, 0.66)]],
    "diamond": [[(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)]],
    "bars": [[(0, y0), (1, y0), (1, y0 + 0.22), (0, y0 + 0.22)] for y0 in (0.0, 0.39, 0.78)],
    "star": [_star()],
}


def _draw_shape_mask(shape: str, size: int, x: float, y: float, w: float, h: float) -> np.ndarray:
    """Anti-aliased uint8 mask (0..255) of `shape` fitted to the box at (x, y) of size w x h."""
    mask = np.zeros((size, size), np.uint8)
    if shape in ("circle", "ring"):
        centre = (round((x + w / 2) * _ONE), round((y + h / 2) * _ONE))
        axes = (round(w / 2 * _ONE), round(h / 2 * _ONE))
        cv2.ellipse(mask, centre, axes, 0, 0, 360, 255, -1, cv2.LINE_AA, _SHIFT)
        if shape == "ring":
            inner = (round(w * 0.27 * _ONE), round(h * 0.27 * _ONE))
            cv2.ellipse(mask, centre, inner, 0, 0, 360, 0, -1, cv2.LINE_AA, _SHIFT)
        return mask
    polygons = [
        np.round((np.array(poly) * (w, h) + (x, y)) * _ONE).astype(np.int32) for poly in _POLYGONS[shape]
    ]
    for polygon in polygons:  # one call each: a single call would XOR their overlap (cross)
        cv2.fillPoly(mask, [polygon], 255, cv2.LINE_AA, _SHIFT)
    return mask


def _texture_factor(texture: str, size: int) -> np.ndarray | float:
    """Brightness multiplier over the image grid (periods of 4-6 px survive JPEG quality 90)."""
    if texture == "solid":
        return 1.0
    yy, xx = np.indices((size, size))
    on = {
        "striped": (xx // 2) % 2 == 0,
        "checkered": ((xx // 3) + (yy // 3)) % 2 == 0,
        "hatched": ((xx + yy) // 2) % 2 == 0,
    }[texture]
    return np.where(on, np.float32(1), np.float32(0.4))


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Class-independent clutter: smooth, muted colour noise plus distractor lines and blobs.

    The muted colours keep the object visible; the random distractors (any colour, palette
    ones included) stop a model from using "a bright red pixel anywhere" as the red-class cue.
    """
    cells = int(rng.integers(2, 6))
    coarse = rng.uniform(30, 225, (cells, cells, 3)).astype(np.float32)
    coarse = 0.5 * coarse + 0.5 * coarse.mean(axis=2, keepdims=True)  # desaturate
    bg = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
    bg = np.ascontiguousarray(np.clip(bg, 0, 255).astype(np.uint8))

    for _ in range(int(rng.integers(1, 4))):
        p0 = tuple(int(v) for v in rng.integers(0, size, 2))
        p1 = tuple(int(v) for v in rng.integers(0, size, 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.line(bg, p0, p1, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    for _ in range(int(rng.integers(0, 3))):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(1, max(2, size // 12), 2))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        cv2.ellipse(bg, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1, cv2.LINE_AA)
    return bg


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator that renders image `index` of `split` (train index = label * n_train + i).

    One generator per image makes every image reproducible on its own from (seed, split, index),
    e.g. to re-render it without its object, without replaying the images before it.
    """
    return np.random.default_rng((seed, _SPLIT_CODES[split], index))


def render_sample(
    label: int, size: int, rng: np.random.Generator, draw_object: bool = True
) -> tuple[np.ndarray, Box, np.ndarray]:
    """Render one RGB uint8 image of class `label`; return (image, box, object mask in 0..255).

    With ``draw_object=False`` the same random draws are consumed but the object is not pasted,
    giving the exact background of the image: the two differ only inside the mask, which lies
    inside the box.
    """
    spec = class_spec(label)
    bg = _background(rng, size).astype(np.float32)

    side = rng.uniform(0.3, 0.6) * size
    aspect = np.exp(rng.uniform(-0.15, 0.15))
    w, h = min(side * aspect, size - 1.0), min(side / aspect, size - 1.0)
    x, y = rng.uniform(0, size - 1 - w), rng.uniform(0, size - 1 - h)
    mask = _draw_shape_mask(spec.shape, size, x, y, w, h)

    colour = np.clip(np.array(COLOURS[spec.colour]) + rng.normal(0, 12, 3), 0, 255).astype(np.float32)
    factor = _texture_factor(spec.texture, size)
    factor = factor[..., None] if isinstance(factor, np.ndarray) else factor
    sensor_noise = 6 * rng.standard_normal((size, size, 3), dtype=np.float32)

    image = bg
    if draw_object:
        alpha = mask[..., None].astype(np.float32) / np.float32(255)
        image = bg * (1 - alpha) + (colour * factor) * alpha  # float32 throughout: equals bg off the mask
    image = np.clip(image + sensor_noise, 0, 255).astype(np.uint8)

    ys, xs = np.nonzero(mask)
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    return image, box, mask


# --------------------------------------------------------------------------------------------
# Writing the dataset
# --------------------------------------------------------------------------------------------

def _grayscale_indices(seed: int, split: str, n_images: int, fraction: float) -> set[int]:
    """Which images of a split are saved as "L" JPEGs: at least one whenever fraction > 0 and
    the split has two images or more (so that both modes occur)."""
    if fraction <= 0 or n_images < 2:
        return set()
    count = min(n_images - 1, max(1, round(fraction * n_images)))
    rng = np.random.default_rng((seed, _SPLIT_CODES[split], 2**32))  # apart from image streams
    return set(rng.choice(n_images, size=count, replace=False).tolist())


def _interleaved_labels(seed: int, split: str, n_classes: int, per_class: int) -> np.ndarray:
    """Labels of the val/test images: `per_class` of each class, shuffled like the real val set."""
    labels = np.repeat(np.arange(n_classes), per_class)
    return np.random.default_rng((seed, _SPLIT_CODES[split], 2**32 + 1)).permutation(labels)


def _save_jpeg(path: Path, image: np.ndarray, grayscale: bool) -> None:
    if grayscale:
        pixels = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)  # single-channel JPEG -> PIL mode "L"
    else:
        pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), pixels, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
        raise OSError(f"could not write {path}")


def _fmt_box(box: Box) -> str:
    return "\t".join(str(v) for v in box)


def _write_dataset(
    root: Path, n_classes: int, n_train: int, n_val: int, n_test: int,
    size: int, grayscale_fraction: float, seed: int,
) -> None:
    wnids = [class_wnid(k) for k in range(n_classes)]
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = sorted([(w, class_name(k)) for k, w in enumerate(wnids)] + list(_EXTRA_WORDS))
    (root / "words.txt").write_text("".join(f"{w}\t{name}\n" for w, name in words))

    gray = _grayscale_indices(seed, "train", n_classes * n_train, grayscale_fraction)
    for label, wnid in enumerate(wnids):
        images_dir = root / "train" / wnid / "images"
        images_dir.mkdir(parents=True)
        lines = []
        for i in range(n_train):
            index = label * n_train + i
            image, box, _ = render_sample(label, size, sample_rng(seed, "train", index))
            name = f"{wnid}_{i}.JPEG"
            _save_jpeg(images_dir / name, image, index in gray)
            lines.append(f"{name}\t{_fmt_box(box)}\n")
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("".join(lines))

    val_labels = _interleaved_labels(seed, "val", n_classes, n_val)
    gray = _grayscale_indices(seed, "val", len(val_labels), grayscale_fraction)
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, label in enumerate(val_labels.tolist()):
        image, box, _ = render_sample(label, size, sample_rng(seed, "val", i))
        name = f"val_{i}.JPEG"
        _save_jpeg(root / "val" / "images" / name, image, i in gray)
        lines.append(f"{name}\t{wnids[label]}\t{_fmt_box(box)}\n")
    (root / "val" / "val_annotations.txt").write_text("".join(lines))

    test_labels = _interleaved_labels(seed, "test", n_classes, n_test)
    gray = _grayscale_indices(seed, "test", len(test_labels), grayscale_fraction)
    (root / "test" / "images").mkdir(parents=True)
    for i, label in enumerate(test_labels.tolist()):
        image, _, _ = render_sample(label, size, sample_rng(seed, "test", i))
        _save_jpeg(root / "test" / "images" / f"test_{i}.JPEG", image, i in gray)


def make_tiny_imagenet(
    dest: str | os.PathLike[str],
    n_classes: int = 10,
    n_train: int = 100,
    n_val: int = 20,
    n_test: int = 10,
    size: int = 64,
    grayscale_fraction: float = 0.05,
    seed: int = 0,
) -> Path:
    """Write a synthetic dataset to ``dest/tiny-imagenet-200/`` and return that root.

    `n_train`, `n_val` and `n_test` are images *per class* (the real set has 500/50/50).
    Deterministic given the arguments.  The dataset is written to a temporary sibling and moved
    into place at the end, so an interrupted run never leaves a half-written root behind.  An
    existing non-empty root is never overwritten (it might be the real dataset): FileExistsError.
    """
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ValueError(f"n_classes must be in [1, {MAX_CLASSES}], got {n_classes}")
    if min(n_train, n_val, n_test) < 0:
        raise ValueError("image counts must be >= 0")
    if size < 16:
        raise ValueError(f"size must be >= 16 to draw recognisable shapes, got {size}")
    if not 0.0 <= grayscale_fraction <= 1.0:
        raise ValueError(f"grayscale_fraction must be in [0, 1], got {grayscale_fraction}")

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest / ROOT_NAME
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise FileExistsError(f"{root} already exists and is not empty; refusing to overwrite it")

    tmp = Path(tempfile.mkdtemp(prefix=f".{ROOT_NAME}-", dir=dest))
    try:
        _write_dataset(tmp, n_classes, n_train, n_val, n_test, size, grayscale_fraction, seed)
        tmp.chmod(0o755)  # mkdtemp makes it private; a dataset should read like any other dir
        if root.exists():
            root.rmdir()  # empty, checked above
        tmp.rename(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return root

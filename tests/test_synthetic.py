"""Checks of the synthetic TinyImageNet: official layout, honest boxes, modes, determinism, and
that a small network can actually learn it (otherwise the demo and Grad-CAM checks mean nothing).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from tinyfast.synthetic import (
    MAX_CLASSES,
    class_name,
    class_spec,
    class_wnid,
    make_tiny_imagenet,
    render_sample,
    sample_rng,
)

# The tiny_root fixture's parameters (tests/conftest.py).
N_CLASSES, N_TRAIN, N_VAL, N_TEST, SIZE, SEED = 4, 24, 8, 2, 64, 0


def _wnids(root: Path) -> list[str]:
    return (root / "wnids.txt").read_text().split("\n")[:-1]


def _val_annotations(root: Path) -> list[tuple[str, str, tuple[int, ...]]]:
    rows = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        name, wnid, *box = line.split("\t")
        rows.append((name, wnid, tuple(int(v) for v in box)))
    return rows


def _train_boxes(root: Path, wnid: str) -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in (root / "train" / wnid / f"{wnid}_boxes.txt").read_text().splitlines():
        name, *box = line.split("\t")
        rows.append((name, tuple(int(v) for v in box)))
    return rows


def _labelled_images(root: Path) -> list[tuple[str, int, int, Path, tuple[int, ...]]]:
    """(split, index as in sample_rng, label, path, box) for every train and val image."""
    wnids = _wnids(root)
    items = []
    for label, wnid in enumerate(wnids):
        for i, (name, box) in enumerate(_train_boxes(root, wnid)):
            items.append(("train", label * N_TRAIN + i, label, root / "train" / wnid / "images" / name, box))
    for i, (name, wnid, box) in enumerate(_val_annotations(root)):
        items.append(("val", i, wnids.index(wnid), root / "val" / "images" / name, box))
    return items


# ---------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------

def test_layout_files_and_counts(tiny_root: Path) -> None:
    assert tiny_root.name == "tiny-imagenet-200"
    wnids = _wnids(tiny_root)
    assert len(wnids) == N_CLASSES == len(set(wnids))
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)

    words = dict(line.split("\t") for line in (tiny_root / "words.txt").read_text().splitlines())
    assert set(wnids) < set(words), "words.txt must be a strict superset of wnids.txt"
    assert [words[w] for w in wnids] == [class_name(k) for k in range(N_CLASSES)]
    assert words["n01000000"] == "red circle"

    assert sorted(p.name for p in (tiny_root / "train").iterdir()) == sorted(wnids)
    for wnid in wnids:
        names = {p.name for p in (tiny_root / "train" / wnid / "images").iterdir()}
        assert names == {f"{wnid}_{i}.JPEG" for i in range(N_TRAIN)}
        assert [name for name, _ in _train_boxes(tiny_root, wnid)] == [f"{wnid}_{i}.JPEG" for i in range(N_TRAIN)]

    n_val = N_CLASSES * N_VAL
    assert {p.name for p in (tiny_root / "val" / "images").iterdir()} == {f"val_{i}.JPEG" for i in range(n_val)}
    assert [name for name, _, _ in _val_annotations(tiny_root)] == [f"val_{i}.JPEG" for i in range(n_val)]
    n_test = N_CLASSES * N_TEST
    assert {p.name for p in (tiny_root / "test" / "images").iterdir()} == {f"test_{i}.JPEG" for i in range(n_test)}
    assert not list(tiny_root.parent.glob(".tiny-imagenet-200-*")), "temporary directory left behind"


def test_val_labels_known_balanced_and_interleaved(tiny_root: Path) -> None:
    labels = [wnid for _, wnid, _ in _val_annotations(tiny_root)]
    assert set(labels) <= set(_wnids(tiny_root))
    assert Counter(labels) == {w: N_VAL for w in _wnids(tiny_root)}
    runs = 1 + sum(a != b for a, b in zip(labels, labels[1:]))
    assert runs > 2 * N_CLASSES, "val classes should be shuffled, not in blocks"


def test_class_specs_names_and_wnids_are_distinct() -> None:
    assert MAX_CLASSES >= 200
    assert len({class_spec(k) for k in range(MAX_CLASSES)}) == MAX_CLASSES
    assert len({class_name(k) for k in range(MAX_CLASSES)}) == MAX_CLASSES
    wnids = [class_wnid(k) for k in range(MAX_CLASSES)]
    assert wnids == sorted(set(wnids)), "wnids must be distinct and sort like the class indices"
    assert all(re.fullmatch(r"n\d{8}", w) for w in wnids)
    # the first 4 classes are a 2x2 block: neither colour nor shape alone tells them apart
    specs = [class_spec(k) for k in range(4)]
    assert len({s.shape for s in specs}) == 2 and len({s.colour for s in specs}) == 2


# ---------------------------------------------------------------------------------------------
# Boxes and the evidence inside them
# ---------------------------------------------------------------------------------------------

def test_boxes_inside_image_and_of_object_scale(tiny_root: Path) -> None:
    for *_, (x0, y0, x1, y1) in _labelled_images(tiny_root):
        assert 0 <= x0 < x1 < SIZE and 0 <= y0 < y1 < SIZE
        side = max(x1 - x0 + 1, y1 - y0 + 1)
        assert 0.25 * SIZE <= side <= 0.75 * SIZE


def test_object_is_the_only_difference_and_lies_in_the_box(tiny_root: Path) -> None:
    """Re-render every image with and without its object: they differ only inside the box, the
    saved JPEG matches the rendering, and the JPEG's departure from the bare background is
    concentrated in the box (what the Grad-CAM checks rely on)."""
    ratios = []
    for split, index, label, path, box in _labelled_images(tiny_root):
        image, rendered_box, mask = render_sample(label, SIZE, sample_rng(SEED, split, index))
        background, _, _ = render_sample(label, SIZE, sample_rng(SEED, split, index), draw_object=False)
        assert rendered_box == box
        x0, y0, x1, y1 = box
        inside = np.zeros((SIZE, SIZE), bool)
        inside[y0 : y1 + 1, x0 : x1 + 1] = True
        assert not mask[~inside].any()
        assert (image != background).any(axis=2)[~inside].sum() == 0

        saved = np.asarray(Image.open(path)).astype(np.float32)
        if saved.ndim == 2:  # grayscale JPEG
            image = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            background = cv2.cvtColor(background, cv2.COLOR_RGB2GRAY)
        assert np.abs(saved - image).mean() < 12, f"{path.name} does not match its rendering"
        diff = np.abs(saved - background.astype(np.float32))
        diff = diff.mean(axis=2) if diff.ndim == 3 else diff
        ratios.append(diff[inside].mean() / max(diff[~inside].mean(), 1e-3))
    assert np.median(ratios) > 5, f"object evidence not concentrated in the box: {np.median(ratios):.1f}"


# ---------------------------------------------------------------------------------------------
# Image modes and determinism
# ---------------------------------------------------------------------------------------------

def test_images_are_jpegs_mostly_rgb_some_grayscale(tiny_root: Path) -> None:
    for split, pattern in (("train", "train/*/images/*.JPEG"), ("val", "val/images/*.JPEG")):
        modes = Counter()
        for path in tiny_root.glob(pattern):
            with Image.open(path) as im:
                assert im.format == "JPEG" and im.size == (SIZE, SIZE)
                modes[im.mode] += 1
        assert set(modes) == {"RGB", "L"}, (split, modes)
        assert modes["L"] <= 0.1 * sum(modes.values()), (split, modes)


def test_no_grayscale_when_fraction_is_zero(tmp_path: Path) -> None:
    root = make_tiny_imagenet(tmp_path, n_classes=2, n_train=5, n_val=3, n_test=1, grayscale_fraction=0.0)
    assert {Image.open(p).mode for p in root.rglob("*.JPEG")} == {"RGB"}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_given_seed(tmp_path: Path) -> None:
    kwargs = dict(n_classes=3, n_train=4, n_val=2, n_test=1)
    a = _snapshot(make_tiny_imagenet(tmp_path / "a", seed=7, **kwargs))
    b = _snapshot(make_tiny_imagenet(tmp_path / "b", seed=7, **kwargs))
    c = _snapshot(make_tiny_imagenet(tmp_path / "c", seed=8, **kwargs))
    assert a == b
    assert a["wnids.txt"] == c["wnids.txt"]
    assert a["train/n01000000/images/n01000000_0.JPEG"] != c["train/n01000000/images/n01000000_0.JPEG"]
    assert a["val/val_annotations.txt"] != c["val/val_annotations.txt"]


def test_refuses_to_overwrite_a_non_empty_root(tmp_path: Path) -> None:
    (tmp_path / "tiny-imagenet-200").mkdir()
    root = make_tiny_imagenet(tmp_path, n_classes=1, n_train=1, n_val=1, n_test=0)  # empty: fine
    with pytest.raises(FileExistsError):
        make_tiny_imagenet(tmp_path, n_classes=1, n_train=1, n_val=1, n_test=0)
    assert (root / "wnids.txt").exists()


@pytest.mark.parametrize("kwargs", [dict(n_classes=0), dict(n_classes=MAX_CLASSES + 1), dict(size=8),
                                    dict(grayscale_fraction=1.5), dict(n_val=-1)])
def test_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_tiny_imagenet(tmp_path, **kwargs)


# ---------------------------------------------------------------------------------------------
# Learnability
# ---------------------------------------------------------------------------------------------

def _load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    wnids = _wnids(root)
    if split == "train":
        items = [(root / "train" / w / "images" / n, k) for k, w in enumerate(wnids) for n, _ in _train_boxes(root, w)]
    else:
        items = [(root / "val" / "images" / n, wnids.index(w)) for n, w, _ in _val_annotations(root)]
    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in items])
    x = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.25
    return x, torch.tensor([k for _, k in items])


class _TwoLayerNet(nn.Module):
    """Two strided convolutions and a global (max, mean) pool: sees shape and colour anywhere."""

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, stride=2, padding=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.head = nn.Linear(128, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.head(torch.cat([f.amax(dim=(2, 3)), f.mean(dim=(2, 3))], dim=1))


def test_learnable_by_a_small_convnet_but_not_by_mean_colour(tiny_root: Path) -> None:
    x, y = _load_split(tiny_root, "train")
    vx, vy = _load_split(tiny_root, "val")

    # Mean colour, nearest class mean: must stay far from solving it (the object is small and
    # the classes form a 2x2 shape x colour block).
    centroids = torch.stack([x[y == k].mean(dim=(0, 2, 3)) for k in range(N_CLASSES)])
    colour_pred = torch.cdist(vx.mean(dim=(2, 3)), centroids).argmin(dim=1)
    colour_acc = (colour_pred == vy).float().mean().item()

    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # ~4 CPU-s; one thread does not collapse when the CPU is shared
    try:
        net = _TwoLayerNet(N_CLASSES)
        epochs, batch = 40, 32
        opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=epochs * -(-len(x) // batch))
        for _ in range(epochs):
            net.train()
            for b in torch.randperm(len(x)).split(batch):
                xb = x[b]
                flip = torch.rand(len(b)) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
                loss = nn.functional.cross_entropy(net(xb), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        net.eval()
        with torch.no_grad():
            net_acc = (net(vx).argmax(dim=1) == vy).float().mean().item()
    finally:
        torch.set_num_threads(threads)

    print(f"synthetic learnability: convnet {net_acc:.2f}, mean colour {colour_acc:.2f}, chance {1 / N_CLASSES:.2f}")
    assert net_acc > 0.7, f"small convnet val accuracy {net_acc:.2f}"
    assert colour_acc < 0.6, f"mean colour alone reaches {colour_acc:.2f}"
    assert net_acc > colour_acc + 0.2

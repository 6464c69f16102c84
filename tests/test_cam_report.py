"""The views over the CAMs (tinyfast.cam_report) on the CAM tests' trained model (conftest's cam_learn): the grid,
the localisation score against the annotated boxes, the files of `python main.py gradcam`."""
from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import pytest
from matplotlib.figure import Figure
from PIL import Image

from tinyfast.cam_report import box_in_input, gradcam, gradcam_grid, localisation_score
from tinyfast.data import load_rgb
from tinyfast.dataset import read_train_boxes, read_val_annotations
from tinyfast.layout import dataset_box, dataset_label

from conftest import cam_learner


def test_box_scaling(tmp_path):
    # annotations are in the original image's pixels; an input pixel is in the box when its centre is
    square, wide = tmp_path / "square.png", tmp_path / "wide.png"
    Image.new("RGB", (64, 64)).save(square)
    Image.new("RGB", (128, 64)).save(wide)
    assert box_in_input(square, (0, 0, 63, 63), (32, 32)) == (0, 0, 31, 31)
    assert box_in_input(square, (10, 20, 29, 39), (32, 32)) == (5, 10, 14, 19)
    assert box_in_input(square, (10, 20, 29, 39), (64, 64)) == (10, 20, 29, 39)
    assert box_in_input(wide, (20, 20, 59, 39), (64, 64)) == (10, 20, 29, 39)  # squished: x halves


def test_bad_arguments_give_one_line_errors(cam_learn, tmp_path):
    with pytest.raises(ValueError, match="gradcam, gradcam\\+\\+"):
        gradcam_grid(cam_learn, method="nope")
    with pytest.raises(ValueError, match="layer3"):
        localisation_score(cam_learn, layer="layer3.7")
    with pytest.raises(ValueError, match="gradcam, gradcam\\+\\+"):
        gradcam(cam_learn, tmp_path / "out", methods=("gradcam", "nope"))
    assert not (tmp_path / "out").exists()  # every method checked before anything is written


def test_trained_model_looks_at_the_object(cam_learn, cam_dls):
    trained = localisation_score(cam_learn)
    unaligned = localisation_score(cam_learn, align=False)
    untrained = localisation_score(cam_learner(cam_dls, seed=1))
    base = trained["box_area_fraction"]
    assert trained["n"] == len(cam_dls.valid_ds) and trained["pointing_baseline"] == base
    assert 0.1 < base < 0.5
    assert trained["pointing_game"] > base + 0.3, trained
    assert trained["energy_in_box"] > base + 0.15, trained
    assert trained["pointing_game"] > untrained["pointing_game"] + 0.2, (trained, untrained)
    assert trained["energy_in_box"] > untrained["energy_in_box"] + 0.1, (trained, untrained)
    assert trained["pointing_game"] > unaligned["pointing_game"] + 0.05, (trained, unaligned)


def test_localisation_limit_and_layer(cam_learn):
    s = localisation_score(cam_learn, method="layercam", limit=10, layer="layer3")
    assert s["n"] == 10 and s["method"] == "layercam" and s["layer"] == "layer3"
    assert 0 <= s["pointing_game"] <= 1 and 0 <= s["energy_in_box"] <= 1


def _titles(fig: Figure) -> list[str]:
    return [t for t in (ax.get_title(loc="left") for ax in fig.axes) if t]


def test_grid_shows_right_and_wrong(cam_learn):
    n = 8
    probs, targs = cam_learn.get_preds(dl=cam_learn.dls.valid)
    n_wrong = int((probs.argmax(1) != targs).sum())
    fig = gradcam_grid(cam_learn, n=n)
    titles = _titles(fig)
    plt.close(fig)
    assert isinstance(fig, Figure) and len(titles) == n
    pairs = [re.fullmatch(r"true: (.+)\npred: (.+) \((\d\.\d\d)\)", t).groups() for t in titles]
    assert {true for true, _, _ in pairs} <= set(cam_learn.dls.names)
    assert sum(true != pred for true, pred, _ in pairs) == min(n // 2, n_wrong)


def test_gradcam_writes_figures_and_scores(cam_learn, tmp_path):
    out = gradcam(cam_learn, tmp_path, n=4, methods=("gradcam", "gradcam++"), score=True, limit=16)
    assert set(out["figures"]) == {"gradcam", "gradcam++"}
    for name in ("gradcam.png", "gradcam_gradcampp.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] >= 4 * 2 * 150 and im.size[1] >= 200  # 4 pairs, legible
    scores = json.loads((tmp_path / "gradcam.json").read_text())
    assert set(scores) == {"gradcam", "gradcam++"} and scores["gradcam"]["n"] == 16


def test_grid_of_given_images(cam_learn, tmp_path):
    root = cam_learn.dls.root
    val = list(cam_learn.dls.valid_ds.items[:2])
    train = sorted((root / "train" / cam_learn.dls.vocab[0] / "images").iterdir())[0]
    outside = tmp_path / "mine.png"
    Image.fromarray(load_rgb(val[0])).save(outside)
    fig = gradcam_grid(cam_learn, n=5, images=[*val, train, outside])
    titles = _titles(fig)
    plt.close(fig)
    assert len(titles) == 4
    assert titles[0].startswith("true: ") and titles[2].startswith(f"true: {cam_learn.dls.names[0]}\n")
    assert titles[3].startswith("mine.png\npred: ")  # no label known for a file outside the dataset
    # dataset images get their annotated box drawn, from val_annotations.txt or the class's boxes file
    annotations = read_val_annotations(root)
    assert dataset_box(val[0], root, annotations) == annotations[val[0].name][1]
    boxes = read_train_boxes(root, cam_learn.dls.vocab[0])
    assert dataset_box(train, root, annotations) == boxes[train.name]
    assert dataset_box(outside, root, annotations) is None
    assert dataset_label(val[0], root, annotations) == annotations[val[0].name][0]
    assert dataset_label(train, root, annotations) == cam_learn.dls.vocab[0]
    assert dataset_label(outside, root, annotations) is None

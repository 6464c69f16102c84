"""tinyfast.layout, the one owner of the path rules: which split and class an image is, where its box is
read from, the run folder's file names, and writing atomically."""
from __future__ import annotations

import matplotlib.pyplot as plt
import pytest

from tinyfast.errors import RunError

from tinyfast import layout
from tinyfast.dataset import read_train_boxes, read_val_annotations
from tinyfast.layout import (atomic_write, atomic_write_text, dataset_box, dataset_label, gradcam_figure_name, is_val,
                             relocate, save_figure, train_wnid)


def test_split_and_class_from_the_path_alone(tmp_path):
    assert is_val("data/tiny-imagenet-200/val/images/val_7.JPEG")
    assert not is_val("data/tiny-imagenet-200/train/n01443537/images/n01443537_0.JPEG")
    assert train_wnid("x/train/n01443537/images/n01443537_0.JPEG") == "n01443537"
    assert train_wnid("x/val/images/val_7.JPEG") is None and train_wnid(tmp_path / "mine.png") is None


def test_label_and_box_of_dataset_images_only(tiny_root, tmp_path):
    ann = read_val_annotations(tiny_root)
    name, (wnid, box) = sorted(ann.items())[0]
    val = tiny_root / "val" / "images" / name
    assert dataset_label(val, tiny_root, ann) == wnid and dataset_box(val, tiny_root, ann) == box
    w = sorted(p.name for p in (tiny_root / "train").iterdir())[0]
    train = sorted((tiny_root / "train" / w / "images").iterdir())[0]
    assert dataset_label(train, tiny_root, ann) == w
    assert dataset_box(train, tiny_root, ann) == read_train_boxes(tiny_root, w)[train.name]
    # a file named like a val image but outside the dataset has neither
    elsewhere = tmp_path / "val" / "images" / name
    assert dataset_label(elsewhere, tiny_root, ann) is None
    assert dataset_box(elsewhere, tiny_root, ann) is None
    assert dataset_box(val, None, ann) is None


def test_relocate_keeps_the_part_from_the_split_on(tmp_path):
    assert relocate("/old/tiny-imagenet-200/val/images/v.JPEG", tmp_path) == tmp_path / "val" / "images" / "v.JPEG"
    assert relocate("/old/x.png", tmp_path) == tmp_path / "x.png"
    assert relocate("/old/x.png", None) == layout.Path("/old/x.png")


def test_atomic_write_keeps_the_old_file_when_the_write_dies(tmp_path):
    target = tmp_path / "metrics.csv"
    atomic_write_text(target, "old\n")

    def dying(tmp):
        tmp.write_text("half")
        raise OSError("killed mid-write")

    with pytest.raises(RunError, match=r"cannot write .*metrics\.csv: killed mid-write"):  # one line (#30)
        atomic_write(target, dying)
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


def test_save_figure_closes_the_figure_even_when_saving_fails(tmp_path):
    fig = plt.figure()
    assert save_figure(fig, tmp_path / "a.png") == tmp_path / "a.png" and (tmp_path / "a.png").stat().st_size > 0
    assert not plt.fignum_exists(fig.number)
    fig = plt.figure()
    with pytest.raises(Exception):
        save_figure(fig, tmp_path / "no-such-folder" / "b.png")
    assert not plt.fignum_exists(fig.number)


def test_gradcam_figure_names():
    assert gradcam_figure_name("gradcam++", first=True) == "gradcam.png"
    assert gradcam_figure_name("gradcam++", first=False) == "gradcam_gradcampp.png"
    assert gradcam_figure_name("layercam", first=False) == "gradcam_layercam.png"

"""Predicting image files of any kind with a trained Learner, through its own test pipeline."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from tinyfast.data import load_rgb, tiny_imagenet_dls
from tinyfast.dataset import DatasetError
from tinyfast.learner import tiny_learner
from tinyfast.model import resnet18
from tinyfast.predict import predict_images, save_cam_overlays

SIZE = 64  # the images' own size: a copy of a val image outside the dataset must predict exactly the same


@pytest.fixture(scope="module")
def learn(tiny_root):
    dls = tiny_imagenet_dls(tiny_root, bs=16, size=SIZE, aug=False)
    torch.manual_seed(0)
    learn = tiny_learner(dls, model=resnet18(dls.c, width=16))  # narrow: the tests need varied predictions, not skill
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(2, 0.05)
    return learn


@pytest.fixture(scope="module")
def odd_images(tmp_path_factory) -> list:
    """One image of each kind a user may hand in: sizes and modes the dataset never has."""
    d = tmp_path_factory.mktemp("odd")
    rgb = np.random.default_rng(0).integers(0, 256, (300, 200, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    files = {"tall.jpg": im, "gray.jpg": im.convert("L"), "rgba.png": im.convert("RGBA"),
             "cmyk.jpg": im.convert("CMYK"), "palette.png": im.convert("P"), "small.bmp": im.resize((23, 17)),
             "gray16.png": Image.fromarray(rgb[..., 0].astype(np.uint16) * 257)}
    for name, image in files.items():
        image.save(d / name)
    return [d / name for name in files]


def test_any_image_mode_and_size(learn, odd_images):
    results = predict_images(learn, odd_images, topk=learn.dls.c)
    assert [r["path"] for r in results] == [str(p) for p in odd_images]
    vocab, names = list(learn.dls.vocab), list(learn.dls.names)
    for r in results:
        probs = [p for _, _, p in r["top"]]
        assert len(probs) == learn.dls.c and abs(sum(probs) - 1) < 1e-3
        assert probs == sorted(probs, reverse=True)
        assert all(names[vocab.index(w)] == name for w, name, _ in r["top"])


def test_topk_is_capped_and_checked(learn, odd_images):
    assert [len(r["top"]) for r in predict_images(learn, odd_images[:2], topk=2)] == [2, 2]
    assert len(predict_images(learn, odd_images[0], topk=500)[0]["top"]) == learn.dls.c
    with pytest.raises(ValueError, match="topk"):
        predict_images(learn, odd_images[:1], topk=0)


def test_agrees_with_get_preds_on_the_val_set(learn, tmp_path):
    probs, _ = learn.get_preds(dl=learn.dls.valid)
    paths = list(learn.dls.valid_ds.items)
    top1 = [r["top"][0][0] for r in predict_images(learn, paths, topk=1)]
    expected = [learn.dls.vocab[i] for i in probs.argmax(1).tolist()]
    assert top1 == expected
    assert len(set(expected)) > 1  # a model that answers one class for everything would prove nothing
    # the same files outside the dataset (not in its decoded cache) go through the file-reading path
    copies = [shutil.copy(p, tmp_path / f"copy_{p.name}") for p in paths]
    assert [r["top"][0][0] for r in predict_images(learn, copies, topk=1)] == expected


def test_missing_or_unreadable_file_is_named(learn, odd_images, tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    for path, message in [(tmp_path / "missing.jpg", "no such image file"), (bad, "cannot decode image"),
                          (tmp_path, "not a file")]:
        with pytest.raises(DatasetError, match=message) as e:
            predict_images(learn, [odd_images[0], path])
        assert str(path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no image"):
        predict_images(learn, [])
    with pytest.raises(ValueError, match="gradcam"):
        save_cam_overlays(learn, odd_images[:1], method="gradcan")
    with pytest.raises(ValueError, match="layer4"):
        save_cam_overlays(learn, odd_images[:1], layer="layer9")


def test_cam_overlays_written_next_to_the_images(learn, odd_images, tmp_path):
    val = shutil.copy(learn.dls.valid_ds.items[0], tmp_path / "val_copy.JPEG")
    images = [odd_images[0], odd_images[2], val]
    written = save_cam_overlays(learn, images)
    assert written == [p.with_name(f"{p.stem}_cam.png") for p in images]
    for src, out in zip(images, written):
        with Image.open(src) as im:
            w, h = im.size
        f = int(np.ceil(256 / min(w, h)))  # small images are enlarged by a whole factor
        with Image.open(out) as im:
            assert im.format == "PNG" and im.mode == "RGB"
            # the image's own shape, not the squished model input, with a caption strip under it
            assert im.width == w * f and h * f < im.height < h * f + 60
            overlay = np.asarray(im)[: h * f].astype(int)
        # a heat-map is laid over it: not the plain (enlarged) image
        plain = np.kron(load_rgb(src), np.ones((f, f, 1), int))
        assert np.abs(overlay - plain).mean() > 10

"""Grad-CAM on a model trained on the synthetic dataset, where the drawn object is the only class evidence:
a model that learned the task must look inside the object's box, and an untrained one need not."""
from __future__ import annotations

import copy
import json
import re

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from fastai.torch_core import set_seed
from matplotlib.figure import Figure
from PIL import Image
from pytorch_grad_cam.utils.image import scale_cam_image

from tinyfast import cam as C
from tinyfast.cam import CAM_METHODS, compute_cams, gradcam, gradcam_grid, localisation_score
from tinyfast.data import load_rgb, tiny_imagenet_dls
from tinyfast.dataset import read_train_boxes, read_val_annotations
from tinyfast.learner import tiny_learner
from tinyfast.model import resnet18

SIZE = 32
WIDTH = 16  # a narrow ResNet18 (the same stages and blocks, ~1/16 of the FLOPs) learns the task in seconds


def _learner(dls, seed: int = 0):
    set_seed(seed)
    return tiny_learner(dls, model=resnet18(dls.c, width=WIDTH))


@pytest.fixture(scope="module")
def dls(demo_root):
    set_seed(0)  # the loader's shuffling too
    return tiny_imagenet_dls(demo_root, bs=16, size=SIZE, aug=False)  # no augmentation: learns in fewer epochs


@pytest.fixture(scope="module")
def learn(dls):
    learn = _learner(dls)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(4, 0.1)
    return learn


@pytest.fixture(scope="module")
def batch(learn):
    x, y = learn.dls.valid.one_batch()
    return x[:12], y[:12]


def _hooks_left(model: torch.nn.Module) -> list[str]:
    kinds = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    return [f"{name or 'model'}.{k}" for name, m in model.named_modules() for k in kinds if getattr(m, k, None)]


def test_cam_shape_range_and_no_hooks_left(learn, batch):
    x, _ = batch
    learn.model.train()
    cams = compute_cams(learn, x)
    assert cams.shape == (len(x), SIZE, SIZE) and cams.dtype == np.float32
    assert cams.min() >= 0 and cams.max() <= 1 + 1e-6
    assert (cams.reshape(len(x), -1).max(1) > 0.99).sum() >= len(x) // 2  # scaled to [0, 1] per image
    assert _hooks_left(learn.model) == []
    assert all(m.training for m in learn.model.modules())  # its mode is given back
    learn.model.eval()
    compute_cams(learn.model, x[:2], method="gradcam++")
    assert not any(m.training for m in learn.model.modules())
    assert _hooks_left(learn.model) == []


def test_cams_follow_the_precision(learn, batch):
    """bf16 autocast (about 2x faster on a bf16 CPU) gives the fp32 maps up to bf16 rounding; the maps come back
    as fp32 either way, no hook is left, and a bare model runs in fp32."""
    x, _ = batch
    seen = []
    spy = learn.model.layer4[0].conv1.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        bf16 = compute_cams(learn, x, precision="bf16")
        n_bf16 = len(seen)
        fp32 = compute_cams(learn, x, precision="fp32")
        n_fp32 = len(seen) - n_bf16
        compute_cams(learn.model, x)
    finally:
        spy.remove()
    assert set(seen[:n_bf16]) == {torch.bfloat16} and set(seen[n_bf16:]) == {torch.float32}
    assert n_fp32 > 0 and len(seen) > n_bf16 + n_fp32
    assert bf16.dtype == fp32.dtype == np.float32
    corr = [np.corrcoef(a.ravel(), b.ravel())[0, 1] for a, b in zip(bf16, fp32) if a.std() > 0 and b.std() > 0]
    assert len(corr) >= len(x) // 2 and min(corr) > 0.9
    assert _hooks_left(learn.model) == []
    with pytest.raises(ValueError, match="precision"):
        compute_cams(learn, x, precision="fp8")


def test_hooks_removed_when_the_cam_fails(learn, batch, monkeypatch):
    class Broken(CAM_METHODS["gradcam"]):
        def get_cam_weights(self, *args, **kwargs):
            raise IndexError("boom")  # the type the library's own __exit__ would swallow

    monkeypatch.setitem(CAM_METHODS, "broken", Broken)
    with pytest.raises(RuntimeError, match="boom"):
        compute_cams(learn, batch[0][:2], method="broken")
    assert _hooks_left(learn.model) == []


def test_targets_default_to_the_prediction(learn, batch):
    x, _ = batch
    with torch.no_grad():
        pred = learn.model.eval()(x.as_subclass(torch.Tensor).float()).argmax(1)
    assert np.allclose(compute_cams(learn, x), compute_cams(learn, x, targets=pred), atol=1e-5)
    other = (pred + 1) % learn.dls.c
    assert not np.allclose(compute_cams(learn, x, targets=pred), compute_cams(learn, x, targets=other), atol=1e-3)


def test_uint8_images_are_normalised_like_the_loader(learn):
    paths = learn.dls.valid_ds.items[:4]
    x = C._inputs(learn, paths)
    raw = np.stack([load_rgb(p, SIZE) for p in paths])
    assert np.allclose(compute_cams(learn, raw, targets=1), compute_cams(learn, x, targets=1), atol=1e-3)


def test_batches_give_the_same_cams(learn, batch):
    x, y = batch
    assert np.allclose(compute_cams(learn, x, y, batch_size=5), compute_cams(learn, x, y, batch_size=32), atol=1e-5)


@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_every_method_runs(learn, batch, method):
    x = batch[0][:1 if method == "scorecam" else 4]
    cams = compute_cams(learn, x, method=method)
    assert cams.shape == (len(x), SIZE, SIZE) and np.isfinite(cams).all()
    assert _hooks_left(learn.model) == []


def test_other_layers(learn, batch):
    x, y = batch
    l3 = compute_cams(learn, x, y, layer="layer3")
    assert l3.shape == (len(x), SIZE, SIZE)
    assert not np.allclose(l3, compute_cams(learn, x, y))  # another layer, another map
    assert np.allclose(compute_cams(learn, x, y, layer=learn.model.layer4[-1]), compute_cams(learn, x, y))
    assert compute_cams(learn, x[:2], layer="layer2.0").shape == (2, SIZE, SIZE)


def test_in_place_op_after_the_target_layer(learn, batch):
    # "stem.1" is the BatchNorm that the stem's ReLU(inplace=True) overwrites: its CAM must be the CAM of the
    # BatchNorm output, as with an out-of-place ReLU
    x, y = batch
    model = copy.deepcopy(learn.model)
    assert model.stem[2].inplace
    inplace = compute_cams(model, x, y, layer="stem.1")
    model.stem[2] = torch.nn.ReLU(inplace=False)
    assert np.allclose(inplace, compute_cams(model, x, y, layer="stem.1"), atol=1e-5)


def test_bad_arguments_give_one_line_errors(learn, batch):
    x = batch[0][:2]
    cases = [(dict(method="gradcam+++"), "gradcam\\+\\+"), (dict(layer="layer5"), "layer4.1"),
             (dict(layer="fc"), "no spatial map"), (dict(targets=[0, learn.dls.c]), "class indices"),
             (dict(targets=[0]), "1 targets for 2 images")]
    for kwargs, listed in cases:
        with pytest.raises(ValueError, match=listed) as e:
            compute_cams(learn, x, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="gradcam, gradcam\\+\\+"):
        gradcam_grid(learn, method="nope")
    with pytest.raises(ValueError, match="layer3"):
        localisation_score(learn, layer="layer3.7")
    assert _hooks_left(learn.model) == []


def test_box_scaling(tmp_path):
    # annotations are in the original image's pixels; an input pixel is in the box when its centre is
    square, wide = tmp_path / "square.png", tmp_path / "wide.png"
    Image.new("RGB", (64, 64)).save(square)
    Image.new("RGB", (128, 64)).save(wide)
    assert C._box_in_input(square, (0, 0, 63, 63), (32, 32)) == (0, 0, 31, 31)
    assert C._box_in_input(square, (10, 20, 29, 39), (32, 32)) == (5, 10, 14, 19)
    assert C._box_in_input(square, (10, 20, 29, 39), (64, 64)) == (10, 20, 29, 39)
    assert C._box_in_input(wide, (20, 20, 59, 39), (64, 64)) == (10, 20, 29, 39)  # squished: x halves


def test_alignment_puts_a_cell_on_its_pixels():
    # a one-hot 4x4 map upsampled as pytorch-grad-cam does (to 32 px, stride 8): cell (1, 2) is centred on
    # input pixel (8, 16) in a network of same-padded stride-2 layers; the library puts it at (11.5, 19.5)
    cell = np.zeros((1, 4, 4), np.float32)
    cell[0, 1, 2] = 1
    raw = scale_cam_image(cell, (32, 32))
    assert np.unravel_index(raw[0].argmax(), raw[0].shape) in {(11, 19), (11, 20), (12, 19), (12, 20)}
    aligned = C.align_cams(raw, (4, 4))
    assert np.unravel_index(aligned[0].argmax(), (32, 32)) == (8, 16)
    assert aligned.min() >= 0 and aligned.max() == pytest.approx(1)
    assert C.align_cams(raw, (32, 32)) is raw  # stride 1: nothing to move


def test_trained_model_looks_at_the_object(learn, dls):
    trained = localisation_score(learn)
    unaligned = localisation_score(learn, align=False)
    untrained = localisation_score(_learner(dls, seed=1))
    base = trained["box_area_fraction"]
    assert trained["n"] == len(dls.valid_ds) and trained["pointing_baseline"] == base
    assert 0.1 < base < 0.5
    assert trained["pointing_game"] > base + 0.3, trained
    assert trained["energy_in_box"] > base + 0.15, trained
    assert trained["pointing_game"] > untrained["pointing_game"] + 0.2, (trained, untrained)
    assert trained["energy_in_box"] > untrained["energy_in_box"] + 0.1, (trained, untrained)
    assert trained["pointing_game"] > unaligned["pointing_game"] + 0.05, (trained, unaligned)


def test_localisation_limit_and_layer(learn):
    s = localisation_score(learn, method="layercam", limit=10, layer="layer3")
    assert s["n"] == 10 and s["method"] == "layercam" and s["layer"] == "layer3"
    assert 0 <= s["pointing_game"] <= 1 and 0 <= s["energy_in_box"] <= 1


def _titles(fig: Figure) -> list[str]:
    return [t for t in (ax.get_title(loc="left") for ax in fig.axes) if t]


def test_grid_shows_right_and_wrong(learn):
    n = 8
    probs, targs = learn.get_preds(dl=learn.dls.valid)
    n_wrong = int((probs.argmax(1) != targs).sum())
    fig = gradcam_grid(learn, n=n)
    titles = _titles(fig)
    plt.close(fig)
    assert isinstance(fig, Figure) and len(titles) == n
    pairs = [re.fullmatch(r"true: (.+)\npred: (.+) \((\d\.\d\d)\)", t).groups() for t in titles]
    assert {true for true, _, _ in pairs} <= set(learn.dls.names)
    assert sum(true != pred for true, pred, _ in pairs) == min(n // 2, n_wrong)


def test_gradcam_writes_figures_and_scores(learn, tmp_path):
    out = gradcam(learn, tmp_path, n=4, methods=("gradcam", "gradcam++"), score=True, limit=16)
    assert set(out["figures"]) == {"gradcam", "gradcam++"}
    for name in ("gradcam.png", "gradcam_gradcampp.png"):
        with Image.open(tmp_path / name) as im:
            im.verify()
            assert im.format == "PNG" and im.size[0] >= 4 * 2 * 150 and im.size[1] >= 200  # 4 pairs, legible
    scores = json.loads((tmp_path / "gradcam.json").read_text())
    assert set(scores) == {"gradcam", "gradcam++"} and scores["gradcam"]["n"] == 16


def test_grid_of_given_images(learn, tmp_path):
    root = learn.dls.root
    val = list(learn.dls.valid_ds.items[:2])
    train = sorted((root / "train" / learn.dls.vocab[0] / "images").iterdir())[0]
    outside = tmp_path / "mine.png"
    Image.fromarray(load_rgb(val[0])).save(outside)
    fig = gradcam_grid(learn, n=5, images=[*val, train, outside])
    titles = _titles(fig)
    plt.close(fig)
    assert len(titles) == 4
    assert titles[0].startswith("true: ") and titles[2].startswith(f"true: {learn.dls.names[0]}\n")
    assert titles[3].startswith("mine.png\npred: ")  # no label known for a file outside the dataset
    # dataset images get their annotated box drawn, from val_annotations.txt or the class's boxes file
    annotations = read_val_annotations(root)
    val_dir = C._val_images_dir(learn)
    assert C._known_box(val[0], learn, annotations, val_dir) == annotations[val[0].name][1]
    assert C._known_box(train, learn, annotations, val_dir) == read_train_boxes(root, learn.dls.vocab[0])[train.name]
    assert C._known_box(outside, learn, annotations, val_dir) is None

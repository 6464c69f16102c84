"""The adapter over pytorch-grad-cam (tinyfast.cam) on a model trained on the synthetic dataset (conftest's
cam_learn): shapes, precision, hooks, targets, layers, methods, alignment; its views are in test_cam_report."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from pytorch_grad_cam.utils.image import scale_cam_image

from tinyfast import cam as C
from tinyfast.cam import CAM_METHODS, compute_cams
from tinyfast.data import load_rgb
from tinyfast.predict import model_inputs

from conftest import CAM_SIZE as SIZE


@pytest.fixture(scope="module")
def learn(cam_learn):
    return cam_learn


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
    x = model_inputs(learn, paths)
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
    assert _hooks_left(learn.model) == []


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

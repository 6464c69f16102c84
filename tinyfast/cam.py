"""Where the model looks: class activation maps (pytorch-grad-cam) for a trained Learner, and how well they
find the object.

fastai explains a classifier by its mistakes (`ClassificationInterpretation`); it has no saliency maps. This
module adds them on top of pytorch-grad-cam, with the library's known traps handled in one place:

* the CAM object is always used as a context manager, so its forward hooks are removed even when a call
  fails (leaked hooks are the library's most reported problem);
* fastai's `TensorImage` is turned into a plain tensor first (grad-cam fails on it: "Can't detach views
  in-place");
* the library puts the model in eval mode and never back: every module's mode is restored afterwards;
* an `IndexError` raised inside the CAM's `with` block is swallowed (printed) by the library's `__exit__`,
  so bad targets are checked before, and any IndexError is re-raised as another type;
* on a CPU the library keeps the target layer's output itself, not a copy: an in-place op after that layer
  (the stem's `ReLU(inplace=True)` after "stem.1") would overwrite it, so the network gets a copy instead;
* the library's upsampling puts each feature cell (s-1)/2 px off the pixels it is centred on (s: the
  layer's stride, 8 for layer4 of our ResNet18): `align_cams` moves it back.

What a user sees of the maps (the grid of val images, the localisation score against TinyImageNet's boxes, the
files of `python main.py gradcam`) is built on this module in `tinyfast.cam_report`; `tinyfast.predict` puts
a map over any image file.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext

import cv2
import numpy as np
import torch
from fastai.learner import Learner
from pytorch_grad_cam import (EigenCAM, GradCAM, GradCAMPlusPlus, HiResCAM, LayerCAM, ScoreCAM, XGradCAM)
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from .choices import CAM_METHOD_NAMES
from .data import TINY_MEAN, TINY_STD
from .compat import quiet_scorecam
from .learner import FastDevice, autocast_dtype, kept_modes

__all__ = ["CAM_METHODS", "cam_class", "resolve_layer", "as_input", "align_cams", "compute_cams", "denormalise",
           "cam_overlay"]

CAM_METHODS = dict(zip(CAM_METHOD_NAMES, (
    GradCAM,          # gradcam: channel weights = spatial mean of the gradients (Selvaraju et al. 2017)
    GradCAMPlusPlus,  # gradcam++: weights from higher-order gradient terms: several objects, sharper maps
    XGradCAM,         # xgradcam: gradients weighted by the normalised activations
    HiResCAM,         # hirescam: element-wise gradient x activation: faithful to the model's computation
    LayerCAM,         # layercam: element-wise positive gradients: finer maps, works on earlier layers too
    EigenCAM,         # eigencam: first principal component of the activations: class-agnostic, no gradients
    ScoreCAM,         # scorecam: weights from the score of the input masked by each channel: no gradients,
                      # one forward pass per channel and image (512 at layer4): slow on a CPU
), strict=True))


# ---------------------------------------------------------------------------------------------------------
# Arguments
# ---------------------------------------------------------------------------------------------------------
def cam_class(method: str):
    """The pytorch-grad-cam class of `method`, or a ValueError listing the methods."""
    if method not in CAM_METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of: {', '.join(CAM_METHODS)}")
    return CAM_METHODS[method]


def _layer_choices(model: nn.Module) -> list[str]:
    """The stages and blocks (containers at most one level deep): what a user would target."""
    return [n for n, m in model.named_modules() if n and n.count(".") <= 1 and len(list(m.children()))]


def resolve_layer(model: nn.Module, layer: str | nn.Module | None = None) -> tuple[str, nn.Module]:
    """(name, module) of the CAM's target layer: by default the last residual block, `model.layer4[-1]`
    (the last map that still has a place, and the one the class scores are pooled from), else the submodule
    `layer` names ("layer3", "layer3.1", any dotted name) or `layer` itself."""
    names = {m: n for n, m in model.named_modules()}
    if isinstance(layer, nn.Module):
        if layer not in names:
            raise ValueError("the target layer given is not a submodule of the model")
        return names[layer], layer
    if layer is None:
        stage = getattr(model, "layer4", None)
        if not isinstance(stage, nn.Sequential) or not len(stage):
            raise ValueError(f"the model has no `layer4` to target by default; pass a layer, one of: "
                             f"{', '.join(_layer_choices(model))}")
        return names[stage[-1]], stage[-1]
    name = str(layer)
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"unknown layer {name!r}; choose one of: {', '.join(_layer_choices(model))} "
                         f"(or any dotted submodule name)") from None
    return name, module


def _model_of(learn_or_model: Learner | nn.Module) -> nn.Module:
    return learn_or_model.model if isinstance(learn_or_model, Learner) else learn_or_model


def as_input(images, device: torch.device) -> torch.Tensor:
    """A plain float NCHW tensor for the model: a normalised float batch passes through (a fastai
    `TensorImage` loses its subclass, which grad-cam cannot handle); uint8 HxWx3 arrays (one, a batch, or a
    list of equal-size ones, as `load_rgb` gives) are normalised with the TinyImageNet statistics."""
    if isinstance(images, torch.Tensor) and images.is_floating_point():
        x = images.as_subclass(torch.Tensor)
        if x.ndim == 3:
            x = x[None]
    else:
        try:
            arr = np.stack(images) if isinstance(images, (list, tuple)) else np.asarray(images)
        except ValueError:
            raise ValueError("images given as a list of arrays must all have the same size") from None
        if arr.dtype != np.uint8:
            raise ValueError(f"images must be a normalised float tensor or uint8 HxWx3 arrays, got {arr.dtype}")
        if arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4 or arr.shape[-1] != 3:
            raise ValueError(f"uint8 images must be HxWx3 (or NxHxWx3), got shape {arr.shape}")
        x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255)
        x = (x - torch.tensor(TINY_MEAN)[:, None, None]) / torch.tensor(TINY_STD)[:, None, None]
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images must be an Nx3xHxW batch, got shape {tuple(x.shape)}")
    return x.detach().float().to(device)


def _targets(targets, n: int, n_classes: int | None) -> list[int] | None:
    """Class indices, checked here: out of range, the library would raise an IndexError that its own
    `__exit__` swallows."""
    if targets is None:
        return None
    t = [int(targets)] * n if np.ndim(targets) == 0 else [int(v) for v in np.asarray(targets).ravel()]
    if len(t) != n:
        raise ValueError(f"got {len(t)} targets for {n} images")
    if n_classes is not None and any(not 0 <= v < n_classes for v in t):
        raise ValueError(f"targets must be class indices in [0, {n_classes}), got {sorted(set(t))}")
    return t


def _feature_shape(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[int, ...]:
    """The target layer's output shape for one image: a CAM needs a spatial map (N, C, H, W)."""
    shape = []
    handle = module.register_forward_hook(lambda m, i, o: shape.extend(getattr(o, "shape", ())) if not shape else None)
    try:
        with torch.no_grad():
            model(x[:1])
    finally:
        handle.remove()
    return tuple(shape)


# ---------------------------------------------------------------------------------------------------------
# Computing CAMs
# ---------------------------------------------------------------------------------------------------------
def align_cams(cams: np.ndarray, feature_hw: tuple[int, int]) -> np.ndarray:
    """Move CAMs upsampled by pytorch-grad-cam back onto the pixels their feature cells look at.

    In a network of "same"-padded strided layers (3x3 stride-2 convs with padding 1, 1x1 stride-2
    shortcuts, the ImageNet stem's 7x7 conv and 3x3 max-pool) cell j of a map with total stride s is centred
    on input pixel s*j. The library's resize puts it at s*j + (s-1)/2: 3.5 px too far right and down for
    layer4 on a 32 px input, a tenth of the image. Shifting back by (s-1)/2 (the border replicated) and
    rescaling to [0, 1] raises the pointing game of a trained model on the synthetic set from ~0.73 to ~0.95."""
    (H, W), (h, w) = cams.shape[-2:], feature_hw
    dy, dx = (H / h - 1) / 2, (W / w - 1) / 2
    if dx == 0 and dy == 0:
        return cams
    m = np.float32([[1, 0, -dx], [0, 1, -dy]])
    out = np.stack([cv2.warpAffine(c, m, (W, H), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
                    for c in cams]) if len(cams) else cams
    lo, hi = out.min(axis=(1, 2), keepdims=True), out.max(axis=(1, 2), keepdims=True)
    return np.where(hi > lo, (out - lo) / np.maximum(hi - lo, 1e-12), 0).astype(np.float32)


def _precision_of(learn_or_model: Learner | nn.Module) -> tuple[str, bool]:
    """(precision, channels_last) of a Learner's `FastDevice` callback; a bare model runs in fp32, NCHW."""
    fast = [cb for cb in getattr(learn_or_model, "cbs", []) if isinstance(cb, FastDevice)]
    return (fast[0].precision, fast[0].channels_last) if fast else ("fp32", False)


@contextmanager
def _autocast_for_cam(model: nn.Module, module: nn.Module, dtype: torch.dtype | None):
    """The model's forward under autocast, as in training, with the target layer's output and the logits cast
    back to fp32: grad-cam reads activations, gradients and scores as numpy arrays, which have no bf16. The
    casting hook on the layer is registered before the CAM's own hooks, so they see the fp32 tensor."""
    if dtype is None:
        yield
        return
    hooks = [module.register_forward_hook(lambda m, i, o: o.float()),
             model.register_forward_hook(lambda m, i, o: o.float())]
    try:
        with torch.autocast(next(model.parameters()).device.type, dtype=dtype):
            yield
    finally:
        for h in hooks:
            h.remove()


def compute_cams(learn_or_model: Learner | nn.Module, images, targets=None, method: str = "gradcam",
                 layer: str | nn.Module | None = None, batch_size: int = 32, align: bool = True,
                 precision: str | None = None) -> np.ndarray:
    """CAMs of `images` (N x H x W float32 in [0, 1], at the input's resolution), for the class indices
    `targets` (one int for all, one per image, or None for each image's predicted class). `align` puts
    each feature cell on the pixels it is centred on (`align_cams`); False gives the library's raw output.

    precision: as for `tiny_learner` (auto|bf16|fp16|fp32; fp16, an old GPU's, computes the maps in fp32: its
    gradients would underflow without loss scaling); None follows the Learner's `FastDevice` (bf16 autocast
    and channels_last where it trains so, 2x faster on a bf16 CPU), and fp32 for a bare model. The maps are
    fp32 either way. The model is put in eval mode for the call and given back its modes; the library's hooks
    and ours are gone when this returns, also after an error."""
    model = _model_of(learn_or_model)
    cam_cls = cam_class(method)
    name, module = resolve_layer(model, layer)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    learner_precision, channels_last = _precision_of(learn_or_model)
    dtype = autocast_dtype(precision or learner_precision, device)  # ValueError on an unknown precision
    if dtype == torch.float16:  # an old GPU: fp16 gradients without loss scaling can underflow to blank maps
        dtype = None
    x = as_input(images, device)
    if channels_last:
        model.to(memory_format=torch.channels_last)  # as FastDevice leaves it after a batch
        x = x.contiguous(memory_format=torch.channels_last)
    fc = getattr(model, "fc", None)
    tgts = _targets(targets, len(x), fc.out_features if isinstance(fc, nn.Linear) else None)
    if len(x) == 0:
        return np.zeros((0, *x.shape[-2:]), np.float32)
    # Score-CAM runs one forward pass per channel and image, and the library keeps the target layer's output
    # of each of them until the call returns: one image per call bounds that memory, and costs nothing.
    step = 1 if method == "scorecam" else batch_size
    out = []
    with kept_modes(model), torch.enable_grad(), _autocast_for_cam(model, module, dtype):
        model.eval()
        shape = _feature_shape(model, module, x)
        if len(shape) != 4:
            raise ValueError(f"layer {name!r} gives no spatial map (output shape {shape}); choose one of: "
                             f"{', '.join(_layer_choices(model))}")
        quiet = quiet_scorecam() if method == "scorecam" else nullcontext()
        with quiet, cam_cls(model=model, target_layers=[module]) as cam:
            cam.batch_size = batch_size  # Score-CAM's batch of masked inputs
            # Registered after the CAM's hooks: they keep the layer's output and the rest of the network
            # gets a copy, so an in-place op further on (the stem's ReLU(inplace=True) after "stem.1")
            # cannot overwrite the activations the CAM is computed from.
            copy_out = module.register_forward_hook(lambda m, i, o: o.clone())
            try:
                for i in range(0, len(x), step):
                    xb = x[i:i + step].clone().requires_grad_(True)  # gradients flow even with frozen weights
                    tb = None if tgts is None else [ClassifierOutputTarget(t) for t in tgts[i:i + step]]
                    out.append(cam(input_tensor=xb, targets=tb))
            except IndexError as e:  # re-raised as another type: the library's __exit__ would swallow it
                raise RuntimeError(f"{method} on layer {name!r} failed: {e}") from e
            finally:
                copy_out.remove()
    cams = np.concatenate(out).astype(np.float32)
    return align_cams(cams, shape[-2:]) if align else cams


# ---------------------------------------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------------------------------------
def denormalise(x: torch.Tensor) -> np.ndarray:
    """A normalised NCHW batch back to the float HxWx3 RGB images in [0, 1] the model saw."""
    x = x.as_subclass(torch.Tensor).detach().float().cpu()
    x = x * torch.tensor(TINY_STD)[:, None, None] + torch.tensor(TINY_MEAN)[:, None, None]
    return x.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def cam_overlay(image: np.ndarray, cam: np.ndarray, min_side: int = 256, max_side: int = 1024,
                box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """The CAM as a jet heat-map over the image, as uint8 RGB. A small image is enlarged by an integer factor
    with nearest neighbours until its short side is >= `min_side` (64 px pixels stay sharp squares), a big
    one shrunk to a long side of `max_side`; the CAM, of any resolution, is resized smoothly onto it.
    `box` (x0, y0, x1, y1, inclusive, in the image's pixels) is drawn in white."""
    img = image.astype(np.float32) / 255 if image.dtype == np.uint8 else image.astype(np.float32)
    h, w = img.shape[:2]
    if min(h, w) < min_side:
        f = float(np.ceil(min_side / min(h, w)))
        img = cv2.resize(img, (int(w * f), int(h * f)), interpolation=cv2.INTER_NEAREST)
    elif max(h, w) > max_side:
        f = max_side / max(h, w)
        img = cv2.resize(img, (max(1, round(w * f)), max(1, round(h * f))), interpolation=cv2.INTER_AREA)
    H, W = img.shape[:2]
    heat = cv2.resize(cam.astype(np.float32), (W, H), interpolation=cv2.INTER_LINEAR)
    out = show_cam_on_image(np.clip(img, 0, 1), np.clip(heat, 0, 1), use_rgb=True, image_weight=0.55)
    if box is not None:
        fx, fy = W / w, H / h
        x0, y0, x1, y1 = box
        cv2.rectangle(out, (round(x0 * fx), round(y0 * fy)), (round((x1 + 1) * fx) - 1, round((y1 + 1) * fy) - 1),
                      (255, 255, 255), max(1, round(min(fx, fy) / 2)))
    return out

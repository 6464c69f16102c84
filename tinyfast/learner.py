"""The Learner: ResNet18 + SGD with momentum + label-smoothed cross-entropy, and what a CPU needs to be fast.

fastai's `MixedPrecision` and `to_bf16()` autocast on CUDA only; on a CPU with native bf16 (AVX512-BF16, AMX)
the same model trains ~2x faster under bf16 autocast and channels_last. `FastDevice` does that on any device,
in fastai's callback idiom, leaving the loss, the metrics and the optimizer state in fp32.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

import torch
from fastai.callback.core import Callback
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle, lr_find)
from fastai.callback.fp16 import MixedPrecision
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy, top_k_accuracy
from fastai.optimizer import Optimizer, average_grad, l2_reg, momentum_step, sgd_step, weight_decay
from fastai.torch_core import to_float
from torch import nn

from .choices import PRECISIONS
from .model import resnet18


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[None]:
    """Every module's train/eval flag as it was, on exit (the range tests and grad-cam switch the model to eval
    mode and would leave it there)."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


_RECORDER_ATTRS = ("lrs", "iters", "losses", "values", "hps", "metric_names")
_LEARNER_ATTRS = ("epoch", "n_epoch", "train_iter", "pct_train", "final_record", "smooth_loss", "path", "model_dir")
_MISSING = object()


@contextmanager
def kept_state(learn: Learner) -> Iterator[Callable[[], None]]:
    """Everything a `fit` changes, put back on exit: weights, BatchNorm buffers, gradients, the optimizer's state
    and hyper-parameters (or no optimizer), each module's mode, the Recorder's history and the Learner's
    bookkeeping (path and model_dir included). Yields the function that puts the training state back, for a
    caller that must start again from it (a range test that sweeps again). fastai's `lr_find` alone does not do
    this: it saves the optimizer after `fit` has reset its LR, overwrites the Recorder, creates an optimizer
    where there was none and leaves the model in train mode. Deep copies: a state_dict holds the live tensors."""
    model, rec = learn.model, getattr(learn, "recorder", None)
    weights = copy.deepcopy(model.state_dict())
    grads = [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()]
    opt = None if learn.opt is None else copy.deepcopy(learn.opt.state_dict())
    saved = [(obj, name, getattr(obj, name, _MISSING))   # fit rebinds these (new lists): references suffice
             for obj, names in ((rec, _RECORDER_ATTRS), (learn, _LEARNER_ATTRS)) if obj is not None for name in names]

    def restore() -> None:  # copies again: the snapshot may be restored more than once, and must stay intact
        model.load_state_dict(weights)   # copies into the existing tensors: their memory format stays
        for p, g in zip(model.parameters(), grads):
            p.grad = None if g is None else g.clone()   # backward accumulates into .grad in place
        if opt is None:
            learn.opt = None
        elif learn.opt is not None:   # fastai's load_state_dict keeps the dicts it is given (hypers, state)
            learn.opt.load_state_dict(copy.deepcopy(opt))   # state *and* hypers (lr, mom, wd), as they were

    try:
        with kept_modes(model):
            yield restore
    finally:
        restore()
        for obj, name, value in saved:
            if value is not _MISSING:
                setattr(obj, name, value)
            elif name in obj.__dict__:
                delattr(obj, name)


def top5(inp: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Top-5 accuracy (top-k with k = the number of classes when there are fewer than 5)."""
    return top_k_accuracy(inp, targ, k=min(5, inp.shape[-1]))


def cpu_has_native_bf16() -> bool:
    """bf16 autocast pays on a CPU only where the processor computes bf16 itself; emulated, it is slower."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `precision` means on `device`: None for fp32, torch.float16 for CUDA without bf16."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and (precision == "bf16" or cpu_has_native_bf16()):
        return torch.bfloat16
    return None


class FastDevice(Callback):
    """bf16 autocast (where `precision` asks for it) and channels_last, on CPU and CUDA alike, for training
    and for inference (`get_preds`, `predict` run the same callbacks). fp16 on an old GPU goes to fastai's
    `MixedPrecision`, which owns the loss scaling fp16 needs."""
    order = MixedPrecision.order

    def __init__(self, precision: str = "auto", channels_last: bool = True):
        self.precision, self.channels_last = precision, channels_last
        self._ctx, self._dtype_for = None, {}

    def _device(self) -> torch.device:
        return next(self.learn.model.parameters()).device

    def dtype(self) -> torch.dtype | None:
        device = self._device()
        if device not in self._dtype_for:
            self._dtype_for[device] = autocast_dtype(self.precision, device)
        return self._dtype_for[device]

    def before_fit(self):
        if self._device().type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN time its algorithms once
        if self.channels_last:  # before fastai's DistributedTrainer (order 11) wraps it: DDP wants equal strides
            self.learn.model.to(memory_format=torch.channels_last)  # on every rank
        if self.dtype() == torch.float16 and not hasattr(self.learn, "mixed_precision"):
            self.learn.add_cb(MixedPrecision())

    def before_batch(self):
        if self.channels_last:
            self.learn.model.to(memory_format=torch.channels_last)  # no-op once converted
            self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in self.xb)
        dtype = self.dtype()
        if dtype == torch.bfloat16:
            self._ctx = torch.autocast(self._device().type, dtype=dtype)
            self._ctx.__enter__()

    def after_pred(self):
        if self._ctx is not None:
            self.learn.pred = to_float(self.pred)

    def after_loss(self):
        self.close_autocast()

    def after_batch(self):
        self.close_autocast()  # also when the batch was cancelled before `after_loss`

    def close_autocast(self):
        """Leave an autocast context left open by a batch an exception cut short (fit's error paths call it)."""
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def __getstate__(self):  # an autocast context in flight does not pickle (learn.export)
        return {**self.__dict__, "_ctx": None, "_dtype_for": {}}


class CompileModel(Callback):
    """`torch.compile` of the model, in place (`nn.Module.compile`: same module, same `state_dict` keys, so
    model.pth and resume are unchanged). Opt-in (`fit --compile`): the first steps wait for the compiler, so it
    pays on long GPU runs, not on a short CPU one."""
    order = FastDevice.order + 0.5  # after channels_last, before fastai's DistributedTrainer (11) wraps the model

    def __init__(self, **compile_kwargs):
        self.compile_kwargs = compile_kwargs

    def before_fit(self):
        self.learn.model.compile(**self.compile_kwargs)

    def after_fit(self):
        self.learn.model._compiled_call_impl = None  # a compiled forward does not pickle (`learn.export`)


def nesterov_step(p, lr, mom, grad_avg, **kwargs):
    """torch's Nesterov update, `p -= lr * (g + mom * buf)` with `buf = mom * buf + g`, as a fastai stepper."""
    p.data.add_(p.grad.data.add(grad_avg, alpha=mom), alpha=-lr)


def SGD(params, lr: float, mom: float = 0.0, wd: float = 0.0, decouple_wd: bool = True,
        nesterov: bool = False) -> Optimizer:
    """fastai's `SGD`, plus Nesterov momentum, which fastai's lacks. Still a fastai `Optimizer`, so fastai's
    one-cycle and `ReduceLROnPlateau` set its LR and momentum (a torch SGD in `OptimWrapper` they would not)."""
    cbs = [weight_decay] if decouple_wd else [l2_reg]
    if mom == 0:
        return Optimizer(params, cbs + [sgd_step], lr=lr, mom=mom, wd=wd)
    cbs += [average_grad, nesterov_step if nesterov else momentum_step]
    return Optimizer(params, cbs, lr=lr, mom=mom, wd=wd)


def tiny_learner(dls: DataLoaders, model: nn.Module | None = None, stem: str = "cifar", wd: float = 5e-4,
                 mom: float = 0.9, label_smoothing: float = 0.1, precision: str = "auto",
                 channels_last: bool = True, wd_bn_bias: bool = True, decouple_wd: bool = False,
                 nesterov: bool = True, cbs=None, **kwargs) -> Learner:
    """A fastai Learner for TinyImageNet-style `dls`: `resnet18(dls.c)` unless `model` is given, SGD with
    Nesterov momentum and the classic L2 penalty on every parameter (fastai's own `Optimizer`, so its
    schedulers and `ReduceLROnPlateau` act on it), label-smoothed cross-entropy, accuracy + top-5 as metrics.

    Why the classic optimizer rather than fastai's decoupled decay kept off BatchNorm: on real 10-class subsets
    tinyfast trailed the independent classic recipe with fastai's SGD (decoupled 5e-4, or 5e-3, which is about
    as strong as L2 5e-4, since L2 goes through the momentum and acts ~1/(1-mom) = 10x as strongly), and matched
    or passed it with the classic L2 + Nesterov + decay on every parameter (README, "The recipe"). The
    decoupled form stays one argument away: `decouple_wd=True, wd=5e-3, nesterov=False, wd_bn_bias=False`."""
    model = model if model is not None else resnet18(n_classes=dls.c, stem=stem)
    loss = LabelSmoothingCrossEntropyFlat(eps=label_smoothing) if label_smoothing > 0 else CrossEntropyLossFlat()
    cbs = [FastDevice(precision, channels_last)] + list(cbs or [])
    opt_func = partial(SGD, mom=mom, decouple_wd=decouple_wd, nesterov=nesterov)
    return Learner(dls, model, loss_func=loss, opt_func=opt_func, metrics=[accuracy, top5],
                   wd=wd, wd_bn_bias=wd_bn_bias, cbs=cbs, **kwargs)

"""The Learner: ResNet18 + SGD with momentum + label-smoothed cross-entropy, and what a CPU needs to be fast.

fastai's `MixedPrecision` and `to_bf16()` autocast on CUDA only; on a CPU with native bf16 (AVX512-BF16, AMX)
the same model trains ~2x faster under bf16 autocast and channels_last. `FastDevice` does that on any device,
in fastai's callback idiom, leaving the loss, the metrics and the optimizer state in fp32; on a GPU without native
bf16 (T4, V100) it trains in fp16 with loss scaling.
"""
from __future__ import annotations

import copy
from contextlib import contextmanager
from functools import partial
from typing import Callable, Iterator

import torch
from fastai.callback.core import Callback, CancelStepException
import fastai.callback.schedule  # noqa: F401  (patches Learner.fit_one_cycle, lr_find)
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.losses import CrossEntropyLossFlat, LabelSmoothingCrossEntropyFlat
from fastai.metrics import accuracy, top_k_accuracy
from fastai.optimizer import Optimizer, average_grad, l2_reg, momentum_step, sgd_step, weight_decay
from fastai.torch_core import to_float
from torch import nn

from . import compat
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


def optimizer_state_to_params(opt: Optimizer) -> None:
    """Every tensor of a fastai optimizer's state (momentum buffers) onto its parameter's device. fastai's
    `Optimizer.load_state_dict` keeps the tensors it is given where they are: a checkpoint read onto the CPU would
    leave CPU buffers beside CUDA parameters, and the first step would fail."""
    for p, state in opt.state.items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor) and v.device != p.device:
                state[k] = v.to(p.device)


def top5(inp: torch.Tensor, targ: torch.Tensor) -> torch.Tensor:
    """Top-5 accuracy (top-k with k = the number of classes when there are fewer than 5)."""
    return top_k_accuracy(inp, targ, k=min(5, inp.shape[-1]))


def cpu_has_native_bf16() -> bool:
    """bf16 autocast pays on a CPU only where the processor computes bf16 itself; emulated, it is slower."""
    return compat.cpu_has_native_bf16()


NATIVE_BF16_CAPABILITY = (8, 0)  # Ampere: the first NVIDIA GPUs whose tensor cores compute bf16


def precision_choice(precision: str, device: torch.device) -> tuple[torch.dtype | None, str]:
    """The autocast dtype `precision` means on `device` (None: fp32), and why, in words (`doctor` prints them).

    `auto` asks for the compute capability, not `torch.cuda.is_bf16_supported()`: that one is True on a T4 or a
    V100 (capability 7.x) because a bf16 tensor can be *created* there, but their tensor cores compute fp16 only,
    so bf16 runs emulated, slower, and without the loss scaling fp16 needs. fp16 is what those GPUs are for."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None, "fp32, as asked"
    if precision == "fp16":
        return torch.float16, "fp16 autocast with loss scaling, as asked"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        native = (major, minor) >= NATIVE_BF16_CAPABILITY
        if precision == "bf16":
            return torch.bfloat16, "bf16 autocast, as asked" + ("" if native else
                                                               f" (emulated on compute capability {major}.{minor})")
        if native:
            return torch.bfloat16, f"bf16 autocast: compute capability {major}.{minor} computes bf16 natively (from 8.0)"
        return torch.float16, (f"fp16 autocast with loss scaling: compute capability {major}.{minor} has no native "
                               f"bf16 (it starts at 8.0)")
    if device.type == "cpu":
        native = cpu_has_native_bf16()
        if precision == "bf16":
            return torch.bfloat16, "bf16 autocast, as asked" + ("" if native else " (emulated on this CPU)")
        if native:
            return torch.bfloat16, "bf16 autocast: this CPU computes bf16 natively (AVX512-BF16 or AMX)"
        return None, "fp32: this CPU has no native bf16 (AVX512-BF16 or AMX), and emulated bf16 is slower"
    if precision == "bf16":
        return torch.bfloat16, "bf16 autocast, as asked"
    return None, f"fp32: tinyfast chooses no mixed precision on a {device.type} device"


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `precision` means on `device`: None for fp32 (`precision_choice` says why)."""
    return precision_choice(precision, device)[0]


# glibc malloc hands any block above its mmap threshold (at most 32 MiB, by default) straight back to the kernel when
# it is freed, so every training step on the CPU maps its largest activations afresh and page-faults through them:
# 40,000-190,000 minor faults a step for the ResNet18 at batch 256 (imagenet stem at 64 px, cifar stem at 32 px),
# where a raised threshold leaves about 6,000-8,000, and the Learner's training batches ran 0-19% faster, 6% on
# average, in six paired runs (docs/BENCHMARKS.md, "The CPU's allocator, batch 128, and room for a faster run"),
# for 0.05-0.1 GiB more peak RSS (0.3 GiB in an hour's run). The same as
# MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ in the environment, set from inside the process.
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (malloc.h)
KEEP_FREED_BYTES = 1 << 30
_kept: bool | None = None  # keep_freed_memory's answer, once asked


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds so that freed activations are reused, not unmapped and faulted in
    again; once a process. False where the C library is not glibc (macOS, Windows, musl): nothing to do there."""
    global _kept
    if _kept is None:
        try:
            import ctypes
            libc = ctypes.CDLL("libc.so.6")
            _kept = bool(libc.mallopt(M_MMAP_THRESHOLD, KEEP_FREED_BYTES)
                         and libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
        except (OSError, AttributeError):
            _kept = False
    return _kept


class FastDevice(Callback):
    """Mixed precision and channels_last, on CPU and CUDA alike, for training and for inference (`get_preds`,
    `predict` run the same callbacks): bf16 autocast, or fp16 autocast with loss scaling on a GPU without native
    bf16 (`precision_choice`). The loss, the metrics and the optimizer state stay fp32.

    Why not fastai's `MixedPrecision`: it autocasts for 'cuda' only (on a bf16 CPU it does nothing), and it reads
    the loss scale into Python after every step. The loss scaling here is fastai's own pattern (this callback
    poses as the optimizer to torch's `GradScaler`, and a step with inf/NaN gradients is cancelled), on the
    model's device type, so the fp16 path runs, and is tested, on a CPU too. GradScaler decides each step on the
    host: one sync a step, as in every torch fp16 recipe; bf16 and fp32 steps have none."""
    order = 10  # where fastai's MixedPrecision runs: before DistributedTrainer (11) wraps the model

    def __init__(self, precision: str = "auto", channels_last: bool = True):
        self.precision, self.channels_last = precision, channels_last
        self._ctx, self._dtype_for, self.scaler, self.scaler_state = None, {}, None, None

    def _device(self) -> torch.device:
        return next(self.learn.model.parameters()).device

    def dtype(self) -> torch.dtype | None:
        """The autocast dtype on the model's device; None where fastai's own `MixedPrecision` was added."""
        if hasattr(self.learn, "mixed_precision"):
            return None
        device = self._device()
        if device not in self._dtype_for:
            self._dtype_for[device] = autocast_dtype(self.precision, device)
        return self._dtype_for[device]

    def before_fit(self):
        device = self._device()
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input sizes: let cuDNN time its algorithms once
        if device.type == "cpu":
            keep_freed_memory()
        self._to_channels_last()  # on every rank, before DistributedTrainer wraps it: DDP wants equal strides
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype() == torch.float16 else None
        if self.scaler is not None and self.scaler_state is not None:  # a resumed fp16 run: the scale it had
            self.scaler.load_state_dict(self.scaler_state)
            self.scaler_state = None

    def before_validate(self):
        self._to_channels_last()  # get_preds and predict run no before_fit
        if self._device().type == "cpu":
            keep_freed_memory()

    def _to_channels_last(self):
        if self.channels_last:
            self.learn.model.to(memory_format=torch.channels_last)  # a no-op once converted

    def before_batch(self):
        if self.channels_last:
            self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x for x in self.xb)
        dtype = self.dtype()
        if dtype is not None:
            self._ctx = torch.autocast(self._device().type, dtype=dtype)
            self._ctx.__enter__()

    def after_pred(self):
        if self._ctx is not None:
            self.learn.pred = to_float(self.pred)

    def after_loss(self):
        self.close_autocast()

    def before_backward(self):
        if self.scaler is not None:
            self.learn.loss_grad = self.scaler.scale(self.loss_grad)

    def before_step(self):
        """fp16: the gradients unscaled, and the step cancelled when one of them is inf or NaN (the scale then
        drops, in `after_step`)."""
        if self.scaler is None:
            return
        self.skipped = True
        self.scaler.step(self)  # unscales through `param_groups`, then calls `step` below unless inf/NaN
        if self.skipped:
            raise CancelStepException()

    def after_step(self):
        if self.scaler is not None:
            self.scaler.update()

    @property
    def param_groups(self):
        """The optimizer's parameter groups, for `GradScaler`, to which this callback poses as the optimizer."""
        return self.opt.param_groups

    def step(self, *args, **kwargs):
        """Called by `GradScaler.step` when the gradients are finite: fastai's own step follows."""
        self.skipped = False

    def after_batch(self):
        self.close_autocast()  # also when the batch was cancelled before `after_loss`

    def close_autocast(self):
        """Leave an autocast context left open by a batch an exception cut short (fit's error paths call it)."""
        if self._ctx is not None:
            self._ctx.__exit__(None, None, None)
            self._ctx = None

    def __getstate__(self):  # an autocast context in flight does not pickle (learn.export)
        return {**self.__dict__, "_ctx": None, "_dtype_for": {}, "scaler": None, "scaler_state": None}


class CompileModel(Callback):
    """`torch.compile` of the model, in place (`nn.Module.compile`: same module, same `state_dict` keys, so
    model.pth and resume are unchanged). Opt-in (`fit --compile`): the first steps wait for the compiler, so it
    pays on long GPU runs, not on a short CPU one.

    It runs after fastai's `DistributedTrainer` (order 11) has wrapped the model: under DDP what is compiled is
    the DistributedDataParallel module, as torch's DDP + compile guide does, so that dynamo's DDPOptimizer splits
    the graph at the gradient buckets and the all-reduce overlaps the backward pass. An inner model compiled before
    DDP wraps it gives one backward graph whose gradients reach DDP's hooks all at the end: no overlap."""
    order = 11.5

    def __init__(self, **compile_kwargs):
        self.compile_kwargs, self.compiled = compile_kwargs, None

    def before_fit(self):
        self.compiled = self.learn.model  # the DDP wrapper in a distributed fit, else the model itself
        self.compiled.compile(**self.compile_kwargs)

    def after_fit(self):
        if self.compiled is not None:  # a compiled forward does not pickle (`learn.export`)
            compat.uncompile(self.compiled)
            self.compiled = None


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

"""What fastai has no callback for, in its callback idiom: a NaN guard that says where, a run's files written
after every epoch, the time left in the run, and two training levers, an EMA of the weights and progressive
resizing. (Mixup and CutMix are fastai's own `MixUp` and `CutMix`;
test-time augmentation is fastai's `Learner.tta`.)

`StopOnNaN` is the one guard against a non-finite training loss, in `fit` (which reports it) and in the LR range
tests (which end their curve there and carry on). Under DDP every rank hears the verdict of all.

`SmoothLossOnDevice` keeps fastai's smoothed training loss on the device, read by the host every `SYNC_EVERY` batches,
and `MixUpOnDevice` / `CutMixOnDevice` are fastai's `MixUp` / `CutMix` drawing the same random numbers without
making the host wait for the GPU: a GPU step is queued while the previous one runs only if nothing in a training
batch reads a value back from the device (tests/test_host_syncs.py counts them).

`EMA` keeps an exponential moving average of the weights and BatchNorm buffers in a
`torch.optim.swa_utils.AveragedModel` and validates *it*, not the raw weights: the metrics of an EMA run are
the EMA model's, and the run's model.pth holds the EMA weights (`RunLogger` asks `EMA.averaged_state`).

`SmithLRFinder` is Leslie Smith's LR range test as a callback, as fastai's `LRFinder` is its own (the test
itself, its rules and the Learner's state kept around it are in `lr_range`).

`RunLogger` writes a run folder's metrics, best weights and checkpoint after every epoch; `Plateau`, `TensorBoard`
and `Wandb` are fastai's ReduceLROnPlateau and trackers made to survive a resume. A resumed fit replays the epochs
before its checkpoint as cancelled ones (fastai's `SkipToEpoch`), whose `after_epoch` still runs: every callback
here that acts after an epoch asks `ResumeAware.skipped` first, the one rule for that.

`ProgressiveResize` trains the first epochs on smaller images (fastai's progressive resizing, as in the
fast.ai DAWNBench runs), by resizing each training batch on the device: the augmentation still runs once,
at full size, and validation always sees the full size.
"""
from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import numpy as np

import torch
import torch.nn.functional as F
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.callback.mixup import CutMix, MixUp
from fastai.callback.schedule import ParamScheduler, SchedLin
from fastai.callback.tracker import ReduceLROnPlateau
from fastai.learner import AvgSmoothLoss, Recorder
from fastai.torch_core import to_float, unsqueeze
from fastcore.foundation import L
from torch.optim.swa_utils import AveragedModel

from .budget import CHECKPOINT_S, format_seconds, paced_share
from .distributed import all_ranks_min, is_main_process, unwrap_model, world_size
from .errors import NonFiniteLoss, RunError
from .learner import kept_modes
from .run_folder import save_checkpoint, save_model, write_metrics


SYNC_EVERY = 50  # training batches between two reads of a device value by the host (NaN verdict, smoothed loss)


class StopOnNaN(Callback):
    """fastai's `TerminateOnNaNCallback` stops silently; a user needs to know where, and what to try.

    Reading the loss into Python on every batch would make the host wait for the GPU each step, so the check
    stays on the device: each batch folds "is this loss finite?" into the index of the first bad batch (a tensor
    op, no sync), and that index is read every `every` batches and at the end of each training phase, before
    validation and before the epoch's checkpoint. The message names the first bad batch exactly.
    Under DDP the index is the minimum over the ranks (one all-reduce at each read, where every rank reads): a
    NaN on one rank stops them all at the same batch, instead of leaving the others waiting for it in the next
    collective until the process group times out.
    `cancel=True` (the LR range tests, with `every=1`) ends the fit instead, as fastai's `stop_div` does, with the
    LR of the bad batch in `nonfinite_lr`; running after the loss, before the Recorder's `after_batch`, it keeps
    the bad batch off the curve."""
    order = 15  # right after the loss is computed

    def __init__(self, every: int = SYNC_EVERY, cancel: bool = False):
        self.every, self.cancel, self.nonfinite_lr = every, cancel, None

    def before_train(self):
        self.first_bad = None

    def after_loss(self):
        if not self.training:
            return
        if self.first_bad is None:  # -1: none yet, on the loss's device
            self.first_bad = torch.full((), -1, dtype=torch.long, device=self.loss.device)
        bad = (self.first_bad < 0) & ~torch.isfinite(self.loss.detach()).all()
        self.first_bad.masked_fill_(bad, self.iter)
        if (self.iter + 1) % self.every == 0:
            self._check()

    def after_train(self):
        self._check()

    def _check(self):
        if self.first_bad is None:
            return
        first_bad = int(all_ranks_min(self.first_bad, absent=-1))
        if first_bad < 0:
            return
        lr = float(self.opt.hypers[-1]["lr"])
        if self.cancel:
            self.nonfinite_lr = lr
            raise CancelFitException()
        raise NonFiniteLoss(f"loss became NaN or inf at epoch {self.epoch + 1}, batch {first_bad + 1}: "
                            f"lower --lr (now {lr:.3g}) or check the data")


class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's `AvgSmoothLoss` (the same exponential average, the same values) kept where the loss is: fastai's
    `to_detach` copies each batch's loss to the host first."""

    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss.mean().detach()
        self.val = torch.lerp(loss, self.val.to(loss.device, non_blocking=True), self.beta)  # once: reset's 0


class SmoothLossOnDevice(Callback):
    """The Recorder's smoothed training loss on the device, brought to the host every `every` training batches
    and at the end of each training phase. fastai's Recorder copies it to the host after every batch and its
    progress bar reads it with `.item()`: on a GPU each of those makes the host wait for the step to finish. Between
    two reads `learn.smooth_loss` (the progress bar's comment, the trackers' train_loss) holds the last value read;
    `recorder.losses` holds every batch's value, as floats once read."""
    order = Recorder.order + 1  # after the Recorder's after_batch, before the progress bar (60) reads the loss

    def __init__(self, every: int = SYNC_EVERY):
        self.every = every

    def before_fit(self):
        self.recorder.smooth_loss = DeviceSmoothLoss(beta=self.recorder.smooth_loss.beta)
        self.read = len(self.recorder.losses)
        self.host_value = None

    def after_batch(self):
        if not self.training or len(self.yb) == 0:
            return
        if (self.iter + 1) % self.every == 0:
            self._read()
        self._show()

    def after_train(self):
        self._read()
        self._show()

    def _show(self):
        if self.host_value is None:  # nothing read yet: no value, rather than a stand-in the bar would print
            self.learn.__dict__.pop("smooth_loss", None)
        else:
            self.learn.smooth_loss = self.host_value

    def after_cancel_fit(self):
        self._read()

    def _read(self):
        """One copy to the host for every value recorded since the last read."""
        losses = self.recorder.losses
        if len(losses) > self.read:
            values = torch.stack([torch.as_tensor(v) for v in losses[self.read:]]).float().cpu().tolist()
            losses[self.read:] = values
            self.read = len(losses)
            self.host_value = torch.tensor(values[-1])


class MixUpOnDevice(MixUp):
    """fastai's `MixUp`, drawing the same numbers in the same order, with its draws sent to the device without
    waiting (fastai copies them with a blocking `.to`, which waits for the GPU to finish the previous step)."""
    name = "mix_up"  # `learn.mix_up`, as with fastai's

    def before_batch(self):
        device = self.x.device
        lam = self.distrib.sample((self.y.size(0),)).squeeze()
        lam = torch.stack([lam, 1 - lam], 1).max(1)[0]
        self.lam = lam.to(device, non_blocking=True)
        shuffle = torch.randperm(self.y.size(0)).to(device, non_blocking=True)
        xb1, self.yb1 = tuple(L(self.xb).itemgot(shuffle)), tuple(L(self.yb).itemgot(shuffle))
        nx_dims = len(self.x.size())
        self.learn.xb = tuple(L(xb1, self.xb).map_zip(torch.lerp, weight=unsqueeze(self.lam, n=nx_dims - 1)))
        if not self.stack_y:
            ny_dims = len(self.y.size())
            self.learn.yb = tuple(L(self.yb1, self.yb).map_zip(torch.lerp, weight=unsqueeze(self.lam, n=ny_dims - 1)))


class CutMixOnDevice(CutMix):
    """fastai's `CutMix`, drawing the same numbers in the same order, with the box drawn on the host: fastai draws
    it on the device and then slices the batch with those device tensors, and each slice bound read back makes the
    host wait for the GPU (four times a batch, plus three blocking copies)."""
    name = "cut_mix"  # `learn.cut_mix`, as with fastai's

    def before_batch(self):
        bs, _, H, W = self.x.size()
        device = self.x.device
        lam = self.distrib.sample((1,))
        shuffle = torch.randperm(bs).to(device, non_blocking=True)
        xb1, self.yb1 = self.x[shuffle], tuple((self.y[shuffle],))
        x1, y1, x2, y2 = self.host_box(W, H, lam)
        self.learn.xb[0][..., y1:y2, x1:x2] = xb1[..., y1:y2, x1:x2]
        self.lam = (1 - torch.tensor([(x2 - x1) * (y2 - y1)]) / float(W * H)).to(device, non_blocking=True)
        if not self.stack_y:
            ny_dims = len(self.y.size())
            self.learn.yb = tuple(L(self.yb1, self.yb).map_zip(torch.lerp, weight=unsqueeze(self.lam, n=ny_dims - 1)))

    @staticmethod
    def host_box(W: int, H: int, lam: torch.Tensor) -> tuple[int, int, int, int]:
        """fastai's `rand_bbox`, computed on the host: (x1, y1, x2, y2) as Python ints."""
        cut_rat = torch.sqrt(1. - lam)
        cut_w = torch.round(W * cut_rat).type(torch.long)
        cut_h = torch.round(H * cut_rat).type(torch.long)
        cx = torch.randint(0, W, (1,))
        cy = torch.randint(0, H, (1,))
        x1 = torch.clamp(cx - torch.div(cut_w, 2, rounding_mode="floor"), 0, W)
        y1 = torch.clamp(cy - torch.div(cut_h, 2, rounding_mode="floor"), 0, H)
        x2 = torch.clamp(cx + torch.div(cut_w, 2, rounding_mode="floor"), 0, W)
        y2 = torch.clamp(cy + torch.div(cut_h, 2, rounding_mode="floor"), 0, H)
        return int(x1), int(y1), int(x2), int(y2)


def ema_decay(decay: float, n: int) -> float:
    """timm's warm-up of the decay, `min(decay, (1 + n) / (10 + n))` after n updates, so that the first updates
    do not drag the average towards the random init."""
    return min(decay, (1 + n) / (10 + n))


class EMA(Callback):
    """An EMA of the weights, updated after every optimizer step and swapped in for validation."""
    order = 66  # after the schedulers (60) and before RunLogger (70), which saves `averaged_state()`

    def __init__(self, decay: float = 0.999, state: dict | None = None):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.state, self.averaged, self._raw = decay, state, None, None

    def before_fit(self):
        model = unwrap_model(self.learn.model)
        self.averaged = AveragedModel(model, use_buffers=True)
        if self.state is not None:  # a resumed run: the average as it was at the checkpoint
            self.averaged.load_state_dict(self.state)
        self.n = int(self.averaged.n_averaged)  # counted in Python: reading the tensor each step syncs a GPU
        pairs = list(zip(self.averaged.module.state_dict().values(), model.state_dict().values()))
        self._floats = ([a for a, m in pairs if a.is_floating_point()], [m for a, m in pairs if a.is_floating_point()])
        self._others = [(a, m) for a, m in pairs if not a.is_floating_point()]

    @torch.no_grad()
    def after_step(self):
        """avg += (1 - d) * (current - avg) on every float tensor in one fused `_foreach_lerp_`, integer buffers
        (BatchNorm's `num_batches_tracked`) copied: no per-tensor kernel, no host sync."""
        averaged, current = self._floats
        if self.n == 0:
            torch._foreach_copy_(averaged, current)
        else:
            torch._foreach_lerp_(averaged, current, 1.0 - ema_decay(self.decay, self.n))
        for a, m in self._others:
            a.copy_(m)
        self.n += 1
        self.averaged.n_averaged.fill_(self.n)

    def before_validate(self):
        model = unwrap_model(self.learn.model)
        self._raw = {k: v.detach().clone() for k, v in model.state_dict().items()}
        model.load_state_dict(self.averaged_state())

    def after_validate(self):
        self._restore()

    def after_cancel_validate(self):
        self._restore()

    def _restore(self):
        if self._raw is not None:
            unwrap_model(self.learn.model).load_state_dict(self._raw)
            self._raw = None

    def averaged_state(self) -> dict:
        """The EMA weights, keyed as the model's own `state_dict` (what model.pth holds)."""
        return self.averaged.module.state_dict()

    def checkpoint_state(self) -> dict:
        """The averaged model with its update count, for a resume."""
        return self.averaged.state_dict()


def progressive_costs(size: int, start: int) -> Callable[[int], list[float]] | None:
    """For `--budget` with `--progressive start`: each epoch's step cost relative to one at `size`, for a plan of n
    epochs (a step costs as its pixels); None without progressive resizing."""
    if not start:
        return None
    return lambda n: [(s / size) ** 2 for s in progressive_sizes(size, n, start)]


def progressive_sizes(size: int, epochs: int, start: int, until: float = 0.5, step: int = 8) -> list[int]:
    """The training size of each epoch: from `start` at epoch 1, growing linearly in multiples of `step`, to
    `size` from epoch `ceil(until * epochs) + 1` on, so that the last epochs (and the BatchNorm statistics
    they leave) are at the size the model is validated at."""
    if not 0 < start <= size:
        raise ValueError(f"progressive resizing needs 0 < start <= size, got start={start}, size={size}")
    if not 0.0 < until <= 1.0:
        raise ValueError(f"progressive resizing `until` must be in (0, 1], got {until}")
    ramp = min(epochs, math.ceil(until * epochs))
    sizes = []
    for epoch in range(epochs):
        if epoch >= ramp:
            sizes.append(size)
            continue
        s = start + (size - start) * epoch / ramp
        sizes.append(int(min(size, max(start, step * round(s / step)))))
    return sizes


class ProgressiveResize(Callback):
    """Resizes each training batch to `sizes[epoch]` (bilinear, antialiased): the plan from
    `progressive_sizes`. Validation batches pass untouched."""
    order = 5  # before FastDevice (10) sets channels_last on the batch; after MixUp/CutMix (0), which commute with it

    def __init__(self, sizes: list[int]):
        self.sizes = list(sizes)

    def before_batch(self):
        if not self.training:
            return
        s = self.sizes[min(self.epoch, len(self.sizes) - 1)]
        x = self.xb[0]
        if x.ndim == 4 and x.shape[-1] != s:
            resized = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
            self.learn.xb = (resized.as_subclass(type(x)),) + tuple(self.xb[1:])


class SmithLRFinder(ParamScheduler):
    """Leslie Smith's range test as a callback: a linear LR sweep from `start_lr` to `end_lr` over `num_it`
    training steps, and after each step the loss on the fixed `held_out` batches (eval mode, no_grad, the
    learner's loss function, under the autocast dtype the learner's `FastDevice` trains with, as `validate`
    would). Like fastai's `LRFinder` it skips validation and stops when the loss diverges; the sweep trains the
    model, which `lr_range_test` puts back afterwards."""
    order = 60   # a ParamScheduler: after the Recorder, so the step's LR is already logged
    divergence = 4.0   # with stop_div, stop once the loss is 4x the best so far (fastai's `LRFinder` rule)

    def __init__(self, held_out: list[tuple], start_lr: float = 1e-3, end_lr: float = 1.0, num_it: int = 100,
                 stop_div: bool = True):
        if num_it < 2:
            raise ValueError(f"num_it must be at least 2 for a sweep, got {num_it}")
        super().__init__({"lr": SchedLin(start_lr, end_lr)})
        self.held_out, self.num_it, self.stop_div = held_out, num_it, stop_div
        self.lrs, self.losses, self.nonfinite_lr = [], [], None

    def before_fit(self):
        super().before_fit()
        self.lrs, self.losses, self.nonfinite_lr, self.best = [], [], None, math.inf

    def before_batch(self):
        self._update_val(self.train_iter / (self.num_it - 1))   # exactly start_lr ... end_lr, linearly

    def after_batch(self):
        super().after_batch()
        lr, loss = float(self.opt.hypers[-1]["lr"]), self.held_out_loss()
        if not math.isfinite(loss):
            self.nonfinite_lr = lr
            raise CancelFitException()
        self.lrs.append(lr)
        self.losses.append(loss)
        self.best = min(self.best, loss)
        if (self.stop_div and loss > self.divergence * self.best) or self.train_iter >= self.num_it:
            raise CancelFitException()

    def before_validate(self):
        raise CancelValidException()

    def held_out_loss(self) -> float:
        model, fast = self.learn.model, getattr(self.learn, "fast_device", None)
        dtype = fast.dtype() if fast is not None else None
        device = next(model.parameters()).device
        total, count = 0.0, 0
        with kept_modes(model), torch.no_grad(), (torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()):
            model.eval()
            for *xb, yb in self.held_out:
                loss = self.learn.loss_func(to_float(model(*xb)), yb)
                total, count = total + float(loss) * len(yb), count + len(yb)
        return total / count


# ---------------------------------------------------------------------------------------------------------
# A run's callbacks (`tinyfast.train.fit`)
# ---------------------------------------------------------------------------------------------------------
class ResumeAware:
    """A callback of a resumed fit: the epochs before `start_epoch` are the ones a resume skips (fastai's
    `SkipToEpoch` cancels them, then runs their `after_epoch`): there is nothing to record, track or time."""
    start_epoch: int = 0

    def skipped(self) -> bool:
        return self.epoch < self.start_epoch


class RunLogger(ResumeAware, Callback):
    """After every epoch: a metrics.csv row, model.pth when accuracy improves (the EMA weights in an EMA run),
    and checkpoint.pth holding all a resume needs (model, optimizer, EMA, loss scale, epoch, the train
    DataLoader's rng, the rows and the LR/mom trace)."""
    order = 70  # after Recorder (50) and the trackers (60-62)

    def __init__(self, run_dir: Path, start: dict | None = None):
        self.run_dir = Path(run_dir)
        start = start or {}
        self.rows: list[dict] = start.get("rows", [])
        self.lrs: list[float] = start.get("lrs", [])
        self.moms: list[float] = start.get("moms", [])
        self.start_epoch: int = start.get("epoch", 0)
        self.best = max((r["accuracy"] for r in self.rows), default=-1.0)
        self.writes = is_main_process()  # every rank keeps the rows (metrics are gathered), rank 0 writes

    @property
    def best_epoch(self) -> int | None:
        return max(self.rows, key=lambda r: r["accuracy"])["epoch"] if self.rows else None

    def before_epoch(self):
        self.t_epoch = time.perf_counter()

    def before_train(self):
        self.t_train = time.perf_counter()

    def after_train(self):
        if self.dls.device is not None and torch.device(self.dls.device).type == "cuda":
            torch.cuda.synchronize()  # the queued kernels are training time too
        self.train_seconds = time.perf_counter() - self.t_train

    def after_batch(self):
        if self.training and not self.skipped():
            h = self.opt.hypers[-1]
            self.lrs.append(float(h["lr"]))
            self.moms.append(float(h.get("mom", 0.0)))

    def after_epoch(self):
        if self.skipped():
            return
        train_loss, valid_loss, acc, top5 = (float(v) for v in self.recorder.values[-1][:4])
        seconds = time.perf_counter() - self.t_epoch
        elapsed = (self.rows[-1]["elapsed"] if self.rows else 0.0) + seconds
        self.rows.append(dict(epoch=self.epoch + 1, train_loss=train_loss, valid_loss=valid_loss, accuracy=acc,
                              top5=top5, time=round(seconds, 3), elapsed=round(elapsed, 3),
                              train_seconds=round(self.train_seconds, 3)))
        improved = acc > self.best
        self.best = max(self.best, acc)
        if not self.writes:
            return
        model, ema = unwrap_model(self.learn.model), getattr(self.learn, "ema", None)
        fast, plateau = getattr(self.learn, "fast_device", None), getattr(self.learn, "plateau", None)
        if improved:  # the weights that were validated: the EMA's when there is one
            save_model(self.run_dir, ema.averaged_state() if ema is not None else model.state_dict())
        write_metrics(self.run_dir, self.rows)
        save_checkpoint(self.run_dir, dict(
            model=model.state_dict(), opt=self.learn.opt.state_dict(), epoch=self.epoch + 1,
            ema=ema.checkpoint_state() if ema is not None else None,
            dl_rng=self.dls.train.rng.getstate(), py_rng=random.getstate(), np_rng=np.random.get_state(),
            torch_rng=torch.get_rng_state(), rows=self.rows, lrs=self.lrs, moms=self.moms,
            lr=float(self.opt.hypers[-1]["lr"]), plateau=(plateau.best, plateau.wait) if plateau is not None else None,
            scaler=fast.scaler.state_dict() if fast is not None and fast.scaler is not None else None))


class Plateau(ResumeAware, ReduceLROnPlateau):
    """fastai's ReduceLROnPlateau (acting on fastai's own SGD) whose `best` and `wait` survive a resume."""

    def __init__(self, *args, state: tuple | None = None, start_epoch: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.state, self.start_epoch = state, start_epoch

    def before_fit(self):
        super().before_fit()
        if self.state is not None:
            self.best, self.wait = self.state

    def after_epoch(self):
        if not self.skipped():
            super().after_epoch()


class TimeLeft(ResumeAware, Callback):
    """After each epoch, the wall time left in the whole run: to the budget's deadline in a budgeted run, else the
    mean epoch so far times the epochs to go. The progress bar only knows the epoch's."""
    order = 75  # after RunLogger (70) has written the epoch

    def __init__(self, deadline: float | None = None, show: bool = True, start_epoch: int = 0):
        self.deadline, self.show, self.start_epoch, self.durations = deadline, show, start_epoch, []

    def before_epoch(self):
        self.t_epoch = time.perf_counter()

    def after_epoch(self):
        if self.skipped():
            return
        self.durations.append(time.perf_counter() - self.t_epoch)
        to_go = self.n_epoch - self.epoch - 1
        if self.deadline is not None:
            self.left = max(0.0, self.deadline - time.time())
        else:
            self.left = to_go * float(np.mean(self.durations))
        if self.show and to_go > 0:
            print(f"epoch {self.epoch + 1}/{self.n_epoch} done: ~{format_seconds(self.left)} left in the run")


DISTRIBUTED_EVERY = 8  # batches between the ranks' agreements on where an epoch of a budget run stops


class BudgetPace(ResumeAware, Callback):
    """Keeps a budgeted run on its deadline. The plan's step time comes from a few throwaway batches, and a whole
    epoch ran 10-23% slower than that on the 2-core CPU (issue #29's 24 px screen: 113% of its budget). So:
    - before each epoch, the share of its shuffle to train on is set again from the time left and the times
      measured so far (`paced_share`);
    - during an epoch, once a tenth of it has given a step time, it stops early where going on would leave the
      epochs to go less than the share of the time this one took (in the last epoch: where it would pass the
      deadline), its position in the schedule stretched so that its slice of the one-cycle still ends. fastai sets
      `pct_train` to epoch/n_epoch before each epoch, so each epoch keeps its slice whatever its length.
    In a distributed run the ranks take the smallest share and the earliest stop (a collective an epoch, and one
    every `DISTRIBUTED_EVERY` batches), as their loaders must stay the same length."""
    order = 80  # after RunLogger's checkpoint (70) and TimeLeft (75): an epoch's time includes them
    clock = staticmethod(time.time)  # the deadline's clock (tests run it at the plan's pace)

    def __init__(self, deadline: float, plan: dict, reserve_s: float, costs: list[float] | None = None,
                 start_epoch: int = 0):
        self.deadline, self.reserve_s, self.given_costs, self.start_epoch = deadline, reserve_s, costs, start_epoch
        self.train_epoch_s = plan["epoch_s"] / plan["epoch_share"]  # the whole shuffle, at the run's size
        self.fixed_s = plan["valid_s"] + CHECKPOINT_S
        self.measured, self.shares, self.stopped = [], [], {}

    def before_fit(self):
        self.costs = self.given_costs or [1.0] * self.n_epoch
        self.every = DISTRIBUTED_EVERY if world_size() > 1 else 1
        train = self.dls.train
        share, train.epoch_share = train.epoch_share, 1.0
        self.full_iters = len(train)
        train.epoch_share = share

    def left_s(self) -> float:
        return self.deadline - self.clock() - self.reserve_s

    def before_epoch(self):
        if self.skipped():
            return
        share = paced_share(self.left_s(), self.costs[self.epoch:], self.train_epoch_s, self.fixed_s)
        self.share = int(all_ranks_min(torch.tensor(round(share * 1e6)))) / 1e6
        self.dls.train.epoch_share = self.share
        self.shares.append(round(self.share, 4))
        self.t_epoch = self.clock()

    def before_train(self):
        self.t_train, self.done, self.target = self.clock(), 0, None
        self.dl.stop_after = None

    def after_batch(self):
        if not self.training or self.skipped():
            return
        self.done, self.target = self.iter + 1, self.target or self.n_iter
        if self.done == 1:  # the first batch carries the loader's start: the step time is measured after it
            self.t_first = self.clock()
        if self.done >= max(2, self.n_iter // 10) and self.done % self.every == 0 and self.done < self.target:
            # this epoch's batches to go, r, and the later epochs (relative cost `later` to this one's) at the share
            # this one ends with, (done + r) / full_iters, fill the training time left: the deficit is shared out
            batch_s = (self.clock() - self.t_first) / (self.done - 1)
            later = sum(self.costs[self.epoch + 1:]) / self.costs[self.epoch]
            train_left = self.left_s() - (self.n_epoch - self.epoch) * self.fixed_s
            fits = max(1, int((train_left / batch_s - self.done * later) / (1 + later)))  # 1: the slice's end
            self.target = int(all_ranks_min(torch.tensor(min(self.target, self.done + fits))))
        if self.target < self.n_iter:  # pct_train reaches the end of this epoch's slice at the new last batch
            self.learn.pct_train = (self.epoch + self.done / self.target) / self.n_epoch
            if self.done >= self.target:  # the loader ends the epoch here: the Recorder logs it as any other
                self.stopped[self.epoch + 1] = self.done
                self.dl.stop_after = self.done

    def after_train(self):
        self.train_s = self.clock() - self.t_train

    def after_epoch(self):
        if self.skipped() or not self.done:
            return
        self.measured.append(self.train_s * self.full_iters / self.done / self.costs[self.epoch])
        self.train_epoch_s = float(np.mean(self.measured))
        self.fixed_s = self.clock() - self.t_epoch - self.train_s

    def outcome(self) -> dict:
        """What the pacing did, for config.json: each epoch's share, and the epochs stopped early (at which batch)."""
        return {"epoch_shares": self.shares, "stopped_early": {str(k): v for k, v in self.stopped.items()}}


def tensorboard_callback(run_dir: Path, start_epoch: int) -> Callback:
    """fastai's TensorBoardCallback into RUN_DIR/tensorboard; the model graph and the prediction images left out
    (tracing runs a batch, images need show_results)."""
    from fastai.callback.tensorboard import TensorBoardCallback

    class TensorBoard(ResumeAware, TensorBoardCallback):
        def after_epoch(self):
            if not self.skipped():
                super().after_epoch()

    cb = TensorBoard(log_dir=run_dir / "tensorboard", trace_model=False, log_preds=False)
    cb.start_epoch = start_epoch
    return cb


def wandb_callback(start_epoch: int) -> Callback:
    """fastai's WandbCallback (wandb itself initialised by the caller, with the run's own arguments as its config:
    fastai's walk over the learner's arguments fails on a Path inside the datasets)."""
    from fastai.callback.wandb import WandbCallback

    class Wandb(ResumeAware, WandbCallback):
        def before_fit(self):
            self.learn.gather_args = dict  # "vars() argument must have __dict__" on a slotted Path otherwise
            try:
                super().before_fit()
            finally:
                del self.learn.gather_args

        def after_epoch(self):
            if not self.skipped():
                super().after_epoch()

    cb = Wandb(log_preds=False, log_model=False)
    cb.start_epoch = start_epoch
    return cb


def check_tracker(log: str) -> None:
    """Before any folder is made: a tracker whose package is missing is one line, not an ImportError mid-run."""
    import importlib.util
    package = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(log)
    if package and importlib.util.find_spec(package) is None:
        raise RunError(f"--log {log} needs the {package} package: pip install {package} (metrics.csv is written "
                       f"without it, with --log csv)")


def tracker_callbacks(args: dict, run_dir: Path, start: dict | None = None, quiet: bool = False) -> list:
    """fastai's TensorBoardCallback or WandbCallback, writing into the run folder (rank 0 only, as fastai's own)."""
    log, start_epoch = args.get("log", "csv"), (start or {}).get("epoch", 0)
    if log == "tensorboard":
        return [tensorboard_callback(run_dir, start_epoch)]
    if log == "wandb" and is_main_process():
        import wandb
        if wandb.run is None:
            wandb.init(project="tinyfast", dir=str(run_dir), config=args, mode=os.environ.get("WANDB_MODE", "offline"),
                       name=run_dir.name, settings=wandb.Settings(silent=quiet))
        return [wandb_callback(start_epoch)]
    return []


def lever_callbacks(args: dict, start: dict | None = None) -> list:
    """The callbacks of the levers `args` turns on (EMA, mixup or cutmix, progressive resizing)."""
    cbs = []
    if args.get("ema"):
        cbs.append(EMA(args["ema"], state=(start or {}).get("ema")))
    if args.get("mixup"):
        cbs.append(MixUpOnDevice(args["mixup"]))
    if args.get("cutmix"):
        cbs.append(CutMixOnDevice(args["cutmix"]))
    if args.get("progressive"):
        cbs.append(ProgressiveResize(progressive_sizes(args["size"], args["epochs"], args["progressive"])))
    return cbs

"""A run planned for the time there is (`fit --budget 90m`), instead of for a number of epochs.

Users have an afternoon on a laptop or 15 minutes of a lent GPU; fastai, timm and the classic recipe all ask for
epochs. Budgeted training (Li, Yumer and Ramanan, ICLR 2020) shows that a schedule fitted to the budget beats a
long schedule cut short, so the budget plans the run and the one-cycle schedule always completes:

1. the image size, where `--size` is not given: a few throwaway steps of the bare model at 16 and 32 px give this
   machine's step time as a fixed cost plus a cost per pixel, which gives it at the other sizes, and `choose_size`
   takes the largest size that still affords `MIN_EPOCHS_FOR_SIZE` epochs (a step at 16 px costs half of one at
   32 px on the 2-core CPU, not a quarter: the fixed cost matters); where `--stem` is not given either and that
   size is small, `choose_stem` takes the imagenet stem at 64 px instead, if it affords as many epochs there;
2. after the cache build and the range test of `--lr auto` (both spent from the budget), a few throwaway training
   and validation batches of the real Learner (`measure`, which puts everything back) give the step and
   validation times at that size;
3. `plan_epochs` fits the epochs, fractional: a plan of 6.4 epochs is 8 epochs, each training on the first 80%
   of its shuffle (`CachedBatchDL.epoch_share`), so the schedule spans the iterations there is time for, and every
   epoch is validated and checkpointed; the share is at most `PLAN_SHARE`, room for the pacing to give a faster
   run more;
4. during the run, `tinyfast.callbacks.BudgetPace` keeps to the deadline: each epoch's share is set again from
   the time left and the times measured so far (`paced_share`), and an epoch ends early, its slice of the schedule
   completed, where going on would leave the later epochs short (the last: where it would pass the deadline).

A budget too small for one epoch at the smallest size is `BudgetTooSmall`, naming the smallest workable budget.
"""
from __future__ import annotations

import math
import random
import shutil
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException, CancelTrainException, CancelValidException
from fastai.learner import Learner

from .distributed import is_main_process, on_main
from .config import BUDGET_SIZES as SIZES, parse_budget  # noqa: F401  (the budget's names, kept here)
from .errors import RunError
from .learner import keep_freed_memory, kept_state
from .run_folder import update_config

if TYPE_CHECKING:
    from .config import RunConfig


# The largest size that affords this many epochs. The 30-minute screen on the whole dataset (docs/BENCHMARKS.md,
# "The whole dataset on 2 CPU cores") measured val top-1 0.324 at 16 px (5.3 epochs), 0.331 at 24 px (3.4) and
# 0.274 at 32 px (1.8): between 3.4 and 5.3 epochs the size hardly mattered, below 2 it cost 5 points. 4 keeps to
# the safe side of that cliff: 16 px for 30 minutes on the 2-core CPU, 24 px for 60, 32 px for 2 hours, 64 px for a
# GPU. The 60-minute run at 24 px reached 0.395, the 120-minute run at 32 px 0.459 (BENCHMARKS). A run validates at
# the size it trained at: the 24 px model lost 1.7 points at 32 px and 31 at 64 (BENCHMARKS, "Validating a model
# trained small at a larger size").
MIN_EPOCHS_FOR_SIZE = 4
# The stem, where neither --stem, --size nor --progressive is given. The imagenet stem (7x7 stride 2 + max-pool)
# at 64 px costs a step about what the cifar stem costs at 16 px, and sees the whole image where the cifar stem
# sees it shrunk. On the whole dataset (docs/BENCHMARKS.md, "The imagenet stem under a budget") it reached 0.385
# in 30 minutes, where the cifar stem reached 0.331 at 24 px and 0.324 at 16, and 0.473 in 60 minutes, where the
# cifar stem reached 0.395 at 24 px. So where the cifar stem's rule would train below 32 px, the budget takes the
# imagenet stem at 64 px, if that affords MIN_EPOCHS_FOR_SIZE epochs. At 32 px and above (2 hours on the 2-core
# CPU; a GPU) the cifar stem stays: the imagenet stem was not measured against it there.
CIFAR_STEM_FROM = 32
MIN_EPOCHS = 1.0  # below one epoch of the smallest size a run is not worth starting
MIN_SHARE = 0.02  # of an epoch's shuffle: a run far behind its plan still trains a little and validates each epoch
# The plan trains at most this share of each epoch's shuffle, so that `BudgetPace` can give a run that steps faster
# than it planned the time it saves (up to 1/PLAN_SHARE as fast); it takes time back from a slower run at any
# share. Planned at whole epochs, two runs on the whole dataset had time they could not use: 96.1% of an hour (its
# last epochs whole) and 80.9% of 30 minutes (its first epoch slowed by a load beside it) (docs/BENCHMARKS.md, "The
# CPU's allocator, batch 128, and room for a faster run"). Each epoch the room adds costs a validation and a
# checkpoint: it is taken only while those of all the epochs stay within ROOM_FIXED_MAX of the time left (3-4% on
# the whole dataset on this CPU; on tiny data they would dominate).
PLAN_SHARE = 0.8
ROOM_FIXED_MAX = 0.1
CHECKPOINT_S = 1.0  # the plan's allowance for an epoch's checkpoint, until one is measured
RESERVE = (5.0, 0.01)  # seconds, and share of the budget, kept for the end: best weights back, learner.pkl, plots


class BudgetTooSmall(RunError):
    """The budget cannot buy one epoch: the message names the smallest budget that can. Exit code 2, as a flag
    out of its range."""
    exit_code = 2


def format_seconds(seconds: float) -> str:
    """`45 s`, `13 min`, `1 h 05 min`: for plans and time-left lines."""
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


@dataclass
class Timing:
    """This machine's cost of one run at one size: per training batch, per validation batch, per checkpoint."""
    train_batch_s: float
    valid_batch_s: float
    train_batches: int  # a whole epoch's
    valid_batches: int
    checkpoint_s: float = CHECKPOINT_S

    @property
    def train_epoch_s(self) -> float:
        return self.train_batch_s * self.train_batches

    @property
    def valid_s(self) -> float:
        return self.valid_batch_s * self.valid_batches


@dataclass
class Plan:
    budget_s: float
    spent_s: float      # before training: cache build, range test, measurement
    size: int
    epochs: float       # of the whole training set
    n_epoch: int        # validated epochs: `epochs` spread over them
    epoch_share: float  # the share of each epoch's shuffle that is trained on
    epoch_s: float      # one epoch's training time, at epoch_share
    valid_s: float
    reserve_s: float

    def line(self, budget_text: str) -> str:
        return (f"budget {budget_text}: {self.epochs:.1f} epochs at {self.size} px "
                f"({self.n_epoch} of {self.epoch_share:.0%} of the training set), ~{format_seconds(self.epoch_s)} "
                f"each, validation {format_seconds(self.valid_s)}; {format_seconds(self.spent_s)} spent before "
                f"training")

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def reserve_for(budget_s: float) -> float:
    return RESERVE[0] + RESERVE[1] * budget_s


def plan_epochs(budget_s: float, spent_s: float, timing: Timing, size: int,
                cost_of_epoch: Callable[[int], list[float]] | None = None) -> Plan:
    """The most training the time left buys, every epoch validated and checkpointed. `cost_of_epoch` (a factor per
    validated epoch, for progressive resizing: smaller images cost less) is called with the number of epochs."""
    left = budget_s - spent_s - reserve_for(budget_s)
    per_epoch_fixed = timing.valid_s + timing.checkpoint_s
    # n validated epochs, each training on `share` of the set: share * T * sum(factors) + n * fixed = left. Every
    # validation costs training time, so the fewest epochs with share <= PLAN_SHARE train the most (<= 1, where
    # another epoch's validation would cost too much).
    n_epoch = 1
    while True:
        factors = cost_of_epoch(n_epoch) if cost_of_epoch else [1.0] * n_epoch
        share = (left - n_epoch * per_epoch_fixed) / (timing.train_epoch_s * sum(factors))
        room_too_dear = (n_epoch + 1) * per_epoch_fixed > ROOM_FIXED_MAX * left
        if share <= PLAN_SHARE or (share <= 1.0 and room_too_dear):
            break
        n_epoch += 1
    epochs = max(share, 0.0) * n_epoch
    smallest = spent_s + timing.train_epoch_s * MIN_EPOCHS + per_epoch_fixed
    smallest = (smallest + RESERVE[0]) / (1 - RESERVE[1])
    if epochs < MIN_EPOCHS:
        raise BudgetTooSmall(f"a budget of {format_seconds(budget_s)} buys {max(epochs, 0):.2f} epochs at {size} px "
                             f"here ({format_seconds(spent_s)} went to the data and set-up, an epoch takes "
                             f"{format_seconds(timing.train_epoch_s + per_epoch_fixed)}): the smallest workable "
                             f"budget is about {math.ceil(smallest / 60)}m")
    return Plan(budget_s, spent_s, size, epochs, n_epoch, share, share * timing.train_epoch_s, timing.valid_s,
                reserve_for(budget_s))


def paced_share(left_s: float, costs: list[float], train_epoch_s: float, per_epoch_fixed_s: float) -> float:
    """The share of each epoch's shuffle to train on so that the epochs to go (`costs`: each one's step cost
    relative to the run's size) end when `left_s` does: `plan_epochs`'s arithmetic again, with the clock's time
    left and the times measured so far (`tinyfast.callbacks.BudgetPace`)."""
    share = (left_s - len(costs) * per_epoch_fixed_s) / (train_epoch_s * sum(costs))
    return min(1.0, max(MIN_SHARE, share))


def choose_size(train_epoch_s_at: dict[int, float], valid_s_at: dict[int, float], left_s: float) -> int:
    """The largest of `SIZES` that affords `MIN_EPOCHS_FOR_SIZE` epochs in `left_s`, else the smallest."""
    for size in sorted(train_epoch_s_at, reverse=True):
        if MIN_EPOCHS_FOR_SIZE * (train_epoch_s_at[size] + valid_s_at[size]) <= left_s:
            return size
    return min(train_epoch_s_at)


def probe_step_s(model: torch.nn.Module, bs: int, size: int, dtype: torch.dtype | None, device: torch.device,
                 steps: int = 3) -> tuple[float, float]:
    """(training step, inference pass) seconds of `model` on a random batch at `size` px, after one warm-up each:
    the bare model, before any data is decoded. The model is given back as it was."""
    x = torch.randn(bs, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (bs,), device=device)
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else nullcontext
    model.to(device=device, memory_format=torch.channels_last)
    if device.type == "cpu":
        keep_freed_memory()  # as the run's FastDevice will: the probe times the steps the run will take

    def step():
        with autocast():
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()

    def forward():
        with torch.no_grad(), autocast():
            model(x)

    times = []
    try:
        for fn in (step, forward):
            model.train(fn is step)
            fn()
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                fn()
            _sync(device)
            times.append((time.perf_counter() - t) / steps)
    finally:
        model.load_state_dict(saved)
        model.train()
    return times[0], times[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Clock(Callback):
    """Times `n_train` training batches and `n_valid` validation batches after `warmup` of each, then ends the
    fit. Runs before every other callback of a batch and after every other callback's after_batch."""
    order = -1000

    def __init__(self, n_train: int, n_valid: int, warmup: int):
        self.n_train, self.n_valid, self.warmup = n_train, n_valid, warmup
        self.train_s, self.valid_s = [], []

    def before_batch(self):
        _sync(self.dls.device or torch.device("cpu"))
        self.t = time.perf_counter()

    def after_batch(self):
        _sync(self.dls.device or torch.device("cpu"))
        times = self.train_s if self.training else self.valid_s
        times.append(time.perf_counter() - self.t)
        if self.training and len(times) >= self.warmup + self.n_train:
            raise CancelTrainException()
        if not self.training and len(times) >= self.warmup + self.n_valid:
            raise CancelValidException()

    def after_validate(self):
        raise CancelFitException()

    def after_cancel_validate(self):
        raise CancelFitException()


def measure(learn: Learner, lr: float, n_train: int = 4, n_valid: int = 2, warmup: int = 2) -> Timing:
    """Throwaway batches of the real Learner (loader, transforms, callbacks, model), timed, then everything put
    back: weights, optimizer, random states, the loader's stream. Medians, after `warmup` batches of each."""
    rng = learn.dls.train.rng.getstate()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    clock = _Clock(n_train, n_valid, warmup)
    with kept_state(learn), learn.no_bar(), learn.no_logging():
        learn.fit(1, lr, cbs=[clock])
    learn.dls.train.rng.setstate(rng)
    random.setstate(states[0])
    np.random.set_state(states[1])
    torch.set_rng_state(states[2])
    train = clock.train_s[warmup:] or clock.train_s
    valid = clock.valid_s[warmup:] or clock.valid_s
    return Timing(float(np.median(train)), float(np.median(valid)) if valid else 0.0,
                  len(learn.dls.train), len(learn.dls.valid))


PROBE_SIZES = (16, 32)


def per_size(at: dict[int, float]) -> dict[int, float]:
    """A time measured at the two `PROBE_SIZES`, at each of `SIZES`: a fixed cost plus a cost per pixel."""
    (s0, t0), (s1, t1) = sorted(at.items())
    per_pixel = max(0.0, (t1 - t0) / (s1 ** 2 - s0 ** 2))
    fixed = max(0.0, t0 - per_pixel * s0 ** 2)
    return {s: fixed + per_pixel * s ** 2 for s in SIZES}


def choose_stem(size: int, imagenet_epoch_s: float | None, left_s: float) -> tuple[str, int]:
    """(stem, size): the cifar stem at the size its rule chose, or, where that is below `CIFAR_STEM_FROM`, the
    imagenet stem at 64 px if it affords `MIN_EPOCHS_FOR_SIZE` epochs there (`imagenet_epoch_s`: one epoch's
    training and validation)."""
    if size < CIFAR_STEM_FROM and imagenet_epoch_s is not None and MIN_EPOCHS_FOR_SIZE * imagenet_epoch_s <= left_s:
        return "imagenet", max(SIZES)
    return "cifar", size


def budget_choice(run, spent_s: float) -> tuple[str, int]:
    """The stem and size a budget affords: `choose_size` for the stem given (cifar where none is), from the bare
    model's step and inference times at `PROBE_SIZES` on this machine (`per_size`) and the dataset's size (its
    file list: nothing is decoded); then, where neither a stem nor progressive resizing was given, `choose_stem`,
    from the imagenet stem's times at 64 px."""
    from fastai.torch_core import default_device
    from .config import DEFAULT_STEM
    from .data import tiny_imagenet_files
    from .dataset import resolve_dataset
    from .learner import autocast_dtype
    from .model import resnet18
    wnids, files, val = tiny_imagenet_files(resolve_dataset(run.data), run.classes, run.train_per_class)
    device = default_device()
    dtype = autocast_dtype(run.precision, device)
    train_batches, valid_batches = math.ceil((len(files) - len(val)) / run.bs), math.ceil(len(val) / run.bs)

    def epoch_s(stem: str, sizes: tuple[int, ...]) -> tuple[dict[int, float], dict[int, float]]:
        """(training, validation) seconds of an epoch at each of `sizes`, measured there."""
        model = resnet18(len(wnids), stem=stem)
        probes = {s: probe_step_s(model, run.bs, s, dtype, device) for s in sizes}
        return ({s: p[0] * train_batches for s, p in probes.items()}, {s: p[1] * valid_batches for s, p in probes.items()})

    stem = run.stem or DEFAULT_STEM
    train, valid = (per_size(t) for t in epoch_s(stem, PROBE_SIZES))
    budget_s = parse_budget(run.budget)
    smallest = min(SIZES)  # not even one epoch there: said now, before the cache is built
    plan_epochs(budget_s, spent_s, Timing(train[smallest] / train_batches, valid[smallest] / valid_batches,
                                          train_batches, valid_batches), smallest)
    left = budget_s - spent_s - reserve_for(budget_s)
    size = choose_size(train, valid, left)
    said = (f"{size} px, the largest size with {MIN_EPOCHS_FOR_SIZE} epochs or more (epochs by the bare model's "
            f"speed, {stem} stem: " + ", ".join(f"{s} px {left / (train[s] + valid[s]):.1f}" for s in SIZES) + ")")
    if run.stem is None and not run.progressive and size < CIFAR_STEM_FROM:  # progressive: cifar's small sizes
        top = max(SIZES)
        imagenet_train, imagenet_valid = epoch_s("imagenet", (top,))
        imagenet_epoch_s = imagenet_train[top] + imagenet_valid[top]
        stem, size = choose_stem(size, imagenet_epoch_s, left)
        if stem == "imagenet":
            said = (f"the imagenet stem at {size} px, {left / imagenet_epoch_s:.1f} epochs by the bare model's "
                    f"speed, where the cifar stem would train at " + said)
    if is_main_process():
        print(f"budget {run.budget}: {said}")
    return stem, size


def plan_run(learn: Learner, size: int, spent_s: float, lr: float, budget_s: float,
             cost_of_epoch: Callable[[int], list[float]] | None = None) -> Plan:
    """The run's plan: `measure` on the Learner as built (the cache built, the LR picked), then `plan_epochs`
    (`cost_of_epoch`: progressive resizing's cheaper first epochs)."""
    start = time.time()
    timing = measure(learn, lr)
    return plan_epochs(budget_s, spent_s + time.time() - start, timing, size, cost_of_epoch)


# ---------------------------------------------------------------------------------------------------------
# The budget's place in a run (`tinyfast.train.fit`)
# ---------------------------------------------------------------------------------------------------------
def apply_budget(learn: Learner, config: RunConfig, state: dict, run_dir: Path, start: dict | None, called: float,
                 quiet: bool, cost: Callable[[int], list[float]] | None = None) -> tuple[float, RunConfig]:
    """A new budgeted run: measured and planned on rank 0 (its epochs and epoch share into config.json, its plan
    line printed); a resumed one goes on with its plan. The training set's epoch share applied; returns the
    deadline (wall clock) the budget sets, and the configuration with the planned epochs. cost: each epoch's step
    cost relative to one at the run's size, for a plan of n epochs (progressive resizing: the first are cheaper)."""
    budget_s = parse_budget(config.budget)
    if start is None:
        lr = float(state["lr_picked"] or config.lr)
        plan = on_main(plan_run, learn, config.size, time.time() - called, lr, budget_s, cost)
        config, state["budget_plan"] = config.replace(epochs=plan.n_epoch), plan.as_dict()
        on_main(update_config, run_dir, args=config.as_dict() | state)
        if is_main_process():
            print(plan.line(str(config.budget)))
        used = 0.0
    else:  # what the budget already paid for: set-up, and the epochs done
        used = budget_used_before(state, start)
        if is_main_process() and not quiet:
            print(f"budget {config.budget}: ~{format_seconds(budget_s - used)} left; the plan goes on "
                  f"({config.epochs} epochs of {state['budget_plan']['epoch_share']:.0%} of the training set)")
    learn.dls.train.epoch_share = state["budget_plan"]["epoch_share"]
    return called + budget_s - used, config


def budget_used_before(state: dict, start: dict) -> float:
    """What a resumed budget run had spent in its earlier sessions: its set-up, and the epochs done."""
    return state["budget_plan"]["spent_s"] + (start["rows"][-1]["elapsed"] if start["rows"] else 0.0)


@contextmanager
def no_folder_if_budget_too_small(run_dir: Path, new: bool) -> Iterator[None]:
    """A budget found too small leaves no folder behind: a new one holds nothing worth keeping yet."""
    try:
        yield
    except BudgetTooSmall:
        if new and is_main_process():
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def record_budget_outcome(run_dir: Path, config: RunConfig, state: dict, start: dict | None, called: float,
                          paced: dict | None = None) -> None:
    """config.json's "budget": the plan's budget, the wall time the run took (all its sessions), and what the
    pacing did (`BudgetPace.outcome`: in a resumed run, this session's epochs)."""
    wall = (0.0 if start is None else budget_used_before(state, start)) + time.time() - called
    budget_s = parse_budget(config.budget)
    update_config(run_dir, budget={"budget_s": budget_s, "wall_s": round(wall, 1),
                                    "share_of_budget": round(wall / budget_s, 4), "plan": state["budget_plan"],
                                    **(paced or {})})

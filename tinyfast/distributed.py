"""Data-parallel training over several processes, through fastai's `Learner.distrib_ctx`.

Launched by `torchrun --nproc_per_node N main.py fit ...` (or `accelerate launch --multi_gpu --num_processes N
main.py fit ...`), every process builds the same Learner, and `distributed_context(learn)` turns the fit into
fastai's DistributedDataParallel training: each process trains on its own shard of every epoch (fastai's
`DistributedDL` splits rank 0's shuffle), DDP averages the gradients, and fastai gathers the metrics, so every
process sees the same validation numbers. `bs` is per process: the global batch is `bs * N`.

fastai's own path assumes one CUDA device per process. What this module adds so it also runs on CPUs (gloo)
and with tinyfast's `CachedBatchDL`:

- `DistributedDL._broadcast` sends the shuffled indices as a CUDA tensor, which only nccl needs: the
  replacement below keeps them on the CPU when the process group runs on gloo.
- `distrib_ctx` builds an `accelerate.Accelerator` that, on a machine without a GPU, does not see the
  torchrun processes unless it is told `cpu=True`; and `SyncBatchNorm` refuses CPU tensors. Both are set here.
- The process group is started before the Learner exists (`setup_distributed`), so that rank 0 can decode the
  image cache and create the run folder first (`main_process_first`, `on_main`) and the others follow.
- `CachedBatchDL` seeds its augmentation per batch from `epoch_seed`, the batch number and the worker: under
  `DistributedDL` every rank would replay the same augmentation sequence, and every worker too (fastai tells
  workers their id on the wrapper, not on the wrapped loader). Both are made distinct below.
- `DistributedDL` iterates with fastai's own `DataLoader.__iter__`, which starts the loader's workers again every
  epoch and copies each batch to the GPU blocking: over a `CachedBatchDL` it iterates as that loader does
  (`serve_batches`: persistent workers told each epoch's shard and seed, non-blocking copies).
- `accelerate launch --mixed_precision fp16` (ACCELERATE_MIXED_PRECISION) makes fastai's Accelerator wrap the
  forward in autocast, but fastai calls `loss.backward()`, not `accelerator.backward`: fp16 without loss scaling.
  The Accelerator is told `mixed_precision="no"`; the precision is `fit --precision`'s, on every rank.
- fastai's `to_detach` gathers across processes whenever WORLD_SIZE > 1: work done by rank 0 alone (the
  model summary, an LR range test) runs under `single_process`, or every other rank would wait for it.
- `DistributedDL.rng` reads the wrapped loader's, so a checkpoint written mid-fit saves the stream that
  actually drives the epoch; rank 0's `epoch_seed` is broadcast like its shuffle, so an epoch depends on rank
  0's stream only, and a resumed run repeats the uninterrupted one.
- DDP checks that parameters have the same strides on every rank: `FastDevice.before_fit` makes the model
  channels_last before fastai's `DistributedTrainer` wraps it (otherwise rank 0 alone, which ran the summary,
  would have converted it).
"""
from __future__ import annotations

import os
import pickle
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from fastai.learner import Learner
from fastai.torch_core import distrib_barrier, num_distrib, rank_distrib
from torch import nn

from . import compat
from .data import CachedBatchDL, restore_epoch_in_worker, serve_batches

try:
    from fastai.distributed import DistributedDL
except NameError:  # fastai.distributed names accelerate's Accelerator at import time
    raise ImportError("distributed training needs the accelerate package: pip install accelerate") from None


# ---------------------------------------------------------------------------------------------------------
# Who am I
# ---------------------------------------------------------------------------------------------------------
def world_size() -> int:
    """The number of processes launched (1 when not launched by torchrun/accelerate)."""
    return max(num_distrib(), 1)


def rank() -> int:
    return rank_distrib()


def is_distributed() -> bool:
    """True inside a multi-process launch (torchrun and accelerate set WORLD_SIZE, as fastai reads it)."""
    return num_distrib() > 1


def is_main_process() -> bool:
    """Rank 0, or a plain single process: the one that writes files and prints."""
    return rank_distrib() == 0


# ---------------------------------------------------------------------------------------------------------
# The process group
# ---------------------------------------------------------------------------------------------------------
def setup_distributed() -> bool:
    """Join the process group the launcher described (env://), once; pin this process to its GPU first so
    that fastai's `default_device()` gives each rank its own. A no-op outside a multi-process launch.
    Returns whether this process is part of a distributed run."""
    if not is_distributed():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank_distrib() % torch.cuda.device_count())))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"  # nccl where each process has a GPU
        if backend == "gloo" and not dist.is_gloo_available():
            raise RuntimeError("distributed training on CPUs needs torch's gloo backend, which this torch build lacks")
        dist.init_process_group(backend=backend, init_method="env://")
    return True


def barrier() -> None:
    distrib_barrier()


@contextmanager
def main_process_first() -> Iterator[None]:
    """Rank 0 runs the block first (decoding the image cache, say), the others after it, reusing its work.
    Rank 0 reaches the barrier even when the block fails, so the others run it and fail the same way
    instead of waiting forever."""
    if not is_distributed():
        yield
        return
    setup_distributed()
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


@contextmanager
def single_process() -> Iterator[None]:
    """This process on its own, as fastai sees it: fastai's `to_detach` gathers across processes whenever
    WORLD_SIZE > 1, so `get_preds`, `summary` or an LR range test run by one rank alone would wait forever
    for the others."""
    saved = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ["WORLD_SIZE"]
        else:
            os.environ["WORLD_SIZE"] = saved


def on_main(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """`fn(*args, **kwargs)` run by rank 0 alone (`single_process`), its result (or its exception) handed to
    every rank, so that one decision (a run folder named after the time, an LR picked by a range test) holds
    for all, and only rank 0 writes the files that go with it."""
    if not is_distributed():
        return fn(*args, **kwargs)
    setup_distributed()
    box: list = [None]
    if is_main_process():
        try:
            with single_process():
                mine = ("ok", fn(*args, **kwargs))
        except Exception as e:
            mine = ("error", e)
        try:
            pickle.dumps(mine)
            box[0] = mine
        except Exception:  # the others still need to hear that there is nothing to wait for
            box[0] = ("error", RuntimeError(f"rank 0 could not share the result of {getattr(fn, '__name__', fn)}"))
    dist.broadcast_object_list(box, src=0)
    status, value = mine if is_main_process() else box[0]
    if status == "error":
        raise value
    return value


def all_ranks_min(value: torch.Tensor, absent: int = -1) -> torch.Tensor:
    """The smallest `value` over the ranks, where `absent` means "none here" (StopOnNaN's index of the first bad
    batch): `absent` only if it is absent on every rank. Outside a distributed run, `value` itself. Every rank must
    call it at the same point, as for any collective."""
    if not (is_distributed() and dist.is_initialized()):
        return value
    big = torch.iinfo(value.dtype).max
    shared = torch.where(value == absent, big, value).to(collective_device())
    dist.all_reduce(shared, op=dist.ReduceOp.MIN)
    return torch.where(shared == big, absent, shared)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself, also while fastai has it wrapped in DistributedDataParallel (its state_dict keys
    would otherwise all start with `module.`)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


# ---------------------------------------------------------------------------------------------------------
# fastai's DistributedDL, made device-aware and CachedBatchDL-aware (the replaced methods: tinyfast/compat.py)
# ---------------------------------------------------------------------------------------------------------
def collective_device() -> torch.device:
    """Where tensors must live for the current process group's collectives: CUDA for nccl, CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


compat.adapt_distributed_dl(DistributedDL, collective_device, CachedBatchDL, serve_batches, restore_epoch_in_worker)


# ---------------------------------------------------------------------------------------------------------
# The context a fit runs in
# ---------------------------------------------------------------------------------------------------------
def distributed_context(learn: Learner, sync_bn: bool = True):
    """`learn.distrib_ctx(...)` inside a multi-process launch, a null context otherwise, so the same `fit` code
    runs both ways. On CPUs it asks accelerate for its CPU setup and keeps plain BatchNorm (SyncBatchNorm
    is GPU-only). Leaving it normally waits for every rank, so files rank 0 wrote during the fit (the best
    weights) are complete when the others read them."""
    if not is_distributed():
        return nullcontext(learn)
    return _distributed(learn, sync_bn)


@contextmanager
def _distributed(learn: Learner, sync_bn: bool) -> Iterator[Learner]:
    setup_distributed()
    on_cpu = not torch.cuda.is_available()
    # mixed_precision="no": precision is FastDevice's. `accelerate launch --mixed_precision fp16` would otherwise
    # wrap the forward in fp16 autocast, and fastai never calls `accelerator.backward`: no loss scaling.
    with learn.distrib_ctx(sync_bn=sync_bn and not on_cpu, cpu=on_cpu, mixed_precision="no"):
        trainer = getattr(learn, "distributed_trainer", None)
        try:
            yield learn
        except BaseException:
            # fastai runs `after_fit` (which unwraps the model and the loaders) only when the fit ends cleanly
            if trainer is not None and hasattr(trainer, "old_dls") and learn.model is not unwrap_model(learn.model):
                trainer.after_fit()
            raise
    barrier()

"""Every private name of fastai, torch and pytorch-grad-cam that tinyfast uses, in one place, each with why and the
version it was checked against. tests/test_compat.py checks each one against the installed libraries, so that an
upgrade that changes one fails there, by name, instead of somewhere inside a training run.

Checked against fastai 2.8.12, torch 2.14.1 and grad-cam 1.5.7 (`CHECKED`).
"""
from __future__ import annotations

from contextlib import contextmanager
from functools import partial
from types import SimpleNamespace
from typing import Iterator

import torch

CHECKED = {"fastai": "2.8.12", "torch": "2.14.1", "grad-cam": "1.5.7"}


# fastai's DataLoader keeps an epoch's order in the name-mangled `__idxs`: set in the main process by `__iter__`
# (from `get_idxs`), read by `sample` in each worker. tinyfast's loader sets it the same way, and tells persistent
# workers the next epoch's order through it.
def set_epoch_order(loader, idxs) -> None:
    loader._DataLoader__idxs = idxs


def epoch_order(loader):
    return loader._DataLoader__idxs


def fastai_batches(fake_loader, workers: bool):
    """fastai's own choice of iterator over its `_FakeLoader`: torch's single-process or multi-process one."""
    from fastai.data.load import _loaders
    return _loaders[not workers](fake_loader)


def persistent_workers(fake_loader):
    """torch's multi-process iterator, kept by the loader from epoch to epoch (fastai makes a new one each epoch)."""
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter
    return _MultiProcessingDataLoaderIter(fake_loader)


def restart_workers(iterator, fake_loader) -> None:
    """The next epoch on the same worker processes, as torch's DataLoader does for `persistent_workers`."""
    iterator._reset(fake_loader)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 itself (AVX512-BF16 or AMX): torch's own test, private in torch.cpu."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def uncompile(module: torch.nn.Module) -> None:
    """Drop the compiled forward `nn.Module.compile` installed (it does not pickle: `learn.export`)."""
    module._compiled_call_impl = None


@contextmanager
def quiet_scorecam() -> Iterator[None]:
    """pytorch-grad-cam's Score-CAM draws a tqdm bar per image, to stderr, with no switch to turn it off: its
    module's `tqdm` is swapped for a silent one while the block runs."""
    import tqdm
    from pytorch_grad_cam import score_cam
    saved = score_cam.tqdm
    score_cam.tqdm = SimpleNamespace(tqdm=partial(tqdm.tqdm, disable=True))
    try:
        yield
    finally:
        score_cam.tqdm = saved


# fastai's `DistributedDL` (fastai 2.8.12), adapted in place as tinyfast/distributed.py's docstring explains, since
# fastai's `DistributedTrainer` builds it by name: `_broadcast` (private) sends the shuffle on the process group's
# device; `before_iter` also broadcasts rank 0's `epoch_seed` and makes it distinct per rank; `wif` tells the
# wrapped loader its worker; `__iter__` and `sample` go through the CachedBatchDL's own iteration (persistent
# workers, non-blocking copies); `rng` is the wrapped loader's. Applied once, by tinyfast.distributed's import.
def adapt_distributed_dl(DistributedDL, collective_device, cached_loader, serve_batches, restore_epoch_in_worker) -> None:
    if getattr(DistributedDL, "_tinyfast_adapted", False):
        return
    import torch.distributed as dist
    fastai_before_iter, fastai_iter, fastai_sample = DistributedDL.before_iter, DistributedDL.__iter__, DistributedDL.sample

    def _broadcast(self, t, rank):
        "Broadcasts t from rank `rank` to all other ranks, on the device the process group's backend works on."
        t = torch.tensor(t, dtype=torch.long, device=collective_device())
        dist.broadcast(t, rank)
        return t.cpu().tolist()

    def before_iter(self):
        "fastai's, then rank 0's `epoch_seed` (when the wrapped loader draws one), made distinct for each rank."
        fastai_before_iter(self)
        if self.world_size > 1 and hasattr(self.dl, "epoch_seed"):
            # rank 0's draw, as for the shuffle: an epoch depends on rank 0's `rng` only, the one a checkpoint saves
            seed = self._broadcast([self.dl.epoch_seed], 0)[0]
            self.dl.epoch_seed = (seed * self.world_size + self.rank) % 2**31

    def wif(self):
        "In a worker: tell the wrapped loader which worker it runs in, as fastai's `_wif` told the wrapper."
        self.dl.num_workers, self.dl.offs = self.num_workers, self.offs
        self.dl.wif()

    def __iter__(self):
        "Over a CachedBatchDL, its own iteration: persistent workers and non-blocking copies. Else fastai's."
        return serve_batches(self) if isinstance(self.dl, cached_loader) else fastai_iter(self)

    def sample(self):
        "In a persistent worker, this epoch's shard and seed first (as `CachedBatchDL.sample`)."
        restore_epoch_in_worker(self)
        return fastai_sample(self)

    def get_rng(self):
        return self.dl.rng

    def set_rng(self, rng):
        self.dl.rng = rng

    for method in (_broadcast, before_iter, wif, __iter__, sample):
        method.__module__ = __name__
        setattr(DistributedDL, method.__name__, method)
    DistributedDL.rng = property(get_rng, set_rng, doc="The wrapped loader's `rng`: it draws the shuffle and the augmentation.")
    DistributedDL._tinyfast_adapted = True

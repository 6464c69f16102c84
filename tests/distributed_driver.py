"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2`: one `tinyfast.train.fit` per process,
with a probe of the data sharding and of which files each process writes, reported per rank as JSON.

usage: distributed_driver.py DATA RUN_DIR REPORT_DIR
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch
from fastai.callback.core import Callback
from fastai.distributed import DistributedDL

from tinyfast.data import tiny_imagenet_dls
from tinyfast.distributed import is_main_process, main_process_first, rank, setup_distributed, unwrap_model, world_size
from tinyfast.train import fit

data, run_dir, report_dir = (Path(p).resolve() for p in sys.argv[1:4])
watched = run_dir.parent  # where the run folder goes; any write there by rank 1 is a bug
writes: list[str] = []


def _inside(path) -> bool:
    try:
        return Path(os.fsdecode(path)).resolve().is_relative_to(watched)
    except (TypeError, ValueError):
        return False


def _audit(event: str, args: tuple) -> None:
    """Every file this process creates, renames or opens for writing (os.replace raises `os.rename`)."""
    if event == "open" and isinstance(args[1], str) and any(c in args[1] for c in "wax+") and _inside(args[0]):
        writes.append(f"open {args[0]}")
    elif event in ("os.rename", "os.mkdir") and _inside(args[1] if event == "os.rename" else args[0]):
        writes.append(f"{event} {args[1] if event == 'os.rename' else args[0]}")


class Witness(Callback):
    """What this rank trained and validated on, and its weights when training ends (before `fit` loads the
    best ones back: the same file on every rank, which would prove nothing)."""

    def __init__(self):
        self.train_batches, self.train_samples, self.valid_batches, self.loaders = [], [], [], set()
        self.mixed_precision, self.forward_autocast = None, None

    def before_train(self):  # after every before_fit: the model is prepared by accelerate
        trainer = self.learn.distributed_trainer
        self.mixed_precision = trainer.accelerator.mixed_precision
        self.forward_autocast = hasattr(self.learn.model, "_original_forward")  # accelerate's autocast wrapper

    def before_epoch(self):
        self.train_batches.append(0)
        self.train_samples.append(0)
        self.valid_batches.append(0)

    def after_batch(self):
        self.loaders.add(type(self.dl).__name__)
        if self.training:
            self.train_batches[-1] += 1
            self.train_samples[-1] += len(self.yb[0])
        else:
            self.valid_batches[-1] += 1

    def after_fit(self):
        torch.save(unwrap_model(self.learn.model).state_dict(), report_dir / f"weights_rank{rank()}.pth")


if __name__ == "__main__":
    setup_distributed()
    if not is_main_process():
        sys.addaudithook(_audit)
        real_save = torch.save

        def save(obj, f, *args, **kwargs):  # torch.save to a path writes from C++, unseen by the audit hook
            if _inside(f):
                writes.append(f"torch.save {f}")
            return real_save(obj, f, *args, **kwargs)

        torch.save = save

    # The sharding, with a different shuffle stream on each rank: only broadcasting rank 0's keeps it a partition.
    with main_process_first():
        dls = tiny_imagenet_dls(data, bs=8, size=16)
    probe = dls.train.new(shuffle=True)
    probe.rng = random.Random(1000 + rank())
    shard = DistributedDL(probe).get_idxs()

    witness = Witness()
    result = fit(data=data, epochs=2, bs=8, lr=0.05, size=16, out=run_dir, seed=0, cbs=[witness], quiet=True)
    report = dict(rank=rank(), world_size=world_size(), n_train=len(dls.train_ds), batches_single=len(dls.train),
                  shard=list(map(int, shard)), train_batches=witness.train_batches,
                  train_samples=witness.train_samples, valid_batches=witness.valid_batches,
                  loaders=sorted(witness.loaders), writes=writes, run_dir=str(result.run_dir),
                  mixed_precision=witness.mixed_precision, forward_autocast=witness.forward_autocast,
                  best_accuracy=result.best_accuracy)
    (report_dir / f"rank{rank()}.json").write_text(json.dumps(report))

"""A stand-in GPU for counting host syncs on a CPU-only machine: training runs on torch's `meta` device (shapes, no
values), and `HostReads` counts every op that on a GPU would make the host wait for the device:

- a device value read into Python (`aten._local_scalar_dense`: `.item()`, `bool()`, `int()`, `float()`, slicing with
  a device tensor);
- a copy from the device to the host (`.cpu()`, fastai's `to_detach`);
- a blocking copy from the host to the device (`.to(device)` without `non_blocking`: the copy waits for the stream).

On `meta` nothing has a value, so a read is answered with a stand-in (False, -1, 0.0, zeros) and the run goes on.
`Phase` labels each event with the batch it happened in: ("train", epoch, iter), ("valid", ...), "between" (after
a batch, until the next: epoch ends, validation set-up, checkpoints) or "outside" (before the first batch).
"""
from __future__ import annotations

from collections import Counter

import torch
from fastai.callback.core import Callback
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


def _device_type(device) -> str | None:
    return None if device is None else torch.device(device).type


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[tuple] = []
        self.phase: object = "outside"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is aten._local_scalar_dense.default and args[0].device.type == "meta":
            self.events.append((self.phase, "read"))
            t = args[0]
            return False if t.dtype == torch.bool else 0.0 if t.is_floating_point() else -1
        if func is aten._to_copy.default:
            source, target = args[0].device.type, _device_type(kwargs.get("device"))
            if source == "meta" and target == "cpu":
                self.events.append((self.phase, "copy to host"))
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
            if source == "cpu" and target == "meta" and not kwargs.get("non_blocking"):
                self.events.append((self.phase, "blocking copy to device"))
        if func is aten.copy_.default:
            target, source = args[0].device.type, args[1].device.type
            if source == "meta" and target == "cpu":
                self.events.append((self.phase, "copy to host"))
                return args[0]
            if source == "cpu" and target == "meta" and not (len(args) > 2 and args[2]):
                self.events.append((self.phase, "blocking copy to device"))
        return func(*args, **kwargs)

    def in_training_batches(self) -> Counter:
        return Counter(e for p, e in self.events if isinstance(p, tuple) and p[0] == "train")

    def training_batches_seen(self) -> set:
        return self._batches

    def callbacks(self) -> list[Callback]:
        """The two callbacks that set `phase`: first before each batch, last after it."""
        mode, self._batches = self, set()

        class BatchStarts(Callback):
            order = -100

            def before_batch(self):
                mode.phase = ("train" if self.training else "valid", self.epoch, self.iter)
                if self.training:
                    mode._batches.add((self.epoch, self.iter))

        class BatchEnds(Callback):
            order = 1000

            def after_batch(self):
                mode.phase = "between"

        return [BatchStarts(), BatchEnds()]

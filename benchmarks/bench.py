"""The benchmarks behind `python main.py bench data` and `python main.py bench train`.

Each one measures tinyfast next to the baseline a PyTorch user would write by hand, in the same run, over the
same files or the same model, so the ratio printed is a comparison on this machine now, not against a figure
measured elsewhere. They are run on purpose: the tests only check that they run and report sane fields.

- `bench_data`: images/s of tinyfast's train DataLoader (decoded cache + per-batch Albumentations, batch
  transforms on the device) against a torch `Dataset` that decodes with cv2 and applies the same Albumentations
  policy and normalisation per item, in a torch `DataLoader`; optionally the same fastai DataBlock without
  tinyfast's two speed-ups (fastai's per-item pipeline, decoding every epoch), for context.
- `bench_train`: images/s of a training step through the real fastai Learner (FastDevice, the real loader, the
  batch transforms) against a plain fp32 PyTorch loop of the same ResNet18 on preloaded tensors; on CUDA also
  the measured bf16 matmul throughput and the FLOP-bound ceiling it implies for this model.
"""
from __future__ import annotations

import math
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from fastai.torch_core import default_device
from torch import nn

import albumentations as alb  # after fastai (see tinyfast.data)

from tinyfast.data import (TINY_MEAN, TINY_STD, TinyLabel, default_augmentation, file_stats_digest, is_val, tiny_imagenet_block,
                   tiny_imagenet_dls, tiny_imagenet_files)
from tinyfast.dataset import DatasetError, resolve_dataset
from tinyfast.learner import autocast_dtype, tiny_learner
from tinyfast.model import resnet18, training_flops_per_image

__all__ = ["HandWrittenDataset", "bench_data", "format_bench_data", "bench_train", "format_bench_train",
           "matmul_tflops"]

# The benchmark model always has TinyImageNet's 200-class head, whatever the (synthetic or subset) data has.
N_CLASSES = 200
# bench_train on generated data: that many classes, images written only for the batches it needs (capped).
SYNTHETIC_CLASSES, SYNTHETIC_MAX_PER_CLASS = 10, 500
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def _check_non_negative(**values: int) -> None:
    for name, value in values.items():
        if value is not None and value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def _sync(device: torch.device) -> None:
    """CUDA work is asynchronous: a clock read without this measures the launches, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# bench data
# ---------------------------------------------------------------------------------------------------------
class HandWrittenDataset(torch.utils.data.Dataset):
    """The loader a PyTorch user writes by hand, the baseline of `bench_data`: every image decoded with cv2 at
    every epoch, then the same Albumentations policy as tinyfast plus `Normalize`, per item, in the workers.
    Images not at `size` are resized as tinyfast's cache does (INTER_AREA), so both serve the same tensors."""

    def __init__(self, files: list[Path], labels: list[int], size: int = 64, augment: bool = True):
        self.files, self.labels, self.size = [str(f) for f in files], list(labels), size
        policy = [default_augmentation(size)] if augment else []
        self.tfm = alb.Compose(policy + [alb.Normalize(mean=TINY_MEAN, std=TINY_STD)])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = cv2.imread(self.files[i], cv2.IMREAD_COLOR)
        if img is None:
            raise DatasetError(f"cv2 cannot decode {self.files[i]}")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape[:2] != (self.size, self.size):
            img = cv2.resize(img, (self.size, self.size), interpolation=cv2.INTER_AREA)
        x = self.tfm(image=img)["image"]  # HWC float32, normalised
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), self.labels[i]


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, joined at the end of
    each pass). Less distorted than wall time by other programs on the machine, not immune: contended cores
    slow every instruction, and torch's OpenMP threads spin while they wait for one another."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _time_pass(loader, device: torch.device) -> tuple[int, float, float]:
    """One pass over `loader` as a training loop consumes it: every batch on `device` (a no-op for a fastai
    DataLoader, which has already moved it and run its batch transforms there).
    Returns (images, wall seconds, CPU seconds of all processes)."""
    n = 0
    _sync(device)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    for xb, yb in loader:
        xb = xb.to(device, non_blocking=True)
        n += len(yb)
    _sync(device)
    return n, time.perf_counter() - start, _cpu_seconds() - cpu_start


def _images_per_second(loader, device: torch.device, passes: int) -> tuple[float, float]:
    """Run `passes` passes, time only the last: the first ones build caches (tinyfast's decoded array, the OS
    page cache for the JPEGs) that every later epoch of a training run finds warm.
    Returns (images per second, CPU microseconds per image)."""
    for _ in range(passes - 1):
        _time_pass(loader, device)
    n, seconds, cpu = _time_pass(loader, device)
    if n == 0:
        raise ValueError("the loader served no images: fewer training images than the batch size?")
    return n / seconds, cpu / n * 1e6


def bench_data(data: Path | str | None = None, bs: int = 256, size: int = 64, num_workers: int | None = None,
               baseline_workers: int = 2, classes: int | None = None, train_per_class: int | None = None,
               passes: int = 2, naive: bool = True, baseline: bool = True,
               device: torch.device | str | None = None) -> dict:
    """Train-loader images/s: tinyfast's `dls.train` with its defaults against the hand-written
    `HandWrittenDataset` in a torch `DataLoader(bs, shuffle=True, num_workers=baseline_workers)`, same files.

    tinyfast's timing includes its batch transforms (float conversion, normalisation) on the device, as a
    Learner iterates it; the baseline's includes moving each batch to the device. Both drop the last partial
    batch, as fastai's train loader does. `naive` adds one pass of the same fastai DataBlock served by
    fastai's ordinary per-item DataLoader with `baseline_workers` workers, decoding every image every epoch:
    what the decoded cache and `CachedBatchDL` buy (its only pass comes after the JPEGs are in the page cache).
    Each loader also reports CPU microseconds per image over all its processes (`*_cpu_us`): what it costs
    the cores the model needs too, and less distorted than the wall-clock rates on a busy machine.
    `baseline=False` times tinyfast's loader alone (a sweep over its worker counts, on the full set).
    """
    _check_positive(bs=bs, size=size, passes=passes, classes=classes, train_per_class=train_per_class)
    _check_non_negative(num_workers=num_workers, baseline_workers=baseline_workers)
    root = resolve_dataset(data)
    device = torch.device(device) if device is not None else default_device()

    dls = tiny_imagenet_dls(root, bs=bs, size=size, num_workers=num_workers, device=device, classes=classes,
                            train_per_class=train_per_class)
    train = dls.train
    if len(train) == 0:
        raise ValueError(f"bs={bs} is larger than the {len(dls.train_ds)} training images")
    tinyfast_img_s, tinyfast_cpu_us = _images_per_second(train, device, passes)

    files = [Path(p) for p in dls.train_ds.items]
    labels = [dls.vocab.o2i[p.parent.parent.name] for p in files]
    baseline_img_s = baseline_cpu_us = None
    if baseline:
        hand_written = torch.utils.data.DataLoader(
            HandWrittenDataset(files, labels, size), batch_size=bs, shuffle=True, num_workers=baseline_workers,
            drop_last=train.drop_last, pin_memory=device.type == "cuda")
        baseline_img_s, baseline_cpu_us = _images_per_second(hand_written, device, passes)

    naive_img_s = naive_cpu_us = None
    if naive:
        wnids, all_files, val_wnids = tiny_imagenet_files(root, classes, train_per_class)
        block = tiny_imagenet_block(root, wnids, val_wnids, size, aug=None, decoded=None)
        naive_dls = block.dataloaders(all_files, path=root, bs=bs, num_workers=baseline_workers, device=device)
        naive_img_s, naive_cpu_us = _images_per_second(naive_dls.train, device, 1)

    all_files = tiny_imagenet_files(root, classes, train_per_class)[1]
    t0 = time.perf_counter()
    file_stats_digest(all_files)  # what every `tiny_imagenet_dls` pays to know its cache is not stale
    cache_check_ms = (time.perf_counter() - t0) * 1e3

    return {"tinyfast_img_s": tinyfast_img_s, "baseline_img_s": baseline_img_s,
            "cache_check_ms": cache_check_ms, "cache_check_files": len(all_files),
            "ratio": tinyfast_img_s / baseline_img_s if baseline else None, "naive_fastai_img_s": naive_img_s,
            "tinyfast_cpu_us": tinyfast_cpu_us, "baseline_cpu_us": baseline_cpu_us, "naive_fastai_cpu_us": naive_cpu_us,
            "n_images": len(dls.train_ds), "bs": bs, "size": size, "num_workers": train.fake_l.num_workers,
            "baseline_workers": baseline_workers, "passes": passes, "device": str(device),
            "threads": torch.get_num_threads()}


def format_bench_data(result: dict) -> str:
    r = result

    def line(label: str, key: str) -> str:
        cpu = r.get(key.replace("_img_s", "_cpu_us"))
        return f"  {label:<76} {r[key]:>9,.0f} img/s" + (f"  ({cpu:,.0f} us CPU/image)" if cpu is not None else "")

    lines = [
        f"train loader: {r['n_images']:,} images, bs {r['bs']}, {r['size']} px, device {r['device']}, "
        f"{r['threads']} torch threads on {os.cpu_count()} cores; last of {r.get('passes', 2)} passes timed",
        line(f"tinyfast (decoded cache, per-batch Albumentations, {r['num_workers']} workers):", "tinyfast_img_s"),
    ]
    if r.get("baseline_img_s") is not None:
        lines.append(line(f"hand-written (torch Dataset: cv2 + Albumentations + Normalize, {r['baseline_workers']} "
                          "workers):", "baseline_img_s"))
    if r.get("naive_fastai_img_s") is not None:
        lines.append(line(f"fastai per-item DataLoader, same DataBlock, no cache ({r['baseline_workers']} workers):",
                          "naive_fastai_img_s"))
    if r.get("ratio") is not None:
        lines.append(f"  ratio tinyfast / hand-written: {r['ratio']:.2f}x")
    if r.get("cache_check_ms") is not None:
        lines.append(f"  stale-cache check (one stat a file): {r['cache_check_ms']:,.0f} ms for {r['cache_check_files']:,} files")
    lines.append("  (wall-clock rates move with whatever else runs on the machine; CPU time per image, workers "
                 "included, less so)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# bench train
# ---------------------------------------------------------------------------------------------------------
class StepTimer(Callback):
    """Times `steps` training batches of a real `Learner.fit` after `warmup` ones, then stops the fit: what is
    measured is fastai's whole step (loader, batch transforms, FastDevice, forward, backward, optimizer).
    Validation is skipped. Runs after every other callback, so their `after_batch` work is inside the clock."""
    order = 99

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.batches, self.images, self.start, self.seconds = 0, 0, None, None

    def _now(self) -> float:
        _sync(self.dls.device if self.dls.device is not None else torch.device("cpu"))
        return time.perf_counter()

    def before_train(self):
        if self.warmup == 0 and self.start is None:
            self.start = self._now()

    def before_validate(self):
        raise CancelValidException

    def after_batch(self):
        if not self.training:
            return
        self.batches += 1
        if self.batches > self.warmup:
            self.images += len(self.yb[0])
        if self.batches == self.warmup and self.start is None:
            self.start = self._now()
        if self.batches == self.warmup + self.steps:
            self.seconds = self._now() - self.start
            raise CancelFitException


def _plain_fp32_img_s(model: nn.Module, size: int, bs: int, steps: int, warmup: int, lr: float,
                      device: torch.device) -> float:
    """The plain PyTorch loop: fp32, contiguous NCHW, a batch already on the device (no loader at all, which
    favours it), torch SGD with momentum and weight decay, plain cross-entropy."""
    model = model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    loss_func = nn.CrossEntropyLoss()
    x = torch.randn(bs, 3, size, size, device=device)
    y = torch.randint(0, N_CLASSES, (bs,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        loss_func(model(x), y).backward()
        opt.step()

    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return bs * steps / (time.perf_counter() - start)


def matmul_tflops(device: torch.device | str = "cuda", n: int = 8192, repeats: int = 5, iters: int = 10) -> float:
    """Measured bf16 matmul TFLOP/s on a CUDA device (median of `repeats` runs of `iters` n x n products): the
    ceiling a dense training step can approach on that card, whatever its datasheet says."""
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"matmul_tflops measures a CUDA device, got {device}")
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        torch.cuda.synchronize(device)
        times.append((time.perf_counter() - start) / iters)
    return 2 * n**3 / statistics.median(times) / 1e12


def bench_train(data: Path | str | None = None, size: int = 64, bs: int = 64, steps: int = 5, warmup: int = 2,
                precision: str = "auto", channels_last: bool = True, stem: str = "cifar",
                device: torch.device | str | None = None, num_workers: int | None = None,
                classes: int | None = None, train_per_class: int | None = None, lr: float = 0.01) -> dict:
    """Training images/s: tinyfast's Learner with its defaults (`tiny_learner` over `tiny_imagenet_dls`, a
    200-class ResNet18, `learn.fit` timed by `StepTimer`) against `_plain_fp32_img_s`, same model, batch, size.

    data: a TinyImageNet folder (all of it unless `classes`/`train_per_class` cut a real subset; the decoded
    cache is the one `fit` uses), or None to generate, in a temporary folder, a small synthetic set with just
    enough images for `warmup + steps` batches. On CUDA, `matmul_tflops` and the FLOP-bound images/s it
    implies for this model are reported beside tinyfast's figure; on a CPU those are None."""
    _check_positive(size=size, bs=bs, steps=steps, classes=classes, train_per_class=train_per_class)
    _check_non_negative(warmup=warmup, num_workers=num_workers)
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr}")
    device = torch.device(device) if device is not None else default_device()
    dtype = autocast_dtype(precision, device)  # ValueError on an unknown precision
    plain_model = resnet18(N_CLASSES, stem=stem)  # ValueError on an unknown stem, before any work
    flops = training_flops_per_image(plain_model, size)

    with tempfile.TemporaryDirectory(prefix="tinyfast-bench-") as tmp:
        if data is None:
            from tinyfast.synthetic import make_tiny_imagenet
            per_class = min(SYNTHETIC_MAX_PER_CLASS, math.ceil(bs * (warmup + steps) / SYNTHETIC_CLASSES))
            data = make_tiny_imagenet(tmp, n_classes=SYNTHETIC_CLASSES, n_train=max(per_class, 1), n_val=1,
                                      n_test=0, size=64, seed=0)
        dls = tiny_imagenet_dls(data, bs=bs, size=size, num_workers=num_workers, device=device, classes=classes,
                                train_per_class=train_per_class)
        if len(dls.train) == 0:
            raise ValueError(f"bs={bs} is larger than the {len(dls.train_ds)} training images")
        timer = StepTimer(warmup, steps)
        learn = tiny_learner(dls, model=resnet18(N_CLASSES, stem=stem), precision=precision,
                             channels_last=channels_last, cbs=[timer])
        epochs = math.ceil((warmup + steps) / len(dls.train))
        with learn.no_bar(), learn.no_logging():
            learn.fit(epochs, lr)
        if timer.seconds is None:
            raise RuntimeError(f"the fit ended after {timer.batches} of {warmup + steps} batches")
        tinyfast_img_s = timer.images / timer.seconds
        del learn, dls

    plain_img_s = _plain_fp32_img_s(plain_model, size, bs, steps, warmup, lr, device)
    tflops = matmul_tflops(device) if device.type == "cuda" else None
    return {"tinyfast_img_s": tinyfast_img_s, "plain_fp32_img_s": plain_img_s, "ratio": tinyfast_img_s / plain_img_s,
            "size": size, "bs": bs, "steps": steps, "warmup": warmup, "precision": DTYPE_NAMES[dtype],
            "channels_last": channels_last, "stem": stem, "device": str(device), "threads": torch.get_num_threads(),
            "flops_per_image": flops, "matmul_tflops": tflops,
            "flop_bound_img_s": tflops * 1e12 / flops if tflops is not None else None}


def format_bench_train(result: dict) -> str:
    r = result
    layout = "channels_last" if r["channels_last"] else "NCHW"
    lines = [
        f"training step: ResNet18 ({r['stem']} stem, {N_CLASSES} classes), {r['size']} px, batch {r['bs']}, "
        f"{r['steps']} steps timed after {r.get('warmup', 0)} warm-up, device {r['device']}, "
        f"{r['threads']} torch threads on {os.cpu_count()} cores",
        f"  tinyfast (fastai Learner, {r['precision']}, {layout}, real loader): {r['tinyfast_img_s']:>10,.1f} img/s",
        f"  plain PyTorch loop (fp32, NCHW, preloaded tensors, no loader: favours it): {r['plain_fp32_img_s']:>10,.1f} img/s",
        f"  ratio tinyfast / plain fp32: {r['ratio']:.2f}x",
        f"  training FLOPs per image: {r['flops_per_image'] / 1e9:.2f} GFLOP",
    ]
    if r.get("matmul_tflops") is not None:
        lines.append(f"  measured bf16 matmul: {r['matmul_tflops']:.0f} TFLOP/s -> FLOP-bound limit "
                     f"{r['flop_bound_img_s']:,.0f} img/s; tinyfast reaches "
                     f"{r['tinyfast_img_s'] / r['flop_bound_img_s']:.1%} of it")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# The same recipe, learned by tinyfast and by a plain PyTorch loop
# ---------------------------------------------------------------------------------------------------------
def _seed_worker_augmentation(worker_id: int) -> None:
    """Albumentations does not reseed in DataLoader workers: each forked worker would draw the same augmentations
    from the generator it copied. Seed each one from torch's per-worker seed (which derives from the loader's)."""
    info = torch.utils.data.get_worker_info()
    info.dataset.tfm.set_random_seed(info.seed % 2**32)


def plain_loop_fit(train: HandWrittenDataset, valid: HandWrittenDataset, n_classes: int, epochs: int, bs: int,
                   lr: float, wd: float = 5e-4, label_smoothing: float = 0.1, seed: int = 0, num_workers: int = 2,
                   stem: str = "cifar", device: torch.device | str | None = None) -> list[dict]:
    """tinyfast's recipe written by hand, as a PyTorch user would: the same ResNet18, fp32, one-cycle LR and
    momentum as fastai's `fit_one_cycle` (pct_start 0.25, div 25, final div 1e5, momentum 0.95-0.85-0.95),
    SGD with decoupled weight decay kept off BatchNorm and biases, label-smoothed cross-entropy, the same
    Albumentations policy, seeded per worker. Runs on `device` (default: fastai's default device, as tinyfast).
    Returns a row per epoch (val accuracy, cumulative seconds)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    device = torch.device(device) if device is not None else default_device()
    model = resnet18(n_classes, stem=stem).to(device)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD([{"params": decay}, {"params": no_decay}], lr=lr, momentum=0.95)
    train_dl = torch.utils.data.DataLoader(train, bs, shuffle=True, drop_last=True, num_workers=num_workers,
                                           generator=g, persistent_workers=num_workers > 0,
                                           worker_init_fn=_seed_worker_augmentation)
    valid_dl = torch.utils.data.DataLoader(valid, bs * 2, num_workers=num_workers)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(train_dl), pct_start=0.25,
                                                div_factor=25, final_div_factor=1e5 / 25, base_momentum=0.85,
                                                max_momentum=0.95)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
    rows, start = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for xb, yb in train_dl:
            xb, yb = xb.to(device), yb.to(device)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            with torch.no_grad():  # decoupled weight decay, as fastai's SGD applies it
                for p in decay:
                    p.mul_(1 - opt.param_groups[0]["lr"] * wd)
            opt.step()
            sched.step()
        model.eval()
        correct = n = 0
        with torch.no_grad():
            for xb, yb in valid_dl:
                xb, yb = xb.to(device), yb.to(device)
                correct += (model(xb).argmax(1) == yb).sum().item()
                n += len(yb)
        rows.append({"epoch": epoch + 1, "accuracy": correct / n, "elapsed": time.perf_counter() - start})
    return rows


def bench_recipe(data: Path | str | None = None, classes: int = 10, train_per_class: int | None = 200,
                 size: int = 32, bs: int = 64, epochs: int = 6, lr: float = 0.1, seeds: tuple[int, ...] = (0, 1),
                 precisions: tuple[str, ...] = ("auto", "fp32"), plain: bool = True) -> list[dict]:
    """Does tinyfast learn a real subset at least as well as a plain PyTorch loop of the same recipe, and does
    bf16 reach fp32's accuracy? One row per (trainer, precision, seed): best and final val top-1, seconds."""
    from tinyfast.train import fit, read_metrics

    root = resolve_dataset(data)
    wnids, files, val_wnids = tiny_imagenet_files(root, classes, train_per_class)
    o2i, wnid_of = {w: i for i, w in enumerate(wnids)}, TinyLabel(val_wnids)  # the DataBlock's labels and split

    def label(f: Path) -> int:
        return o2i[wnid_of(f)]

    train_files = [f for f in files if not is_val(f)]
    val_files = [f for f in files if is_val(f)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="tinyfast-recipe-") as tmp:
        for seed in seeds:
            for precision in precisions:
                r = fit(root, epochs=epochs, bs=bs, lr=lr, size=size, classes=classes, train_per_class=train_per_class,
                        seed=seed, precision=precision, out=Path(tmp) / f"tinyfast-{precision}-{seed}", quiet=True)
                accs = [m["accuracy"] for m in read_metrics(r.run_dir)]
                rows.append({"trainer": "tinyfast", "precision": DTYPE_NAMES[autocast_dtype(precision, r.learn.dls.device)],
                             "seed": seed, "best": max(accs),
                             "final": accs[-1], "seconds": r.seconds, "accuracies": accs})
            if plain:
                m = plain_loop_fit(HandWrittenDataset(train_files, [label(f) for f in train_files], size),
                                   HandWrittenDataset(val_files, [label(f) for f in val_files], size, augment=False),
                                   len(wnids), epochs, bs, lr, seed=seed)
                accs = [row["accuracy"] for row in m]
                rows.append({"trainer": "plain PyTorch", "precision": "fp32", "seed": seed, "best": max(accs),
                             "final": accs[-1], "seconds": m[-1]["elapsed"], "accuracies": accs})
    return rows


def format_bench_recipe(rows: list[dict]) -> str:
    lines = ["| trainer | precision | seed | best top-1 | final top-1 | seconds | top-1 per epoch |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['trainer']} | {r['precision']} | {r['seed']} | {r['best']:.3f} | {r['final']:.3f} | "
                     f"{r['seconds']:.0f} | {' '.join(f'{a:.3f}' for a in r['accuracies'])} |")
    return "\n".join(lines)

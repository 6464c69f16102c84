"""The classic recipe, in plain PyTorch, written without any tinyfast code: the reference tinyfast must meet.

It is the recipe a PyTorch user would take from kuangliu/pytorch-cifar and torchvision's references and apply
to TinyImageNet, the recipe whose 30-epoch figure (about 50% val top-1) is the classic target:
- a ResNet18 with a 3x3 stride-1 stem, basic blocks [2, 2, 2, 2], widths 64-128-256-512, global average pool
  and a linear head, with PyTorch's default initialisation (no zero-init residual);
- reflect-pad by 1/8 of the side, random crop back, horizontal flip (Albumentations), ImageNet normalisation;
- SGD, momentum 0.9, Nesterov, L2 weight decay 5e-4 on every parameter (`weight_decay=` of torch's SGD);
- plain cross-entropy (no label smoothing);
- torch's `OneCycleLR` with pct_start 0.25 and its defaults otherwise (cosine, div 25, final div 1e4,
  momentum cycled 0.85-0.95).

Only the data layout is shared with tinyfast, because it is TinyImageNet's: wnids.txt, train/<wnid>/images and
val/val_annotations.txt, read here by its own code. Val top-1 is counted against val_annotations.txt.
`precision="bf16"` runs the forward pass under CPU/CUDA bf16 autocast with channels_last; it changes the speed,
not the recipe (docs/BENCHMARKS.md compares it with fp32).
"""
from __future__ import annotations

import re
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import albumentations as alb

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------------------
# The model: kuangliu's ResNet18, with an adaptive pool so that any input size works
# ---------------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ClassicResNet18(nn.Module):
    def __init__(self, num_classes: int = 200):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, 2, stride=1)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.linear = nn.Linear(512, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# ---------------------------------------------------------------------------------------------------------
# The data: TinyImageNet's layout read directly, decoded once into memory (a subset fits easily)
# ---------------------------------------------------------------------------------------------------------
def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def read_split(root: Path | str, classes: int | None = None, train_per_class: int | None = None):
    """(wnids, train [(path, label)], val [(path, label)]): the first `classes` wnids of wnids.txt, the first
    `train_per_class` training images of each by file name, and every val image of those classes."""
    root = Path(root)
    wnids = [w for w in (root / "wnids.txt").read_text().split() if w][:classes]
    index = {w: i for i, w in enumerate(wnids)}
    train = [(p, index[w]) for w in wnids
             for p in sorted((root / "train" / w / "images").glob("*.JPEG"))[:train_per_class]]
    val = []
    for line in (root / "val" / "val_annotations.txt").read_text().splitlines():
        fields = line.split("\t")
        if len(fields) > 1 and fields[1] in index:
            val.append((root / "val" / "images" / fields[0], index[fields[1]]))
    val.sort(key=lambda item: _natural(item[0].name))
    return wnids, train, val


def decode(items: list[tuple[Path, int]], size: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.empty((len(items), size, size, 3), np.uint8)
    for i, (path, _) in enumerate(items):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"cannot decode {path}")
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
        if img.shape[:2] != (size, size):
            img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
        images[i] = img
    return images, np.array([label for _, label in items], np.int64)


class ArrayDataset(torch.utils.data.Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray, tfm: alb.Compose):
        self.images, self.labels, self.tfm = images, labels, tfm

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        x = self.tfm(image=self.images[i])["image"]
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), int(self.labels[i])


def classic_transforms(size: int, train: bool, seed: int) -> alb.Compose:
    pad = size // 8
    steps = [alb.PadIfNeeded(size + 2 * pad, size + 2 * pad, border_mode=cv2.BORDER_REFLECT_101),
             alb.RandomCrop(size, size), alb.HorizontalFlip()] if train else []
    return alb.Compose(steps + [alb.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD)], seed=seed)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------
def classic_fit(root: Path | str, epochs: int = 8, lr: float = 0.05, bs: int = 64, size: int = 32, seed: int = 0,
                classes: int | None = None, train_per_class: int | None = None, wd: float = 5e-4,
                momentum: float = 0.9, nesterov: bool = True, pct_start: float = 0.25, precision: str = "bf16",
                device: str | None = None, on_epoch=None) -> list[dict]:
    """Train the classic recipe; a row per epoch: val top-1 counted against val_annotations.txt, train loss,
    cumulative training seconds (validation excluded), and cumulative validation seconds and the decode's seconds
    (for fitting its epochs to a wall-clock budget, benchmarks/head_to_head.py). `on_epoch(row)` is called as each
    epoch ends: an hour-long run shows its progress."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision must be bf16 or fp32, got {precision!r}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    np.random.seed(seed)
    decode_start = time.perf_counter()
    wnids, train_items, val_items = read_split(root, classes, train_per_class)
    train = ArrayDataset(*decode(train_items, size), classic_transforms(size, True, seed))
    val = ArrayDataset(*decode(val_items, size), classic_transforms(size, False, seed))
    train_dl = torch.utils.data.DataLoader(train, bs, shuffle=True, drop_last=True,
                                           generator=torch.Generator().manual_seed(seed))
    val_dl = torch.utils.data.DataLoader(val, 2 * bs)
    decode_seconds = time.perf_counter() - decode_start

    model = ClassicResNet18(len(wnids)).to(device)
    if precision == "bf16":
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, epochs=epochs, steps_per_epoch=len(train_dl),
                                                pct_start=pct_start)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"))
    memory = torch.channels_last if precision == "bf16" else torch.contiguous_format
    rows, seconds, valid_seconds = [], 0.0, 0.0
    for epoch in range(epochs):
        model.train()
        start, losses = time.perf_counter(), []
        for xb, yb in train_dl:
            xb, yb = xb.to(device).contiguous(memory_format=memory), yb.to(device)
            with autocast():
                out = model(xb)
            loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        seconds += time.perf_counter() - start
        model.eval()
        correct = total = 0
        valid_start = time.perf_counter()
        with torch.no_grad(), autocast():
            for xb, yb in val_dl:
                pred = model(xb.to(device).contiguous(memory_format=memory)).argmax(1).cpu()
                correct += int((pred == yb).sum())
                total += len(yb)
        valid_seconds += time.perf_counter() - valid_start
        rows.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "accuracy": correct / total,
                     "seconds": round(seconds, 2), "valid_seconds": round(valid_seconds, 2),
                     "decode_seconds": round(decode_seconds, 2)})
        if on_epoch is not None:
            on_epoch(rows[-1])
    return rows

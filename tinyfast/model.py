"""ResNet18 for 64x64 inputs, written out in full so the stem, the widths and the init are ours to choose.

torchvision's ResNet18 is built for 224 px: its stride-2 7x7 stem plus max-pool shrinks a 64x64 TinyImageNet
image to 16x16 before the first block. The CIFAR-style stem (3x3, stride 1, no pool) keeps 64x64 feature maps,
which costs 15x the FLOPs (13.3 against 0.89 GFLOP per training image) and buys accuracy; `stem` lets a run pick (see README, "The model").
"""
from __future__ import annotations

import torch
from torch import nn
import torch.nn.functional as F

from .choices import STEMS

INITS = ("pytorch", "kaiming")


class BasicBlock(nn.Module):
    """Two 3x3 convs with a shortcut. `zero_init` starts the second BN at zero, so the block begins as the
    identity (Goyal et al. 2017, "zero-init residual"); off by default, see `ResNet`."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, zero_init: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if zero_init:
            nn.init.zeros_(self.bn2.weight)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """`init="pytorch"` keeps PyTorch's default conv init; `"kaiming"` is torchvision's He-normal (fan_out).
    Every conv here feeds a BatchNorm, so its output ignores the weights' scale but its effective learning
    rate goes as lr / |w|^2: He-normal weights are ~2.4x larger (6x in |w|^2), and in a run of a few thousand
    steps that slows the residual branches to a crawl. The same goes for `zero_init_residual`, whose branches
    get no gradient until their last BN's scale has grown. Together they cost 10 points of val top-1 on a real
    10-class subset in 8 epochs (0.448 against 0.552, docs/BENCHMARKS.md), so both are off by default."""

    def __init__(self, blocks: tuple[int, ...] = (2, 2, 2, 2), n_classes: int = 200, stem: str = "cifar",
                 width: int = 64, zero_init_residual: bool = False, init: str = "pytorch"):
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, stride=2, padding=1))
        widths = [width * 2**i for i in range(len(blocks))]
        in_planes, layers = width, []
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            strides = [1 if i == 0 else 2] + [1] * (n - 1)
            stage = []
            for s in strides:
                stage.append(BasicBlock(in_planes, planes, s, zero_init=zero_init_residual))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        # named layer1..layer4 like torchvision, so Grad-CAM's usual target `model.layer4[-1]` works
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, n_classes)
        if init == "kaiming":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet18(n_classes: int = 200, stem: str = "cifar", width: int = 64, zero_init_residual: bool = False,
             init: str = "pytorch") -> ResNet:
    """ResNet18 ([2,2,2,2] basic blocks, widths 64-128-256-512): ~11.3M parameters at 200 classes."""
    return ResNet((2, 2, 2, 2), n_classes=n_classes, stem=stem, width=width, zero_init_residual=zero_init_residual,
                  init=init)


def training_flops_per_image(model: nn.Module, size: int = 64) -> float:
    """Forward FLOPs x 3 (forward + backward), counted from the conv and linear layers: what a GPU's
    FLOP-bound limit in `bench train` is computed from."""
    flops = 0

    def hook(m, inp, out):
        nonlocal flops
        if isinstance(m, nn.Conv2d):
            flops += 2 * out.numel() * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
        elif isinstance(m, nn.Linear):
            flops += 2 * out.numel() * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        p = next(model.parameters())
        with torch.no_grad():
            model.eval()(torch.zeros(1, 3, size, size, device=p.device, dtype=p.dtype))
    finally:
        for h in handles:
            h.remove()
    return 3.0 * flops

"""tinyfast: train a ResNet18 from scratch on TinyImageNet with fastai, and understand what it learned.

The REPL names are the CLI's: `tiny_imagenet_dls` (data), `resnet18` (model), `tiny_learner` (Learner),
`fit` (a training run with its run folder), `load_run` (a run folder back as a Learner).
Heavier parts import on use: `tinyfast.lr_range`, `tinyfast.interpret`, `tinyfast.cam`, `tinyfast.compare`.
"""
from .data import default_augmentation, tiny_imagenet_dls
from .dataset import DatasetError, download_tiny_imagenet, resolve_dataset
from .learner import tiny_learner
from .model import resnet18
from .train import fit, load_run

__all__ = ["tiny_imagenet_dls", "default_augmentation", "resnet18", "tiny_learner", "fit", "load_run",
           "download_tiny_imagenet", "resolve_dataset", "DatasetError"]

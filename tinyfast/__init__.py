"""tinyfast: train a ResNet18 from scratch on TinyImageNet with fastai, and understand what it learned.

The REPL names are the CLI's: `tiny_imagenet_dls` (data), `resnet18` (model), `tiny_learner` (Learner),
`RunConfig` (every option of a run), `fit` (a training run with its run folder), `load_run` (a run folder back as a
Learner).
They import on first use (PEP 562), so that `tinyfast --help` does not wait for torch and fastai; so do the
heavier parts: `tinyfast.lr_range` and `tinyfast.lr_range_report`, `tinyfast.interpret`, `tinyfast.cam` and
`tinyfast.cam_report`, `tinyfast.compare`, `tinyfast.export`.
"""
import warnings
from importlib import import_module

# fastai 2.8 decorates a few functions with `torch.jit.script` as it imports, and torch 2.14 answers each with a
# FutureWarning: two lines on stderr at every command, meant for fastai's maintainers, not for tinyfast's users.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

_HOME = {"tiny_imagenet_dls": "data", "default_augmentation": "data", "resnet18": "model",
         "tiny_learner": "learner", "RunConfig": "config", "fit": "train", "load_run": "train", "download_tiny_imagenet": "dataset",
         "resolve_dataset": "dataset", "DatasetError": "dataset"}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module 'tinyfast' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)

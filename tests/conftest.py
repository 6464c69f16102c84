"""Session-wide fixtures: small synthetic TinyImageNet copies, generated once per test run.

The environment defaults are set at import time, before torch/matplotlib are imported by any
test module, so that the suite behaves the same on a 2-core CI box and never opens a window.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tinyfast.synthetic import make_tiny_imagenet  # noqa: E402


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes x (24 train, 8 val, 2 test) 64 px images: cheap layout/loader checks."""
    return make_tiny_imagenet(
        tmp_path_factory.mktemp("tin"), n_classes=4, n_train=24, n_val=8, n_test=2, size=64, seed=0
    )


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 classes x (60 train, 16 val) images: enough for a real model to learn something."""
    return make_tiny_imagenet(tmp_path_factory.mktemp("demo"), n_classes=6, n_train=60, n_val=16, seed=1)


CAM_SIZE = 32
CAM_WIDTH = 16  # a narrow ResNet18 (the same stages and blocks, ~1/16 of the FLOPs) learns the task in seconds


def cam_learner(dls, seed: int = 0):
    """A fresh narrow ResNet18 Learner on `dls`, seeded."""
    from fastai.torch_core import set_seed
    from tinyfast.learner import tiny_learner
    from tinyfast.model import resnet18
    set_seed(seed)
    return tiny_learner(dls, model=resnet18(dls.c, width=CAM_WIDTH))


@pytest.fixture(scope="session")
def cam_dls(demo_root):
    """The demo set at 32 px, unaugmented (learns in fewer epochs): for the CAM tests (test_cam, test_cam_report)."""
    from fastai.torch_core import set_seed
    from tinyfast.data import tiny_imagenet_dls
    set_seed(0)  # the loader's shuffling too
    return tiny_imagenet_dls(demo_root, bs=16, size=CAM_SIZE, aug=False)


@pytest.fixture(scope="session")
def cam_learn(cam_dls):
    """`cam_learner` trained 4 epochs on `cam_dls`: its maps sit on the drawn objects."""
    learn = cam_learner(cam_dls)
    with learn.no_bar(), learn.no_logging():
        learn.fit_one_cycle(4, 0.1)
    return learn

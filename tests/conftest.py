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

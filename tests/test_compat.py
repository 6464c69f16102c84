"""The private library names tinyfast relies on (tinyfast/compat.py), checked against the installed libraries: an
upgrade that changes one fails here, by name. Where the installed version is not the one checked, the behaviour
tests below still run; the version test says which library moved."""
from __future__ import annotations

import inspect
from importlib.metadata import version

import fastai
import pytest
import torch
from fastai.data.load import DataLoader
from fastai.distributed import DistributedDL

from tinyfast import compat


def test_the_versions_checked_are_the_ones_installed():
    installed = {"fastai": fastai.__version__, "torch": torch.__version__.split("+")[0], "grad-cam": version("grad-cam")}
    moved = {k: (compat.CHECKED[k], v) for k, v in installed.items() if v != compat.CHECKED[k]}
    assert not moved, f"re-check tinyfast/compat.py against these (checked, installed): {moved}"


def test_fastai_samples_the_order_set_in_its_mangled_attribute():
    dl = DataLoader(list(range(10)), bs=2)
    compat.set_epoch_order(dl, [9, 8, 7, 6])
    assert compat.epoch_order(dl) == [9, 8, 7, 6] and list(dl.sample()) == [9, 8, 7, 6]
    assert "self.__idxs" in inspect.getsource(DataLoader.sample) and "self.__idxs=" in inspect.getsource(DataLoader.__iter__).replace(" ", "")


def test_fastai_picks_torchs_iterators_by_worker_count():
    from fastai.data.load import _loaders
    from torch.utils.data.dataloader import _MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter
    assert _loaders == (_MultiProcessingDataLoaderIter, _SingleProcessDataLoaderIter)
    assert "_reset" in vars(_MultiProcessingDataLoaderIter)
    assert list(inspect.signature(_MultiProcessingDataLoaderIter._reset).parameters)[:3] == ["self", "loader", "first_iter"]


def test_torch_names_bf16_cpus_and_compiled_modules_privately():
    assert isinstance(compat.cpu_has_native_bf16(), bool)
    module = torch.nn.Linear(2, 2)
    assert hasattr(module, "_compiled_call_impl") and module._compiled_call_impl is None
    module.compile(backend="eager")
    assert module._compiled_call_impl is not None
    compat.uncompile(module)
    assert module._compiled_call_impl is None


def test_score_cam_draws_through_its_module_tqdm():
    from pytorch_grad_cam import score_cam
    assert "tqdm.tqdm(" in inspect.getsource(score_cam)
    before = score_cam.tqdm
    with compat.quiet_scorecam():
        assert score_cam.tqdm is not before and score_cam.tqdm.tqdm(range(2)).disable
    assert score_cam.tqdm is before


def test_distributed_dl_broadcasts_through_a_private_method_tinyfast_replaces():
    """tinyfast/distributed.py replaces `DistributedDL._broadcast` (fastai's moves the indices to CUDA, which a
    gloo group cannot take): the method must still exist, with its signature, and be called by `get_idxs`."""
    import tinyfast.distributed  # noqa: F401  (applies the replacement)
    assert list(inspect.signature(DistributedDL._broadcast).parameters) == ["self", "t", "rank"]
    assert "self._broadcast(" in inspect.getsource(DistributedDL.get_idxs)
    assert DistributedDL._broadcast.__module__ == "tinyfast.compat"


def test_the_distributed_dl_tinyfast_adapts_is_fastais_as_checked():
    """compat.adapt_distributed_dl replaces five methods of fastai's DistributedDL (a class fastai's trainer builds
    by name) and reads what its constructor stores: fastai's class must still have them as checked, and the
    replacements must be the ones in place."""
    import fastai.distributed as fd
    import tinyfast.distributed  # noqa: F401  (adapts the class)
    source = inspect.getsource(fd.DistributedDL)
    assert "def before_iter(self):" in source and "self.dl.before_iter()" in source  # what the replacement wraps
    assert "'num_workers','offs'" in source and "store_attr()" in source  # dl, rank, world_size, offs stored
    for name in ("wif", "sample", "__iter__"):  # inherited from fastai's DataLoader: replaced on the subclass only
        assert name not in source.split("def __init__")[0] and hasattr(DataLoader, name)
    from fastai.data import load  # its worker_init_fn tells the wrapper, not the wrapped loader, which worker it is
    assert "ds.num_workers,ds.offs = info.num_workers,info.id" in inspect.getsource(load._wif).replace(", ", ",")
    assert "ds.wif()" in inspect.getsource(load._wif) and "wif" in DataLoader._noop_methods
    for name in ("_broadcast", "before_iter", "wif", "__iter__", "sample"):
        assert vars(DistributedDL)[name].__module__ == "tinyfast.compat", name
    assert isinstance(vars(DistributedDL)["rng"], property) and DistributedDL._tinyfast_adapted
    assert DataLoader.wif.__module__.startswith("fastai")  # fastai's base class is left as it was

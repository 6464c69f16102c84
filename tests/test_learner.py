"""tinyfast's SGD: fastai's Optimizer, stepping exactly as torch's SGD does for each weight-decay coupling; and
what FastDevice does to the CPU's allocator."""
import resource
import sys

import pytest
import torch
from torch import nn

from fastai.callback.core import Callback

import tinyfast.learner as learner_module
from tinyfast.learner import SGD, FastDevice


def _steps(make_opt, n=5):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = make_opt(model.parameters())
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for _ in range(n):
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_with_l2_matches_torch(nesterov):
    ours = _steps(lambda ps: SGD(list(ps), lr=0.1, mom=0.9, wd=5e-2, decouple_wd=False, nesterov=nesterov))
    torchs = _steps(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=5e-2, nesterov=nesterov))
    assert torch.allclose(ours, torchs, atol=1e-6)


def test_nesterov_changes_the_step_and_decoupled_wd_differs_from_l2():
    plain = _steps(lambda ps: SGD(list(ps), lr=0.1, mom=0.9, wd=5e-2))
    nesterov = _steps(lambda ps: SGD(list(ps), lr=0.1, mom=0.9, wd=5e-2, nesterov=True))
    l2 = _steps(lambda ps: SGD(list(ps), lr=0.1, mom=0.9, wd=5e-2, decouple_wd=False))
    assert not torch.allclose(plain, nesterov, atol=1e-4)
    assert not torch.allclose(plain, l2, atol=1e-4)
    # decoupled: p <- p * (1 - lr * wd) before the momentum step, as fastai's own SGD does it
    torch.manual_seed(0)
    from fastai.optimizer import SGD as fastai_SGD
    fastai = _steps(lambda ps: fastai_SGD(list(ps), lr=0.1, mom=0.9, wd=5e-2))
    assert torch.allclose(plain, fastai, atol=1e-7)


def test_compile_trains_as_the_eager_model_does(tiny_root):
    """`CompileModel` (fit --compile) on a tiny model: the same losses as without it, and learn.export still works."""
    import pickle
    from fastai.torch_core import set_seed
    from torch import nn
    from tinyfast.data import tiny_imagenet_dls
    from tinyfast.learner import CompileModel, tiny_learner

    def run(compiled: bool):
        set_seed(0)
        dls = tiny_imagenet_dls(tiny_root, bs=16, size=16, device="cpu", aug=False)
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, dls.c))
        learn = tiny_learner(dls, model, precision="fp32", cbs=[CompileModel()] if compiled else [])
        seen = []
        with learn.no_bar(), learn.no_logging():
            learn.fit(1, 0.05, cbs=[_Calls(seen)])
        return learn, seen

    eager, eager_losses = run(False)
    compiled, compiled_losses = run(True)
    assert compiled_losses[0][1], "the forward went through torch.compile"
    assert [l for l, _ in compiled_losses] == pytest.approx([l for l, _ in eager_losses], rel=1e-4, abs=1e-5)
    assert compiled.model._compiled_call_impl is None  # undone after fit: the Learner pickles
    pickle.dumps(compiled.model)


class _Calls(Callback):
    def __init__(self, seen):
        self.seen = seen

    def after_loss(self):
        if self.training:
            self.seen.append((float(self.loss.detach()), getattr(self.learn.model, "_compiled_call_impl", None) is not None))


def _page_faults_of_big_blocks(n: int = 4, mib: int = 48) -> int:
    start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        block = torch.empty(mib * 2**20, dtype=torch.uint8)
        block.fill_(1)
        del block
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_cpu_fit_reuses_freed_activations_instead_of_faulting_them_in_again(monkeypatch):
    """glibc unmaps a freed block above its mmap threshold (32 MiB at most, by default), so each training step
    faulted its largest activations in again; FastDevice raises the threshold on the CPU."""
    from fastai.test_utils import synth_learner
    monkeypatch.setattr(learner_module, "_kept", None)
    learn = synth_learner(cbs=FastDevice(precision="fp32"))
    learn.fit(1)
    assert learner_module._kept is True
    one_block = 48 * 2**20 // resource.getpagesize()
    assert _page_faults_of_big_blocks() < 2 * one_block  # the first may grow the heap; the others reuse it

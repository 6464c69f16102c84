"""The GPU paths, proven on a CPU by simulation (issue #28): the precision each compute capability gets, the fp16
path with its loss scaling, a resume onto another device, where `torch.load` puts tensors, the host syncs of a
training step (on the `meta` device, tests/host_reads.py), fastai's MixUp/CutMix without syncs, the kernels of the
installed torch, `doctor`, DDP's precision, compile order and persistent workers.
"""
from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from fastai.callback.core import Callback
from fastai.callback.mixup import CutMix, MixUp
from fastai.distributed import DistributedTrainer

import tinyfast.data as data_module
import tinyfast.doctor as doctor_module
from tinyfast.callbacks import CutMixOnDevice, MixUpOnDevice, SmoothLossOnDevice
from tinyfast.data import tiny_imagenet_dls
from tinyfast.doctor import check_device, doctor, format_doctor, has_kernels
from tinyfast.errors import RunError
from tinyfast.learner import CompileModel, FastDevice, autocast_dtype, precision_choice, tiny_learner
from tinyfast.model import resnet18
from tinyfast.train import _load_checkpoint, fit, load_run, read_checkpoint

from host_reads import HostReads

CUDA = torch.device("cuda", 0)
SMALL = dict(size=16, bs=8, num_workers=0, quiet=True)


@pytest.fixture
def gpu_of(monkeypatch):
    """A GPU of the given compute capability, as torch reports it (and, as on a T4, `is_bf16_supported` True)."""
    def make(major: int, minor: int, arch_list=("sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"),
             name: str = "Simulated GPU"):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (major, minor))
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
        monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: list(arch_list))
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return make


# ---------------------------------------------------------------------------------------------------------
# The precision a device gets
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("capability, dtype", [((7, 0), torch.float16), ((7, 5), torch.float16),
                                               ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16),
                                               ((9, 0), torch.bfloat16)])
def test_auto_is_bf16_from_compute_capability_8_and_fp16_below(gpu_of, capability, dtype):
    gpu_of(*capability)  # torch.cuda.is_bf16_supported() says True on every one of them, T4 and V100 included
    chosen, why = precision_choice("auto", CUDA)
    assert chosen == dtype == autocast_dtype("auto", CUDA)
    assert f"{capability[0]}.{capability[1]}" in why
    assert ("loss scaling" in why) == (dtype == torch.float16)


@pytest.mark.parametrize("native, dtype", [(True, torch.bfloat16), (False, None)])
def test_auto_on_a_cpu_is_bf16_only_where_it_is_native(monkeypatch, native, dtype):
    monkeypatch.setattr("tinyfast.learner.cpu_has_native_bf16", lambda: native)
    chosen, why = precision_choice("auto", torch.device("cpu"))
    assert chosen == dtype and ("natively" in why) == native
    assert precision_choice("bf16", torch.device("cpu"))[0] == torch.bfloat16  # asked for: given, even emulated


def test_explicit_precisions_are_honoured_and_said(gpu_of):
    gpu_of(7, 5)
    assert precision_choice("bf16", CUDA) == (torch.bfloat16, "bf16 autocast, as asked (emulated on compute capability 7.5)")
    assert precision_choice("fp16", CUDA)[0] == precision_choice("fp16", torch.device("cpu"))[0] == torch.float16
    assert precision_choice("fp32", CUDA)[0] is None
    with pytest.raises(ValueError, match="precision must be one of"):
        precision_choice("fp8", CUDA)


# ---------------------------------------------------------------------------------------------------------
# fp16: autocast and loss scaling, on the CPU (the same code a T4 runs)
# ---------------------------------------------------------------------------------------------------------
def _record_conv_dtype(model, seen: list):
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return first.register_forward_hook(lambda m, i, o: seen.append(o.dtype))


@pytest.fixture(scope="module")
def small_dls(tiny_root):
    return tiny_imagenet_dls(tiny_root, bs=8, size=16, num_workers=0)


def test_fp16_trains_with_loss_scaling_and_predicts(small_dls, monkeypatch):
    """The dtype forced to fp16 on the CPU, as `auto` gives it on a T4: the first fit and get_preds ran into
    fastai's MixedPrecision added from inside a before_fit (whose own before_fit then never ran)."""
    monkeypatch.setattr("tinyfast.learner.autocast_dtype", lambda precision, device: torch.float16)
    learn = tiny_learner(small_dls, model=resnet18(small_dls.c, width=8))
    seen: list = []
    hook = _record_conv_dtype(learn.model, seen)
    try:
        learn.fit(1, 0.01)
        fast = learn.fast_device
        assert fast.scaler is not None and fast.scaler.is_enabled() and fast.scaler.get_scale() > 0
        assert seen and set(seen) == {torch.float16}
        seen.clear()
        preds, targs = learn.get_preds()
        assert preds.dtype == torch.float32 and torch.isfinite(preds).all() and set(seen) == {torch.float16}
    finally:
        hook.remove()


def test_fp16_cancels_a_step_with_inf_gradients_and_lowers_the_scale(small_dls, monkeypatch):
    monkeypatch.setattr("tinyfast.learner.autocast_dtype", lambda precision, device: torch.float16)
    learn = tiny_learner(small_dls, model=resnet18(small_dls.c, width=8))

    class InfGradient(Callback):
        order = 5  # before FastDevice (10) unscales them in before_step

        def before_step(self):
            if self.iter == 1:
                next(self.model.parameters()).grad[0].fill_(float("inf"))
                self.weights = [p.detach().clone() for p in self.model.parameters()]
                self.scale = self.fast_device.scaler.get_scale()

        def after_batch(self):  # after FastDevice's after_step has updated the scale
            if self.training and self.iter == 1:
                self.unchanged = all(torch.equal(a, p) for a, p in zip(self.weights, self.model.parameters()))
                self.scale_after = self.fast_device.scaler.get_scale()

    spy = InfGradient()
    learn.fit(1, 0.01, cbs=[spy])
    assert spy.unchanged, "a step with inf gradients must not touch the weights"
    assert spy.scale_after == spy.scale / 2


def test_fp16_resume_keeps_the_loss_scale(tiny_root, tmp_path, monkeypatch):
    monkeypatch.setattr("tinyfast.learner.autocast_dtype", lambda precision, device: torch.float16)
    fit(tiny_root, epochs=1, lr=0.01, out=tmp_path / "run", **SMALL)
    start = read_checkpoint(tmp_path / "run")
    assert start["scaler"] is not None and start["scaler"]["scale"] > 0


# ---------------------------------------------------------------------------------------------------------
# Where tensors land: resume onto another device, torch.load
# ---------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_epoch_run(tiny_root, tmp_path_factory):
    return fit(tiny_root, epochs=1, lr=0.05, out=tmp_path_factory.mktemp("one") / "run", **SMALL).run_dir


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta tensors hold no values
def test_a_checkpoint_restored_onto_another_device_puts_the_optimizer_state_there(one_epoch_run, tiny_root):
    """The checkpoint is read onto the CPU; the training device here is `meta` (a GPU's stand-in): every parameter
    and every momentum buffer must end up there, or the first step mixes devices."""
    start = read_checkpoint(one_epoch_run)
    assert any(isinstance(v, torch.Tensor) for s in start["opt"]["state"] for v in s.values())
    dls = tiny_imagenet_dls(tiny_root, bs=8, size=16, num_workers=0)
    dls.device = torch.device("meta")
    learn = tiny_learner(dls)
    assert _load_checkpoint(learn, start) == 1
    assert {p.device.type for p in learn.model.parameters()} == {"meta"}
    buffers = [v for s in learn.opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    assert buffers and {b.device.type for b in buffers} == {"meta"}


def test_every_torch_load_of_a_run_maps_to_the_cpu(one_epoch_run, tiny_root, tmp_path, monkeypatch):
    """A GPU-trained model.pth opened on a CPU-only machine, and under DDP every rank, must not load to cuda:0."""
    calls = []
    real = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("map_location"))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    fit(tiny_root, epochs=1, lr=0.05, out=tmp_path / "again", **SMALL)  # loads the best weights back at the end
    load_run(one_epoch_run, num_workers=0)
    read_checkpoint(one_epoch_run)
    assert len(calls) >= 3 and all(c == "cpu" for c in calls), calls


# ---------------------------------------------------------------------------------------------------------
# Host syncs in a training step, counted on the meta device
# ---------------------------------------------------------------------------------------------------------
def _fit_on_meta(root, out, monkeypatch, **levers) -> HostReads:
    monkeypatch.setattr(data_module, "default_device", lambda *a, **k: torch.device("meta"))
    reads = HostReads()
    with reads:
        fit(root, epochs=2, lr=0.05, out=out, cbs=reads.callbacks(), **SMALL, **levers)
    return reads


@pytest.mark.parametrize("levers", [{}, {"ema": 0.99, "mixup": 0.4}, {"cutmix": 1.0, "progressive": 8}],
                         ids=["defaults", "ema+mixup", "cutmix+progressive"])
def test_no_host_sync_inside_a_training_batch(tiny_root, tmp_path, monkeypatch, levers):
    """`fit` on the meta device: nothing in a training batch reads a device value or copies blocking. The NaN
    verdict and the smoothed loss are read at the end of each training phase (and every 50 batches, more than
    this epoch has); validation reads its metrics, as fastai does."""
    reads = _fit_on_meta(tiny_root, tmp_path / "run", monkeypatch, **levers)
    assert len(reads.training_batches_seen()) == 2 * 12  # 2 epochs of 12 batches (96 images, bs 8)
    assert reads.in_training_batches() == {}, reads.in_training_batches()
    between = [e for p, e in reads.events if p == "between"]
    assert between.count("read") >= 2  # the NaN verdict at the end of each training phase: the check is counted


def test_the_counter_sees_fastais_own_syncs(small_dls):
    """The same count on stock fastai: the Recorder's `to_detach` of the loss and CutMix's device-tensor slicing
    are syncs in every training batch (so the test above can fail)."""
    dls = tiny_imagenet_dls(small_dls.root, bs=8, size=16, num_workers=0, device="meta")
    for mix, own in ((CutMix(1.0), True), (MixUp(0.4), True), (None, False)):
        learn = tiny_learner(dls, model=resnet18(dls.c, width=8))
        reads = HostReads()
        with reads, learn.no_bar():
            learn.fit(1, 0.01, cbs=reads.callbacks() + ([mix] if mix else []))
        per_batch = reads.in_training_batches()
        assert per_batch["copy to host"] >= len(reads.training_batches_seen())  # the Recorder, every batch
        if isinstance(mix, CutMix):
            assert per_batch["read"] >= 4 * len(reads.training_batches_seen())  # the box's bounds
        if isinstance(mix, MixUp):
            assert per_batch["blocking copy to device"] >= 2 * len(reads.training_batches_seen())


@pytest.mark.parametrize("fastai_cls, ours", [(MixUp, MixUpOnDevice), (CutMix, CutMixOnDevice)])
def test_the_sync_free_mixup_and_cutmix_compute_what_fastais_do(small_dls, fastai_cls, ours):
    """Same seed, same batch: the same mixed images, targets and weights as fastai's, on the CPU."""
    results = []
    xb, yb = small_dls.one_batch()
    for cls in (fastai_cls, ours):
        learn = tiny_learner(small_dls, model=resnet18(small_dls.c, width=8))
        cb = cls(0.7)
        learn.add_cb(cb)
        learn.xb, learn.yb, learn.training = (xb.clone(),), (yb,), True
        cb.before_train()
        torch.manual_seed(3)
        cb.before_batch()
        results.append((learn.xb[0].clone(), cb.yb1[0].clone(), torch.as_tensor(cb.lam).clone()))
        cb.after_train()
    (x0, y0, l0), (x1, y1, l1) = results
    assert torch.equal(x0, x1) and torch.equal(y0, y1) and torch.equal(l0.cpu(), l1.cpu())


def test_the_smoothed_loss_on_the_device_is_fastais(small_dls):
    """The same seeded fit with and without `SmoothLossOnDevice`: the same losses, the same weights."""
    outcomes = []
    for cbs in ([], [SmoothLossOnDevice(every=5)]):
        torch.manual_seed(0)
        small_dls.train.rng = random.Random(0)
        learn = tiny_learner(small_dls, model=resnet18(small_dls.c, width=8))
        with learn.no_bar():
            learn.fit(2, 0.01, cbs=cbs)
        outcomes.append(([float(v) for v in learn.recorder.losses], learn.model.state_dict()))
    (l0, w0), (l1, w1) = outcomes
    assert l0 == pytest.approx(l1, abs=1e-6) and all(torch.equal(w0[k], w1[k]) for k in w0)


# ---------------------------------------------------------------------------------------------------------
# The installed torch's kernels, doctor, fit's refusal
# ---------------------------------------------------------------------------------------------------------
def test_kernel_compatibility_follows_cuda_rules():
    cu13 = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert not has_kernels((7, 0), cu13)        # V100 under a CUDA 13 build
    assert has_kernels((7, 5), cu13) and has_kernels((8, 9), cu13) and has_kernels((10, 3), cu13)
    assert has_kernels((7, 0), ["sm_50", "sm_60", "sm_70", "sm_75"])
    assert not has_kernels((8, 0), ["sm_90a"]) and has_kernels((9, 0), ["sm_90a"])
    assert has_kernels((9, 0), ["sm_80", "compute_80"]) and not has_kernels((7, 5), ["compute_80"])


def test_fit_refuses_a_gpu_the_installed_torch_cannot_run(gpu_of, tiny_root, tmp_path, monkeypatch):
    gpu_of(7, 0, name="Tesla V100-SXM2-16GB")
    monkeypatch.setattr(doctor_module, "default_device", lambda *a, **k: CUDA)
    with pytest.raises(RunError) as refused:
        fit(tiny_root, epochs=1, out=tmp_path / "run", **SMALL)
    message = str(refused.value)
    assert "\n" not in message and "Tesla V100" in message and "7.0" in message and "cu126" in message
    assert not (tmp_path / "run").exists()
    check_device(torch.device("cpu"))  # a CPU is always fine


def test_doctor_says_device_kernels_precision_workers_cache_and_versions(gpu_of, tiny_root, monkeypatch):
    facts = doctor(tiny_root, device=torch.device("cpu"))
    assert {"device", "precision auto", "loader workers", "dataset", "decoded cache", "versions"} <= set(facts)
    assert "fastai 2.8" in facts["versions"] and "grad-cam" in facts["versions"]
    assert str(tiny_root) in facts["decoded cache"]
    gpu_of(7, 5, name="Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda d: type("P", (), {"major": 7, "minor": 5, "total_memory": 16 * 2**30})())
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    facts = doctor(tiny_root, device=CUDA)
    assert "Tesla T4" in facts["device"] and "7.5" in facts["device"] and facts["kernels"].startswith("yes")
    assert "fp16" in facts["precision auto"] and "loss scaling" in facts["precision auto"]
    assert facts["loader workers"].startswith(str(data_module.default_num_workers(CUDA)))
    assert "precision auto:" in format_doctor(facts)


def test_doctor_command_runs(tiny_root):
    from typer.testing import CliRunner
    from tinyfast.cli import app
    res = CliRunner().invoke(app, ["doctor", "--data", str(tiny_root)])
    assert res.exit_code == 0, res.output
    assert "precision auto:" in res.output and "versions:" in res.output


# ---------------------------------------------------------------------------------------------------------
# Several processes: compile order, accelerate's precision, persistent workers under DistributedDL
# ---------------------------------------------------------------------------------------------------------
def test_compile_wraps_what_ddp_wrapped(small_dls):
    """Under DDP the DistributedDataParallel module is compiled (its buckets then overlap the backward), not the
    inner model before it is wrapped. A stand-in wrapper at DistributedTrainer's order shows which one it gets."""
    assert CompileModel.order > DistributedTrainer.order > FastDevice.order

    class Wrapper(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, x):
            return self.module(x)

    class WrapLikeDDP(Callback):
        order = DistributedTrainer.order

        def before_fit(self):
            self.learn.model = Wrapper(self.learn.model)

        def after_fit(self):
            self.learn.model = self.learn.model.module

    learn = tiny_learner(small_dls, model=resnet18(small_dls.c, width=8))
    compiled = []

    class Spy(CompileModel):
        def before_fit(self):
            compiled.append(type(self.learn.model).__name__)
            super().before_fit()

    with learn.no_bar():
        learn.fit(1, 0.01, cbs=[WrapLikeDDP(), Spy(backend="eager")])
    assert compiled == ["Wrapper"]


needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="this torch build has no gloo backend: no multi-process training on CPUs")


@needs_gloo
def test_distributed_dl_keeps_cachedbatchdl_workers_and_order(tiny_root, tmp_path, monkeypatch):
    """fastai's DistributedDL over a CachedBatchDL iterates as the CachedBatchDL does: its worker processes live
    from epoch to epoch, and the batches are the ones the loader itself serves for the same random state."""
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    from tinyfast import distributed as D
    dls = tiny_imagenet_dls(tiny_root, bs=8, size=16, num_workers=2)
    plain = dls.train
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        state = plain.rng.getstate()
        expected = [[(x.clone(), y.clone()) for x, y in plain] for _ in range(2)]
        plain.rng.setstate(state)
        ddl = D.DistributedDL(plain, rank=0, world_size=1)
        first = [(x.clone(), y.clone()) for x, y in ddl]
        workers = ddl._workers
        pids = {w.pid for w in workers._workers}
        second = [(x.clone(), y.clone()) for x, y in ddl]
        assert ddl._workers is workers and {w.pid for w in workers._workers} == pids and all(
            w.is_alive() for w in workers._workers), "the workers must serve the next epoch too"
        for got, want in zip((first, second), expected):
            assert len(got) == len(want)
            assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, want))
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# scripts/gpu: the independent top-1 counts in the vocabulary's order
# ---------------------------------------------------------------------------------------------------------
def test_device_verify_uses_the_vocabulary_order_not_sorted_wnids(one_epoch_run, tiny_root, tmp_path):
    import sys
    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts" / "gpu"))
    import device as device_script
    shuffled = tmp_path / "shuffled"
    shutil.copytree(tiny_root, shuffled, symlinks=True)
    wnids = (shuffled / "wnids.txt").read_text().split()
    (shuffled / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    run = fit(shuffled, epochs=1, lr=0.05, out=tmp_path / "run", **SMALL)
    vocab = device_script.run_vocabulary(run.run_dir, shuffled)
    assert vocab == list(run.learn.dls.vocab) == list(reversed(wnids)) != sorted(wnids)
    with pytest.raises(SystemExit, match="not the run's vocabulary"):  # the same run against the sorted order
        device_script.run_vocabulary(run.run_dir, tiny_root)

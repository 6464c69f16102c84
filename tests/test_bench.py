"""The benchmarks run end to end on tiny inputs and report consistent fields (no timing assertions: speed is
measured on purpose with `python main.py bench`, not in tests)."""
from __future__ import annotations

import math

import pytest
import torch

import albumentations as alb

from benchmarks.bench import (HandWrittenDataset, bench_data, bench_train, format_bench_data, format_bench_train)
from tinyfast.data import TINY_MEAN, TINY_STD, tiny_imagenet_dls
from tinyfast.learner import autocast_dtype
from tinyfast.model import resnet18, training_flops_per_image

TRAIN_KEYS = {"tinyfast_img_s", "plain_fp32_img_s", "ratio", "size", "bs", "steps", "precision", "channels_last",
              "device", "flops_per_image", "matmul_tflops", "flop_bound_img_s", "threads"}


@pytest.fixture(scope="module")
def data_result(tiny_root):
    return bench_data(tiny_root, bs=16, size=32, passes=2, device="cpu")


def test_bench_data_reports_both_loaders(data_result, tiny_root):
    r = data_result
    assert r["n_images"] == 4 * 24  # the train split of tiny_root, val excluded
    assert r["tinyfast_img_s"] > 0 and r["baseline_img_s"] > 0 and r["naive_fastai_img_s"] > 0
    assert math.isclose(r["ratio"], r["tinyfast_img_s"] / r["baseline_img_s"])
    assert (r["bs"], r["size"], r["baseline_workers"], r["device"]) == (16, 32, 2, "cpu")
    assert r["num_workers"] == 0  # tinyfast's CPU default
    assert r["threads"] == torch.get_num_threads()
    assert r["tinyfast_cpu_us"] > 0 and r["baseline_cpu_us"] > 0 and r["naive_fastai_cpu_us"] > 0


def test_format_bench_data_shows_figures_and_ratio(data_result):
    text = format_bench_data(data_result)
    for key in ("tinyfast_img_s", "baseline_img_s", "naive_fastai_img_s"):
        assert f"{data_result[key]:,.0f} img/s" in text
    assert f"{data_result['ratio']:.2f}x" in text


def test_bench_data_naive_is_optional(tiny_root):
    r = bench_data(tiny_root, bs=32, size=32, passes=1, baseline_workers=0, naive=False, device="cpu")
    assert r["naive_fastai_img_s"] is None and r["naive_fastai_cpu_us"] is None
    assert r["baseline_workers"] == 0 and r["n_images"] == 96 and r["baseline_cpu_us"] > 0
    assert "fastai per-item" not in format_bench_data(r)


def test_hand_written_baseline_serves_what_tinyfast_serves(tiny_root):
    """The baseline is a fair one: same files and labels, and, augmentation aside, the very tensors tinyfast's
    loader gives the model (cv2 decode, INTER_AREA resize to `size`, TINY_MEAN/TINY_STD normalisation)."""
    dls = tiny_imagenet_dls(tiny_root, bs=8, size=32, device="cpu")
    files = list(dls.train_ds.items)
    labels = [dls.vocab.o2i[p.parent.parent.name] for p in files]
    ds = HandWrittenDataset(files, labels, size=32)
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and x.is_contiguous() and y == labels[0]
    assert labels == [int(dls.train_ds[i][1]) for i in range(len(files))]
    ds.tfm = alb.Compose([alb.Normalize(mean=TINY_MEAN, std=TINY_STD)])  # the policy off: compare pixels
    ours = dls.test_dl(files[:8]).one_batch()[0].as_subclass(torch.Tensor).float()
    theirs = torch.stack([ds[i][0] for i in range(8)])
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_bench_train_reports_both_loops():
    # one call: a step of the 11M-parameter model costs ~0.5 s of CPU even at 16 px (weights, not pixels)
    size, stem = 16, "cifar"
    r = bench_train(size=size, bs=8, steps=2, warmup=1, stem=stem, device="cpu")
    assert TRAIN_KEYS <= set(r)
    assert r["tinyfast_img_s"] > 0 and r["plain_fp32_img_s"] > 0
    assert math.isclose(r["ratio"], r["tinyfast_img_s"] / r["plain_fp32_img_s"])
    assert (r["size"], r["bs"], r["steps"], r["device"]) == (size, 8, 2, "cpu")
    assert r["precision"] == ("bf16" if autocast_dtype("auto", torch.device("cpu")) else "fp32")
    assert r["channels_last"] is True and r["threads"] == torch.get_num_threads()
    assert r["flops_per_image"] == training_flops_per_image(resnet18(200, stem=stem), size)  # the timed model's
    assert r["matmul_tflops"] is None and r["flop_bound_img_s"] is None  # CUDA only
    text = format_bench_train(r)
    assert f"{r['tinyfast_img_s']:,.1f} img/s" in text and f"{r['plain_fp32_img_s']:,.1f} img/s" in text
    assert f"{r['ratio']:.2f}x" in text
    # the CUDA line (no GPU here): the FLOP-bound figure is printed beside tinyfast's
    on_gpu = {**r, "device": "cuda", "matmul_tflops": 500.0, "flop_bound_img_s": 500e12 / r["flops_per_image"]}
    assert "500 TFLOP/s" in format_bench_train(on_gpu)
    assert f"{on_gpu['flop_bound_img_s']:,.0f} img/s" in format_bench_train(on_gpu)


@pytest.mark.parametrize("kwargs,message", [
    (dict(bs=0), "bs must be >= 1"), (dict(steps=0), "steps must be >= 1"), (dict(warmup=-1), "warmup must be >= 0"),
    (dict(precision="fp8"), "precision must be one of"), (dict(stem="vit"), "stem must be one of"),
])
def test_bench_train_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bench_train(device="cpu", **kwargs)


def test_bench_data_without_the_baseline_times_tinyfast_alone(tiny_root, monkeypatch):
    import benchmarks.bench as bench
    timed = []
    real = bench._images_per_second
    monkeypatch.setattr(bench, "_images_per_second", lambda loader, *a: timed.append(loader) or real(loader, *a))
    r = bench_data(tiny_root, bs=32, size=32, passes=1, num_workers=0, naive=False, baseline=False, device="cpu")
    assert len(timed) == 1 and r["tinyfast_img_s"] > 0 and r["baseline_img_s"] is None and r["ratio"] is None
    text = format_bench_data(r)
    assert "hand-written" not in text and "ratio" not in text and "tinyfast (decoded cache" in text


def test_bench_data_rejects_bad_arguments(tiny_root):
    with pytest.raises(ValueError, match="passes must be >= 1"):
        bench_data(tiny_root, passes=0)
    with pytest.raises(ValueError, match="larger than the 96 training images"):
        bench_data(tiny_root, bs=128, size=32, device="cpu")


def _one_image_loader(tiny_root, worker_init_fn):
    """8 copies of one training image, 2 workers, batches of 4 in order: worker 0 serves batch 0, worker 1 batch 1."""
    image = next((tiny_root / "train").glob("*/images/*"))
    ds = HandWrittenDataset([image] * 8, [0] * 8, size=32)
    g = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, generator=g, worker_init_fn=worker_init_fn)


def test_plain_loop_workers_draw_their_own_augmentations(tiny_root):
    """Albumentations does not reseed in forked workers: unseeded, both workers would augment identically."""
    from benchmarks.bench import _seed_worker_augmentation

    unseeded = [xb for xb, _ in _one_image_loader(tiny_root, None)]
    assert torch.equal(unseeded[0], unseeded[1])  # the trap itself: both workers copied one generator
    seeded = [xb for xb, _ in _one_image_loader(tiny_root, _seed_worker_augmentation)]
    again = [xb for xb, _ in _one_image_loader(tiny_root, _seed_worker_augmentation)]
    assert not torch.equal(seeded[0], seeded[1])
    assert all(torch.equal(a, b) for a, b in zip(seeded, again))  # reproducible from the loader's seed


def test_plain_loop_fit_trains_and_reports_every_epoch(tiny_root):
    from benchmarks.bench import plain_loop_fit
    from tinyfast.data import tiny_imagenet_files

    wnids, files, val_wnids = tiny_imagenet_files(tiny_root)
    o2i = {w: i for i, w in enumerate(wnids)}
    train = [f for f in files if f.parent.parent.name != "val"]
    val = [f for f in files if f.parent.parent.name == "val"]
    rows = plain_loop_fit(HandWrittenDataset(train, [o2i[f.parent.parent.name] for f in train], 16),
                          HandWrittenDataset(val, [o2i[val_wnids[f.name]] for f in val], 16, augment=False),
                          len(wnids), epochs=2, bs=16, lr=0.05, num_workers=0, device="cpu")
    assert [r["epoch"] for r in rows] == [1, 2] and all(0 <= r["accuracy"] <= 1 for r in rows)
    assert 0 < rows[0]["elapsed"] < rows[1]["elapsed"]

"""The DataBlock: classes, official val labels, 3 channels always, train-only augmentation, fast path == slow path."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tinyfast.data import (TINY_MEAN, TINY_STD, AlbumentationsTransform, CachedBatchDL, Cutout, DecodedImages, RandomPadCrop,
                           default_augmentation, load_rgb, tiny_imagenet_dls)
from tinyfast.dataset import DatasetError, read_val_annotations, read_wnids


@pytest.fixture(scope="module")
def dls(tiny_root):
    return tiny_imagenet_dls(tiny_root, bs=8, size=32, device="cpu")


def test_classes_and_sizes(dls, tiny_root):
    wnids = read_wnids(tiny_root)
    assert list(dls.vocab) == wnids and dls.c == len(wnids) == 4
    assert len(dls.train_ds) == 4 * 24 and len(dls.valid_ds) == 4 * 8
    assert all(Path(p).parent.parent.name == "val" for p in dls.valid_ds.items)
    assert not any(Path(p).parent.parent.name == "val" for p in dls.train_ds.items)
    assert isinstance(dls.train, CachedBatchDL) and isinstance(dls.valid, CachedBatchDL)
    assert len(dls.names) == 4 and all(isinstance(n, str) and n for n in dls.names)


def test_valid_labels_come_from_annotations(dls, tiny_root):
    ann = read_val_annotations(tiny_root)
    ys = []
    for x, y in dls.valid:
        ys.append(y)
    ys = torch.cat(ys)
    expected = [dls.vocab.o2i[ann[Path(p).name][0]] for p in dls.valid_ds.items]
    assert ys.tolist() == expected


def test_batches_are_normalised_channels_last(dls):
    x, y = dls.train.one_batch()
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    assert -3 < x.mean().item() < 3 and 0.3 < x.std().item() < 3


def test_grayscale_images_become_three_channels(tiny_root, tmp_path):
    gray = [p for p in (tiny_root / "val" / "images").iterdir() if Image.open(p).mode == "L"]
    assert gray, "the generated dataset should contain grayscale JPEGs"
    arr = load_rgb(gray[0])
    assert arr.shape == (64, 64, 3) and arr.dtype == np.uint8
    assert np.array_equal(arr[..., 0], arr[..., 1])
    # CMYK, palette and RGBA images too
    for mode in ("CMYK", "P", "RGBA"):
        img = Image.open(gray[0]).convert(mode)
        f = tmp_path / f"img_{mode}.{'jpg' if mode == 'CMYK' else 'png'}"
        img.save(f)
        assert load_rgb(f, size=32).shape == (32, 32, 3)


def test_augmentation_on_train_only(dls):
    tfms = [t for t in dls.train.after_item.fs if isinstance(t, AlbumentationsTransform)]
    assert tfms and tfms[0].split_idx == 0
    # valid is deterministic and equals the cached images, normalised
    v1, v2 = dls.valid.one_batch()[0], dls.valid.one_batch()[0]
    assert torch.equal(v1, v2)
    # train batches of the same items differ from the unaugmented images
    dl = dls.train.new(shuffle=False, drop_last=False)
    dl_plain = dls.valid.new(dls.train_ds, shuffle=False)
    t, p = dl.one_batch()[0], dl_plain.one_batch()[0]
    assert t.shape == p.shape and not torch.equal(t, p)


def test_random_pad_crop_is_a_crop_of_the_reflect_padded_image():
    """Every output is the crop, at the offset the transform drew, of numpy's reflect padding (cv2's
    BORDER_REFLECT_101), and the offsets cover the whole [0, 2*pad] range."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    padded = np.pad(img, ((3, 3), (3, 3), (0, 0)), mode="reflect")
    crop = RandomPadCrop(pad=3)
    crop.set_random_seed(0)
    offsets = set()
    for _ in range(400):
        out = crop(image=img)["image"]
        top, left = crop.params["top"], crop.params["left"]
        offsets.add((top, left))
        assert out.shape == img.shape and out.flags["C_CONTIGUOUS"]
        assert np.array_equal(out, padded[top:top + 20, left:left + 24])
    assert offsets == {(t, l) for t in range(7) for l in range(7)}


def test_cutout_fills_one_square_inside_the_image():
    rng = np.random.default_rng(1)
    img = rng.integers(1, 256, (32, 32, 3), dtype=np.uint8)  # no zero pixel: the hole is the only fill colour
    before = img.copy()
    cut = Cutout(size=8, fill=(0, 0, 0), p=0.5)
    cut.set_random_seed(1)
    applied, corners = 0, set()
    for _ in range(300):
        out = cut(image=img)["image"]
        assert np.array_equal(img, before)  # the input is never written to
        hole = (out != img).any(axis=2)
        if not hole.any():
            continue
        applied += 1
        ys, xs = np.nonzero(np.all(out == 0, axis=2))
        assert ys.max() - ys.min() == 7 and xs.max() - xs.min() == 7 and len(ys) == 64
        assert np.array_equal(out[~hole], img[~hole])
        corners.add((ys.min(), xs.min()))
    assert 100 < applied < 200  # p=0.5
    assert min(c[0] for c in corners) == 0 and max(c[0] for c in corners) == 24  # the hole reaches every edge
    assert min(c[1] for c in corners) == 0 and max(c[1] for c in corners) == 24


def test_default_policy_is_reproducible_from_its_seed():
    """CachedBatchDL seeds the policy per batch: the lean transforms must draw from the Compose's generator."""
    imgs = np.random.default_rng(2).integers(0, 256, (16, 64, 64, 3), dtype=np.uint8)
    aug = default_augmentation(64)
    runs = []
    for seed in (5, 5, 6):
        aug.set_random_seed(seed)
        runs.append(np.stack([aug(image=x)["image"] for x in imgs]))
    assert np.array_equal(runs[0], runs[1]) and not np.array_equal(runs[0], runs[2])


def test_default_policy_without_cutout_never_fills_a_hole():
    """`cutout=False` (the no-cutout ablation): pad-crop and flip only, so a constant image stays constant."""
    from tinyfast.data import Cutout
    assert any(isinstance(t, Cutout) for t in default_augmentation(32).transforms)
    aug = default_augmentation(32, cutout=False)
    assert not any(isinstance(t, Cutout) for t in aug.transforms)
    flat = np.full((32, 32, 3), 7, dtype=np.uint8)
    assert all(np.array_equal(aug(image=flat)["image"], flat) for _ in range(20))


def test_fast_path_equals_fastai_pipeline(dls, monkeypatch):
    """The cached batch path must give what fastai's own per-item pipeline gives (valid: no randomness), and it
    reads the cache with `DecodedImages.read`."""
    reads = []
    real = DecodedImages.read
    monkeypatch.setattr(DecodedImages, "read", lambda self, rows: reads.append(len(rows)) or real(self, rows))
    fast = dls.valid.one_batch()
    assert reads == [len(fast[0])]
    items = [dls.valid_ds[i] for i in range(8)]
    slow = dls.valid.after_batch(dls.valid.do_batch([dls.valid.after_item(it) for it in items]))
    assert torch.equal(fast[1].cpu(), slow[1].cpu())
    assert torch.allclose(fast[0].cpu(), slow[0].cpu(), atol=1e-5)


def test_test_dl_for_new_images(dls, tiny_root, tmp_path):
    """An image not in the cache (predict time) goes through the per-item path, any size."""
    src = next((tiny_root / "test" / "images").iterdir())
    big = tmp_path / "big.png"
    Image.open(src).convert("RGB").resize((100, 70)).save(big)
    x, = dls.test_dl([big]).one_batch()
    assert x.shape == (1, 3, 32, 32)


def test_cache_is_reused_and_atomic(tiny_root, tmp_path):
    files = sorted((tiny_root / "val" / "images").iterdir())[:5]
    d = DecodedImages(files, 32, tmp_path)
    assert d.images.shape == (5, 32, 32, 3)
    mtime = d.file.stat().st_mtime_ns
    d2 = DecodedImages(files, 32, tmp_path)
    assert np.array_equal(d2.images, d.images) and d2.file.stat().st_mtime_ns == mtime
    assert not list(tmp_path.glob(".*.tmp"))
    assert DecodedImages(files[:4], 32, tmp_path).file != d.file  # another subset, another cache


def test_batches_are_read_from_the_cache_not_through_its_map(tiny_root, tmp_path, monkeypatch):
    """`read` gives the map's rows exactly, by pread (the map's pages stay out of RSS), in any order and with
    repeats; the loader's batches come through it; a cache cut short under a reader is one line."""
    import os
    files = sorted((tiny_root / "train").rglob("*.JPEG"))[:20]
    d = DecodedImages(files, 32, tmp_path)
    rows = np.array([7, 3, 3, 19, 0])
    calls = []
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: calls.append(a[2]) or real(*a))
    assert np.array_equal(d.read(rows), d.images[rows]) and len(calls) == len(rows)
    monkeypatch.setattr(os, "preadv", real)
    with open(d.file, "r+b") as f:
        f.truncate(d.file.stat().st_size - 100)
    with pytest.raises(DatasetError, match="ends before row 19"):
        d.read(np.array([19]))


def test_corrupt_jpeg_is_reported_by_path(tiny_root, tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns(".tinyfast-cache"))
    wnid = read_wnids(root)[0]
    bad = sorted((root / "train" / wnid / "images").iterdir())[3]
    bad.write_bytes(b"this is not a jpeg")
    with pytest.raises(DatasetError, match=bad.name):
        tiny_imagenet_dls(root, bs=8, size=32, device="cpu")
    assert not list((root / ".tinyfast-cache").glob("*.npy"))  # no half-written cache


def _copy(tiny_root, tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    shutil.copytree(tiny_root, root, ignore=shutil.ignore_patterns(".tinyfast-cache"))
    return root


def test_an_image_replaced_after_the_first_run_is_decoded_again(tiny_root, tmp_path, capsys):
    root = _copy(tiny_root, tmp_path)
    dls = tiny_imagenet_dls(root, bs=8, size=32, device="cpu")
    target = Path(dls.valid_ds.items[0])
    first = dls.valid_ds[0][0]
    old_caches = list((root / ".tinyfast-cache").glob("*.npy"))
    Image.new("RGB", (64, 64), (255, 0, 255)).save(target, format="JPEG", quality=100)
    dls2 = tiny_imagenet_dls(root, bs=8, size=32, device="cpu")
    assert "changed on disk" in capsys.readouterr().out
    served = np.asarray(dls2.valid_ds[0][0])
    assert not np.array_equal(served, np.asarray(first))
    assert np.abs(served.astype(int) - [255, 0, 255]).max() <= 3   # the new pixels, not the cached old ones
    x, _ = next(iter(dls2.valid))  # the fast batch path too, normalised
    pixels = (x[0].permute(1, 2, 0).numpy() * TINY_STD + TINY_MEAN) * 255
    assert np.abs(pixels - served).max() < 0.01
    caches = list((root / ".tinyfast-cache").glob("*.npy"))
    assert len(caches) == 1 and caches != old_caches  # the stale cache is gone, its successor is there


def test_a_jpeg_corrupted_after_the_first_run_is_reported_by_path(tiny_root, tmp_path):
    root = _copy(tiny_root, tmp_path)
    tiny_imagenet_dls(root, bs=8, size=32, device="cpu")
    bad = sorted((root / "train" / read_wnids(root)[1] / "images").iterdir())[2]
    bad.write_bytes(bad.read_bytes()[:40])  # truncated mid-header
    with pytest.raises(DatasetError, match=bad.name):
        tiny_imagenet_dls(root, bs=8, size=32, device="cpu")


def test_a_cache_named_as_before_the_stats_digest_is_replaced(tiny_root, tmp_path):
    files = sorted((tiny_root / "val" / "images").iterdir())[:5]
    d = DecodedImages(files, 32, tmp_path)
    older = tmp_path / f"{d.prefix}.npy"  # the name of 2026-12-01: listing digest only
    np.save(older, np.zeros((5, 32, 32, 3), np.uint8))
    assert d.images.shape == (5, 32, 32, 3) and d.images.any()  # decoded anew, not the old file's zeros
    assert not older.exists() and d.file.exists()


def test_an_unchanged_dataset_reuses_its_cache_without_decoding(tiny_root, tmp_path, monkeypatch):
    root = _copy(tiny_root, tmp_path)
    tiny_imagenet_dls(root, bs=8, size=32, device="cpu")
    monkeypatch.setattr(DecodedImages, "build", lambda self, n_threads=None: pytest.fail("decoded again"))
    tiny_imagenet_dls(root, bs=8, size=32, device="cpu")


def test_subset_of_classes(tiny_root):
    dls = tiny_imagenet_dls(tiny_root, bs=8, size=32, classes=2, train_per_class=10, device="cpu")
    assert dls.c == 2 and len(dls.train_ds) == 20 and len(dls.valid_ds) == 16


def test_pinned_batches_are_copied_without_blocking_and_are_the_same(tiny_root, monkeypatch):
    """On a GPU the loader pins its batches and copies them non-blocking (fastai copies blocking). Here, on the
    CPU, the same loop with pinning asked for: the copy is non-blocking and the batches are the same."""
    import tinyfast.data as data
    plain = tiny_imagenet_dls(tiny_root, bs=8, size=32, device="cpu")
    assert not plain.train.pin_memory  # no GPU: nothing to pin for
    expected = [b for b in plain.valid]
    calls = []
    real = data.to_device
    monkeypatch.setattr(data, "to_device", lambda b, device, non_blocking=False: calls.append(non_blocking) or real(b, device))
    pinned = tiny_imagenet_dls(tiny_root, bs=8, size=32, device="cpu")
    pinned.valid.pin_memory = True
    got = [b for b in pinned.valid]
    assert calls and all(calls)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(expected, got))


def test_persistent_workers_serve_the_same_epochs_and_stay_alive(tiny_root):
    """fastai starts its workers again every epoch; tinyfast's persistent ones live on, and are told each epoch's
    shuffle and augmentation seed through shared memory: the batches are those of fresh workers."""
    from fastai.torch_core import set_seed

    def epochs(persistent: bool):
        set_seed(0)
        dls = tiny_imagenet_dls(tiny_root, bs=8, size=32, device="cpu", num_workers=2)
        dls.train.fake_l.persistent_workers = persistent
        seen, pids = [], []
        for _ in range(3):
            seen.append([(x.clone(), y.clone()) for x, y in dls.train])
            workers = getattr(dls.train, "_workers", None)
            pids.append(sorted(w.pid for w in workers._workers) if workers is not None else None)
        return seen, pids

    fresh, no_pids = epochs(False)
    kept, pids = epochs(True)
    assert no_pids == [None] * 3 and pids[0] == pids[1] == pids[2] and len(pids[0]) == 2  # the same 2 processes
    for a, b in zip(fresh, kept):
        assert len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert not torch.equal(fresh[0][0][1], fresh[1][0][1])  # the epochs differ from each other (shuffled)


def test_an_epoch_ended_early_leaves_the_next_one_whole(tiny_root):
    """A budgeted run's pacing (`BudgetPace`) ends an epoch early through the loader's `stop_after`. With
    persistent workers, the epoch after it is whole, and the same as after an epoch that ran to its end."""
    from fastai.torch_core import set_seed

    def two_epochs(stop_after: int | None):
        set_seed(0)
        dls = tiny_imagenet_dls(tiny_root, bs=8, size=32, device="cpu", num_workers=2)
        dls.train.fake_l.persistent_workers = True
        first = []
        for batch in dls.train:
            first.append(batch)
            if len(first) == stop_after:
                dls.train.stop_after = stop_after
        dls.train.stop_after = None
        return len(first), [(x.clone(), y.clone()) for x, y in dls.train], len(dls.train)

    stopped, after_stop, n = two_epochs(2)
    whole, after_whole, _ = two_epochs(None)
    assert stopped == 2 < whole == n == len(after_stop) == len(after_whole)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(after_stop, after_whole))

"""TinyImageNet as fastai DataLoaders: a DataBlock with an Albumentations item transform, made fast.

The DataBlock is the usual one (paths -> PILImage, wnid -> category, train/val split from the folder layout,
Albumentations as a train-only item transform). Two things make it fast without changing that shape:

1. every image is decoded once into a uint8 array memory-mapped from disk (`DecodedImages`), so no epoch
   ever decodes a JPEG again;
2. `CachedBatchDL` builds each batch from a chunk of indices into that array, calling only the
   Albumentations transform per image, and leaves float conversion and normalisation to the batch
   transforms on the device. fastai's per-item machinery costs ~400 us an image; the Albumentations call ~20.

Anything the fast path cannot serve (an image that is not in the cache, an extra item transform) goes
through fastai's ordinary per-item pipeline, which gives the same result, only slower.
"""
from __future__ import annotations

import errno
import hashlib
import multiprocessing
import os
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import torch
from fastai.data.block import CategoryBlock, DataBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import FuncSplitter, Normalize, ToTensor
from fastai.torch_core import TensorCategory, TensorImage, default_device, to_device
from fastai.vision.augment import RandTransform, Resize
from fastai.vision.core import PILImage
from fastai.vision.data import ImageBlock
from fasttransform import Transform
from fastprogress.fastprogress import progress_bar
from PIL import Image

import albumentations as alb  # after fastai: `from fastai.vision.all import *` would bind `A`

from . import compat
from .dataset import DatasetError, read_val_annotations, read_wnids, read_words, resolve_dataset
from .errors import RunError
from .layout import atomic_write, free_bytes, is_val, train_wnid, write_failure  # is_val: the splitter, found here by an older learner.pkl

# Per-channel statistics of the TinyImageNet training set (RGB, 0-1 scale).
TINY_MEAN = (0.4802, 0.4481, 0.3975)
TINY_STD = (0.2770, 0.2691, 0.2821)
IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png")


# ---------------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------------
class RandomPadCrop(alb.ImageOnlyTransform):
    """Reflect-pad by `pad` pixels and crop back to the input size at a random offset: Albumentations'
    `PadIfNeeded` + `RandomCrop` in one cv2 call and a slice, 15 us an image instead of 35 (measured,
    docs/BENCHMARKS.md). Image-only, as a classification policy needs: it does not move masks or boxes."""

    def __init__(self, pad: int = 8, border_mode: int = cv2.BORDER_REFLECT_101, p: float = 1.0):
        super().__init__(p=p)
        self.pad, self.border_mode = pad, border_mode

    def get_params(self) -> dict[str, int]:
        return {"top": self.py_random.randint(0, 2 * self.pad), "left": self.py_random.randint(0, 2 * self.pad)}

    def apply(self, img: np.ndarray, top: int = 0, left: int = 0, **params) -> np.ndarray:
        h, w, k = img.shape[0], img.shape[1], self.pad
        return cv2.copyMakeBorder(img, k, k, k, k, self.border_mode)[top:top + h, left:left + w]

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("pad", "border_mode")


class Cutout(alb.ImageOnlyTransform):
    """One square hole of side `size`, inside the image, filled with `fill` (DeVries & Taylor's cutout): what
    Albumentations' `CoarseDropout` does with one fixed-size hole, at 13 us an image instead of 70 (its
    parameter checks cost more than the fill). Image-only, as `RandomPadCrop`."""

    def __init__(self, size: int = 16, fill: float | tuple[float, ...] = 0, p: float = 0.5):
        super().__init__(p=p)
        self.size, self.fill = size, fill

    def get_params(self) -> dict[str, float]:
        return {"top": self.py_random.random(), "left": self.py_random.random()}

    def apply(self, img: np.ndarray, top: float = 0.0, left: float = 0.0, **params) -> np.ndarray:
        s = self.size
        y, x = int(top * (img.shape[0] - s + 1)), int(left * (img.shape[1] - s + 1))
        img = img.copy()
        img[y:y + s, x:x + s] = self.fill
        return img

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("size", "fill")


def default_augmentation(size: int = 64, cutout: bool = True) -> alb.Compose:
    """Reflect-pad by 1/8 and random-crop back, flip, one cutout hole of 1/4 side filled with the mean colour
    (half the time): the CIFAR-style policy that suits 64 px images, where a random-resized crop throws away
    too much. Pad-crop and cutout are tinyfast's lean Albumentations transforms, the same operations as
    `PadIfNeeded`+`RandomCrop` and a one-hole `CoarseDropout` at a third of their cost."""
    mean_fill = tuple(int(round(m * 255)) for m in TINY_MEAN)
    return alb.Compose([
        RandomPadCrop(size // 8, cv2.BORDER_REFLECT_101),
        alb.HorizontalFlip(p=0.5),
    ] + ([Cutout(size // 4, mean_fill, p=0.5)] if cutout else []))


class AlbumentationsTransform(RandTransform):
    """An Albumentations pipeline as a fastai item transform, on the training split only (`split_idx=0`).
    `order=2` runs it after `Resize` (order 1), on the image the model will see."""
    split_idx, order = 0, 2

    def __init__(self, aug: alb.BaseCompose):
        super().__init__()
        self.aug = aug

    def augment(self, image: np.ndarray) -> np.ndarray:
        return self.aug(image=image)["image"]

    def encodes(self, img: PILImage) -> PILImage:
        return PILImage.create(self.augment(np.asarray(img)))


# ---------------------------------------------------------------------------------------------------------
# Decoding, once
# ---------------------------------------------------------------------------------------------------------
def load_rgb(path: Path | str, size: int | None = None) -> np.ndarray:
    """Any image file as an RGB uint8 array: grayscale (~1.7% of TinyImageNet), CMYK and palette images
    become 3 channels. cv2 is the fast path; PIL the fallback for what cv2 cannot read."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is not None:
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    else:
        try:
            with Image.open(path) as im:
                img = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise DatasetError(f"cannot decode image {path}: {e.__class__.__name__}: {e}") from None
    if size is not None and img.shape[:2] != (size, size):
        img = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return img


def check_images(paths: Sequence[Path | str] | Path | str) -> list[Path]:
    """The paths as `Path`s, each an existing, decodable image file, or a DatasetError naming the first
    one that is not. Decoding each file once here costs milliseconds and turns a failure deep inside a
    DataLoader into one line."""
    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("no image paths given")
    for p in paths:
        if not p.exists():
            raise DatasetError(f"no such image file: {p}")
        if not p.is_file():
            raise DatasetError(f"not a file: {p}")
        load_rgb(p)  # DatasetError("cannot decode image <path>: ...") for a file that is not an image
    return paths


class DecodedImages:
    """Every listed image decoded once into a uint8 (N, size, size, 3) `.npy`, memory-mapped.

    The file name carries two digests: one of the file list and the size, so that a different subset or size
    gets its own cache, and one of every file's size and modification time, so that an image replaced, edited
    or corrupted on disk after the cache was built makes a new cache (decoded again, a corrupt file reported by
    its path) instead of serving the old pixels. Checking costs one `stat` a file (measured for the 110,000
    files in docs/BENCHMARKS.md). A cache made stale that way is deleted when its successor is complete. It is
    written to a temporary name and renamed when complete: a killed build leaves no half-written cache behind."""

    def __init__(self, files: list[Path], size: int, cache_dir: Path | str):
        self.files, self.size = [Path(f) for f in files], size
        listing = hashlib.sha1(("\n".join(map(str, self.files)) + f"|{size}").encode()).hexdigest()[:16]
        self.prefix = f"images-{size}px-{len(self.files)}-{listing}"
        self.file = Path(cache_dir) / f"{self.prefix}-{file_stats_digest(self.files)}.npy"
        self._images = None
        self._row_of = None
        self._reader = None  # (pid, fd) of the file `read` preads from, opened once per process

    def stale_caches(self) -> list[Path]:
        """Caches of the same files and size built before one of the files changed, and the one a tinyfast of
        before 2026-12-02 built (named without the stats digest)."""
        older = self.file.parent / f"{self.prefix}.npy"
        return [p for p in self.file.parent.glob(f"{self.prefix}-*.npy") if p != self.file] + \
            ([older] if older.exists() else [])

    def __getstate__(self):  # pickled with an exported Learner: keep the path, reopen lazily
        return {**self.__dict__, "_images": None, "_row_of": None, "_reader": None}

    @property
    def images(self) -> np.ndarray:
        return self.load()

    def load(self, progress: bool = True) -> np.ndarray:
        """The memory-mapped array, decoded first (with a progress bar, unless not `progress`) if need be. A
        damaged cache (truncated, of the wrong shape, unreadable) is derived data: it is decoded again, with one
        line saying so."""
        if self._images is None:
            images = self._open() if self.file.exists() else None
            if images is None:
                stale = self.stale_caches()
                if stale and not self.file.exists():
                    print(f"images changed on disk (size or modification time) since the cache {stale[0]} was "
                          f"built: decoding them again")
                self.build(progress=progress)
                for old in stale:
                    old.unlink(missing_ok=True)
                images = self._open(after_build=True)
            self._images = images
        return self._images

    def _open(self, after_build: bool = False) -> np.ndarray | None:
        """The cache memory-mapped, or None (with a line saying why) when it is damaged."""
        expected = (len(self.files), self.size, self.size, 3)
        try:
            images = np.load(self.file, mmap_mode="r")
            problem = None if images.shape == expected and images.dtype == np.uint8 else \
                f"it holds {images.dtype} {tuple(images.shape)}, not uint8 {expected}"
        except (OSError, ValueError, EOFError) as e:  # truncated: "mmap length is greater than file size"
            problem = f"{e.strerror if isinstance(e, OSError) and e.strerror else e}"
        if problem is None:
            return images
        if after_build:
            raise DatasetError(f"the decoded cache {self.file} is unreadable just after it was written ({problem}): "
                               f"point the cache elsewhere with {CACHE_ENV}=DIR")
        print(f"the decoded cache {self.file} is damaged ({problem}): decoding the images again")
        return None

    def read(self, rows: np.ndarray) -> np.ndarray:
        """A copy of the images at `rows`, read with `pread` rather than through the memory map: the file's pages
        then stay in the kernel's page cache (shared, reclaimable) and out of this process's RSS, where the
        pages a map touches count, and its readahead touches most of them within a few random batches (1.2 GiB of
        a 64 px run's peak: docs/BENCHMARKS.md)."""
        images = self.images  # the map gives the shape, and where the array starts in the file
        out = np.empty((len(rows),) + images.shape[1:], np.uint8)
        if not hasattr(os, "preadv"):
            out[:] = images[rows]
            return out
        fd, row_bytes = self._file_descriptor(), out[0].nbytes if len(out) else 0
        for i, row in enumerate(rows):
            if os.preadv(fd, [out[i]], images.offset + int(row) * row_bytes) != row_bytes:
                raise DatasetError(f"the decoded cache {self.file} ends before row {int(row)}: delete it to decode "
                                   f"the images again")
        return out

    def _file_descriptor(self) -> int:
        if self._reader is None or self._reader[0] != os.getpid():  # a forked worker opens its own
            fd = os.open(self.file, os.O_RDONLY)
            self._reader = (os.getpid(), fd, weakref.finalize(self, os.close, fd))  # closed with this object
        return self._reader[1]

    def nbytes(self) -> int:
        """The cache file's size: the array and the .npy header."""
        return len(self.files) * self.size * self.size * 3 + 128

    def row(self, path: Path | str) -> int | None:
        if self._row_of is None:
            self._row_of = {str(f): i for i, f in enumerate(self.files)}
        return self._row_of.get(str(path))

    def build(self, n_threads: int | None = None, progress: bool = True) -> None:
        """Decode with a few threads (cv2 releases the GIL) straight into the memory-mapped file, written
        atomically (`atomic_write`): a run killed mid-decoding leaves no cache, never half of one. The file's
        space is reserved first (`posix_fallocate`): a page of a memory map that the disk has no room for kills
        the process (SIGBUS) instead of raising, and a cache that cannot fit is better said before decoding."""
        needed = self.nbytes()
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            free = free_bytes(self.file.parent)
            if free is not None and free < needed:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise self._cannot_write(e) from None
        chunk = 512
        starts = range(0, len(self.files), chunk)

        def write(tmp: Path) -> None:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8,
                                            shape=(len(self.files), self.size, self.size, 3))
            if hasattr(os, "posix_fallocate"):
                with open(tmp, "r+b") as f:
                    os.posix_fallocate(f.fileno(), 0, os.path.getsize(tmp))

            def decode(start: int) -> None:
                for i in range(start, min(start + chunk, len(self.files))):
                    out[i] = load_rgb(self.files[i], self.size)

            with ThreadPoolExecutor(n_threads or min(8, os.cpu_count() or 1)) as pool:
                done = pool.map(decode, starts)
                if progress:  # not progress_bar(display=False): its console bar still clears its line at the end
                    done = progress_bar(done, total=len(starts), leave=False)
                    done.comment = f"decoding {len(self.files)} images once"
                for _ in done:
                    pass
            out.flush()
            del out

        try:
            atomic_write(self.file, write, needed=needed, elsewhere=CACHE_ELSEWHERE)
        except RunError as e:
            raise DatasetError(str(e)) from None

    def _cannot_write(self, error: OSError) -> DatasetError:
        return DatasetError(str(write_failure(self.file, error, self.nbytes(), CACHE_ELSEWHERE)))


def file_stats_digest(files: list[Path]) -> str:
    """A digest of every file's size and modification time (ns): what changes when a file is replaced, edited or
    truncated, at the cost of one `stat` a file, not a read."""
    h = hashlib.sha1()
    for f in files:
        try:
            st = os.stat(f)
        except OSError as e:
            raise DatasetError(f"cannot read image {f}: {e.strerror}") from None
        h.update(f"{st.st_size},{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


CACHE_ENV = "TINYFAST_CACHE"  # a folder for the decoded caches, where the data's own folder will not do
CACHE_ELSEWHERE = f"point the cache elsewhere with {CACHE_ENV}=DIR (it is derived data: the dataset is unchanged)"


NETWORK_FILE_SYSTEMS = ("nfs", "nfs4", "cifs", "smb3", "smbfs", "fuse.sshfs", "9p", "lustre", "fuse.gcsfuse",
                        "fuse.s3fs", "fuse.rclone", "afs", "glusterfs", "ceph")


def file_system_type(path: Path, mounts: Path = Path("/proc/mounts")) -> str | None:
    """The type of the file system that holds `path` (the longest mount point above it in /proc/mounts), or None
    where that cannot be read."""
    try:
        entries = [line.split() for line in mounts.read_text().splitlines()]
    except OSError:
        return None
    path = str(Path(path).resolve())
    best = max((e for e in entries if len(e) > 2 and (path == e[1] or path.startswith(e[1].rstrip("/") + "/"))),
               key=lambda e: len(e[1]), default=None)
    return best[2] if best else None


def default_cache_dir(root: Path) -> Path:
    """$TINYFAST_CACHE/<digest of the data's path> when it is set; else beside the data when that folder is
    writable and local, else under ~/.cache. A cache on a network file system (NFS, SMB, sshfs...) would be
    read from the network at every batch: it goes to the local disk instead."""
    digest = hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:12]
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / digest
    if os.access(root, os.W_OK) and file_system_type(root) not in NETWORK_FILE_SYSTEMS:
        return root / ".tinyfast-cache"
    return Path.home() / ".cache" / "tinyfast" / digest


# ---------------------------------------------------------------------------------------------------------
# The DataBlock's functions (module level, so that `learn.export` can pickle them)
# ---------------------------------------------------------------------------------------------------------
class ReadImage(Transform):
    """get_x: a path -> PILImage, from the decoded cache when the path is in it, from the file otherwise
    (a new image at `predict` time). Anything that is not a path (a PIL image, an array) passes through."""

    def __init__(self, decoded: DecodedImages | None = None, size: int | None = None):
        super().__init__()
        self.decoded, self.size = decoded, size

    def encodes(self, path: Path | str) -> PILImage:
        row = self.decoded.row(path) if self.decoded is not None else None
        if row is not None and self.decoded.file.exists():
            return PILImage.create(np.array(self.decoded.images[row]))
        return PILImage.create(load_rgb(path, self.size))  # resized as the cache is (INTER_AREA), not by PIL


class TinyLabel:
    """get_y: the wnid of an image: its class folder for train, `val_annotations.txt` for val."""

    def __init__(self, val_wnids: dict[str, str]):
        self.val_wnids = val_wnids

    def __call__(self, path: Path | str) -> str:
        path = Path(path)
        return self.val_wnids[path.name] if is_val(path) else train_wnid(path)


def _images_in(folder: Path) -> list[Path]:
    with os.scandir(folder) as it:
        return sorted(folder / e.name for e in it if e.name.lower().endswith(IMAGE_SUFFIXES))


def tiny_imagenet_files(root: Path, classes: int | None = None, train_per_class: int | None = None) -> tuple[list[str], list[Path], dict[str, str]]:
    """wnids, the image files (train then val), and the val labels; `classes` keeps the first N wnids and
    `train_per_class` the first M training images of each, for quick runs on a real subset."""
    wnids = read_wnids(root)[:classes]
    keep = set(wnids)
    train = [f for w in wnids for f in _images_in(root / "train" / w / "images")[:train_per_class]]
    val_wnids = {name: wnid for name, (wnid, _box) in read_val_annotations(root).items() if wnid in keep}
    val = [root / "val" / "images" / name for name in sorted(val_wnids, key=_natural_key)]
    return wnids, train + val, val_wnids


def _natural_key(name: str) -> tuple:
    stem = Path(name).stem
    head, _, num = stem.rpartition("_")
    return (head, int(num)) if num.isdigit() else (stem, -1)


# ---------------------------------------------------------------------------------------------------------
# The fast DataLoader
# ---------------------------------------------------------------------------------------------------------
class CachedBatchDL(TfmdDL):
    """A TfmdDL that serves whole batches from `DecodedImages`: one read of the batch's rows from the cache
    (`DecodedImages.read`), then the Albumentations item transform per image (train only), and the batch goes out as uint8
    NCHW for the batch transforms (`IntToFloatTensor`, `Normalize`) to finish on the device. The randomness
    of an epoch (shuffle and augmentation) derives from `self.rng`, so restoring its state restores the epoch."""

    _fast_ok = (Resize, ToTensor, AlbumentationsTransform)
    epoch_share = 1.0  # a budgeted run (tinyfast.budget) trains each epoch on the first share of its shuffle

    def __iter__(self):
        return serve_batches(self)

    def _shared_n(self) -> int:
        return max(min(self.n, self.bs), round(self.n * self.epoch_share))  # a batch at least, also with drop_last

    def get_idxs(self):
        idxs = super().get_idxs()
        return idxs if self.epoch_share >= 1.0 else list(idxs)[:self._shared_n()]

    def __len__(self):
        if self.epoch_share >= 1.0 or self.n is None:
            return super().__len__()
        n = self._shared_n()
        return n // self.bs + (0 if self.drop_last or n % self.bs == 0 else 1)

    def sample(self):
        restore_epoch_in_worker(self)
        return super().sample()

    def __getstate__(self):  # the worker processes stay with this object; pickles (learn.export) go without them
        return {k: v for k, v in self.__dict__.items() if k != "_workers"}

    def before_iter(self):
        super().before_iter()
        self.epoch_seed = self.rng.randint(0, 2**31 - 1)
        self._fast_source()  # in the main process, before workers fork

    def _fast_source(self):
        """(the decoded cache, rows, targets, augmentation) when every item is in the cache, else None."""
        if getattr(self, "_fast", None) is not None:
            return self._fast if self._fast != "slow" else None
        self._fast = "slow"
        tls = getattr(self.dataset, "tls", None)
        if tls is None or len(tls) != 2 or not all(isinstance(t, self._fast_ok) for t in self.after_item.fs):
            return None
        readers = [t for t in tls[0].tfms.fs if isinstance(t, ReadImage)]
        if not readers or readers[0].decoded is None or len(self.dataset) == 0:
            return None
        decoded = readers[0].decoded
        rows = [decoded.row(p) for p in tls[0].items]
        if any(r is None for r in rows):
            return None
        targets = np.array([int(tls[1].tfms(p)) for p in tls[1].items], dtype=np.int64)
        split = getattr(self.dataset, "split_idx", None)
        augs = [t for t in self.after_item.fs if isinstance(t, AlbumentationsTransform) and t.split_idx == split]
        self._fast = (decoded, np.array(rows), targets, augs[0] if augs else None)
        return self._fast

    def create_batches(self, samps):
        fast = self._fast_source()
        if fast is None:
            yield from super().create_batches(samps)
            return
        decoded, rows, targets, aug = fast
        for k, idxs in enumerate(self.chunkify(samps)):
            idxs = np.asarray(idxs)
            x = decoded.read(rows[idxs])  # a copy: (B, H, W, 3) uint8
            if aug is not None:
                aug.aug.set_random_seed(getattr(self, "epoch_seed", 0) * 100_003 + k * self.num_workers + self.offs)
                for i in range(len(x)):
                    x[i] = aug.augment(x[i])
            # NHWC memory seen as NCHW: exactly the channels_last layout the model is run in
            yield TensorImage(torch.from_numpy(x).permute(0, 3, 1, 2)), TensorCategory(torch.from_numpy(targets[idxs]))


def _seed_holder(loader) -> CachedBatchDL:
    """The CachedBatchDL that draws an epoch's augmentation seed: the loader itself, or the one a fastai
    `DistributedDL` wraps."""
    return getattr(loader, "dl", loader)


def serve_batches(loader):
    """fastai's `DataLoader.__iter__` for a CachedBatchDL, or for fastai's `DistributedDL` over one (which would
    otherwise run fastai's own), with two changes. The batch is copied to a device with `non_blocking=True`
    (from pinned memory, `pin_memory`, on by default on a GPU), so that the host queues the copy behind the running
    step instead of waiting for the GPU to finish it (fastai copies blocking). And with `persistent_workers` the
    worker processes live from epoch to epoch (`_epoch_batches`); fastai starts them again every epoch, whatever the
    flag says."""
    loader.randomize()
    loader.before_iter()
    compat.set_epoch_order(loader, loader.get_idxs())  # in the main process, as fastai does
    non_blocking = loader.pin_memory or (loader.device is not None and torch.device(loader.device).type != "cpu")
    for i, b in enumerate(_epoch_batches(loader)):
        if getattr(loader, "stop_after", None) is not None and i >= loader.stop_after:
            break  # a budgeted run's pacing ended this epoch early (tinyfast.callbacks.BudgetPace)
        if loader.pin_memory and type(b) == list:  # pinning turns tuples into lists
            b = tuple(b)
        if loader.device is not None:
            b = to_device(b, loader.device, non_blocking=non_blocking)
        yield loader.after_batch(b)
    loader.after_iter()
    if hasattr(loader, "it"):
        del loader.it


def _epoch_batches(loader):
    """The batches of this epoch: from fastai's own loader iterator, or from persistent workers, which are told
    the epoch's order and augmentation seed through shared memory (`_epoch_state`): a worker's copy of the loader
    dates from the epoch it was started in."""
    workers = loader.fake_l.num_workers > 0
    if not (workers and loader.fake_l.persistent_workers and multiprocessing.get_start_method() == "fork"):
        return compat.fastai_batches(loader.fake_l, workers)  # (forked workers share `_epoch_state`'s memory)
    idxs = torch.as_tensor(list(compat.epoch_order(loader)), dtype=torch.int64)
    state = getattr(loader, "_epoch_state", None)
    if state is None or len(state) != len(idxs) + 1:
        loader._epoch_state = state = torch.zeros(len(idxs) + 1, dtype=torch.int64).share_memory_()
    state[0], state[1:] = _seed_holder(loader).epoch_seed, idxs
    it = getattr(loader, "_workers", None)
    if it is None:
        loader._workers = it = compat.persistent_workers(loader.fake_l)
    else:
        compat.restart_workers(it, loader.fake_l)
    return it


def restore_epoch_in_worker(loader) -> None:
    """In a persistent worker: this epoch's order and augmentation seed, from the shared memory `_epoch_batches`
    wrote them to (a no-op in the main process and in fastai's own per-epoch workers)."""
    state = getattr(loader, "_epoch_state", None)
    if state is not None and torch.utils.data.get_worker_info() is not None:
        compat.set_epoch_order(loader, state[1:].tolist())
        _seed_holder(loader).epoch_seed = int(state[0])


def default_num_workers(device: torch.device | str | None = None) -> int:
    """On a CPU the loader shares two cores with the model, and serving a batch from the cache costs ~1% of a
    training step: no worker processes (measured, see docs/BENCHMARKS.md). On a GPU, up to 8 workers."""
    device = torch.device(device) if device is not None else default_device()
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


# ---------------------------------------------------------------------------------------------------------
# The public entry point
# ---------------------------------------------------------------------------------------------------------
def tiny_imagenet_block(root: Path, wnids: list[str], val_wnids: dict[str, str], size: int = 64,
                        aug: alb.BaseCompose | None | bool = None, decoded: DecodedImages | None = None) -> DataBlock:
    """The DataBlock itself: usable on its own (`.summary(files)`, `.dataloaders(files)`)."""
    item_tfms = [Resize(size, method="squish")]
    if aug is not False:
        item_tfms.append(AlbumentationsTransform(default_augmentation(size) if aug is None or aug is True else aug))
    return DataBlock(
        blocks=(ImageBlock, CategoryBlock(vocab=wnids, sort=False)),
        get_x=ReadImage(decoded, size), get_y=TinyLabel(val_wnids), splitter=FuncSplitter(is_val),
        item_tfms=item_tfms, batch_tfms=[Normalize.from_stats(TINY_MEAN, TINY_STD)])


def tiny_imagenet_dls(path: Path | str | None = None, bs: int = 256, size: int = 64, num_workers: int | None = None,
                      aug: alb.BaseCompose | None | bool = None, device: torch.device | str | None = None,
                      classes: int | None = None, train_per_class: int | None = None,
                      cache_dir: Path | str | None = None, progress: bool = True) -> DataLoaders:
    """TinyImageNet train/val DataLoaders.

    path: a `tiny-imagenet-200` folder or its zip (default `data/tiny-imagenet-200` or $TINYFAST_DATA).
    aug: None for the default policy (`default_augmentation`), False for none, or any Albumentations Compose.
    classes / train_per_class: a real subset (the first N classes, the first M training images of each).
    The vocab is the wnids in `wnids.txt` order; `dls.names` gives their human names from `words.txt`.
    progress: show the bar of the one-off decoding into the cache (`fit(quiet=True)` does not)."""
    root = resolve_dataset(path)
    device = torch.device(device) if device is not None else default_device()
    wnids, files, val_wnids = tiny_imagenet_files(root, classes, train_per_class)
    decoded = DecodedImages(files, size, cache_dir or default_cache_dir(root))
    decoded.load(progress)  # build now, in the main process, so an unreadable image is reported before training
    block = tiny_imagenet_block(root, wnids, val_wnids, size, aug, decoded)
    nw = default_num_workers(device) if num_workers is None else num_workers
    dls = block.dataloaders(files, path=root, bs=bs, num_workers=nw, device=device, dl_type=CachedBatchDL,
                            pin_memory=device.type == "cuda", persistent_workers=nw > 0)
    words = read_words(root, wnids)
    dls.names = [words[w] for w in wnids]
    dls.root = root
    return dls


def class_names(dls: DataLoaders) -> list[str]:
    """The human names of `dls.vocab`, in its order: `dls.names` (set by `tiny_imagenet_dls` from words.txt),
    else words.txt under `dls.root`, else the wnids themselves (a Learner built some other way)."""
    vocab = [str(v) for v in dls.vocab]
    names = getattr(dls, "names", None)
    if names is not None and len(names) == len(vocab):
        return list(names)
    root = getattr(dls, "root", None)
    if root is not None and Path(root).is_dir():
        words = read_words(root, vocab)
        return [words[w] for w in vocab]
    return vocab

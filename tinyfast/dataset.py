"""Getting and checking the TinyImageNet dataset on disk.

Everything that touches the dataset's files before training starts lives here,
so that a broken or missing dataset fails in seconds with one readable line
(a `DatasetError`) instead of minutes later deep inside a DataLoader.

Expected layout (the official tiny-imagenet-200 zip)::

    ROOT/wnids.txt                          one class id (wnid) per line
    ROOT/words.txt                          wnid <tab> human names (optional)
    ROOT/train/<wnid>/images/<wnid>_<i>.JPEG
    ROOT/train/<wnid>/<wnid>_boxes.txt      file <tab> x0 y0 x1 y1 (optional)
    ROOT/val/images/val_<i>.JPEG
    ROOT/val/val_annotations.txt            file <tab> wnid <tab> x0 y0 x1 y1
    ROOT/test/images/*.JPEG                 unlabelled (optional, never read)

Only the standard library is used for downloading and unpacking, so getting
the data needs nothing beyond what the training environment already has.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import Optional, Union

__all__ = [
    "OFFICIAL_URL",
    "OFFICIAL_MD5",
    "DEFAULT_DATA",
    "DatasetError",
    "default_data_path",
    "read_wnids",
    "read_words",
    "read_val_annotations",
    "read_train_boxes",
    "validate_layout",
    "resolve_dataset",
    "extract_zip",
    "download_tiny_imagenet",
]

OFFICIAL_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
OFFICIAL_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
DEFAULT_DATA = Path("data/tiny-imagenet-200")

ROOT_NAME = "tiny-imagenet-200"
"""Name of the dataset folder inside the official zip, and the name we extract to."""

PathLike = Union[str, "os.PathLike[str]"]
Box = tuple[int, int, int, int]

_CHUNK = 1 << 20  # 1 MiB: big enough to keep the download loop cheap, small enough to resume well
_JPEG_SUFFIXES = (".jpeg", ".jpg")


class DatasetError(Exception):
    """A one-line, user-facing message about the dataset (the CLI prints it and exits 1)."""


class _NotAZip(DatasetError):
    """The archive itself is unreadable, so a downloaded copy is worth throwing away."""


# --------------------------------------------------------------------------- where


def default_data_path() -> Path:
    """Where to look when the user passes no --data, overridable without editing commands."""
    env = os.environ.get("TINYFAST_DATA")
    return Path(env).expanduser() if env else DEFAULT_DATA


# --------------------------------------------------------------------------- readers


def _lines(path: Path) -> list[str]:
    # splitlines() also swallows the '\r' of files written on Windows.
    return path.read_text(encoding="utf-8", errors="replace").splitlines()


def read_wnids(root: PathLike) -> list[str]:
    """The class ids in file order; the order defines the class indices everywhere else."""
    path = Path(root) / "wnids.txt"
    if not path.is_file():
        raise DatasetError(f"missing {path}: not a TinyImageNet folder")
    return [line.strip() for line in _lines(path) if line.strip()]


def read_words(root: PathLike, wnids: Optional[list[str]] = None) -> dict[str, str]:
    """Human-readable class names for reports and plots, never failing for lack of them.

    Only the first comma-separated synonym is kept ("goldfish, Carassius auratus"
    -> "goldfish") because labels must fit on a plot. words.txt covers all of
    ImageNet (~82k lines), so passing `wnids` keeps the result small. A class
    with no entry, or a dataset with no words.txt, falls back to the wnid itself.
    """
    root = Path(root)
    path = root / "words.txt"
    if not path.is_file():
        ids = wnids if wnids is not None else (read_wnids(root) if (root / "wnids.txt").is_file() else [])
        return {w: w for w in ids}

    wanted = set(wnids) if wnids is not None else None
    names: dict[str, str] = {}
    for line in _lines(path):
        wnid, _, rest = line.strip().partition("\t")
        if not wnid or (wanted is not None and wnid not in wanted):
            continue
        names[wnid] = rest.split(",")[0].strip() or wnid
    if wnids is None:
        return names
    return {w: names.get(w, w) for w in wnids}


def _parse_boxes(path: Path, n_labels: int) -> list[tuple[str, list[str], Box]]:
    """Shared parser for the two box files so both report bad lines the same way."""
    rows = []
    n_fields = 1 + n_labels + 4
    for lineno, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != n_fields:
                raise ValueError
            x0, y0, x1, y1 = (int(v) for v in fields[-4:])
        except ValueError:
            want = "file, wnid, x0, y0, x1, y1" if n_labels else "file, x0, y0, x1, y1"
            raise DatasetError(
                f"malformed line {lineno} in {path}: expected {n_fields} tab-separated fields ({want}), got {line.strip()!r}"
            ) from None
        rows.append((fields[0], fields[1 : 1 + n_labels], (x0, y0, x1, y1)))
    return rows


def read_val_annotations(root: PathLike) -> dict[str, tuple[str, Box]]:
    """Val images are not in class folders; this file is the only source of their labels."""
    path = Path(root) / "val" / "val_annotations.txt"
    if not path.is_file():
        raise DatasetError(f"missing {path}: the validation labels are needed")
    return {name: (labels[0], box) for name, labels, box in _parse_boxes(path, n_labels=1)}


def read_train_boxes(root: PathLike, wnid: str) -> dict[str, Box]:
    """Boxes are optional extras (e.g. for Grad-CAM comparisons), so absence is not an error."""
    path = Path(root) / "train" / wnid / f"{wnid}_boxes.txt"
    if not path.is_file():
        return {}
    return {name: box for name, _, box in _parse_boxes(path, n_labels=0)}


# --------------------------------------------------------------------------- validation


def _has_jpeg(folder: Path) -> bool:
    # Stop at the first hit: 200 folders x 500 files must cost milliseconds, not a full listing.
    with os.scandir(folder) as entries:
        return any(e.name.lower().endswith(_JPEG_SUFFIXES) for e in entries)


def validate_layout(root: PathLike) -> Path:
    """Fail now, naming the exact file or class, rather than mid-epoch with a KeyError.

    Only directory listings and the two small text files are read (no image is
    opened), so this runs in well under a second on the full 110k-image dataset
    and can be called before every training run.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"no dataset folder at {root}")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder")

    wnids = read_wnids(root)
    if not wnids:
        raise DatasetError(f"{root / 'wnids.txt'} lists no classes")
    seen: set[str] = set()
    for wnid in wnids:
        if wnid in seen:
            raise DatasetError(f"{root / 'wnids.txt'} lists class {wnid} twice")
        seen.add(wnid)

    train = root / "train"
    if not train.is_dir():
        raise DatasetError(f"missing training folder {train}")
    for wnid in wnids:
        images = train / wnid / "images"
        if not images.is_dir():
            raise DatasetError(f"class {wnid} has no training folder: missing {images}")
        if not _has_jpeg(images):
            raise DatasetError(f"class {wnid} has no training images: no .JPEG in {images}")

    val_images = root / "val" / "images"
    annotations = read_val_annotations(root)  # raises for a missing file or a malformed line
    ann_path = root / "val" / "val_annotations.txt"
    if not annotations:
        raise DatasetError(f"{ann_path} lists no validation images")
    for name, (wnid, _) in annotations.items():
        if wnid not in seen:
            raise DatasetError(f"{ann_path} labels {name} with class {wnid}, which is not in {root / 'wnids.txt'}")
    if not val_images.is_dir():
        raise DatasetError(f"missing validation image folder {val_images}")
    present = set(os.listdir(val_images))
    missing = [name for name in annotations if name not in present]
    if missing:
        raise DatasetError(
            f"{len(missing)} validation image(s) listed in {ann_path} are missing from {val_images}, e.g. {missing[0]}"
        )
    return root


# --------------------------------------------------------------------------- resolve


def _missing_message(path: Path, dest: Path) -> str:
    return (
        f"no TinyImageNet at {path}: run `python main.py download --dest {dest}` "
        f"or pass --data PATH (a {ROOT_NAME} folder or its zip)"
    )


def resolve_dataset(path: Optional[PathLike] = None) -> Path:
    """Accept whatever the user is likely to point at and return a validated dataset root.

    That is: the dataset folder itself, the folder holding it (e.g. `data/`), the
    zip (unpacked next to itself on first use), or nothing (the default location).
    """
    path = Path(path).expanduser() if path is not None else default_data_path()

    if path.is_dir():
        if (path / "wnids.txt").exists():
            return validate_layout(path)
        if (path / ROOT_NAME).is_dir():
            return validate_layout(path / ROOT_NAME)
        if (path / f"{ROOT_NAME}.zip").is_file():
            return extract_zip(path / f"{ROOT_NAME}.zip", path)
        if path.name == ROOT_NAME or (path / "train").is_dir() or (path / "val").is_dir():
            return validate_layout(path)  # looks like a damaged dataset: say precisely what is wrong
        raise DatasetError(_missing_message(path, path))

    if path.is_file():
        if path.suffix.lower() != ".zip":
            raise DatasetError(f"{path} is a file but not a .zip: pass a {ROOT_NAME} folder or its zip")
        return extract_zip(path, path.parent)

    # Nothing there: suggest a --dest whose download lands where this path will find it.
    dest = path.parent if (path.name == ROOT_NAME or path.suffix.lower() == ".zip") else path
    raise DatasetError(_missing_message(path, dest))


# --------------------------------------------------------------------------- extract


def _check_member_names(zf: zipfile.ZipFile, zip_path: Path) -> None:
    # zipfile sanitises names itself, but a hostile entry means a hostile archive: refuse it outright.
    for name in zf.namelist():
        parts = PurePosixPath(name.replace("\\", "/")).parts
        if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
            raise DatasetError(f"refusing {zip_path}: unsafe path {name!r} inside the zip")


def _find_root(tmp: Path) -> Optional[Path]:
    if (tmp / ROOT_NAME / "wnids.txt").is_file():
        return tmp / ROOT_NAME
    candidates = [p.parent for p in [tmp / "wnids.txt", *sorted(tmp.glob("*/wnids.txt"))] if p.is_file()]
    return candidates[0] if candidates else None


def extract_zip(zip_path: PathLike, dest: PathLike) -> Path:
    """Unpack a TinyImageNet zip to `dest/tiny-imagenet-200`, all or nothing.

    Extraction goes to a hidden temp folder inside `dest` (same filesystem, so
    the final `os.replace` is atomic) and is validated before it is moved into
    place. Any failure, Ctrl-C included, removes the temp folder: a later run
    never mistakes a half-extracted folder for a dataset. An existing valid
    dataset is returned as is, which makes repeated calls cheap.
    """
    zip_path, dest = Path(zip_path), Path(dest)
    final = dest / ROOT_NAME
    if final.exists():
        return _existing_or_error(final)
    if not zip_path.is_file():
        raise DatasetError(f"no zip at {zip_path}")

    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-extract-", dir=dest))
    try:
        try:
            with zipfile.ZipFile(zip_path) as zf:
                _check_member_names(zf, zip_path)
                zf.extractall(tmp)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            raise _NotAZip(f"not a valid zip: {zip_path} ({e})") from None
        except OSError as e:
            raise DatasetError(f"could not extract {zip_path} into {dest}: {e}") from None

        root = _find_root(tmp)
        if root is None:
            raise DatasetError(f"{zip_path} holds no {ROOT_NAME} folder (no wnids.txt inside)")
        try:
            validate_layout(root)
        except DatasetError as e:
            # Name the zip, not a temp folder that is about to disappear.
            raise DatasetError(f"{zip_path} is not a valid TinyImageNet: {str(e).replace(str(root), ROOT_NAME)}") from None
        try:
            os.replace(root, final)
        except OSError as e:
            raise DatasetError(f"could not move the extracted dataset to {final}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _existing_or_error(final: Path) -> Path:
    # Never overwrite or delete a folder we did not just create: it may be the user's own data.
    try:
        return validate_layout(final)
    except DatasetError as e:
        raise DatasetError(f"{final} already exists but is not a valid dataset ({e}); move or delete it and retry") from None


# --------------------------------------------------------------------------- download


class _Progress:
    """One self-overwriting stderr line, only on a terminal: log files get a start and an end line."""

    def __init__(self, label: str, done: int, total: Optional[int], enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.tty = enabled and sys.stderr.isatty()
        self.start_bytes, self.start_t, self.last_t = done, time.monotonic(), 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.tty or now - self.last_t < 0.2:
            return
        self.last_t = now
        rate = (done - self.start_bytes) / max(now - self.start_t, 1e-6) / 1e6
        of = f"/{self.total / 1e6:.1f} MB ({100 * done / self.total:.0f}%)" if self.total else " MB"
        sys.stderr.write(f"\r{self.label}: {done / 1e6:.1f}{of} {rate:.1f} MB/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.tty and self.last_t:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _open(url: str, start: int, timeout: float) -> Optional[http.client.HTTPResponse]:
    """Open `url` from byte `start`; None means the server says there is nothing left to send."""
    headers = {"User-Agent": "tinyfast"}
    if start:
        headers["Range"] = f"bytes={start}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and start:  # Range not satisfiable: the .part already holds the whole file
            return None
        raise DatasetError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", e)
        raise DatasetError(f"could not download {url}: {reason}") from None


_CONTENT_RANGE = re.compile(r"bytes (\d+)-\d+/(\d+|\*)")


def _fetch(url: str, part: Path, timeout: float, progress: bool) -> None:
    """Append the rest of `url` to `part`, resuming from whatever a previous run left there."""
    start = part.stat().st_size if part.exists() else 0
    resp = _open(url, start, timeout)
    if resp is None:
        return
    with resp:
        if start and resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != start:
                # A range we did not ask for: appending it would corrupt the file. Start over.
                resp.close()
                part.unlink()
                return _fetch(url, part, timeout, progress)
        else:
            start = 0  # a 200 is the whole file: the server ignored (or cannot do) Range
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None

        done = start
        bar = _Progress(f"downloading {part.name[: -len('.part')]}", done, total, progress)
        if progress:
            resumed = f", resuming at {start / 1e6:.1f} MB" if start else ""
            print(f"downloading {url} to {part.parent}{resumed}", file=sys.stderr)
        error: Optional[BaseException] = None
        with open(part, "ab" if start else "wb") as f:
            try:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    done += len(chunk)
                    bar.update(done)
            except (OSError, http.client.HTTPException) as e:  # timeouts, resets, IncompleteRead
                error = e
        bar.close()

    if error is not None or (total is not None and done < total):
        why = f" ({error})" if error is not None and str(error) else ""
        of = f" of {total}" if total is not None else ""
        raise DatasetError(
            f"download of {url} interrupted{why}: kept {done}{of} bytes in {part}; run the same command again to resume"
        )


def _zip_name(url: str) -> str:
    name = Path(urllib.parse.urlparse(url).path).name
    return name if name.lower().endswith(".zip") else f"{ROOT_NAME}.zip"


def download_tiny_imagenet(
    dest: PathLike = "data",
    url: str = OFFICIAL_URL,
    md5: Optional[str] = None,
    progress: bool = True,
    timeout: float = 30,
) -> Path:
    """Download, verify and unpack TinyImageNet into `dest/tiny-imagenet-200`; return that root.

    Safe to interrupt and re-run: the bytes go to `<zip>.part` and a second run
    resumes it with an HTTP Range request; the `.zip` name only appears once
    the file is complete (and its md5 matches), and extraction is all or
    nothing (see `extract_zip`). A dataset already in place is returned without
    touching the network. The zip is kept after extraction so the dataset can
    be re-created offline.
    """
    dest = Path(dest).expanduser()
    final = dest / ROOT_NAME
    if final.exists():
        return _existing_or_error(final)
    if md5 is None and url == OFFICIAL_URL:
        md5 = OFFICIAL_MD5

    dest.mkdir(parents=True, exist_ok=True)
    zip_path = dest / _zip_name(url)
    part = zip_path.with_name(zip_path.name + ".part")

    if zip_path.is_file() and md5 and _md5(zip_path) != md5.lower():
        zip_path.unlink()  # a stale or corrupt earlier download: fetch a fresh copy
    if not zip_path.is_file():
        _fetch(url, part, timeout, progress)
        if md5:
            got = _md5(part)
            if got != md5.lower():
                part.unlink()
                raise DatasetError(
                    f"checksum mismatch for {url}: md5 {got}, expected {md5}; deleted the download, run again to retry"
                )
        os.replace(part, zip_path)

    if progress:
        print(f"extracting {zip_path}", file=sys.stderr)
    try:
        return extract_zip(zip_path, dest)
    except _NotAZip as e:
        zip_path.unlink(missing_ok=True)  # useless to keep: the next run must download it again
        raise DatasetError(f"{e}; deleted it, run again to re-download") from None

"""Tests for tinyfast.dataset: readers, layout checks, zip extraction and resumable download.

Datasets are built in tmp_path with a handful of 8x8 JPEGs, and downloads go to
a throw-away HTTP server on 127.0.0.1, so the whole file runs in a few seconds
with no network.
"""

from __future__ import annotations

import hashlib
import io
import shutil
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from tinyfast import dataset as ds
from tinyfast.dataset import (
    DatasetError,
    default_data_path,
    download_tiny_imagenet,
    extract_zip,
    read_train_boxes,
    read_val_annotations,
    read_wnids,
    read_words,
    resolve_dataset,
    validate_layout,
)

WNIDS = ["n01443537", "n02124075", "n04067472"]


# --------------------------------------------------------------------------- helpers


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buf, "JPEG")
    return buf.getvalue()


JPEG = _jpeg_bytes()


def make_dataset(parent: Path, wnids=WNIDS, n_train: int = 2, n_val: int = 2) -> Path:
    """A tiny dataset in the official layout; returns the tiny-imagenet-200 root."""
    root = parent / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "test" / "images").mkdir(parents=True)
    (root / "test" / "images" / "test_0.JPEG").write_bytes(JPEG)
    (root / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    (root / "words.txt").write_text("".join(f"{w}\tname {w}, other\n" for w in wnids))
    ann, k = [], 0
    for w in wnids:
        images = root / "train" / w / "images"
        images.mkdir(parents=True)
        boxes = []
        for i in range(n_train):
            (images / f"{w}_{i}.JPEG").write_bytes(JPEG)
            boxes.append(f"{w}_{i}.JPEG\t0\t1\t6\t7\n")
        (root / "train" / w / f"{w}_boxes.txt").write_text("".join(boxes))
        for _ in range(n_val):
            (root / "val" / "images" / f"val_{k}.JPEG").write_bytes(JPEG)
            ann.append(f"val_{k}.JPEG\t{w}\t1\t2\t5\t6\n")
            k += 1
    (root / "val" / "val_annotations.txt").write_text("".join(ann))
    return root


def zip_folder(folder: Path, zip_path: Path, arc_root: str = "tiny-imagenet-200") -> bytes:
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, f"{arc_root}/{p.relative_to(folder).as_posix()}")
    return zip_path.read_bytes()


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def leftovers(dest: Path) -> set[str]:
    return {p.name for p in dest.iterdir()} if dest.exists() else set()


@pytest.fixture(scope="module")
def zip_bytes(tmp_path_factory) -> bytes:
    src = tmp_path_factory.mktemp("src")
    make_dataset(src)
    return zip_folder(src / "tiny-imagenet-200", src / "tiny-imagenet-200.zip")


@pytest.fixture
def root(tmp_path) -> Path:
    return make_dataset(tmp_path)


# --------------------------------------------------------------------------- local HTTP server


class RangeHandler(BaseHTTPRequestHandler):
    """Serves server.files; honours `Range: bytes=N-` unless server.honor_range is False.

    server.drop_after[path] = n makes the next response for `path` announce the
    full Content-Length but close the connection after n body bytes.
    """

    def do_GET(self):
        srv = self.server
        srv.seen.append((self.path, self.headers.get("Range")))
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        start, rng = 0, self.headers.get("Range")
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and srv.honor_range:
            start = int(m.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        payload = body[start:]
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = srv.drop_after.pop(self.path, None)
        self.wfile.write(payload if cut is None else payload[:cut])
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):  # keep pytest output clean
        pass


@pytest.fixture
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    srv.daemon_threads = True
    srv.files, srv.drop_after, srv.seen, srv.honor_range = {}, {}, [], True
    srv.url = lambda path: f"http://127.0.0.1:{srv.server_address[1]}{path}"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


def download(dest, url, **kw):
    # No test here waits for the timeout to fire; it only bounds a hang. 5 s was once too short for a local 404 on
    # a loaded CI machine ("timed out" instead of "HTTP 404"), so it is generous.
    return download_tiny_imagenet(dest, url=url, progress=False, timeout=60, **kw)


# --------------------------------------------------------------------------- readers


def test_default_data_path_env(monkeypatch, tmp_path):
    monkeypatch.delenv("TINYFAST_DATA", raising=False)
    assert default_data_path() == ds.DEFAULT_DATA == Path("data/tiny-imagenet-200")
    monkeypatch.setenv("TINYFAST_DATA", str(tmp_path / "x"))
    assert default_data_path() == tmp_path / "x"


def test_read_wnids_strips_blank_lines_and_cr(tmp_path):
    (tmp_path / "wnids.txt").write_bytes(b"n02\r\n\r\n  n01 \r\nn03\n\n")
    assert read_wnids(tmp_path) == ["n02", "n01", "n03"]


def test_read_wnids_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="wnids.txt"):
        read_wnids(tmp_path)


def test_read_words(tmp_path):
    (tmp_path / "wnids.txt").write_text("n1\nn2\n")
    (tmp_path / "words.txt").write_text("n1\tgoldfish, Carassius auratus\nn9\tother thing\nn2\t\n")
    assert read_words(tmp_path, ["n1", "n2", "n3"]) == {"n1": "goldfish", "n2": "n2", "n3": "n3"}
    assert read_words(tmp_path)["n9"] == "other thing"
    (tmp_path / "words.txt").unlink()
    assert read_words(tmp_path, ["a", "b"]) == {"a": "a", "b": "b"}
    assert read_words(tmp_path) == {"n1": "n1", "n2": "n2"}


def test_read_val_annotations_and_train_boxes(root):
    ann = read_val_annotations(root)
    assert len(ann) == 6
    assert ann["val_0.JPEG"] == (WNIDS[0], (1, 2, 5, 6))
    assert read_train_boxes(root, WNIDS[1]) == {f"{WNIDS[1]}_0.JPEG": (0, 1, 6, 7), f"{WNIDS[1]}_1.JPEG": (0, 1, 6, 7)}
    (root / "train" / WNIDS[1] / f"{WNIDS[1]}_boxes.txt").unlink()
    assert read_train_boxes(root, WNIDS[1]) == {}


# --------------------------------------------------------------------------- validate_layout


def test_validate_layout_ok(root):
    assert validate_layout(root) == root
    assert validate_layout(str(root)) == root


def _rm(p: Path):
    p.unlink()


def _write(p: Path, text: str):
    p.write_text(text)


CASES = {
    # name: (break the dataset, substrings the one-line message must contain)
    "missing root": (lambda r: shutil.rmtree(r), ["no dataset folder", "tiny-imagenet-200"]),
    "missing wnids": (lambda r: _rm(r / "wnids.txt"), ["missing", "wnids.txt"]),
    "empty wnids": (lambda r: _write(r / "wnids.txt", "\n\n"), ["wnids.txt", "no classes"]),
    "missing train images": (
        lambda r: shutil.rmtree(r / "train" / WNIDS[1] / "images"),
        [f"class {WNIDS[1]}", "images"],
    ),
    "empty class": (
        lambda r: [p.unlink() for p in (r / "train" / WNIDS[2] / "images").iterdir()],
        [f"class {WNIDS[2]} has no training images", "images"],
    ),
    "missing annotations": (lambda r: _rm(r / "val" / "val_annotations.txt"), ["missing", "val_annotations.txt"]),
    "malformed annotation": (
        lambda r: _write(r / "val" / "val_annotations.txt", f"val_0.JPEG\t{WNIDS[0]}\t1\t2\t5\t6\nval_1.JPEG\t{WNIDS[0]}\t1\tx\n"),
        ["malformed line 2", "val_annotations.txt"],
    ),
    "unknown wnid": (
        lambda r: _write(r / "val" / "val_annotations.txt", "val_0.JPEG\tn99999999\t1\t2\t5\t6\n"),
        ["n99999999", "not in", "wnids.txt"],
    ),
    "missing val image": (lambda r: _rm(r / "val" / "images" / "val_3.JPEG"), ["missing", "val_3.JPEG", "images"]),
    "missing val images folder": (
        lambda r: shutil.rmtree(r / "val" / "images"),
        ["missing validation image folder", "images"],
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_validate_layout_errors(root, case):
    breaker, expected = CASES[case]
    breaker(root)
    with pytest.raises(DatasetError) as info:
        validate_layout(root)
    msg = str(info.value)
    assert "\n" not in msg
    for part in expected:
        assert part in msg, (part, msg)


def test_validate_layout_test_folder_optional(root):
    shutil.rmtree(root / "test")
    assert validate_layout(root) == root


# --------------------------------------------------------------------------- resolve_dataset / extract_zip


def test_resolve_folder_and_parent(root):
    assert resolve_dataset(root) == root
    assert resolve_dataset(root.parent) == root


def test_resolve_default_uses_env(monkeypatch, root):
    monkeypatch.setenv("TINYFAST_DATA", str(root))
    assert resolve_dataset() == root


def test_resolve_zip_extracts_once(tmp_path, zip_bytes):
    zip_path = tmp_path / "tiny-imagenet-200.zip"
    zip_path.write_bytes(zip_bytes)
    got = resolve_dataset(zip_path)
    assert got == tmp_path / "tiny-imagenet-200"
    assert validate_layout(got) == got
    marker = got / "marker"
    marker.write_text("kept")  # a second extraction would have failed or replaced the folder
    assert resolve_dataset(str(zip_path)) == got
    assert marker.exists()
    assert leftovers(tmp_path) == {"tiny-imagenet-200.zip", "tiny-imagenet-200"}


def test_resolve_missing_path_suggests_download(tmp_path):
    missing = tmp_path / "data" / "tiny-imagenet-200"
    with pytest.raises(DatasetError) as info:
        resolve_dataset(missing)
    msg = str(info.value)
    assert "download" in msg and f"--dest {tmp_path / 'data'}" in msg and str(missing) in msg


def test_resolve_empty_folder_and_non_zip_file(tmp_path):
    with pytest.raises(DatasetError, match="download"):
        resolve_dataset(tmp_path)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DatasetError, match="not a .zip"):
        resolve_dataset(tmp_path / "notes.txt")


def test_extract_rejects_path_traversal(tmp_path, zip_bytes):
    bad = tmp_path / "bad.zip"
    bad.write_bytes(zip_bytes)
    with zipfile.ZipFile(bad, "a") as zf:
        zf.writestr("../evil.txt", "x")
    dest = tmp_path / "out"
    with pytest.raises(DatasetError, match="unsafe path"):
        extract_zip(bad, dest)
    assert leftovers(dest) == set()
    assert not (tmp_path / "evil.txt").exists()


def test_extract_invalid_layout_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    broken = make_dataset(src)
    (broken / "val" / "val_annotations.txt").unlink()
    zip_path = tmp_path / "broken.zip"
    zip_folder(broken, zip_path)
    dest = tmp_path / "out"
    with pytest.raises(DatasetError, match="val_annotations.txt") as info:
        extract_zip(zip_path, dest)
    assert str(zip_path) in str(info.value) and ".tmp-extract" not in str(info.value)
    assert leftovers(dest) == set()


def test_extract_zip_without_dataset(tmp_path):
    zip_path = tmp_path / "other.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        zf.writestr("readme.txt", "nothing here")
    with pytest.raises(DatasetError, match="no tiny-imagenet-200 folder"):
        extract_zip(zip_path, tmp_path / "out")
    assert leftovers(tmp_path / "out") == set()


def test_extract_refuses_existing_invalid_folder(tmp_path, zip_bytes):
    (tmp_path / "tiny-imagenet-200").mkdir()
    (tmp_path / "a.zip").write_bytes(zip_bytes)
    with pytest.raises(DatasetError, match="already exists"):
        extract_zip(tmp_path / "a.zip", tmp_path)


# --------------------------------------------------------------------------- download


def test_download_good_zip(tmp_path, server, zip_bytes):
    server.files["/tiny-imagenet-200.zip"] = zip_bytes
    dest = tmp_path / "data"
    got = download(dest, server.url("/tiny-imagenet-200.zip"), md5=md5(zip_bytes))
    assert got == dest / "tiny-imagenet-200"
    assert validate_layout(got) == got
    assert read_wnids(got) == WNIDS
    assert (dest / "tiny-imagenet-200.zip").read_bytes() == zip_bytes
    assert leftovers(dest) == {"tiny-imagenet-200", "tiny-imagenet-200.zip"}
    assert server.seen == [("/tiny-imagenet-200.zip", None)]


def test_download_already_present_is_not_refetched(tmp_path, server, zip_bytes):
    make_dataset(tmp_path / "data")
    server.files["/tiny-imagenet-200.zip"] = zip_bytes
    got = download(tmp_path / "data", server.url("/tiny-imagenet-200.zip"))
    assert got == tmp_path / "data" / "tiny-imagenet-200"
    assert server.seen == []


def test_download_truncated_zip(tmp_path, server, zip_bytes):
    server.files["/tiny-imagenet-200.zip"] = zip_bytes[: len(zip_bytes) // 2]
    dest = tmp_path / "data"
    with pytest.raises(DatasetError, match="not a valid zip"):
        download(dest, server.url("/tiny-imagenet-200.zip"))
    assert leftovers(dest) <= {"tiny-imagenet-200.zip", "tiny-imagenet-200.zip.part"}


def test_download_not_a_zip(tmp_path, server):
    server.files["/tiny-imagenet-200.zip"] = b"<html>Service unavailable</html>" * 10
    dest = tmp_path / "data"
    with pytest.raises(DatasetError, match="not a valid zip"):
        download(dest, server.url("/tiny-imagenet-200.zip"))
    assert leftovers(dest) <= {"tiny-imagenet-200.zip", "tiny-imagenet-200.zip.part"}


def test_download_wrong_md5(tmp_path, server, zip_bytes):
    server.files["/tiny-imagenet-200.zip"] = zip_bytes
    dest = tmp_path / "data"
    with pytest.raises(DatasetError, match="checksum mismatch"):
        download(dest, server.url("/tiny-imagenet-200.zip"), md5="0" * 32)
    assert not (dest / "tiny-imagenet-200").exists()
    assert leftovers(dest) == set()  # the bad file is deleted


def test_download_drop_then_resume(tmp_path, server, zip_bytes):
    path = "/tiny-imagenet-200.zip"
    server.files[path] = zip_bytes
    half = len(zip_bytes) // 2
    server.drop_after[path] = half
    dest = tmp_path / "data"
    with pytest.raises(DatasetError) as info:
        download(dest, server.url(path), md5=md5(zip_bytes))
    msg = str(info.value)
    assert f"kept {half} of {len(zip_bytes)} bytes" in msg and "again to resume" in msg
    part = dest / "tiny-imagenet-200.zip.part"
    assert part.read_bytes() == zip_bytes[:half]
    assert leftovers(dest) == {part.name}

    got = download(dest, server.url(path), md5=md5(zip_bytes))
    assert server.seen[-1] == (path, f"bytes={half}-")
    assert (dest / "tiny-imagenet-200.zip").read_bytes() == zip_bytes
    assert validate_layout(got) == got
    assert leftovers(dest) == {"tiny-imagenet-200", "tiny-imagenet-200.zip"}


def test_download_restarts_when_server_ignores_range(tmp_path, server, zip_bytes):
    path = "/tiny-imagenet-200.zip"
    server.files[path] = zip_bytes
    server.honor_range = False
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "tiny-imagenet-200.zip.part").write_bytes(b"garbage from some other file")
    got = download(dest, server.url(path), md5=md5(zip_bytes))
    assert server.seen == [(path, "bytes=28-")]
    assert (dest / "tiny-imagenet-200.zip").read_bytes() == zip_bytes
    assert got == dest / "tiny-imagenet-200"


def test_download_complete_part_gets_416(tmp_path, server, zip_bytes):
    # A previous run got every byte but died before renaming: the server answers 416.
    path = "/tiny-imagenet-200.zip"
    server.files[path] = zip_bytes
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "tiny-imagenet-200.zip.part").write_bytes(zip_bytes)
    got = download(dest, server.url(path), md5=md5(zip_bytes))
    assert validate_layout(got) == got


def test_download_http_error_and_unreachable(tmp_path, server):
    with pytest.raises(DatasetError, match="HTTP 404"):
        download(tmp_path / "data", server.url("/nope.zip"))
    port = server.server_address[1]
    server.shutdown()
    server.server_close()
    with pytest.raises(DatasetError, match="could not download"):
        download(tmp_path / "data", f"http://127.0.0.1:{port}/tiny-imagenet-200.zip")


def test_official_md5_is_the_default(tmp_path, monkeypatch, zip_bytes):
    # No network: pretend the official server sent our small zip; its md5 cannot match.
    def fake_fetch(url, part, timeout, progress):
        assert url == ds.OFFICIAL_URL
        part.write_bytes(zip_bytes)

    monkeypatch.setattr(ds, "_fetch", fake_fetch)
    with pytest.raises(DatasetError, match=ds.OFFICIAL_MD5):
        download_tiny_imagenet(tmp_path / "data", progress=False)


# --------------------------------------------------------------------------- agreement with tinyfast.synthetic


def test_synthetic_dataset_validates(tiny_root):
    # The synthetic generator (conftest's tiny_root) must produce exactly the layout we check.
    assert validate_layout(tiny_root) == tiny_root
    wnids = read_wnids(tiny_root)
    assert len(wnids) == 4
    assert set(read_words(tiny_root, wnids)) == set(wnids)
    assert {w for w, _ in read_val_annotations(tiny_root).values()} <= set(wnids)
    assert read_train_boxes(tiny_root, wnids[0])

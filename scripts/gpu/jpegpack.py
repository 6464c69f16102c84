"""TinyImageNet's train and val folders, packed losslessly small enough for the lent device machine's 64 MiB calls.

Why: the standard folders are 214 MB of JPEGs, and a third of every 64x64 JPEG is its header (quantisation and
Huffman tables), identical for all files from one encoder: in a sample of 2,000 training files there were 2
distinct headers (colour and grayscale), 617 B on average of 1,943 B. This pack stores each distinct header once
and each file's remaining bytes, so 110,000 files take ~146 MB, in parts of at most `--part-mib` MiB, one part per
device call. Unpacking rebuilds every file byte for byte, checked against its sha1, and writes the folder
atomically (a temporary name, renamed when complete).

    python scripts/gpu/jpegpack.py pack data/tiny-imagenet-200 .gpu/parts --part-mib 60
    python scripts/gpu/jpegpack.py unpack .gpu/parts DEST        # -> DEST/tiny-imagenet-200

The pack is a tar (uncompressed) of: `index.json.gz` (the headers, and for each file its path, header, size and
sha1), `tails.bin` (the files' bytes after their header, in index order), and `other.tar.gz` (wnids.txt,
words.txt, val_annotations.txt, the box files). The tar is cut into `pack.NN` parts; `pack.sha1` lists them.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
from pathlib import Path

SOS = b"\xff\xda"


def split_header(data: bytes) -> tuple[bytes, bytes]:
    """(header through the end of the first SOS segment, the rest); no header for a file that is not a JPEG."""
    if not data.startswith(b"\xff\xd8"):
        return b"", data
    i = data.find(SOS)
    if i < 0 or i + 4 > len(data):
        return b"", data
    end = i + 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return data[:end], data[end:]


def _members(root: Path) -> tuple[list[Path], list[Path]]:
    """(images, the other files of the layout) under train/ and val/, in a fixed order."""
    images = sorted(p for p in (root / "train").glob("*/images/*") if p.is_file())
    images += sorted(p for p in (root / "val" / "images").glob("*") if p.is_file())
    other = [root / "wnids.txt", root / "words.txt", root / "val" / "val_annotations.txt"]
    other += sorted((root / "train").glob("*/*_boxes.txt"))
    return images, [p for p in other if p.exists()]


def pack(root: Path | str, out: Path | str, part_mib: float = 60.0) -> list[Path]:
    root, out = Path(root), Path(out)
    images, other = _members(root)
    if not images:
        raise SystemExit(f"jpegpack: no images under {root}/train/*/images or {root}/val/images")
    headers: dict[bytes, int] = {}
    entries, tails = [], io.BytesIO()
    for p in images:
        data = p.read_bytes()
        head, tail = split_header(data)
        h = headers.setdefault(head, len(headers)) if head else -1
        entries.append([str(p.relative_to(root)), h, len(tail), hashlib.sha1(data).hexdigest()])
        tails.write(tail)
    index = {"root": root.name, "headers": [h.hex() for h in headers], "files": entries}
    other_tgz = io.BytesIO()
    with tarfile.open(fileobj=other_tgz, mode="w:gz") as t:
        for p in other:
            t.add(p, arcname=str(p.relative_to(root)))
    blob = io.BytesIO()
    with tarfile.open(fileobj=blob, mode="w") as t:
        for name, payload in (("index.json.gz", gzip.compress(json.dumps(index).encode())),
                              ("tails.bin", tails.getvalue()), ("other.tar.gz", other_tgz.getvalue())):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            t.addfile(info, io.BytesIO(payload))
    data, size = blob.getvalue(), int(part_mib * 2**20)
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for k in range(0, len(data), size):
        part = out / f"pack.{k // size:02d}"
        part.write_bytes(data[k:k + size])
        parts.append(part)
    (out / "pack.sha1").write_text("".join(f"{hashlib.sha1(p.read_bytes()).hexdigest()}  {p.name}\n" for p in parts))
    return parts


def unpack(parts_dir: Path | str, dest: Path | str) -> Path:
    parts_dir, dest = Path(parts_dir), Path(dest)
    listed = [line.split() for line in (parts_dir / "pack.sha1").read_text().splitlines() if line.strip()]
    chunks = []
    for sha, name in listed:
        data = (parts_dir / name).read_bytes()
        if hashlib.sha1(data).hexdigest() != sha:
            raise SystemExit(f"jpegpack: {parts_dir / name} is damaged (sha1 mismatch): carry it again")
        chunks.append(data)
    with tarfile.open(fileobj=io.BytesIO(b"".join(chunks)), mode="r") as t:
        index = json.loads(gzip.decompress(t.extractfile("index.json.gz").read()))
        tails = t.extractfile("tails.bin").read()
        other = t.extractfile("other.tar.gz").read()
    final = dest / index["root"]
    if final.exists():
        raise SystemExit(f"jpegpack: {final} already exists: remove it or unpack elsewhere")
    tmp = dest / f".{index['root']}.unpacking.{os.getpid()}"
    try:
        headers = [bytes.fromhex(h) for h in index["headers"]]
        offset = 0
        for rel, h, n, sha in index["files"]:
            data = (headers[h] if h >= 0 else b"") + tails[offset:offset + n]
            offset += n
            if hashlib.sha1(data).hexdigest() != sha:
                raise SystemExit(f"jpegpack: {rel} does not rebuild to its sha1: the pack is damaged")
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        with tarfile.open(fileobj=io.BytesIO(other), mode="r:gz") as t:
            t.extractall(tmp, filter="data")
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("root")
    p.add_argument("out")
    p.add_argument("--part-mib", type=float, default=60.0)
    u = sub.add_parser("unpack")
    u.add_argument("parts")
    u.add_argument("dest")
    a = ap.parse_args(argv)
    if a.cmd == "pack":
        parts = pack(a.root, a.out, a.part_mib)
        print(f"{len(parts)} parts: " + ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in parts))
    else:
        print(unpack(a.parts, a.dest))


if __name__ == "__main__":
    sys.exit(main())

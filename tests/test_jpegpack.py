"""scripts/gpu/jpegpack.py: TinyImageNet packed for the device's 64 MiB calls rebuilds byte for byte."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("jpegpack", Path(__file__).parents[1] / "scripts" / "gpu" / "jpegpack.py")
jpegpack = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(jpegpack)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.parts[len(root.parts)] in ("train", "val", "wnids.txt", "words.txt")}


def test_pack_and_unpack_rebuild_every_file_and_share_the_headers(tiny_root, tmp_path):
    parts = jpegpack.pack(tiny_root, tmp_path / "parts", part_mib=0.05)
    assert len(parts) > 1 and all(p.stat().st_size <= 0.05 * 2**20 for p in parts)
    original = _tree(tiny_root)
    images = [k for k in original if "/images/" in k]
    assert sum(p.stat().st_size for p in parts) < sum(len(original[k]) for k in images)  # headers stored once
    rebuilt = jpegpack.unpack(tmp_path / "parts", tmp_path / "out")
    assert rebuilt == tmp_path / "out" / "tiny-imagenet-200"
    assert _tree(rebuilt) == original
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_a_damaged_part_or_an_existing_folder_is_refused(tiny_root, tmp_path):
    jpegpack.pack(tiny_root, tmp_path / "parts", part_mib=0.05)
    jpegpack.unpack(tmp_path / "parts", tmp_path / "out")
    with pytest.raises(SystemExit, match="already exists"):
        jpegpack.unpack(tmp_path / "parts", tmp_path / "out")
    part = tmp_path / "parts" / "pack.01"
    part.write_bytes(part.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(SystemExit, match="pack.01 is damaged"):
        jpegpack.unpack(tmp_path / "parts", tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere" / "tiny-imagenet-200").exists()

"""Make a TinyImageNet-layout subset folder of symlinks: classes [start, start+n) of wnids.txt, first m train images
(natural order) of each, all official val images of those classes."""
import re, sys
from pathlib import Path
src, dst, start, n, m = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
wnids = [w.strip() for w in (src / "wnids.txt").read_text().split() if w.strip()][start:start + n]
dst.mkdir(parents=True)
(dst / "wnids.txt").write_text("\n".join(wnids) + "\n")
(dst / "words.txt").write_text((src / "words.txt").read_text())
for w in wnids:
    (dst / "train" / w / "images").mkdir(parents=True)
    for f in sorted((src / "train" / w / "images").glob("*.JPEG"), key=key)[:m]:
        (dst / "train" / w / "images" / f.name).symlink_to(f)
    boxes = src / "train" / w / f"{w}_boxes.txt"
    names = {f.name for f in (dst / "train" / w / "images").iterdir()}
    (dst / "train" / w / f"{w}_boxes.txt").write_text("".join(l for l in boxes.read_text().splitlines(True) if l.split("\t")[0] in names))
(dst / "val" / "images").mkdir(parents=True)
keep = [l for l in (src / "val" / "val_annotations.txt").read_text().splitlines(True) if l.split("\t")[1] in wnids]
(dst / "val" / "val_annotations.txt").write_text("".join(keep))
for l in keep:
    name = l.split("\t")[0]
    (dst / "val" / "images" / name).symlink_to(src / "val" / "images" / name)
print(dst, len(wnids), "classes", sum(1 for _ in dst.glob("train/*/images/*")), "train", len(keep), "val")

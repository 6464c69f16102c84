#!/usr/bin/env bash
# On the device machine, from the repository root: gather the dataset parts carried one per call into $TIN,
# assemble them once all 4 are there, install the carried wheels into $SITE once, then run a tinyfast command
# on the real data. See scripts/gpu/README.md for the order of the calls.
# Usage (device tool): bash scripts/gpu/run.sh fit --epochs 30 --out $OUT/run      (any main.py command)
# Exit 3: a part was stored, the dataset is not complete yet (carry the next part within 30 s).
set -euo pipefail
TIN=${TIN:-/root/tin} SITE=${SITE:-/root/site}
mkdir -p "$TIN"
cp -n .data/parts/tin.tgz.* "$TIN"/ 2>/dev/null || true
if [ ! -f "$TIN/tiny-imagenet-200/wnids.txt" ]; then
  n=$(ls "$TIN"/tin.tgz.* 2>/dev/null | wc -l)
  [ "$n" -ge 4 ] || { echo "run.sh: $n of 4 dataset parts under $TIN: carry the next part"; exit 3; }
  tmp=$(mktemp -d "$TIN/.extract.XXXX")
  cat "$TIN"/tin.tgz.* | tar -xz -C "$tmp"
  mv "$tmp/tiny-imagenet-200" "$TIN/" && rmdir "$tmp"
fi
if [ ! -d "$SITE/fastai" ]; then
  ls .wheels/*.whl >/dev/null 2>&1 || { echo "run.sh: the wheels are not installed yet: carry .wheels"; exit 3; }
  pip install -q --no-index --no-deps --target "$SITE" .wheels/*.whl
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} TINYFAST_DATA=$TIN/tiny-imagenet-200
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
python main.py "$@"

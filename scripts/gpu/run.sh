#!/usr/bin/env bash
# On the device machine, from the repository root: assemble the dataset carried as parts into /root/tin,
# install the carried wheels into /root/site once, then run a tinyfast command on the real data.
# Usage (device tool): bash scripts/gpu/run.sh fit --epochs 30 --out $OUT/run      (any main.py command)
set -euo pipefail
mkdir -p /root/tin
cp -n .data/parts/tin.tgz.* /root/tin/ 2>/dev/null || true
if [ ! -d /root/tin/tiny-imagenet-200 ]; then
  n=$(ls /root/tin/tin.tgz.* | wc -l)
  [ "$n" -ge 4 ] || { echo "only $n of 4 dataset parts under /root/tin: carry the next part"; exit 3; }
  cat /root/tin/tin.tgz.* | tar -xz -C /root/tin
fi
[ -d /root/site/fastai ] || pip install -q --no-index --no-deps --target /root/site .wheels/*.whl
export PYTHONPATH=/root/site${PYTHONPATH:+:$PYTHONPATH} TINYFAST_DATA=/root/tin/tiny-imagenet-200
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python main.py "$@"

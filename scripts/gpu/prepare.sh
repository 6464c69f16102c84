#!/usr/bin/env bash
# Prepare, on THIS (CPU) machine, what a GPU run carries to the lent device machine (see docs/BENCHMARKS.md):
#   .data/parts/tin.tgz.NN  the real dataset as 4 parts of at most 45 MiB (one part travels per call)
#   .wheels/                fastai, albumentations, grad-cam, typer, accelerate... for the device's Python 3.12
# Both folders are git-ignored (.git/info/exclude or .gitignore) and never committed.
# Usage: bash scripts/gpu/prepare.sh GIT_DIR_OF_rangeetpan/IMagenet
#   with the environment made from requirements.txt active (gpu-wheels asks its pip for the versions to fetch)
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
python3 -c "import fastai, albumentations, pytorch_grad_cam, typer" 2>/dev/null \
  || { echo "prepare.sh: activate the environment made from requirements.txt first (source .venv/bin/activate)"; exit 2; }
git_dir=${1:?usage: prepare.sh GIT_DIR (from the search tool: fetch github:rangeetpan/IMagenet)}
mkdir -p .data .wheels
[ -d .data/parts ] || ../shared/tools/prepare-tinyimagenet "$git_dir" .data --parts 45
../shared/tools/gpu-wheels .wheels
# what gpu-wheels does not bring but tinyfast needs: the CLI (typer and its deps) and accelerate (distrib_ctx)
for p in typer click rich shellingham markdown-it-py mdurl pygments accelerate huggingface_hub safetensors hf-xet; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .wheels "$p" \
    || python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .wheels "$p"
done
du -sh .data/parts .wheels

#!/usr/bin/env bash
# Regenerate the README's pictures on the generated demo dataset (CPU, about 10 minutes on 2 cores):
# a demo run (curves, LR range test, Grad-CAM), then one-cycle vs plateau at the demo's LR, compared.
set -euo pipefail
cd "$(dirname "$0")/.."
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python main.py demo --out "$tmp/demo" --data "$tmp/data"
lr=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['args']['lr_picked'])" "$tmp/demo/config.json")
common=(--data "$tmp/data/tiny-imagenet-200" --size 32 --bs 32 --epochs 6 --lr "$lr")
python main.py fit "${common[@]}" --schedule one-cycle --out "$tmp/one-cycle"
python main.py fit "${common[@]}" --schedule plateau --patience 1 --out "$tmp/plateau"
python main.py compare "$tmp/one-cycle" "$tmp/plateau" --out "$tmp/compare"
mkdir -p docs/img
cp "$tmp/demo/curves.png" docs/img/demo_curves.png
cp "$tmp/demo/lr_find.png" docs/img/demo_lr_find.png
cp "$tmp/demo/gradcam.png" docs/img/demo_gradcam.png
cp "$tmp/compare/compare.png" docs/img/compare_schedules.png
cp "$tmp/compare/compare.md" docs/img/compare_schedules.md
echo "pictures written to docs/img/ (lr $lr)"

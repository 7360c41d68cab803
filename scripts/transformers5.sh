#!/usr/bin/env bash
# transformers 5: the table of its checkpoint renames that bone-tool reads
# (src/model/transformers5-renames.json, by fixtures/transformers5_renames.py) and the fixtures of
# adapters that PEFT 0.21.2 makes on it (fixtures/transformers5/, by fixtures/transformers5.py).
# transformers 5.24.0 (with its dependencies), PEFT 0.21.2 and timm 1.0.31 (alone) go into
# git-ignored fixtures/.tf-5.24.0, fixtures/.peft-0.21.2 and fixtures/.timm-1.0.31, put before the
# PEFT 0.18.1 virtualenv's (fixtures/venv.sh) on the path, whose torch they use. Not part of CI;
# deterministic.
#   scripts/transformers5.sh [--renames | --fixtures]   (default both)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="$(bash "$root/fixtures/venv.sh")"
tf="$root/fixtures/.tf-5.24.0"
peft="$root/fixtures/.peft-0.21.2"
[ -d "$tf/transformers" ] || "$python" -m pip install -q --target "$tf" "transformers==5.24.0"
[ -d "$peft/peft" ] || "$python" -m pip install -q --no-deps --target "$peft" "peft==0.21.2"
# timm (with Pillow and torchvision, which it imports) for the models whose vision tower is a timm
# model (Gemma 3n, FastVLM): only built on the meta device, so torchvision's compiled ops, made for
# another torch, never run
timm="$root/fixtures/.timm-1.0.31"
[ -d "$timm/timm" ] || "$python" -m pip install -q --no-deps --target "$timm" \
  "timm==1.0.31" "pillow==13.0.0" "torchvision==0.29.2"
export PYTHONPATH="$peft:$tf:$timm" PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES=""
what="${1:-both}"
if [ "$what" != --fixtures ]; then
  "$python" "$root/fixtures/transformers5_renames.py"
fi
if [ "$what" != --renames ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
  BONE_TOOL="$root/target/release/bone-tool" "$python" "$root/fixtures/transformers5.py"
fi

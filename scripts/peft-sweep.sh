#!/usr/bin/env bash
# Differential sweep against PEFT 0.18.1 (fixtures/sweep.py): TRIALS randomly drawn models and
# adapters (default 100) from SEED (default 1), each merged and unmerged by PEFT and by bone-tool,
# compared by the fixture tests' rules. Builds the release binary, installs PEFT into
# fixtures/.venv on first use (~6 GB, a few minutes), writes only to temporary folders, and keeps
# the folder of a failing trial for a look. Exits 1 if any trial failed.
#   scripts/peft-sweep.sh [TRIALS] [SEED] [FIRST]   (FIRST: the first trial's number, to rerun one)
# SWEEP_CLASSIFIER=1, SWEEP_RESIZE=1, SWEEP_STRAY=1 force those trials (fixtures/sweep.py).
# SWEEP_HUGE=1 makes every model huge (one layer, hidden 392-1024: BAT's r beyond 384).
# SWEEP_BAT_R=8 gives BAT adapters r = 8 wherever the model allows it (their unmerges held to bytes).
# SWEEP_FOREIGN=1 runs PEFT with MKL's AVX2 code (MKL_ENABLE_INSTRUCTIONS=AVX2), as on a processor
# without AVX-512: BAT merges are then held to the bounds of verify's notes (fixtures/sweep.py).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
# a copy of the binary, so that building while a long sweep runs changes nothing under it
bin="$(mktemp -d)"
trap 'rm -rf "$bin"' EXIT
cp "$root/target/release/bone-tool" "$bin/"
python="$(bash "$root/fixtures/venv.sh")"
if [ "${SWEEP_FOREIGN:-0}" = 1 ]; then export MKL_ENABLE_INSTRUCTIONS=AVX2; fi
PYTHONHASHSEED=0 CUDA_VISIBLE_DEVICES="" BONE_TOOL="$bin/bone-tool" \
  "$python" "$root/fixtures/sweep.py" "${1:-100}" "${2:-1}" "${3:-0}"

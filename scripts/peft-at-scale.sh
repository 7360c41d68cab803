#!/usr/bin/env bash
# bone-tool against PEFT 0.18.1 at full size: the synthetic model of bench/run.sh (examples/synth.rs,
# a TinyLlama-shaped 2.2 GB model at 1b, r = 64 on all seven linear kinds) merged with its Bone
# default and BAT adapters and its MiSS mini adapter (mini_r = 16), each alone, and Bone default
# and BAT stacked (JOBS="default bat mini stacked" picks them), and that merge unmerged, by PEFT (fixtures/at_scale.py, as users do: from_pretrained,
# merge_and_unload, save_pretrained) and by bone-tool, side by side in one run, each next to
# `cp -r` of the base.
# Every tensor of bone-tool's output is compared with PEFT's bit for bit; `bone-tool verify` must
# accept PEFT's merge. Prints a markdown table; exits 1 if a merge is not PEFT's bytes or verify
# fails.
#   scripts/peft-at-scale.sh [SHAPE] [DTYPE] [R]   SHAPE: 1b (default), 3b, 7b or tiny; DTYPE: bf16
#                                                  (default), f16 or f32; R: 64 (default); an R that
#                                                  leaves tail columns (48 at 1b) fits only the
#                                                  default adapter: JOBS=default
# BAT_SUMS=amd passes --bat-sums amd to bone-tool (on an AMD processor, whose PEFT sums
# BAT's f32 GEMMs and inverts I + B otherwise).
# Needs about 7x the model's size of free disk under AT_SCALE_DIR (default /tmp/bone-at-scale) and,
# for PEFT, about 2.5x its size of memory; installs PEFT into fixtures/.venv on first use.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
shape="${1:-1b}" dtype="${2:-bf16}" r="${3:-64}"
dir="${AT_SCALE_DIR:-/tmp/bone-at-scale}/$shape-$dtype-r$r"
cargo build --release --quiet --bins --example synth
bin="$root/target/release/bone-tool"
sums=()
[ -z "${BAT_SUMS:-}" ] || sums=(--bat-sums "$BAT_SUMS")
python="$(bash fixtures/venv.sh)"
if [ ! -f "$dir/base/config.json" ] || [ ! -f "$dir/mini/adapter_config.json" ]; then
  echo "generating the $shape $dtype model in $dir ..." >&2
  target/release/examples/synth --shape "$shape" --dtype "$dtype" --r "$r" --out "$dir" 2>/dev/null
fi
export CUDA_VISIBLE_DEVICES="" PYTHONHASHSEED=0
size=$(du -sb "$dir/base" | cut -f1)
work="$dir/work"
rm -rf "$work" && mkdir -p "$work"
trap 'rm -rf "$work"' EXIT

# run LABEL CMD...: times CMD (wall seconds and peak RSS in MB into the table), its output to a log
rows=()
run() {
  local label="$1"; shift
  cat "$dir"/base/* > /dev/null  # a warm page cache for every row
  if ! /usr/bin/time -f "%e %M" -o "$work/time" "$@" > "$work/log" 2>&1; then
    echo "$label failed:" >&2; tail -20 "$work/log" >&2; exit 1
  fi
  read -r wall rss < "$work/time"
  [ -z "${cp_wall:-}" ] && cp_wall=$wall
  rows+=("| $label | $wall | $(awk "BEGIN {if ($cp_wall > 0) printf \"%.2f\", $wall / $cp_wall; else print \"-\"}") | $((rss / 1024)) |")
}
# compare LABEL OURS PEFT [MERGED ADAPTER]: bone-tool's output against PEFT's, tensor by tensor
failed=0
results=()
compare() {
  local json
  json="$("$python" fixtures/at_scale.py compare "${@:2}")"
  results+=("$1: $json")
  if [[ "$1" == merge* ]] && ! [[ "$json" == *'"differ": 0,'* ]]; then failed=1; fi
}

run "cp -r base" cp -r "$dir/base" "$work/copy"
rm -rf "$work/copy"
# job LABEL ADAPTER...: merge, compare, verify PEFT's merge, unmerge PEFT's merge, compare
job() {
  local v="$1"; shift
  local each=()
  for a in "$@"; do each+=(--adapter "$a"); done
  run "PEFT merge $v" "$python" fixtures/at_scale.py merge "$dir/base" "$work/peft-merged" "$@"
  run "bone-tool merge $v" "$bin" merge --base "$dir/base" "${each[@]}" "${sums[@]}" --out "$work/ours-merged" --quiet
  compare "merge $v" "$work/ours-merged" "$work/peft-merged"
  rm -rf "$work/ours-merged"
  run "bone-tool verify $v" "$bin" verify --base "$dir/base" "${each[@]}" "${sums[@]}" --merged "$work/peft-merged" --quiet
  run "PEFT unmerge $v" "$python" fixtures/at_scale.py unmerge "$dir/base" "$work/peft-merged" "$work/peft-unmerged" "$@"
  run "bone-tool unmerge $v" "$bin" unmerge --merged "$work/peft-merged" "${each[@]}" "${sums[@]}" --out "$work/ours-unmerged" --quiet
  compare "unmerge $v" "$work/ours-unmerged" "$work/peft-unmerged" "$work/peft-merged" "$@"
  rm -rf "$work/peft-merged" "$work/peft-unmerged" "$work/ours-unmerged"
}
jobs=" ${JOBS:-default bat mini stacked} "
[[ "$jobs" != *" default "* ]] || job default "$dir/default"
[[ "$jobs" != *" bat "* ]] || job bat "$dir/bat"
[[ "$jobs" != *" mini "* ]] || job mini "$dir/mini"
[[ "$jobs" != *" stacked "* ]] || job "default+bat" "$dir/default" "$dir/bat"

echo "$shape ($dtype, $(awk "BEGIN {printf \"%.2f\", $size / 1e9}") GB), r = $r, $(nproc) cores, one run each, $(date -u +%F):${BAT_SUMS:+ (--bat-sums $BAT_SUMS)}"
echo
echo "| job | wall (s) | × cp -r | peak RSS (MB) |"
echo "|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "bone-tool's output against PEFT's (values that differ, the largest difference in ulps; for unmerges"
echo "the largest ratio of bone-tool's RMS error to PEFT's against the spec's unmerge in f64):"
printf '%s\n' "${results[@]}"
exit "$failed"

#!/usr/bin/env bash
# The benchmark table: bone-tool merge/unmerge next to `cp -r` of the same base, measured side by
# side in one run (median of RUNS runs each, warm page cache), peak RSS from /usr/bin/time.
#
#   bench/run.sh [SHAPE] [RUNS]        SHAPE: 1b (default), 3b, 7b or tiny; RUNS: 3
#
# Models are generated once by examples/synth.rs under $BENCH_DIR (default /tmp/bone-bench).
# Needs about 4x the model size of free disk (base, two merged inputs for unmerge, one output).
# Prints a markdown table.
#   DEVICES="cuda cpu"   rows for each device (--device), default "cpu"; `gpu-only` is
#                        --device cuda --all-on-gpu (no CPU adds while the GPU starts)
#   BONE_TOOL_PREBUILT=DIR   use the binaries in DIR (bone-tool, synth, gemm_peak); build nothing
set -euo pipefail
cd "$(dirname "$0")/.."
shape="${1:-1b}"
runs="${2:-3}"
dir="${BENCH_DIR:-/tmp/bone-bench}/$shape"
out="${BENCH_DIR:-/tmp/bone-bench}/out"

devices="${DEVICES:-cpu}"
if [ -n "${BONE_TOOL_PREBUILT:-}" ]; then
  bin="$BONE_TOOL_PREBUILT/bone-tool"; synth="$BONE_TOOL_PREBUILT/synth"; gemm_peak="$BONE_TOOL_PREBUILT/gemm_peak"
else
  cargo build --release --quiet --examples --bins
  bin=target/release/bone-tool; synth=target/release/examples/synth; gemm_peak=target/release/examples/gemm_peak
fi
if [ ! -f "$dir/base/config.json" ]; then
  echo "generating the $shape model in $dir ..." >&2
  "$synth" --shape "$shape" --out "$dir" >&2
fi
# peak RSS needs GNU time; without it (a bare GPU image) the walls come from bash and RSS is "-"
have_time=1
[ -x /usr/bin/time ] || { have_time=0; echo "no /usr/bin/time: measuring wall time only (apt-get install time for RSS)" >&2; }

bytes=$(du -sb "$dir/base" | cut -f1)
r=$(sed -n 's/.*"r": *\([0-9]*\).*/\1/p' "$dir/bat/adapter_config.json" | head -1)
# warm the page cache so that every row reads from memory
cat "$dir"/base/* > /dev/null

measure() { # label, then the command; prints "median_wall max_rss_kb", or "FAILED -" when a run fails
  local label="$1"; shift
  local walls=() rss=0
  for _ in $(seq "$runs"); do
    rm -rf "$out"
    local t
    if [ "$have_time" = 1 ]; then
      /usr/bin/time -o "$out.time" -f "%e %M" "$@" > /dev/null || { echo "$label FAILED -"; return; }
      t=$(tail -1 "$out.time")
    else
      local t0 t1
      t0=$(date +%s.%N); "$@" > /dev/null || { echo "$label FAILED -"; return; }; t1=$(date +%s.%N)
      t="$(echo "$t1 - $t0" | awk '{printf "%.3f", $1 - $3}') -"
    fi
    walls+=("${t% *}")
    local m="${t#* }"
    if [ "$m" = "-" ]; then rss="-"; elif [ "$m" -gt "$rss" ]; then rss="$m"; fi
  done
  local med
  med=$(printf '%s\n' "${walls[@]}" | sort -g | sed -n "$(( (runs + 1) / 2 ))p")
  echo "$label $med $rss"
}

rows=()
rows+=("$(measure "cp -r base" cp -r "$dir/base" "$out")")
rows+=("$(measure "cp -r base + sync" sh -c "cp -r '$dir/base' '$out' && sync")")
# unmerge inputs: merged models made once, outside the timing
"$bin" -q merge --base "$dir/base" --adapter "$dir/default" --out "$dir/merged-default" --force
"$bin" -q merge --base "$dir/base" --adapter "$dir/bat" --out "$dir/merged-bat" --force
for dev in $devices; do
  tag=""; [ "$devices" != "cpu" ] && tag=" ($dev)"
  dev_args=(--device "$dev"); [ "$dev" = gpu-only ] && dev_args=(--device cuda --all-on-gpu)
  cat "$dir"/base/* > /dev/null
  rows+=("$(measure "merge default$tag" "$bin" -q merge --base "$dir/base" --adapter "$dir/default" --out "$out" "${dev_args[@]}")")
  rows+=("$(measure "merge default --no-fsync$tag" "$bin" -q merge --base "$dir/base" --adapter "$dir/default" --out "$out" --no-fsync "${dev_args[@]}")")
  rows+=("$(measure "merge BAT$tag" "$bin" -q merge --base "$dir/base" --adapter "$dir/bat" --out "$out" "${dev_args[@]}")")
  rows+=("$(measure "merge BAT --no-fsync$tag" "$bin" -q merge --base "$dir/base" --adapter "$dir/bat" --out "$out" --no-fsync "${dev_args[@]}")")
  cat "$dir"/merged-default/* "$dir"/merged-bat/* > /dev/null
  rows+=("$(measure "unmerge default$tag" "$bin" -q unmerge --merged "$dir/merged-default" --adapter "$dir/default" --out "$out" "${dev_args[@]}")")
  rows+=("$(measure "unmerge BAT$tag" "$bin" -q unmerge --merged "$dir/merged-bat" --adapter "$dir/bat" --out "$out" "${dev_args[@]}")")
done
rm -rf "$out" "$out.time"

gemm=$("$gemm_peak" "$r")
peak=$(echo "$gemm" | sed -n 's/gemm_peak_gflops //p')
strip=$(echo "$gemm" | sed -n 's/bat_strip_gemm_gflops //p')
kernel=$(echo "$gemm" | sed -n 's/bat_kernel_gflops //p')
# adapted elements: every linear weight of the synthetic model (7 kinds x layers)
linear=$(python3 -c "
import json; c = json.load(open('$dir/base/config.json'))
h, m, L = c['hidden_size'], c['intermediate_size'], c['num_hidden_layers']
kv = h // c['num_attention_heads'] * c['num_key_value_heads']
print(L * (2 * h * h + 2 * kv * h + 3 * h * m))")
flops=$(python3 -c "print(2 * $r * $linear)")

cp_wall=$(echo "${rows[0]}" | awk '{print $(NF-1)}')
echo
echo "shape $shape: $(python3 -c "print(f'{$bytes/1e9:.2f}')") GB base, $(nproc) cores, median of $runs runs, warm page cache"
echo
echo "| job | wall (s) | × cp -r | peak RSS (MB) | GB/s | GFLOP/s |"
echo "|---|---|---|---|---|---|"
for row in "${rows[@]}"; do
  rss=$(echo "$row" | awk '{print $NF}')
  wall=$(echo "$row" | awk '{print $(NF-1)}')
  label=$(echo "$row" | awk '{$NF=""; $(NF-1)=""; print}' | sed 's/ *$//')
  if [ "$wall" = FAILED ]; then
    echo "| $label | failed (its error is above) | - | - | - | - |"
    continue
  fi
  gf="-"
  case "$label" in *BAT*) gf=$(python3 -c "print(f'{$flops / max($wall, 0.001) / 1e9:.0f}')");; esac
  rss_mb="-"; [ "$rss" != "-" ] && rss_mb=$(python3 -c "print(f'{$rss / 1024:.0f}')")
  python3 -c "print(f'| $label | {$wall:.2f} | {$wall / max($cp_wall, 0.001):.2f} | $rss_mb | {$bytes / 1e9 / max($wall, 0.001):.2f} | $gf |')"
done
echo
echo "GEMM on this machine (examples/gemm_peak, r = $r): square f32 GEMM peak $peak GFLOP/s;"
echo "BAT strip GEMMs alone $strip GFLOP/s; BAT kernel with decode, add, rounding, encode $kernel GFLOP/s."

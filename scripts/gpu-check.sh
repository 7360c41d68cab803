#!/usr/bin/env bash
# The GPU check, run on the GPU machine in one call; builds nothing there (no Rust): it uses the
# binaries scripts/gpu-prepare.sh put in .device-bin/. Prints everything, most important first.
# Sections (SECTIONS="kernels bench ab" runs only those, for a second, shorter call that confirms
# a change):
#   select    bone-tool's device selection with --timings: each start-up step, NVRTC compiling,
#             then again with the PTX cache;
#   startend  a device alone (examples/gpu_start), as a default and a BAT merge open it, ended by
#             dropping it or by exiting, each process timed whole;
#   kernels   examples/gpu_kernels: the one-pass default add at every access width with one and
#             four groups a thread (16-byte ones also on grids of 1024 and 256 rows of blocks:
#             BONE_TOOL_GRID_ROWS), against a device-to-device copy; BAT's strip GEMMs by the
#             in-order kernel and by cuBLAS, with how many values of each equal the CPU's in-order
#             sum (the kernel must give all); the + B_i pass;
#   check     examples/gpu_check: every fixture merged and unmerged on cuda (two lanes) and on cpu
#             (both manifests; f16/bf16 BAT also merged with --rounding once, as the transformers 5
#             cases are; the BAT cases with merged-amd and the AMD-only ones, merged and where
#             PEFT's unmerge is kept unmerged, with --bat-sums amd),
#             compared: the same bytes, also for five default/mini cases on copies of their bases
#             with NaN weights (each NaN must come out quieted, as on the CPU, not as the GPU's
#             canonical NaN); then BAT cases with cuBLAS's GEMMs (BONE_TOOL_GEMM=cublas),
#             within one unit (or in f32 2^-18 of the largest value: Float::disagreement);
#   bench     the 1b table, cuda and cpu rows (DEVICES adds others: gpu-only is --all-on-gpu) next
#             to cp -r (3 runs), and the --timings of one cuda merge of each kind;
#   outputs   the 1b outputs of cpu, cuda, cuda --all-on-gpu, adds-cpu, the four-groups add and
#             cuBLAS's GEMMs compared byte for byte (before ab: a correctness check, and short);
#   ab        interleaved 1b merges, each process timed whole, 3 runs of each variant (AB_RUNS=N),
#             each variant's median as a multiple of cp -r's (+ sync with fsync) in the same
#             interleaved runs, the issue's ratio; the variants: cpu, cuda,
#             one writer (-1w) against one per shard, the adds kept on the CPU (adds-cpu), the GPU
#             kept to the end (keep-device), pieces read with pread (pread), BAT with cuBLAS's GEMMs
#             (cublas: BAT then waits for the GPU), with and without fsync;
#   lanes1, x4, small   gpu_check again on a few cases: one lane (the synchronous path), the
#             four-groups add (BONE_TOOL_UNROLL=4), 4 KB pieces (many in flight);
#   7b        the 7b table, cuda rows only (1 run), when the disk has room (SKIP_7B=1 leaves it out).
# Everything also goes to $OUT/gpu-check.log (the device tool brings $OUT back), since a call
# returns only the last 12,000 characters; lanes1, x4, small and 7b are skipped once 420 s have
# gone (GPU_CHECK_LATE_S=N moves that mark), so that a 540 s call ends with its summary. Each step
# is stopped after 60-200 s (a hang in one step must not eat the whole call).
set -uo pipefail
cd "$(dirname "$0")/.."
want() { [ -z "${SECTIONS:-}" ] || [[ " $SECTIONS " == *" $1 "* ]]; }
# variant_env NAME: sets env_v to the environment of a variant that ab and outputs name by words:
# adds-cpu (the adds stay on the CPU), pread, -1w (one writer), keep-device, -fb (writeback started
# every 32 MB as the shards are written), cublas, x4 (the four-groups add)
variant_env() {
  env_v=()
  [[ "$1" == *adds-cpu* ]] && env_v+=(BONE_TOOL_ADDS_ON=cpu)
  [[ "$1" == *pread* ]] && env_v+=(BONE_TOOL_READ=pread)
  [[ "$1" == *-1w ]] && env_v+=(BONE_TOOL_WRITERS=1)
  [[ "$1" == *keep-device* ]] && env_v+=(BONE_TOOL_KEEP_DEVICE=1)
  [[ "$1" == *-fb ]] && env_v+=(BONE_TOOL_FLUSH_BEHIND=32MB)
  [[ "$1" == *cublas* ]] && env_v+=(BONE_TOOL_GEMM=cublas)
  [[ "$1" == *x4 ]] && env_v+=(BONE_TOOL_UNROLL=4)
  return 0
}
late() { if [ "$SECONDS" -gt "${GPU_CHECK_LATE_S:-420}" ]; then echo "skipped: $SECONDS s gone"; return 0; fi; return 1; }
main() {
  bin="$PWD/.device-bin"
  [ -x "$bin/bone-tool" ] || { echo "no .device-bin/bone-tool: run scripts/gpu-prepare.sh here and carry .device-bin"; return 2; }
  export BONE_TOOL_PREBUILT="$bin" BENCH_DIR="${BENCH_DIR:-/tmp/bone-bench}"
  echo "== machine"; nproc; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | head -3
  [ -z "${PROBE:-}" ] || { echo "== probe"; bash "$PROBE"; }
  export BONE_TOOL_CACHE_DIR=/tmp/bone-tool-cache
  if want select; then
  echo "== device selection"
  rm -rf "$BONE_TOOL_CACHE_DIR"
  timeout 60 "$bin/bone-tool" merge --base fixtures/bases/llama-bf16 --adapter fixtures/cases/bone-bat-bf16/adapter --out /tmp/sel --force --device cuda --timings 2>&1
  echo "-- again, kernels from the PTX cache:"
  "$bin/bone-tool" merge --base fixtures/bases/llama-bf16 --adapter fixtures/cases/bone-bat-bf16/adapter --out /tmp/sel --force --device cuda --timings 2>&1 | grep "device start"
  fi
  if want startend; then
  echo "== start and end (a default merge's device, a BAT merge's; the end by drop or by exit)"
  for kind in default bat; do
    for end in drop exit drop exit; do
      t0=$(date +%s.%N)
      timeout 60 "$bin/gpu_start" "$kind" "$end"
      t1=$(date +%s.%N)
      echo "  $kind $end: process wall $(echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}')s"
    done
  done
  fi
  if want kernels; then
  echo "== kernels"
  timeout 150 "$bin/gpu_kernels"; echo "gpu_kernels exit $?"
  fi
  if want check; then
  echo "== gpu_check (cuda, 2 lanes, vs cpu on every fixture)"
  timeout 150 "$bin/gpu_check" "$bin/bone-tool" fixtures; echo "gpu_check exit $?"
  echo "-- BAT cases with cuBLAS's GEMMs (BONE_TOOL_GEMM=cublas: within one unit)"
  BONE_TOOL_GEMM=cublas timeout 120 "$bin/gpu_check" "$bin/bone-tool" fixtures bat; echo "gpu_check (cublas) exit $?"
  fi
  if want bench; then
  echo "== bench 1b"
  DEVICES="${DEVICES:-cuda cpu}" timeout 200 bash bench/run.sh 1b 3 2>&1 | tail -25
  for kind in default bat; do
    echo "-- timings: cuda merge $kind (1b)"
    timeout 60 "$bin/bone-tool" merge --base "$BENCH_DIR/1b/base" --adapter "$BENCH_DIR/1b/$kind" --out /tmp/t1b --force --device cuda --timings 2>&1 | tail -12
    rm -rf /tmp/t1b
  done
  fi
  if { want ab || want outputs; } && [ ! -f "$BENCH_DIR/1b/base/config.json" ]; then
    "$bin/synth" --shape 1b --out "$BENCH_DIR/1b" > /dev/null
  fi
  if want outputs; then
  echo "== 1b outputs: cpu, cuda (the CPU computes while the GPU starts), cuda --all-on-gpu, cuda with BONE_TOOL_ADDS_ON=cpu, cuda --all-on-gpu with BONE_TOOL_UNROLL=4, cuda --all-on-gpu with BONE_TOOL_GEMM=cublas"
  # same A B: shard $n of the $kind outputs of devices A and B (as the loop below names them), byte
  # for byte
  same() {
    local a="/tmp/same-${1// /_}/$n" b="/tmp/same-${2// /_}/$n"
    if [ ! -f "$a" ] || [ ! -f "$b" ]; then echo "$kind $n: $1 or $2 has no output (its merge FAILED above)"
    elif cmp -s "$a" "$b"; then echo "$kind $n: $1 = $2"
    else echo "$kind $n: $1 and $2 DIFFER${3:-}"; fi
  }
  for kind in default bat; do
    for dev in "cpu" "cuda" "cuda --all-on-gpu" "cuda adds-cpu" "cuda --all-on-gpu x4" "cuda --all-on-gpu cublas"; do
      variant_env "$dev"; flags=(--device "${dev%% *}")
      [[ "$dev" == *--all-on-gpu* ]] && flags+=(--all-on-gpu)
      env "${env_v[@]}" timeout 60 "$bin/bone-tool" -q merge --base "$BENCH_DIR/1b/base" --adapter "$BENCH_DIR/1b/$kind" \
        --out "/tmp/same-${dev// /_}" --force --no-fsync "${flags[@]}" || echo "FAILED: merge $kind --device $dev"
    done
    for f in "$BENCH_DIR"/1b/base/*.safetensors; do
      n=$(basename "$f")
      same "cuda" "cuda --all-on-gpu"
      same "cuda" "cuda adds-cpu"
      same "cuda --all-on-gpu" "cuda --all-on-gpu x4"
      same "cpu" "cuda"
      same "cpu" "cuda --all-on-gpu"
      same "cpu" "cuda --all-on-gpu cublas" " (for BAT they may: cuBLAS sums in its own order)"
    done
    rm -rf /tmp/same-*
  done
  fi
  if want ab; then
  echo "== 1b A/B, interleaved: process wall of each run; the --timings summary of the last run of each"
  # adds-cpu: BONE_TOOL_ADDS_ON=cpu, the adds stay on the CPU once the GPU is open (GEMMs on it);
  # keep-device: BONE_TOOL_KEEP_DEVICE=1, the GPU is freed at the process's end, not once its last
  # piece is back; pread: BONE_TOOL_READ=pread, pieces read into pooled buffers rather than mapped
  # (no mmap/munmap per piece while the driver starts beside the pipeline); -1w: one writer thread
  # (BONE_TOOL_WRITERS=1) rather than one per shard; -fb: BONE_TOOL_FLUSH_BEHIND=32MB, each writer
  # starts its file's writeback every 32 MB, so the fsyncs find it mostly written (fsync runs only)
  median() { printf '%s\n' "$@" | sort -g | awk '{v[NR] = $1} END {print v[int((NR + 1) / 2)]}'; }
  ab() { # fsync flag ("" or --no-fsync), kind, variants... (cp: cp -r of the base, the yardstick)
    local sync="$1" kind="$2" reps="${AB_RUNS:-3}"; shift 2
    local -A walls=() failed=()
    for rep in $(seq "$reps"); do
      for v in "$@"; do
        local dev=cuda
        case "$v" in cpu*) dev=cpu;; esac
        variant_env "$v"
        rm -rf /tmp/ab
        local t0 t1 wall
        t0=$(date +%s.%N)
        if [ "$v" = cp ]; then # the yardstick, interleaved: cp -r of the base (and sync, with fsync)
          cp -r "$BENCH_DIR/1b/base" /tmp/ab && { [ -n "$sync" ] || sync; } || { echo "FAILED: cp"; failed[$v]=1; }
        else
          # shellcheck disable=SC2086
          env "${env_v[@]}" timeout 60 "$bin/bone-tool" merge --base "$BENCH_DIR/1b/base" --adapter "$BENCH_DIR/1b/$kind" \
            --out /tmp/ab $sync --device "$dev" --timings > "/tmp/ab-$v.log" 2>&1 || { echo "FAILED: $kind $v $sync"; failed[$v]=1; }
        fi
        t1=$(date +%s.%N)
        wall=$(echo "$t0 $t1" | awk '{printf "%.3f", $2 - $1}')
        walls[$v]+=" $wall"
        echo "  $kind ${sync:-fsync} $v run $rep: process wall ${wall}s"
      done
    done
    # each variant's median next to cp's median of the same interleaved runs: the issue's ratio
    local cp_med
    cp_med=$(median ${walls[cp]})
    echo "  -- $kind ${sync:-fsync}, medians of $reps runs, x cp -r$( [ -n "$sync" ] || echo ' + sync'):"
    for v in "$@"; do
      local med; med=$(median ${walls[$v]})
      if [ -n "${failed[$v]:-}" ]; then echo "  $kind ${sync:-fsync} $v: FAILED (its error is in the log below)"
      else echo "  $kind ${sync:-fsync} $v: median ${med}s = $(echo "$med $cp_med" | awk '{printf "%.2f", $1 / $2}')x cp"; fi
    done
    for v in "$@"; do
      [ "$v" = cp ] && continue
      echo "  -- $kind ${sync:-fsync} $v:"
      if [ -n "${failed[$v]:-}" ]; then tail -3 "/tmp/ab-$v.log"
      else grep -E "compute |staging|waits|pipeline|process|device start|waited" "/tmp/ab-$v.log"; fi | sed 's/^/  /'
    done
    rm -rf /tmp/ab /tmp/ab-*.log
  }
  ab --no-fsync default cp cpu cpu-1w cuda cuda-1w adds-cpu keep-device pread adds-cpu-pread
  ab --no-fsync bat cp cpu cpu-1w cuda cuda-1w keep-device cublas pread
  ab "" default cp cpu cpu-1w cuda cuda-1w keep-device cpu-fb cuda-fb
  ab "" bat cp cpu cuda cuda-1w keep-device cuda-fb
  fi
  if want lanes1; then
  echo "== gpu_check, one lane (synchronous path)"
  late || BONE_TOOL_CUDA_LANES=1 timeout 150 "$bin/gpu_check" "$bin/bone-tool" fixtures bat-bf16,mini,tail; echo "exit $?"
  fi
  if want x4; then
  echo "== gpu_check, the one-pass add with four groups a thread (BONE_TOOL_UNROLL=4)"
  late || BONE_TOOL_UNROLL=4 timeout 150 "$bin/gpu_check" "$bin/bone-tool" fixtures default,mini,tail; echo "exit $?"
  fi
  if want small; then
  echo "== gpu_check, 4 KB pieces (many in flight)"
  late || BONE_TOOL_PIECE_BYTES=4096 timeout 150 "$bin/gpu_check" "$bin/bone-tool" fixtures bat-bf16,mini,tail; echo "exit $?"
  fi
  rm -rf "$BENCH_DIR/1b"
  if want 7b; then
  echo "== bench 7b"
  if late; then :
  elif [ -n "${SKIP_7B:-}" ]; then echo "skipped: SKIP_7B"
  elif [ "$(df --output=avail -B1G "$BENCH_DIR" | tail -1)" -gt 58 ]; then
    DEVICES="cuda" bash bench/run.sh 7b 1 2>&1 | tail -14
  else
    echo "skipped: less than 58 GB free for the 7b model and its outputs"
  fi
  fi
  echo "== done in $SECONDS s"
}
if [ -n "${OUT:-}" ]; then
  main 2>&1 | tee "$OUT/gpu-check.log"
else
  main
fi

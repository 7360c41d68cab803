#!/usr/bin/env bash
# Fuzz bone-tool's readers with cargo-fuzz (libFuzzer), each target for SECONDS (default 600),
# seeded from fixtures/. Needs a nightly toolchain (rustup's `nightly`) and cargo-fuzz
# (`cargo install cargo-fuzz`). Prints libFuzzer's closing statistics for each target; crashes
# are saved under fuzz/artifacts/<target>/ and must become regression tests.
#   scripts/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
secs="${1:-600}"; shift || true
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(safetensors_header model_index adapter_config)
# seed corpora from the fixtures
mkdir -p corpus/safetensors_header corpus/model_index corpus/adapter_config
cp ../fixtures/bases/*/model*.safetensors ../fixtures/cases/*/adapter*/adapter_model.safetensors corpus/safetensors_header/ 2>/dev/null || true
for f in ../fixtures/bases/*/model.safetensors.index.json; do cp "$f" "corpus/model_index/$(basename "$(dirname "$f")").json"; done
for f in ../fixtures/cases/*/adapter*/adapter_config.json; do cp "$f" "corpus/adapter_config/$(echo "$f" | tr '/' '_')"; done
for t in "${targets[@]}"; do
  echo "== $t ($secs s)"
  cargo +nightly fuzz run "$t" --release -- -max_total_time="$secs" -rss_limit_mb=2048 -malloc_limit_mb=1024 2>&1 \
    | grep -E "^#[0-9]+[[:space:]]+(DONE|INITED)|Done [0-9]+ runs|ERROR|SUMMARY|crash-|leak-|timeout-|oom-" || true
done

#!/usr/bin/env bash
# Run here (with the Rust toolchain) before a GPU check: builds the x86-64 binaries that
# scripts/gpu-check.sh needs into .device-bin/ (git-ignored), which the device call carries:
#   device run: carry [".device-bin"], command "bash scripts/gpu-check.sh", timeout_s 540
# First the kernels go through the device's NVRTC and ptxas here (scripts/nvrtc-check.sh): a
# source NVRTC refuses would otherwise cost a device session to find out. NO_NVRTC_CHECK=1 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${NO_NVRTC_CHECK:-}" ] || bash scripts/nvrtc-check.sh
cargo build --release --bins --examples
mkdir -p .device-bin
cp target/release/bone-tool target/release/examples/{synth,gemm_peak,gpu_check,gpu_kernels,gpu_start} .device-bin/
strip .device-bin/* 2>/dev/null || true
du -sh .device-bin

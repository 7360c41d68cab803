#!/usr/bin/env bash
# bone-tool on processors and systems other than this x86-64 Linux machine: the whole test suite
# for aarch64 Linux (Grace Hopper, Graviton) run under qemu, and clippy for macOS on Apple silicon
# (which cannot be run here). Run it after changing SIMD code, the GEMM, the GPU kernels or
# anything system-specific (file copies, mmap advice, writeback): the scalar paths, faer's
# aarch64 kernels and the emulated GPU kernels then meet the PEFT fixtures.
# Installs, once: the rustup targets, and with apt qemu-user and the aarch64 cross compilers.
# About 10 minutes on 2 cores (qemu runs the tests about 20 times slower).
#   CROSS_ONLY=clippy   skip the qemu run
set -euo pipefail
cd "$(dirname "$0")/.."
for t in aarch64-unknown-linux-gnu aarch64-apple-darwin; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done
if ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
  $sudo apt-get install -y -q qemu-user g++-aarch64-linux-gnu libc6-dev-arm64-cross
fi
echo "== clippy, macOS on Apple silicon and aarch64 Linux (with and without the cuda feature)"
for t in aarch64-apple-darwin aarch64-unknown-linux-gnu; do
  cargo clippy --release --target "$t" --all-targets -q -- -D warnings
  cargo clippy --release --target "$t" --all-targets --no-default-features -q -- -D warnings
done
[ "${CROSS_ONLY:-}" = clippy ] && exit 0
echo "== the test suite on aarch64 Linux, under qemu"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# and the end-to-end tests start bone-tool through it (tests/common/mod.rs)
export BONE_TOOL_TEST_RUNNER="$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
# the emulated GPU kernels are compiled for the processor that runs them
export CXX=aarch64-linux-gnu-g++
cargo test --release --target aarch64-unknown-linux-gnu --no-fail-fast 2>&1 |
  tee /dev/stderr | grep "test result" |
  awk '{p += $4; f += $6} END {print "aarch64: passed", p, "failed", f; exit (f > 0)}'

#!/usr/bin/env bash
# bone-tool on processors and systems other than this x86-64 Linux machine: the whole test suite
# for aarch64 Linux (Grace Hopper, Graviton) run under qemu, and for Windows (x86-64, GNU) run under
# Wine; clippy for macOS on Apple silicon and for Windows' MSVC target (which cannot be run here).
# Run it after changing SIMD code, the GEMM, the GPU kernels or anything system-specific (file
# copies, mmap advice, writeback, src/sys.rs): the scalar paths, faer's aarch64 kernels and the
# emulated GPU kernels then meet the PEFT fixtures.
# Installs, once: the rustup targets, and with apt qemu-user, the aarch64 cross compilers, MinGW-w64
# and Wine. About 16 minutes on 2 cores (qemu runs the tests about 20 times slower; the Windows
# build takes about 4 minutes).
#   CROSS_ONLY=clippy           skip the runs under qemu and Wine
#   CROSS_SYSTEMS="aarch64"     or "windows": one of the two (default both)
set -euo pipefail
cd "$(dirname "$0")/.."
systems="${CROSS_SYSTEMS:-aarch64 windows}"
sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
for t in aarch64-unknown-linux-gnu aarch64-apple-darwin x86_64-pc-windows-gnu x86_64-pc-windows-msvc; do
  rustup target list --installed | grep -qx "$t" || rustup target add "$t"
done
run="${CROSS_ONLY:-all}"
if [ "$run" != clippy ] && [[ $systems == *aarch64* ]] && { ! command -v qemu-aarch64 >/dev/null || ! command -v aarch64-linux-gnu-g++ >/dev/null; }; then
  $sudo apt-get install -y -q qemu-user g++-aarch64-linux-gnu libc6-dev-arm64-cross
fi
if [ "$run" != clippy ] && [[ $systems == *windows* ]] && { ! command -v wine >/dev/null || ! command -v x86_64-w64-mingw32-gcc >/dev/null; }; then
  $sudo apt-get install -y -q gcc-mingw-w64-x86-64 wine64
fi
echo "== clippy: macOS on Apple silicon, aarch64 Linux, Windows (GNU and MSVC); with and without cuda"
for t in aarch64-apple-darwin aarch64-unknown-linux-gnu x86_64-pc-windows-gnu x86_64-pc-windows-msvc; do
  cargo clippy --release --target "$t" --all-targets -q -- -D warnings
  cargo clippy --release --target "$t" --all-targets --no-default-features -q -- -D warnings
done
[ "$run" = clippy ] && exit 0
failed=0
if [[ $systems == *aarch64* ]]; then
  echo "== the test suite on aarch64 Linux, under qemu"
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
  # and the end-to-end tests start bone-tool through it (tests/common/mod.rs)
  export BONE_TOOL_TEST_RUNNER="$CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER"
  # the emulated GPU kernels are compiled for the processor that runs them
  export CXX=aarch64-linux-gnu-g++
  cargo test --release --target aarch64-unknown-linux-gnu --no-fail-fast 2>&1 |
    tee -a /dev/stderr | grep "test result" |
    awk '{p += $4; f += $6} END {print "aarch64: passed", p, "failed", f; exit (f > 0)}' || failed=1
fi
if [[ $systems == *windows* ]]; then
  echo "== the test suite on Windows (x86-64, GNU), under Wine"
  unset BONE_TOOL_TEST_RUNNER # the test binaries run under Wine start bone-tool.exe themselves
  export WINEDEBUG=-all WINEPREFIX="${WINEPREFIX:-$HOME/.wine}"
  wineboot -i >/dev/null 2>&1 || true
  x86_64-w64-mingw32-gcc -O2 -shared -o "$WINEPREFIX/drive_c/windows/system32/bcryptprimitives.dll" \
    scripts/wine-bcryptprimitives.c -ladvapi32
  export CARGO_TARGET_X86_64_PC_WINDOWS_GNU_RUNNER=wine
  # Wine starts a Linux compiler with Windows paths, which it cannot open: the emulated GPU kernels
  # say NOT CHECKED there (they run in the aarch64 and x86-64 Linux suites)
  CXX=bone-tool-no-compiler cargo test --release --target x86_64-pc-windows-gnu --no-fail-fast 2>&1 |
    tee -a /dev/stderr | grep "test result" |
    awk '{p += $4; f += $6} END {print "windows: passed", p, "failed", f; exit (f > 0)}' || failed=1
fi
exit $failed

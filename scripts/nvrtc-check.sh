#!/usr/bin/env bash
# Compile the GPU kernels with the GPU machine's NVRTC and assemble them for its GPU, here, without
# a GPU: NVRTC and ptxas need no driver. Installs both from PyPI (the CUDA 13.0 of the device,
# about 550 MB) into .venv-nvrtc once, then runs examples/nvrtc_check.rs (the same compile_ptx call
# as `--device cuda`) and ptxas for sm_90 (H200), and fails if a kernel divides 64-bit integers.
# scripts/gpu-prepare.sh runs it before building the device binaries.
#   CUDA_PIP_VERSION=13.0.*   the CUDA release to check against
#   PTX_ARCH=sm_90            the GPU to assemble for
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-nvrtc
version="${CUDA_PIP_VERSION:-13.0.*}"
arch="${PTX_ARCH:-sm_90}"
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q "nvidia-cuda-nvrtc==$version" "nvidia-cuda-nvcc==$version"
cuda="$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"
cargo build --release --quiet --example nvrtc_check
ptx="$(mktemp --suffix=.ptx)"
trap 'rm -f "$ptx" "$ptx.cubin"' EXIT
LD_LIBRARY_PATH="$cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" target/release/examples/nvrtc_check "$ptx"
"$cuda/bin/ptxas" -arch="$arch" -v "$ptx" -o "$ptx.cubin" 2>&1 | awk '
  /Compiling entry function/ { split($0, q, "\047"); name = q[2] }
  /bytes spill stores/ { for (i = 1; i <= NF; i++) if ($i == "spill" && $(i + 1) == "stores,") spill = $(i - 2) }
  /Used [0-9]+ registers/ { for (i = 1; i <= NF; i++) if ($i == "Used") regs = $(i + 1)
                            printf "  %-16s %3d registers, %s bytes spilled\n", name, regs, spill }'
echo "ptxas assembled every kernel for $arch"
if grep -qE '(div|rem)\.(s|u)64' "$ptx"; then
  echo "a kernel divides 64-bit integers (slow on a GPU):"; grep -nE '(div|rem)\.(s|u)64' "$ptx"; exit 1
fi
echo "no 64-bit integer division in any kernel"
# the one-pass add's 16-byte path must be 16-byte loads and stores (else its width is lost), in
# both of its kernels
for k in periodic_fused periodic_fused_x4; do
  wide=$(awk -v k="$k" '$0 ~ "\\.entry " k "\\(" { on = 1 } on && /^}/ { on = 0 } on' "$ptx" |
    grep -cE '(ld|st)\.global(\.nc)?\.v(2\.(u|b)64|4\.(u|b)32)')
  if [ "$wide" -lt 2 ]; then
    echo "$k has no 16-byte global loads and stores (ld/st.global.v2.u64 or .v4.u32)"; exit 1
  fi
  echo "$k: $wide 16-byte global loads and stores"
done
# the in-order GEMM's rows of blocks and chunks: 16-byte loads when r is a multiple of 4
wide=$(awk '$0 ~ "\\.entry strip_gemm\\(" { on = 1 } on && /^}/ { on = 0 } on' "$ptx" |
  grep -cE 'ld\.global(\.nc)?\.v4\.(f|b|u)32')
if [ "$wide" -lt 2 ]; then
  echo "strip_gemm has no 16-byte global loads (ld.global.v4.f32)"; exit 1
fi
echo "strip_gemm: $wide 16-byte global loads"

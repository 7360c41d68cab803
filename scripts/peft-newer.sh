#!/usr/bin/env bash
# The fixtures against a newer PEFT (fixtures/newer_peft.py): Bone cases converted to MiSS by
# bone-tool, MiSS cases as they are, merged by that PEFT, must give the fixtures' bytes (from 0.20
# on, the f16/bf16 BAT cases those of --rounding once). PEFT alone (no dependencies) goes into
# fixtures/.peft-VERSION (git-ignored), put before the PEFT 0.18.1 virtualenv's (fixtures/venv.sh)
# on the path, whose torch and transformers it uses. Not part of CI.
# With TRIALS [SEED], also that many random models and MiSS adapters drawn as the sweep draws them.
#   scripts/peft-newer.sh [VERSION [TRIALS [SEED]]]   (default 0.21.2, no random trials)
#   scripts/peft-newer.sh VERSION --targets           writes fixtures/peft-targets-VERSION.json
#   TRANSFORMERS=5.24.0 scripts/peft-newer.sh ...     on that transformers instead of 4.57.6
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
version="${1:-0.21.2}"
cargo build --release --quiet --manifest-path "$root/Cargo.toml"
python="$(bash "$root/fixtures/venv.sh")"
target="$root/fixtures/.peft-$version"
if [ ! -d "$target/peft" ]; then
  "$python" -m pip install -q --no-deps --target "$target" "peft==$version"
fi
path="$target"
# TRANSFORMERS=5.24.0: that transformers too (with its dependencies), in fixtures/.tf-VERSION
if [ -n "${TRANSFORMERS:-}" ]; then
  tf="$root/fixtures/.tf-$TRANSFORMERS"
  [ -d "$tf/transformers" ] || "$python" -m pip install -q --target "$tf" "transformers==$TRANSFORMERS"
  path="$target:$tf"
fi
PYTHONPATH="$path" BONE_TOOL="$root/target/release/bone-tool" "$python" "$root/fixtures/newer_peft.py" "${@:2}"

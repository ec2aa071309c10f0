#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, everything the lent GPU machine runs, into the git-ignored
# folder gpu-bin/cuda: the moe-cuda test binaries, the GPU benchmark, the `moe` CLI, and the torch
# peer script. The GPU machine has no Rust; it only runs these x86-64 binaries (scripts/gpu-run.sh).
#
#   bash scripts/gpu-build.sh            # then carry gpu-bin/cuda and run scripts/gpu-run.sh there
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
dest=gpu-bin/cuda
mkdir -p "$dest"
rm -rf "$dest"/*

# Test binaries (cargo prints their paths as JSON; take the executables of moe-cuda's targets).
cargo test -p moe-cuda --no-run --message-format=json 2>/dev/null \
  | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] in ("moe_cuda", "gpu_backend", "nvrtc_compile", "gpu_fp8_tile", "gpu_quant"):
        name = "unit" if m["target"]["name"] == "moe_cuda" else m["target"]["name"]
        print(m["executable"], name)
' | while read -r exe name; do cp "$exe" "$dest/$name"; done

cargo build --release -p moe-cuda --example gpu_bench
cp "$CARGO_TARGET_DIR/release/examples/gpu_bench" "$dest/"
if cargo build --release -p moe-cli; then
  cp "$CARGO_TARGET_DIR/release/moe" "$dest/"
else
  echo "warning: moe-cli did not build; gpu-run.sh skips moe info/check/bench" >&2
fi
cp python/peers/gpu_torch_moe.py scripts/gpu-run.sh "$dest/"
# Prefill the kernel cache for sm_90a from the same sources (no NVRTC compile on the GPU machine;
# the key includes the NVRTC version, so it hits only where that machine's NVRTC matches this
# one's). Built fresh with the rest, never carried over from an older build.
cargo build --release -p moe-cuda --example kernel_cache
if MOE_KERNEL_CACHE="$dest/kcache" "$CARGO_TARGET_DIR/release/examples/kernel_cache" sm_90a; then
  :
else
  echo "warning: no NVRTC here; the GPU machine compiles the kernels on first use" >&2
  rm -rf "$dest/kcache"
fi
strip "$dest"/unit "$dest"/gpu_backend "$dest"/gpu_fp8_tile "$dest"/gpu_quant "$dest"/nvrtc_compile "$dest"/gpu_bench "$dest"/moe 2>/dev/null || true
du -sh "$dest"
ls -l "$dest"

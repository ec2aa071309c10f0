#!/usr/bin/env bash
# Builds, on this machine, what a CPU measurement on another x86-64 host needs (the lent GPU
# machine's 16-core Xeon has no Rust): the moe-cpu and moe-runtime test binaries, the `moe` CLI,
# the cpu_ab, amx_probe, pool_probe and router_probe examples and the PyTorch peer scripts, into the git-ignored gpu-bin/cpu.
#
#   bash scripts/cpu-host-build.sh      # then carry gpu-bin/cpu and run the binaries there
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
dest=gpu-bin/cpu
mkdir -p "$dest"
rm -rf "${dest:?}"/*
cargo test --release -p moe-cpu -p moe-runtime --no-run --message-format=json 2>/dev/null | python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        t = m["target"]
        print(m["executable"], ("unit_" if t["kind"] == ["lib"] else "") + t["name"])
' | while read -r exe name; do cp "$exe" "$dest/$name"; done
cargo build --release -p moe-cli
cargo build --release -p moe-runtime --example cpu_ab
cargo build --release -p moe-cpu --example amx_probe --example pool_probe --example router_probe
cp "$CARGO_TARGET_DIR/release/moe" "$CARGO_TARGET_DIR/release/examples/cpu_ab" "$CARGO_TARGET_DIR/release/examples/amx_probe" "$CARGO_TARGET_DIR/release/examples/pool_probe" \
    "$CARGO_TARGET_DIR/release/examples/router_probe" "$dest/"
cp python/peers/cpu_torch_moe.py python/peers/cpu_torch_gemm_peak.py "$dest/"
strip "$dest"/* 2>/dev/null || true
du -sh "$dest"

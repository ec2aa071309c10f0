#!/usr/bin/env bash
# Runs on the lent GPU machine from the repository root, over the binaries scripts/gpu-build.sh
# put into gpu-bin/cuda: GPU tests, `moe info` / `moe check`, the GPU benchmark and the torch
# peer. Logs and JSON go to $OUT (or ./gpu-out). Steps: env STEPS="tests check peer bench".
#
#   bash gpu-bin/cuda/gpu-run.sh
set -uo pipefail
bin="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$PWD/gpu-out}"
mkdir -p "$out"
steps="${STEPS:-tests check peer bench}"
# The cache gpu-build.sh prefilled, copied to a writable place (or an empty one).
if [ -z "${MOE_KERNEL_CACHE:-}" ]; then
  export MOE_KERNEL_CACHE=/tmp/moe-kernels
  mkdir -p "$MOE_KERNEL_CACHE"
  [ -d "$bin/kcache" ] && cp "$bin"/kcache/* "$MOE_KERNEL_CACHE"/ 2>/dev/null
fi
export PYTHONUNBUFFERED=1
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
for s in $steps; do
  case "$s" in
    tests)
      for t in ${TESTS:-unit nvrtc_compile gpu_backend gpu_fp8_tile gpu_quant}; do
        [ -x "$bin/$t" ] || continue
        echo "== test $t"
        "$bin/$t" --test-threads=1 >"$out/test-$t.log" 2>&1 || { status=1; echo "FAILED $t"; }
        grep -E "test result|FAILED|panicked" "$out/test-$t.log"
      done ;;
    check)
      [ -x "$bin/moe" ] || continue
      echo "== moe info / moe check"
      "$bin/moe" info >"$out/moe-info.txt" 2>&1 || status=1
      grep -i cuda "$out/moe-info.txt" | head -20
      "$bin/moe" check --backends cuda >"$out/moe-check.txt" 2>&1 || { status=1; echo "FAILED moe check"; }
      tail -5 "$out/moe-check.txt" ;;
    peer)
      echo "== torch peer"
      python3 "$bin/gpu_torch_moe.py" --out "$out/peer.json" ${PEER_ARGS:-} >"$out/peer.log" 2>&1 || { status=1; echo "FAILED peer"; tail -5 "$out/peer.log"; } ;;
    bench)
      echo "== gpu bench"
      peer=(); [ -f "$out/peer.json" ] && peer=(--peer-json "$out/peer.json")
      if [ -x "$bin/moe" ]; then
        "$bin/moe" bench --backend cuda --tokens 1,16,128,1024,4096,16384 --json "$out/bench.json" "${peer[@]}" \
          2>&1 | tee "$out/bench.log" || status=1
      else
        "$bin/gpu_bench" --out "$out/bench.json" "${peer[@]}" ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log" || status=1
      fi ;;
  esac
done
# The lent machine sends back at most 8 files from $OUT (more are dropped): on it, pack them
# into one archive.
if [ -n "${OUT:-}" ]; then
  (cd "$out" && tar czf gpu-run.tgz --exclude=gpu-run.tgz . && find . -type f ! -name gpu-run.tgz -delete)
fi
exit $status

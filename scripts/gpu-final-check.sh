#!/usr/bin/env bash
# Final validation on the GPU machine: GPU tests, moe check (all backends), the shared matrix,
# and every bf16 golden fixture run on the cuda backend vs transformers' output.
# Build here with scripts/gpu-build.sh, add the stripped matrix test binary as gpu-bin/cuda/matrix
# and this script, carry gpu-bin/cuda, run `bash gpu-bin/cuda/gpu-final-check.sh` there
# (FIXTURES_ONLY=1 runs just the fixtures).
set -u
bin="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-$PWD/gpu-out}"; mkdir -p "$out"
export MOE_KERNEL_CACHE=/tmp/moe-kernels
if [ -z "${FIXTURES_ONLY:-}" ]; then
STEPS="tests check" bash "$bin/gpu-run.sh" 2>&1 | tail -20
"$bin/moe" check --seed 7 > "$out/moe-check-all.txt" 2>&1; echo "moe check all backends rc=$?"; tail -1 "$out/moe-check-all.txt"
grep -E "MISS|FAILED" "$out/moe-check-all.txt" | head -5
"$bin/matrix" --test-threads=1 > "$out/matrix.log" 2>&1; echo "matrix rc=$?"; grep -E "matrix:|test result|panicked" "$out/matrix.log"
fi
for d in tests/fixtures/*/bf16; do
  n=$(basename $(dirname $d))
  layer=$(python3 -c "import json;print(json.load(open('$d/fixture.json'))['layer'])")
  "$bin/moe" run --checkpoint "$d" --layer "$layer" --input "$d/input.safetensors" --output "$out/fx-$n.safetensors" --backend cuda > "$out/fx-$n.log" 2>&1 || echo "FAILED $n: $(tail -2 $out/fx-$n.log)"
done
python3 - "$out" <<'PY'
import json, struct, sys, glob, os
import numpy as np
def load(p):
    b = open(p, 'rb').read(); n = struct.unpack('<Q', b[:8])[0]; h = json.loads(b[8:8+n]); d = b[8+n:]
    t = h['hidden_states']; s, e = t['data_offsets']; raw = d[s:e]
    if t['dtype'] == 'BF16':
        a = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        a = np.frombuffer(raw, {'F32': np.float32, 'F16': np.float16}[t['dtype']]).astype(np.float32)
    return a.astype(np.float64)
worst = 0
for f in sorted(glob.glob(sys.argv[1] + '/fx-*.safetensors')):
    n = os.path.basename(f)[3:-12]
    ref = load(f'tests/fixtures/{n}/bf16/reference.safetensors'); got = load(f)
    err = np.linalg.norm(got - ref) / np.linalg.norm(ref); worst = max(worst, err)
    print(f'fixture {n:22s} cuda bf16 rel L2 vs transformers {err:.2e} {"ok" if err < 1e-2 else "MISS"}')
print('worst', worst)
for f in glob.glob(sys.argv[1] + '/fx-*'): os.remove(f)
PY

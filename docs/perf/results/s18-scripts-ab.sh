#!/usr/bin/env bash
# ---- run A (gpu-bin/s/s18a.sh) ----
# Session 18 run A: f8t256c vs f8t256 (default), bf16 deepseek-v3 T=16384 in the same run.
set -u
L=$OUT/log.txt
run() { echo "### $(date +%T) $*" >> $L; "$@" >> $L 2>&1; echo "rc=$?" >> $L; }
mkdir -p /tmp/kc-cuda; cp gpu-bin/cuda/kcache/* /tmp/kc-cuda/
export MOE_KERNEL_CACHE=/tmp/kc-cuda
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.draw,temperature.gpu --format=csv >> $L
run timeout 120 gpu-bin/cuda/gpu_fp8_tile --test-threads=1 --nocapture
Q="--shapes deepseek-v3 --tokens 4096,16384 --quant fp8-block --target-ms 10"
for r in 1 2; do
  run timeout 90 gpu-bin/cuda/gpu_bench $Q --out $OUT/fp8-def-$r.json
  run timeout 90 env MOE_CUDA_F8_TILE=t256c gpu-bin/cuda/gpu_bench $Q --out $OUT/fp8-c-$r.json
done
run timeout 90 gpu-bin/cuda/gpu_bench --shapes deepseek-v3 --tokens 16384 --target-ms 10 --out $OUT/bf16.json
for m in 4 16; do
  run timeout 60 env MOE_CUDA_GROUP_M=$m gpu-bin/cuda/gpu_bench --shapes deepseek-v3 --tokens 16384 --quant fp8-block --target-ms 10
  run timeout 60 env MOE_CUDA_GROUP_M=$m gpu-bin/cuda/gpu_bench --shapes qwen3-30b-a3b --tokens 4096 --target-ms 10
done
run timeout 60 gpu-bin/cuda/gpu_bench --shapes qwen3-30b-a3b --tokens 4096 --target-ms 10
run timeout 120 env MOE_CUDA_F8_TILE=t256c gpu-bin/cuda/gpu_quant --test-threads=1
for t in t256 t256c; do
timeout 100 env MOE_CUDA_F8_TILE=$t ncu --clock-control none --kernel-name regex:'gemm_(gate_up|down)_bf16_f8t256' --launch-skip 2 --launch-count 2 \
  --metrics gpu__time_duration.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_elapsed,smsp__cycles_active.avg \
  gpu-bin/cuda/gpu_bench --shapes deepseek-v3 --tokens 16384 --quant fp8-block --target-ms 2 > $OUT/ncu-$t.log 2>&1
echo "ncu $t rc=$?" >> $L
done
echo done >> $L
# ---- run B (gpu-bin/s/s18b.sh) ----
# Session 18 run B: where MXFP4 gpt-oss T = 1 goes (every kernel of a forward), the decode ratios
# refreshed in one run, qwen3 T = 4096 bf16, and gpu_quant on the default tiles.
# (the same preamble as run A: set -u, $L, run(), the kernel cache copy, nvidia-smi)
G="--shapes gpt-oss-20b --tokens 1,2,16 --target-ms 10"
for r in 1 2; do
  run timeout 60 gpu-bin/cuda/gpu_bench $G --quant mxfp4 --out $OUT/mx-$r.json
  run timeout 60 gpu-bin/cuda/gpu_bench $G --out $OUT/bf16-oss-$r.json
done
run timeout 60 gpu-bin/cuda/gpu_bench --shapes qwen3-30b-a3b --tokens 4096 --target-ms 10 --out $OUT/qwen3.json
timeout 120 ncu --clock-control none --launch-skip 200 --launch-count 40 --metrics gpu__time_duration.sum \
  gpu-bin/cuda/gpu_bench --shapes gpt-oss-20b --tokens 1 --quant mxfp4 --target-ms 2 > $OUT/ncu-mx-t1.log 2>&1
echo "ncu mx rc=$?" >> $L
run timeout 150 gpu-bin/cuda/gpu_quant --test-threads=1
echo done >> $L

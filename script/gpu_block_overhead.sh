#!/usr/bin/env bash
# RingX's per-call and per-block cost against the attention kernel alone, on one GPU, in one call;
# logs under $OUT, a short summary last:
#   bash script/gpu_block_overhead.sh
# 1. the fused-kernel GPU tests; 2. host microseconds per call of each step of the block path and
#    of the fused kernels' launches (script/fused_tune.py --host_only);
# 3. a rank's 4 blocks fwd+bwd through RingX's block path (each partial merged as it comes, and
#    grouped) against the bare kernel, 1K-8K tokens per block, 5 and 20 passes queued, and as
#    CUDA-graph replays;
# 4. profiled queued passes at 2K and 4K (device time by kernel, idle gaps by pass);
# 5. world size 1 against the kernel (ringX.bench), the four functions in reverse order.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_block_overhead}
PY=${RINGX_PYTHON:-python}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$OUT"
step() {  # name command...
  local name=$1; shift
  echo "== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1 || echo "== $name FAILED (rc $?)"
}
step tests "$PY" -m pytest -q test/test_fused.py
step host "$PY" script/block_overhead.py --host --sizes 2048 4096
step launch "$PY" script/fused_tune.py --sizes 2048 --host_only
step blocks "$PY" script/block_overhead.py --sizes 1024 2048 4096 8192 --repeats 15
step blocks_q20 "$PY" script/block_overhead.py --sizes 2048 4096 --repeats 12 --queued 20
step blocks_graph "$PY" script/block_overhead.py --sizes 1024 2048 4096 8192 --repeats 15 --graph
step profile "$PY" script/block_overhead.py --sizes 2048 4096 --repeats 5 --profile
step ws1 "$PY" -m ringX.bench --nproc 1 --heads 32 --kv-heads 8 --headdim 128 --modes fwd_bwd --causal both \
    --seqlens 8192 32768 --methods ringX4 ringX3 ringX2 ringX1 --warmup-s 0.3 --repeats 15 --out "$OUT/ws1"
tail -n 3 "$OUT/tests.log"
cat "$OUT/host.log"
grep -A14 "host us per call" "$OUT/launch.log"
for f in blocks blocks_q20 blocks_graph; do echo "-- $f"; grep -v USDT "$OUT/$f.log" | tail -n 12; done
grep -E "^-- |idle between|device us a pass" "$OUT/profile.log"
grep -v USDT "$OUT/ws1.log" | tail -n 14

#!/usr/bin/env bash
# The 4-GPU attention benchmark recorded in docs/benchmarks.md (Llama3-8B attention: 32 query
# heads, 8 kv heads, head dim 128, bf16, batch 1, forward+backward). Results under ${OUT:-runs}.
#   bash script/gpu_bench.sh short   S = 32K, 64K, 128K, all methods, causal and full
#   bash script/gpu_bench.sh long    S = 256K all methods; S = 1M for ringX3/ringX4 (causal)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs}; py=${RINGX_PYTHON:-python3}; n=${NPROC:-4}
export PYTHONUNBUFFERED=1
common=(--nproc "$n" --heads 32 --kv-heads 8 --headdim 128 --dtype bfloat16 --modes fwd_bwd)
case "${1:-short}" in
  short) timeout 540 "$py" -m ringX.bench "${common[@]}" --seqlens 32768 65536 131072 --causal both \
           --warmup 2 --repeats 5 --out "$out/short" ;;
  long)  timeout 300 "$py" -m ringX.bench "${common[@]}" --seqlens 262144 --causal both \
           --methods ringX1 ringX2 ringX3 ringX4 native-allgather native-alltoall --warmup 1 --repeats 3 --out "$out/s256k"
         timeout 280 "$py" -m ringX.bench "${common[@]}" --seqlens 131072 1048576 --causal true \
           --methods ringX3 ringX4 --single-max-seqlen 131072 --check-max-seqlen 131072 \
           --warmup 1 --repeats 2 --out "$out/s1m" ;;
  *) echo "usage: $0 short|long" >&2; exit 2 ;;
esac

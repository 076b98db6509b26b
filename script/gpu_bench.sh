#!/usr/bin/env bash
# The 4-GPU attention benchmark recorded in docs/benchmarks.md (Llama3-8B attention: 32 query
# heads, 8 kv heads, head dim 128, bf16, batch 1, forward+backward). Results under ${OUT:-runs}.
#   bash script/gpu_bench.sh short   S = 32K, 64K, 128K, all methods, causal and full
#   bash script/gpu_bench.sh long    S = 256K all methods; S = 1M for ringX3/ringX4 (causal)
#   NPROCS="2 4 8" bash script/gpu_bench.sh scaling   S = 128K, 256K, all methods, at each N
#   NPROC=8 bash script/gpu_bench.sh long8   S = 512K all methods; 1M, 2M ringX4 causal; 1M ringX1 full
#   bash script/gpu_bench.sh profile  8K tokens per GPU causal and 32K per GPU full (S = 32K and 128K on 4
#                                     GPUs), every method timed and then profiled (--profile: compute /
#                                     communication / exposed / idle ms, traces, largest kernels,
#                                     OUT/timelines.txt: rank 0's kernels in time order per stream)
#   bash script/gpu_bench.sh copy     8K and 32K tokens per GPU, ringX1/2/4 with collectives and with
#                                     RINGX_TRANSPORT=copy (NAME+copy), causal and full
# Then: python script/bench_table.py $OUT/*/results.csv --seqlen 262144 (scaling table and plot).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs}; py=${RINGX_PYTHON:-python3}; n=${NPROC:-4}
export PYTHONUNBUFFERED=1
shape=(--heads 32 --kv-heads 8 --headdim 128 --dtype bfloat16 --modes fwd_bwd)
common=(--nproc "$n" "${shape[@]}")
case "${1:-short}" in
  short) timeout 540 "$py" -m ringX.bench "${common[@]}" --seqlens 32768 65536 131072 --causal both \
           --warmup 2 --repeats 5 --out "$out/short" ;;
  long)  timeout 300 "$py" -m ringX.bench "${common[@]}" --seqlens 262144 --causal both \
           --methods ringX1 ringX2 ringX3 ringX4 native-allgather native-alltoall --warmup 1 --repeats 3 --out "$out/s256k"
         timeout 280 "$py" -m ringX.bench "${common[@]}" --seqlens 131072 1048576 --causal true \
           --methods ringX3 ringX4 --single-max-seqlen 131072 --check-max-seqlen 131072 \
           --warmup 1 --repeats 2 --out "$out/s1m" ;;
  scaling)
         for k in ${NPROCS:-2 4 8}; do
           timeout 560 "$py" -m ringX.bench --nproc "$k" "${shape[@]}" --seqlens 131072 262144 --causal both \
             --warmup 1 --repeats 2 --out "$out/scale_N$k"
         done ;;
  long8) # single-GPU time measured up to 256K; beyond, the ideal is extrapolated from it by FLOPs
         timeout 280 "$py" -m ringX.bench "${common[@]}" --seqlens 131072 262144 524288 --causal both \
           --single-max-seqlen 262144 --check-max-seqlen 262144 --warmup 1 --repeats 2 --out "$out/long_N${n}_512k"
         timeout 150 "$py" -m ringX.bench "${common[@]}" --seqlens 262144 1048576 2097152 --causal true \
           --methods ringX4 --single-max-seqlen 262144 --check-max-seqlen 262144 \
           --warmup 1 --repeats 1 --out "$out/long_N${n}_2m"
         timeout 100 "$py" -m ringX.bench "${common[@]}" --seqlens 262144 1048576 --causal false \
           --methods ringX1 --single-max-seqlen 262144 --check-max-seqlen 262144 \
           --warmup 1 --repeats 1 --out "$out/long_N${n}_1m_full" ;;
  profile) # the two shapes of the missed targets, per GPU: causal at 8K tokens per GPU (S = 32K on 4),
           # full attention at 32K tokens per GPU (S = 128K on 4); then each rank-0 trace's largest kernels
         timeout 280 "$py" -m ringX.bench "${common[@]}" --seqlens $((8192 * n)) --causal true --warmup 2 \
           --repeats 5 --profile --out "$out/profile_causal"
         timeout 280 "$py" -m ringX.bench "${common[@]}" --seqlens $((32768 * n)) --causal false --warmup 2 \
           --repeats 5 --profile --out "$out/profile_full"
         "$py" -m ringX.bench.profile "$out"/profile_*/traces/*_rank0.json
         "$py" -m ringX.bench.profile --top 4 --timeline "$out"/profile_*/traces/*_rank0.json > "$out/timelines.txt"
         echo "kernels in time order, one column per stream: $out/timelines.txt" ;;
  copy)  timeout 540 "$py" -m ringX.bench "${common[@]}" --seqlens $((8192 * n)) $((32768 * n)) --causal both \
           --methods ringX1 ringX1+copy ringX2 ringX2+copy ringX4 ringX4+copy --warmup 2 --repeats 7 \
           --out "$out/copy" ;;
  *) echo "usage: $0 short|long|scaling|long8|profile|copy" >&2; exit 2 ;;
esac

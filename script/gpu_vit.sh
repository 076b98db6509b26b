#!/usr/bin/env bash
# Climate ViT on one GPU node: the GPU targets of app/vit, on a small synthetic dataset at the
# full 360 x 720 grid (made once under $DATA). Each run's metrics.jsonl lands in $OUT/<name>/;
# a table of samples/s, step time and peak memory per GPU at the end.
#   bash script/gpu_vit.sh                  the default RUNS below (4 GPUs)
#   RUNS="p2_ringX1:4:mp_p2_ringX:1024:8:ringX1:6" bash script/gpu_vit.sh
# A run is NAME:NGPU:CONFIG:EMBED:HEADS:ATTN:STEPS[:EXTRA FLAGS, commas for spaces]; each uses
# cp = NGPU. Steps 2.. are timed (the first two include warm-up).
set -uo pipefail
OUT=${OUT:-runs/gpu_vit}
PY=${RINGX_PYTHON:-python}
DATA=${DATA:-$OUT/data}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$OUT"
DEFAULT_RUNS="p2_e1024_ringX1:4:mp_p2_ringX:1024:8:ringX1:6
p2_e1024_allgather:4:mp_p2_ringX:1024:8:allgather:6
p2_e1024_ringX1_1gpu:1:mp_p2_ringX:1024:8:ringX1:5
p2_e1024_ringX1_2gpu:2:mp_p2_ringX:1024:8:ringX1:5
p1_e1024_ringX1:4:mp_p1_ringX:1024:8:ringX1:4
p1_e1024_allgather:4:mp_p1_ringX:1024:8:allgather:4
p2_e4096_ringX1:4:mp_p2_ringX:4096:32:ringX1:4
p1_e4096_ringX1_fsdp_ac:4:mp_p1_ringX:4096:32:ringX1:3:--dp_engine,fsdp,--ac,full"
[ -f "$DATA/meta.json" ] || "$PY" app/vit/make_data.py "$DATA" --steps-per-year 4 --years 2 --spinup 20 --substeps 1 > "$OUT/make_data.log" 2>&1 \
  || { tail -5 "$OUT/make_data.log"; exit 1; }
names=()
while IFS=: read -r name ngpu config embed heads attn steps extra; do
  [ -n "$name" ] || continue
  names+=("$name")
  rm -rf "${OUT:?}/$name"
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$ngpu" app/vit/train.py --config "$config" \
    --embed "$embed" --heads "$heads" --attn "$attn" --context_parallel "$ngpu" --steps "$steps" \
    --data "$DATA" --no_checkpoint --out "$OUT/$name" ${extra//,/ } > "$OUT/$name.log" 2>&1 \
    || { echo "$name FAILED"; grep -m3 -E "Error|error" "$OUT/$name.log"; }
done <<< "${RUNS:-$DEFAULT_RUNS}"
"$PY" - "$OUT" "${names[@]}" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'run':28s} {'steps':>5s} {'samples/s':>9s} {'step s':>7s} {'mem GB':>7s}  loss")
for name in sys.argv[2:]:
    try:
        rows = [json.loads(l) for l in open(f"{out}/{name}/metrics.jsonl")]
    except OSError:
        print(f"{name:28s} (no metrics)")
        continue
    steady = rows[2:] or rows
    sps = sorted(r["samples_per_s"] for r in steady)[len(steady) // 2]
    print(f"{name:28s} {len(rows):5d} {sps:9.3f} {1 / sps:7.2f} {max(r['max_mem_gb'] or 0 for r in rows):7.1f}  "
          f"{rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")
PY

#!/usr/bin/env bash
# Climate ViT on one GPU node: samples/s and memory of ringX1 against the all-gather baseline at
# the same config (default mp_p2 = 64,800 tokens, emb1024), on a small synthetic dataset at the
# full 360 x 720 grid. Results under $OUT/<attn>/metrics.jsonl, a table at the end.
#   NGPU=4 bash script/gpu_vit.sh              CONFIG=mp_p1_ringX EMBED=1024 STEPS=6 ...
set -uo pipefail
OUT=${OUT:-runs/gpu_vit}
NGPU=${NGPU:-4}
PY=${RINGX_PYTHON:-python}
DATA=${DATA:-$OUT/data}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$OUT"
[ -f "$DATA/meta.json" ] || "$PY" app/vit/make_data.py "$DATA" --steps-per-year 4 --years 2 --spinup 20 --substeps 1 > "$OUT/make_data.log" 2>&1 \
  || { tail -5 "$OUT/make_data.log"; exit 1; }
for attn in ${ATTNS:-ringX1 allgather}; do
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" app/vit/train.py --config "${CONFIG:-mp_p2_ringX}" \
    --embed "${EMBED:-1024}" --heads "${HEADS:-8}" --attn "$attn" --context_parallel "$NGPU" --steps "${STEPS:-6}" \
    --data "$DATA" --no_checkpoint --out "$OUT/$attn" > "$OUT/$attn.log" 2>&1 || { echo "$attn FAILED"; grep -m3 Error "$OUT/$attn.log"; }
done
"$PY" - "$OUT" ${ATTNS:-ringX1 allgather} <<'PY'
import json, sys
out = sys.argv[1]
for attn in sys.argv[2:]:
    try:
        rows = [json.loads(l) for l in open(f"{out}/{attn}/metrics.jsonl")]
    except OSError:
        continue
    steady = rows[2:] or rows
    sps = sorted(r["samples_per_s"] for r in steady)[len(steady) // 2]
    print(f"{attn:10s} steps {len(rows)}  median samples/s {sps:.3f}  step {1 / sps:.2f} s  "
          f"max mem {max(r['max_mem_gb'] or 0 for r in rows):.1f} GB  loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}")
PY

#!/usr/bin/env bash
# GPT app on one GPU node (default 4 GPUs): the GPU targets of app/gpt, results under $OUT.
#   bash script/gpu_gpt.sh 8b       Llama3-8B at 128K tokens, cp=4: step time, tokens/s/GPU, MFU, memory
#   bash script/gpu_gpt.sh passkey  passkey retrieval: 2K-token warm-up (dp=4), then 32K tokens with cp=4
# Each run's metrics.jsonl (and eval.json) is copied to $OUT/<name>/.
set -uo pipefail
what=${1:-8b}
OUT=${OUT:-runs/gpu_gpt}
NGPU=${NGPU:-4}
PY=${RINGX_PYTHON:-python}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
run() { "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" app/gpt/train.py "$@"; }
summary() {
  "$PY" - "$1" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
for r in rows:
    print(f"step {r['step']:5d} loss {r['loss']:.4f} tok/s/GPU {r['tokens_per_s'] / int(__import__('os').environ.get('NGPU', 4)):8.0f} "
          f"TFLOP/s/GPU {r['tflops_per_gpu']:6.1f} MFU {r['mfu']:.3f} mem {r['max_mem_gb'] or 0:6.1f} GB"
          + (f" passkey {r['passkey_acc']:.3f}" if "passkey_acc" in r else ""))
PY
}
case "$what" in
8b)
  for ac in ${AC_MODES:-selective full}; do
    dir=$OUT/8b_128k_$ac
    rm -rf "$dir"
    if run --config llama3-8b-128k --context_parallel "$NGPU" --attn "${ATTN:-ringX4}" --steps "${STEPS:-4}" \
        --ac "$ac" --loss_chunk 8192 --mlp_chunk "${MLP_CHUNK:-0}" --dtype bfloat16 --warmup 1 --out "$dir" \
        --no_checkpoint ${EXTRA:-} > "$dir.log" 2>&1; then
      echo "== llama3-8b-128k cp=$NGPU ac=$ac"; summary "$dir"
    else
      echo "== llama3-8b-128k cp=$NGPU ac=$ac FAILED"; grep -m3 -E "Error|error" "$dir.log"
    fi
  done;;
passkey)
  dir=$OUT/passkey
  rm -rf "$dir"
  run --config passkey --seq_len "${WARM_LEN:-512}" --batch "${WARM_BATCH:-64}" --attn sdpa --steps "${WARM_STEPS:-3000}" \
      --lr 1e-3 --warmup 100 --passkey_loss answer --eval_every 500 --dtype bfloat16 --out "$dir" \
      > "$dir.warm.log" 2>&1 || { tail -20 "$dir.warm.log"; exit 1; }
  echo "== passkey warm-up: ${WARM_LEN:-512} tokens, dp=$NGPU"; summary "$dir" | awk 'NR % 250 == 0 || /passkey/'
  run --config passkey --seq_len 32768 --context_parallel "$NGPU" --attn "${PASSKEY_ATTN:-ringX2}" --resume --passkey_loss answer \
      --batch "${LONG_BATCH:-4}" --steps $(( ${WARM_STEPS:-3000} + ${LONG_STEPS:-300} )) --lr 3e-4 --eval_every 100 --dtype bfloat16 \
      --out "$dir" > "$dir.long.log" 2>&1 || { tail -20 "$dir.long.log"; exit 1; }
  run --config passkey --seq_len 32768 --context_parallel "$NGPU" --attn "${PASSKEY_ATTN:-ringX2}" --eval_only --eval_prompts 64 \
      --dtype bfloat16 --out "$dir" > "$dir.eval.log" 2>&1 || { tail -20 "$dir.eval.log"; exit 1; }
  echo "== passkey at 32K tokens, cp=$NGPU (${PASSKEY_ATTN:-ringX2}, contiguous: the key is on another rank than the question)"; summary "$dir" | tail -n "${LONG_STEPS:-300}" | awk 'NR % 50 == 0 || /passkey/'
  echo "== final evaluation, 64 held-out prompts, key in the first quarter:"; cat "$dir/eval.json";;
*) echo "usage: $0 8b|passkey" >&2; exit 2;;
esac

#!/usr/bin/env bash
# GPT app on one GPU node (default 4 GPUs): the GPU targets of app/gpt, results under $OUT.
#   bash script/gpu_gpt.sh 8b       Llama3-8B at 128K tokens, cp=4: step time, tokens/s/GPU, MFU, memory
#   LAYERS=4 bash script/gpu_gpt.sh 1m   one step of Llama3-8B (depth overridable) at 1,048,576 tokens, cp=4
#   bash script/gpu_gpt.sh passkey  passkey retrieval: 256-token stage (dp=4), then 2K, 16K and 32K tokens with cp=4
#                                   (PASSKEY_DTYPE=float32 trains in float32; STAGES, STAGE_WARMUP: see below)
# Each run's metrics.jsonl (and eval.json) is copied to $OUT/<name>/.
set -uo pipefail
what=${1:-8b}
OUT=${OUT:-runs/gpu_gpt}
NGPU=${NGPU:-4}
PY=${RINGX_PYTHON:-python}
mkdir -p "$OUT"
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
1m)
  # One step at 1,048,576 tokens (LAYERS overrides the depth: a probe of time and memory per layer
  # when a full 32-layer step does not fit the time at hand).
  dir=$OUT/8b_1m_L${LAYERS:-32}
  rm -rf "$dir"
  if run --config llama3-8b-1m --n_layers "${LAYERS:-32}" --context_parallel "$NGPU" --attn "${ATTN:-ringX4}" \
      --steps "${STEPS:-2}" --ac full --loss_chunk 8192 --mlp_chunk "${MLP_CHUNK:-65536}" --dtype bfloat16 --warmup 1 \
      --out "$dir" --no_checkpoint ${EXTRA:-} > "$dir.log" 2>&1; then
    echo "== llama3-8b-1m (${LAYERS:-32} layers) cp=$NGPU ac=full"; summary "$dir"
  else
    echo "== llama3-8b-1m (${LAYERS:-32} layers) cp=$NGPU FAILED"; grep -m3 -E "Error|error" "$dir.log"
  fi;;
passkey)
  # Curriculum: stage 1 at WARM_LEN tokens on dp=$NGPU ranks (sdpa), then each stage of STAGES
  # ("tokens:batch:steps:lr ...") with cp=$NGPU, resumed from the previous stage. The defaults are
  # the recorded run (docs/benchmarks.md): 256 tokens, then 2K, 16K and 32K with RoPE scaled from
  # 256 (EXTEND_ROPE=1: --rope_scale_from WARM_LEN); keys in the first quarter (PASSKEY_DEPTH),
  # like the held-out prompts. Each longer stage warms its rate up again over STAGE_WARMUP steps
  # (--warmup_start), so that the first batches at a new length do not take full-rate steps.
  dir=$OUT/passkey
  rm -rf "$dir"
  attn=${PASSKEY_ATTN:-ringX2} warm_len=${WARM_LEN:-256} depth=${PASSKEY_DEPTH:-0,0.25} dtype=${PASSKEY_DTYPE:-bfloat16}
  rope=(); [ "${EXTEND_ROPE:-1}" = 1 ] && rope=(--rope_scale_from "$warm_len")
  run --config passkey --seq_len "$warm_len" --batch "${WARM_BATCH:-4}" --attn sdpa --steps "${WARM_STEPS:-1000}" \
      --lr 1e-3 --warmup 100 --passkey_loss answer --passkey_depth "$depth" --eval_every 500 --dtype "$dtype" --out "$dir" \
      > "$dir.warm.log" 2>&1 || { tail -20 "$dir.warm.log"; exit 1; }
  echo "== passkey stage 1: $warm_len tokens, dp=$NGPU (${SECONDS} s so far)"; summary "$dir" | awk '/passkey/' | tail -3
  total=${WARM_STEPS:-1000}
  for stage in ${STAGES:-2048:4:150:3e-4 16384:4:200:3e-4 32768:4:300:3e-4}; do
    IFS=: read -r len batch steps lr <<< "$stage"
    start=$total; total=$(( total + steps ))
    run --config passkey --seq_len "$len" --context_parallel "$NGPU" --attn "$attn" --resume --passkey_loss answer \
        --passkey_depth "$depth" "${rope[@]}" --warmup "${STAGE_WARMUP:-20}" --warmup_start "$start" \
        --batch "$batch" --steps "$total" --lr "$lr" --eval_every "${EVAL_EVERY:-50}" --dtype "$dtype" \
        --out "$dir" > "$dir.$len.log" 2>&1 || { tail -20 "$dir.$len.log"; exit 1; }
    echo "== passkey stage: $len tokens, cp=$NGPU ($attn), batch $batch, lr $lr, steps to $total (${SECONDS} s so far)"
    summary "$dir" | tail -n "$steps" | awk 'NR == 1 || /passkey/'
  done
  run --config passkey --seq_len "$len" --context_parallel "$NGPU" --attn "$attn" --eval_only --eval_prompts 64 \
      --passkey_loss answer "${rope[@]}" --dtype "$dtype" --out "$dir" > "$dir.eval.log" 2>&1 || { tail -20 "$dir.eval.log"; exit 1; }
  echo "== final evaluation at $len tokens, cp=$NGPU ($attn), 64 held-out prompts, key in the first quarter:"
  cat "$dir/eval.json";;
*) echo "usage: $0 8b|1m|passkey" >&2; exit 2;;
esac

#!/usr/bin/env bash
# Generation from a sequence-sharded KV cache on one GPU node (app/gpt/generate.py), results under $OUT.
#   bash script/gpu_generate.sh            world size 1, Llama3-8B shapes (random weights), bf16:
#                                          prefill at 32K and 128K tokens, decode at 128K context,
#                                          each checked against one dense forward (--check_dense; at 32K
#                                          also both against float32), timed on the second of two runs;
#                                          decode replays one CUDA graph per token, blocks compiled
#   NGPU=4 bash script/gpu_generate.sh cp  cp = 4: prefill 128K and 512K, decode at 128K and 1M context
# Each run's generated.json lands in $OUT/<name>/; a line per run sums it up.
set -uo pipefail
cd "$(dirname "$0")/.."
what=${1:-one}
OUT=${OUT:-runs/gpu_generate}
NGPU=${NGPU:-4}
PY=${RINGX_PYTHON:-python}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}
mkdir -p "$OUT"
row() {  # name nproc prompt_len new_tokens [flags...]
  local name=$1 nproc=$2 plen=$3 new=$4; shift 4
  "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" app/gpt/generate.py \
      --config "${CONFIG:-llama3-8b}" --random_prompt "1,$plen" --max_new_tokens "$new" \
      --context_parallel "$nproc" --attn "${ATTN:-ringX3}" --dtype bfloat16 --out "$OUT/$name" "$@" \
      > "$OUT/$name.log" 2>&1 || { echo "== $name FAILED"; grep -m3 -E "Error|error" "$OUT/$name.log"; return; }
  "$PY" - "$OUT/$name/generated.json" "$name" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]:14s} prefill {r['prefill_seconds']:7.2f} s ({r['prefill_tokens_per_s']:9.0f} tok/s)  "
      f"decode {r['decode_ms_per_token']:7.2f} ms/token (bound {r['decode_bound_ms']:6.2f}, x{r['decode_over_bound']:.2f}; "
      f"first step {r['decode_first_step_ms']:.0f} ms)  "
      f"peak {r['peak_memory_gb']:6.1f} GB" + (f"  dense rel err {r['dense_logits_max_rel_err']:.2e}"
                                               if 'dense_logits_max_rel_err' in r else "")
      + (f"  vs fp32: ringX {r['fp32_logits_max_rel_err']:.2e}, dense {r['dense_vs_fp32_max_rel_err']:.2e}"
         if 'fp32_logits_max_rel_err' in r else ""))
PY
}
case "$what" in
one)
  row w1_32k 1 32768 16 --check_dense --check_fp32 --repeat 2 --compile
  row w1_128k 1 131072 32 --check_dense --repeat 2 --compile;;
cp)
  row cp${NGPU}_128k "$NGPU" 131072 32
  row cp${NGPU}_512k "$NGPU" 524288 16 --prefill_chunk 131072
  row cp${NGPU}_1m "$NGPU" 1048576 16 --prefill_chunk 131072;;
*) echo "usage: $0 [one|cp]"; exit 2;;
esac

#!/usr/bin/env bash
# On a GPU node: the whole test suite with NCCL, one algorithm's test under torchrun and under
# mpirun, and the self-check at Llama3-8B attention shapes. Logs go to ${OUT:-runs/gpu_check}.
# PYTEST_ARGS (default: test) selects what pytest runs; SKIP_LAUNCHERS=1 stops after pytest.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-runs/gpu_check}; mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${RINGX_PYTHON:-python3}
ngpu=$($py -c "import torch; print(torch.cuda.device_count())")
$py -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name(0))" | tee "$out/env.log"
status=0
step() { local name=$1; shift; echo "== $name: $*"; "$@" 2>&1 | tee "$out/$name.log"; local rc=${PIPESTATUS[0]}; echo "== $name rc=$rc"; [ "$rc" = 0 ] || status=1; }
step pytest timeout ${PYTEST_TIMEOUT:-900} $py -m pytest -q -rs ${PYTEST_ARGS:-test}
[ "${SKIP_LAUNCHERS:-0}" = 1 ] && { echo "== summary: status=$status"; exit $status; }
step torchrun timeout 300 torchrun --nproc_per_node "$ngpu" test/test_ringX3_attn_func.py
step mpirun timeout 300 mpirun --allow-run-as-root -n "$ngpu" $py test/test_ringX4_attn_func.py
step selfcheck timeout 300 $py -m ringX.selfcheck --nproc "$ngpu" --batch 1 --seqlen-per-rank 2048 --heads 32 --kv-heads 8 --headdim 128
echo "== summary: status=$status"
exit $status

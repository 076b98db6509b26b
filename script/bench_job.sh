# Shared body of submit_frontier.sh and submit_cuda.sh (sourced inside the batch job).
# Runs the attention benchmark for one algorithm on every GPU (or CPU rank) of the allocation
# and writes ${RINGX_LOG_DIR}/<algo>_N<nodes>.log plus the benchmark's CSV/JSON/plot under
# ${RINGX_RUN_DIR}/<algo>_N<nodes>_<jobid>/.
# Inputs: $1 = algorithm (ringX1_attn .. ringX4_attn, ringX1 .. ringX4, native-allgather,
# native-alltoall; past one node the two-level forms hybrid<Ni>-ringXk (heads over Ni GPUs of a
# node, ringXk over the rest) and ringX3-nodes<Ni> (the hierarchical ringX3)), and these
# environment variables:
#   RINGX_MODE=gpu|cpu      cpu: gloo ranks on CPUs, tiny sweep (runs on any Slurm)
#   RINGX_GPUS_PER_NODE     GPUs (= ranks) per node in gpu mode (default 8)
#   RINGX_CPU_RANKS         ranks in cpu mode (default 4)
#   RINGX_SWEEP=seed|tiny|none, RINGX_BENCH_ARGS   extra `python -m ringX.bench` arguments
#   RINGX_PYTHON            interpreter (default: python3 on PATH)
#   RINGX_ROOT              checkout (default: found from the submit directory)
#   RINGX_SRUN_GPU_FLAGS    extra srun flags in gpu mode (set by the platform script)
set -uo pipefail
ringx_algo=${1:-}
if [ -z "$ringx_algo" ]; then
  echo "usage: sbatch $0 ringX1_attn|ringX2_attn|ringX3_attn|ringX4_attn|native-allgather|native-alltoall|hybrid8-ringX3|ringX3-nodes8" >&2
  exit 2
fi
ringx_method=${ringx_algo%_attn}
case "$ringx_method" in
  ringX1|ringX2|ringX3|ringX4|native-allgather|native-alltoall) ;;
  hybrid2-ringX[1-4]|hybrid4-ringX[1-4]|hybrid8-ringX[1-4]|ringX3-nodes2|ringX3-nodes4|ringX3-nodes8) ;;
  *) echo "unknown algorithm '$ringx_algo' (expected ringX1_attn .. ringX4_attn, native-allgather, native-alltoall, hybrid{2,4,8}-ringXk, ringX3-nodes{2,4,8})" >&2; exit 2;;
esac
submit=${SLURM_SUBMIT_DIR:-$PWD}
if [ -n "${RINGX_ROOT:-}" ]; then root=$RINGX_ROOT
elif [ -f "$submit/setup_dist_vars.sh" ]; then root=$(cd "$submit/.." && pwd)
elif [ -f "$submit/script/setup_dist_vars.sh" ]; then root=$submit
else echo "cannot find the RingX checkout from $submit; set RINGX_ROOT" >&2; exit 2; fi
mode=${RINGX_MODE:-gpu}
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
py=${RINGX_PYTHON:-python3}
logdir=${RINGX_LOG_DIR:-$root/logs}
rundir=${RINGX_RUN_DIR:-$root/runs/bench}/${ringx_method}_N${nodes}_${SLURM_JOB_ID:-local}
mkdir -p "$logdir"
log=$logdir/${ringx_method}_N${nodes}.log
if [ "$mode" = cpu ]; then
  ntasks=${RINGX_CPU_RANKS:-4}
  srun_flags=(-N "$nodes" -n "$ntasks" -c 1 --kill-on-bad-exit=1)
  sweep=${RINGX_SWEEP:-tiny}
else
  gpn=${RINGX_GPUS_PER_NODE:-8}
  ntasks=$((nodes * gpn))
  # shellcheck disable=SC2206
  srun_flags=(-N "$nodes" -n "$ntasks" --ntasks-per-node="$gpn" --gpus-per-node="$gpn" --kill-on-bad-exit=1 ${RINGX_SRUN_GPU_FLAGS:-})
  sweep=${RINGX_SWEEP:-seed}
  # the seed project's sweep: 32 heads (no GQA) of dim 128, causal on and off
  RINGX_BENCH_ARGS="--heads 32 --kv-heads 32 --headdim 128 ${RINGX_BENCH_ARGS:-}"
fi
{
  echo "# ringX benchmark: algo=$ringx_method mode=$mode nodes=$nodes ranks=$ntasks job=${SLURM_JOB_ID:-} $(date -u +%FT%TZ)"
  echo "# commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "# srun ${srun_flags[*]}"
} > "$log"
# Single quotes: $RINGX_ROOT etc. expand inside each task, after setup_dist_vars.sh ran.
export RINGX_ROOT=$root RINGX_BENCH_PY=$py RINGX_BENCH_METHOD=$ringx_method RINGX_BENCH_SWEEP=$sweep RINGX_BENCH_OUT=$rundir
# srun runs in the background so that the USR1 Slurm sends before the time limit (--signal=B:USR1@60
# in the submit scripts) is handled at once: the log says why the job ends and the ranks are
# stopped cleanly (TERM through srun) instead of being killed at the limit with no word.
stopped=""
trap 'stopped=1; echo "# USR1: the time limit is near; stopping the benchmark (results so far are in the log)" | tee -a "$log"; kill -TERM "$srun_pid" 2>/dev/null' USR1
srun "${srun_flags[@]}" bash -c 'source "$RINGX_ROOT/script/setup_dist_vars.sh" && cd "$RINGX_ROOT" && exec "$RINGX_BENCH_PY" -m ringX.bench --methods "$RINGX_BENCH_METHOD" --sweep "$RINGX_BENCH_SWEEP" --out "$RINGX_BENCH_OUT" '"${RINGX_BENCH_ARGS:-}" > >(tee -a "$log") 2>&1 &
srun_pid=$!
wait "$srun_pid"
rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; rc=$?; done   # a trapped signal interrupts wait
if [ -n "$stopped" ] && [ "$rc" -eq 0 ]; then rc=143; fi
echo "# exit $rc${stopped:+ (stopped by USR1 before the time limit)}" >> "$log"
exit "$rc"

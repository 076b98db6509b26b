# Shared body of the apps' Slurm job scripts (app/gpt/job.sb, app/vit/submit_frontier_cp.sh),
# sourced inside the batch job with $root set to the checkout:
#   source "$root/script/app_job.sh" gpt|vit PRESET [train.py flags]
# Runs app/<app>/train.py on every rank of the allocation (srun, --kill-on-bad-exit) into
# ${RINGX_RUN_DIR:-runs/<app>}/<preset>_<job id>, resuming when that directory holds a complete
# checkpoint; after a preempted exit (USR1/TERM: train.py checkpoints, writes OUT/preempted and
# exits 0) it requeues the job, which starts again under the same job id and resumes.
# Environment: RINGX_PLATFORM=frontier|cuda|cpu (script/platform_env.sh), RINGX_GPUS_PER_NODE,
# RINGX_CPU_RANKS (cpu mode, default 4), RINGX_PYTHON, RINGX_RUN_DIR, RINGX_CP_INNER (two-level
# cp across nodes: "node" = the ranks of one node, or a number; passed as --context_parallel_inner).
set -uo pipefail
ringx_app=$1
shift
config=${1:-}
if [ -z "$config" ]; then
  echo "usage: sbatch <job script> PRESET [train.py flags]   (presets: app/$ringx_app/configs/*.yaml)" >&2
  exit 2
fi
shift
platform=${RINGX_PLATFORM:-cuda}
source "$root/script/platform_env.sh" "$platform" || exit 2
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
if [ "$platform" = cpu ]; then
  srun_flags=(-N "$nodes" -n "${RINGX_CPU_RANKS:-4}" -c 1 --kill-on-bad-exit=1)
else
  gpn=${RINGX_GPUS_PER_NODE:-8}
  # shellcheck disable=SC2206
  srun_flags=(-N "$nodes" -n $((nodes * gpn)) --ntasks-per-node="$gpn" --gpus-per-node="$gpn"
              --kill-on-bad-exit=1 ${RINGX_SRUN_GPU_FLAGS:-})
fi
inner=${RINGX_CP_INNER:-}
if [ "$inner" = node ]; then                 # heads over each node's ranks, the ring across nodes
  if [ "$platform" = cpu ]; then inner=$(( ${RINGX_CPU_RANKS:-4} / nodes )); else inner=$gpn; fi
fi
two_level=()
if [ -n "$inner" ] && [ "$inner" != 1 ]; then two_level=(--context_parallel_inner "$inner"); fi
out=${RINGX_RUN_DIR:-$root/runs/$ringx_app}/${config}_${SLURM_JOB_ID:-local}
resume=()
if compgen -G "$out/checkpoints/step_*/manifest.json" >/dev/null; then resume=(--resume); fi
echo "# ringx-$ringx_app: preset=$config platform=$platform nodes=$nodes restart=${SLURM_RESTART_COUNT:-0} out=$out${two_level[*]:+ ${two_level[*]}} $(date -u +%FT%TZ)"
echo "# commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)"
export RINGX_ROOT=$root RINGX_APP_PY=${RINGX_PYTHON:-python3} RINGX_APP_TRAIN=app/$ringx_app/train.py
# exec: the signal Slurm sends to each task reaches train.py itself
srun "${srun_flags[@]}" bash -c 'source "$RINGX_ROOT/script/setup_dist_vars.sh" && cd "$RINGX_ROOT" && exec "$RINGX_APP_PY" "$RINGX_APP_TRAIN" "$@"' \
  train --config "$config" --out "$out" "${resume[@]}" "${two_level[@]}" "$@"
rc=$?
if [ "$rc" -eq 0 ] && [ -f "$out/preempted" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "# preempted after step $(cat "$out/preempted"): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"

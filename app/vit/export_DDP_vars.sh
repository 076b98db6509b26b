# Source inside each srun task (the seed project's name for script/setup_dist_vars.sh):
#   srun -n8 bash -c "source app/vit/export_DDP_vars.sh; python app/vit/train.py --context_parallel 8"
source "$(dirname "${BASH_SOURCE[0]}")/../../script/setup_dist_vars.sh"

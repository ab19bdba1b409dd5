# Sourced at the top of every ddr worker job of the slurm-a100 profile (job_script_prologue),
# like the original's scripts/setup-plg.sh. Adapt it to your site; keep it quiet and quick.
# The job runs the flow's own Python (the virtual environment's absolute path), so there is no
# environment to activate here.

# Compute nodes have no internet: `provision` fetched every asset on the login node beforehand.
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
# Caches on scratch rather than in $HOME (small quota on PLGrid).
if [ -n "${SCRATCH:-}" ]; then
  export XDG_CACHE_HOME="$SCRATCH/.cache"
  export HF_HOME="$SCRATCH/.cache/huggingface"
  export TORCH_HOME="$SCRATCH/.cache/torch"
fi
# Site modules, if your torch build needs them (pip's CUDA wheels do not):
# module load CUDA/12.4.0
# Site settings that are not secrets may live in .env beside this repository:
if [ -f .env ]; then
  set -a
  # shellcheck disable=SC1091
  . ./.env
  set +a
fi

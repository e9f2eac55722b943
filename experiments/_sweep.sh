# Shared by the per-table scripts: run one paper sweep, then the report on its folder.
# Usage (from a table script): run_sweep <experiment> [hydra overrides...]
# Environment: SWEEP_DIR (default outputs/<experiment>/multiruns/<time>), VLM_ADAPT (default vlm-adapt).
run_sweep() {
  local experiment=$1
  shift
  local sweep_dir=${SWEEP_DIR:-outputs/$experiment/multiruns/$(date +%Y-%m-%d_%H-%M-%S)}
  local status=0
  # shellcheck disable=SC2086  # VLM_ADAPT may be a command with arguments ("python -m vlm_adapt")
  ${VLM_ADAPT:-vlm-adapt} train -m "experiment=$experiment" "$@" "hydra.sweep.dir=$sweep_dir" || status=$?
  # the report is written even when jobs failed: it lists them and leaves them out of every table
  # shellcheck disable=SC2086
  ${VLM_ADAPT:-vlm-adapt} report "$sweep_dir" --latex || status=$?
  return "$status"
}

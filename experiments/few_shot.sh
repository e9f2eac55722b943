#!/usr/bin/env bash
# Few-shot curves: 11 CoOp datasets x shots 1,2,4,8,16 x seeds 1-3 (165 jobs per method),
# then `vlm-adapt report` on the sweep folder (report.md, CSV, LaTeX, PNG in <sweep>/report).
# Arguments are Hydra overrides: the method(s), a method's paper recipe, or a narrower sweep:
#   experiments/few_shot.sh method=zero_shot,coop
#   experiments/few_shot.sh +experiment@_global_=clipfit_few_shot
#   SWEEP_DIR=outputs/try experiments/few_shot.sh method=coop seed=1 backbone=vit_b16
# See experiments/README.md.
set -uo pipefail
source "$(dirname "$0")/_sweep.sh"
run_sweep paper_few_shot "$@"

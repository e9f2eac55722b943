#!/usr/bin/env bash
# Base-to-new table: 11 CoOp datasets x seeds 1-3, 16 shots of the base classes (33 jobs per method),
# then `vlm-adapt report` on the sweep folder (report.md, CSV, LaTeX, PNG in <sweep>/report).
# Arguments are Hydra overrides: the method(s), a method's paper recipe, or a narrower sweep:
#   experiments/base2new.sh method=zero_shot,coop
#   experiments/base2new.sh +experiment@_global_=clipfit_base2new
#   SWEEP_DIR=outputs/try experiments/base2new.sh method=coop seed=1 backbone=vit_b16
# See experiments/README.md.
set -uo pipefail
source "$(dirname "$0")/_sweep.sh"
run_sweep paper_base2new "$@"

#!/usr/bin/env bash
# Cross-dataset table: 16-shot ImageNet, tested on ImageNet + 10 datasets, seeds 1-3 (3 jobs per method),
# then `vlm-adapt report` on the sweep folder (report.md, CSV, LaTeX, PNG in <sweep>/report).
# Arguments are Hydra overrides: the method(s), a method's paper recipe, or a narrower sweep:
#   experiments/cross_dataset.sh method=zero_shot,coop
#   experiments/cross_dataset.sh +experiment@_global_=skip_tuning_cross_dataset
#   SWEEP_DIR=outputs/try experiments/cross_dataset.sh method=coop seed=1 backbone=vit_b16
# See experiments/README.md.
set -uo pipefail
source "$(dirname "$0")/_sweep.sh"
run_sweep paper_cross_dataset "$@"

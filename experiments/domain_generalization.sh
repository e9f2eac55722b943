#!/usr/bin/env bash
# Domain generalization table: 16-shot ImageNet, tested on ImageNet, -V2, -Sketch, -A, -R, seeds 1-3 (3 jobs per method),
# then `vlm-adapt report` on the sweep folder (report.md, CSV, LaTeX, PNG in <sweep>/report).
# Arguments are Hydra overrides: the method(s), a method's paper recipe, or a narrower sweep:
#   experiments/domain_generalization.sh method=zero_shot,coop
#   SWEEP_DIR=outputs/try experiments/domain_generalization.sh method=coop seed=1 backbone=vit_b16
# See experiments/README.md.
set -uo pipefail
source "$(dirname "$0")/_sweep.sh"
run_sweep paper_domain_generalization "$@"

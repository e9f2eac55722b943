#!/usr/bin/env bash
# The field's base-to-new comparison table in one command: every method's base-to-new paper recipe x the 11 CoOp
# datasets x seeds 1-3 (33 Slurm jobs per method, all at 16 shots), then `vlm-adapt report` on the sweep folder,
# whose `comparison` table (report.md, comparison.csv, comparison.tex) has the papers' layout with the cost of
# each method beside its accuracy. Arguments are Hydra overrides (the cluster's settings, a narrower sweep):
#   experiments/comparison_table.sh hydra.launcher.partition=gpu
#   experiments/comparison_table.sh +experiment@_global_=coop_base2new,maple_base2new data=dtd seed=1
#   LAUNCHER=submitit_local TRAINER=gpu experiments/comparison_table.sh     # one machine, no Slurm
# See experiments/README.md; the recipes are conf/experiment/<method>_base2new.yaml.
set -uo pipefail
source "$(dirname "$0")/_sweep.sh"
run_sweep paper_comparison_base2new "hydra/launcher=${LAUNCHER:-slurm}" "trainer=${TRAINER:-gpu}" "$@"

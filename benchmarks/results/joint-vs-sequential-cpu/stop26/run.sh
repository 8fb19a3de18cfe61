#!/usr/bin/env bash
# Issue 15, joint vs sequential wall time, stop 26: the sequential pipeline (12 + 6 epochs per
# stage) at the stop-23 budgets, and the gradient strategy (budget recipe) with fewer epochs
# (6 + 3 and 8 + 4) at a budget no larger than the size the sequential pipeline reached there
# (stop 23: digits 0.331, MNIST-1D 0.291, shapes32 0.397 of W8 -> 33%, 29%, 40%), so that the
# joint plans are at most the sequential plans' size. 3 seeds, ONE job at a time (nothing else
# should run on the machine: the figures are wall times).
#   bash benchmarks/results/joint-vs-sequential-cpu/stop26/run.sh      (from the repository root)
# TASKS, EPOCHS, SEEDS and OUT override the tasks, the joint epochs, the seeds and the folder (stop 27:
#   OUT=benchmarks/results/joint-vs-sequential-cpu/stop27 SEEDS=0,1,2,3,4,5,6,7 EPOCHS=6-3 \
#   TASKS="digits:resnet8=size=35%=size=33%" bash benchmarks/results/joint-vs-sequential-cpu/stop26/run.sh)
#   .ci/env python benchmarks/results/joint-vs-sequential-cpu/summary.py benchmarks/results/joint-vs-sequential-cpu/stop26 \
#       > benchmarks/results/joint-vs-sequential-cpu/stop26/summary.md
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."
out=${OUT:-benchmarks/results/joint-vs-sequential-cpu/stop26}
common=(--costs size --seeds ${SEEDS:-0,1,2} --jobs 1 --threads 1 --no-progress --resume --methods none)
for spec in ${TASKS:-digits:resnet8=size=35%=size=33% mnist1d:dscnn=size=35%=size=29% shapes32:mobilenet=size=50%=size=40%}; do
  task=${spec%%=*} rest=${spec#*=} key=${spec%%:*}
  seq_target=${rest%=size=*} joint_target=size=${rest##*=size=}
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --epochs 12 --finetune-epochs 6 \
    --strategies sequential --targets "$seq_target" --out "$out/$key-12-6"
  for ep in ${EPOCHS:-6-3 8-4}; do
    .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --epochs "${ep%-*}" --finetune-epochs "${ep#*-}" \
      --strategies gradient --targets "$joint_target" --out "$out/$key-$ep"
  done
done

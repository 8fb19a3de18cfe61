#!/usr/bin/env bash
# Issue 15, joint vs sequential wall time at equal budgets: per task, the sequential pipeline
# (prune-only search + fine-tune, then mixed precision + QAT: 12 + 6 epochs per stage) and the
# gradient strategy (budget recipe) at 12 + 6 and at 10 + 5 epochs, 3 seeds, ONE job at a time
# (nothing else should run on the machine: the figures are wall times).
#   bash benchmarks/results/joint-vs-sequential-cpu/run.sh      (from the repository root)
#   .ci/env python benchmarks/results/joint-vs-sequential-cpu/summary.py > benchmarks/results/joint-vs-sequential-cpu/summary.md
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out=benchmarks/results/joint-vs-sequential-cpu
common=(--costs size --seeds 0,1,2 --jobs 1 --threads 1 --no-progress --resume --methods none)
for spec in ${TASKS:-digits:resnet8=size=35% mnist1d:dscnn=size=35% shapes32:mobilenet=size=50%}; do
  task=${spec%%=*} targets=${spec#*=} key=${spec%%:*}
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --epochs 12 --finetune-epochs 6 \
    --strategies sequential,gradient --targets "$targets" --out "$out/$key-12-6"
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --epochs 10 --finetune-epochs 5 \
    --strategies gradient --targets "$targets" --out "$out/$key-10-5"
done

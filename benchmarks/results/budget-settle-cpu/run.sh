#!/usr/bin/env bash
# The budget-settle screen of issue 15 (README "Settling at the budget"): per task, the
# baselines (W8A8 / W2A8 QAT, FP32, ORT int8) and the gradient strategy with
# discretisation=expected (the committed 3-seed front's variant: "expected"), then the same
# budgets with settle + a 4-bit start + Adam logit steps ("settle"); 3 seeds each.
#   bash benchmarks/results/budget-settle-cpu/run.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out=benchmarks/results/budget-settle-cpu
common=(--costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 --jobs 2 --threads 1 --no-progress --resume)
run() {  # TASK TARGETS
  local task=$1 targets=$2 key=${1%%:*}
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --methods uniform,fp32,ort --uniform-bits 8,2 \
    --strategies gradient --targets "$targets" -S gradient.discretisation=expected --out "$out/$key-expected"
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --methods none \
    --strategies gradient --targets "$targets" -S gradient.discretisation=expected -S gradient.settle=true \
    -S gradient.start=4 -S gradient.logit_steps=adam --out "$out/$key-settle"
}
for spec in ${TASKS:-digits:resnet8=size=12%,7% mnist1d:dscnn=size=20%,7% shapes32:mobilenet=size=50%,20%}; do
  run "${spec%%=*}" "${spec#*=}"
done

#!/usr/bin/env bash
# The budget recipe's start width (start=4) against start=default (the paper's alpha_b = b / max b)
# and start=budget, with cosine QAT, on all three tasks over a range of budgets; the recipe
# itself at the budgets qat-schedule-cpu/ lacks; 3 seeds (digits12/ found start=default +3.0 at 12%).
#   bash benchmarks/results/qat-schedule-cpu/start/run.sh      (from the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."
out=benchmarks/results/qat-schedule-cpu/start
common=(--costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 --jobs 2 --threads 1 --no-progress --resume
        --methods none --strategies gradient --qat-schedule cosine)
run() {  # TASK ALL-TARGETS RECIPE-TARGETS
  local task=$1 key=${1%%:*}
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --targets "$2" -S gradient.start=default \
    --out "$out/$key-start-default"
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --targets "$2" -S gradient.start=budget \
    --out "$out/$key-start-budget"
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --targets "$3" --out "$out/$key-recipe"
}
run digits:resnet8 size=35%,20%,7% size=20%,7%
run mnist1d:dscnn size=45%,35%,12%,7% size=12%,7%
run shapes32:mobilenet size=50%,35%,20% size=20%

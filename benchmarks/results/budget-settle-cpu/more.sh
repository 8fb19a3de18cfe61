#!/usr/bin/env bash
# The second batch of the budget-settle screen (run.sh did the first): more budgets, no uniform
# baselines (run.sh's *-expected folders hold them; `pareto.py --report-only` merges the folders).
#   bash benchmarks/results/budget-settle-cpu/more.sh            (from the repository root)
#   TASKS=shapes32:mobilenet=size=12%,7% SUFFIX=3 bash benchmarks/results/budget-settle-cpu/more.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out=benchmarks/results/budget-settle-cpu
common=(--costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 --jobs 2 --threads 1 --no-progress --resume
        --methods none --strategies gradient -S gradient.discretisation=expected)
for spec in ${TASKS:-mnist1d:dscnn=size=45%,35%,12% digits:resnet8=size=45%,35%,20% shapes32:mobilenet=size=35%}; do
  task=${spec%%=*} targets=${spec#*=} key=${spec%%:*}
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --targets "$targets" --out "$out/$key-expected-${SUFFIX:-2}"
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --targets "$targets" -S gradient.settle=true \
    -S gradient.start=4 -S gradient.logit_steps=adam --out "$out/$key-settle-${SUFFIX:-2}"
done

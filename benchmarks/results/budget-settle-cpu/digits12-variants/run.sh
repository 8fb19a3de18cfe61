#!/usr/bin/env bash
# digits size=12%, the one budget where the budget recipe lost (README): four variants of it, 3 seeds.
# (These ran with --out /tmp/pq/dig/...; the folders were copied here.)
set -e
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."
common=(--tasks digits:resnet8 --costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 --jobs 2 --threads 1 --no-progress --methods none --strategies gradient --targets size=12%)
.ci/env python benchmarks/pareto.py "${common[@]}" --out benchmarks/results/budget-settle-cpu/digits12-variants/recipe
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.start=default --out benchmarks/results/budget-settle-cpu/digits12-variants/start-default
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.start=budget --out benchmarks/results/budget-settle-cpu/digits12-variants/start-budget
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.start_logit=1.0 --out benchmarks/results/budget-settle-cpu/digits12-variants/start-logit1
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.settle=false --out benchmarks/results/budget-settle-cpu/digits12-variants/no-settle

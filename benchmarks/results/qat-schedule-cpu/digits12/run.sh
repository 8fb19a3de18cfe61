#!/usr/bin/env bash
# digits size=12%, the budget where the budget recipe trails discretisation=expected alone
# (README), again with cosine QAT (the default) on this machine's digits network: the recipe,
# expected alone (the paper's recipe + expected) and four one-option variants; 3 seeds.
#   bash benchmarks/results/qat-schedule-cpu/digits12/run.sh      (from the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../../.."
out=benchmarks/results/qat-schedule-cpu/digits12
common=(--tasks digits:resnet8 --costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 --jobs 2 --threads 1
        --no-progress --resume --methods none --strategies gradient --targets "${TARGETS:-size=12%}" --qat-schedule cosine)
sfx=${SUFFIX:-}
.ci/env python benchmarks/pareto.py "${common[@]}" --out "$out/recipe$sfx"
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.recipe=paper -S gradient.discretisation=expected \
  --out "$out/expected-alone$sfx"
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.start=default --out "$out/start-default$sfx"
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.settle=false --out "$out/no-settle$sfx"
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.logit_steps=sgd --out "$out/sgd-logits$sfx"
.ci/env python benchmarks/pareto.py "${common[@]}" -S gradient.start=budget --out "$out/start-budget$sfx"

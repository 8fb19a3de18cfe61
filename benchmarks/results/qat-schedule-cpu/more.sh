#!/usr/bin/env bash
# The second batch of the QAT-schedule screen (run.sh did the first), with cosine the default:
# more budgets near the <= 0.45-of-W8A8 target (MNIST-1D 40%, shapes32 45%), and
# --keep-best-qat (QAT ends on its best held-out epoch) with cosine on shapes32; 3 seeds.
#   bash benchmarks/results/qat-schedule-cpu/more.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out=benchmarks/results/qat-schedule-cpu
common=(--costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 --jobs 2 --threads 1 --no-progress --resume
        --methods none --strategies gradient --qat-schedule cosine)
.ci/env python benchmarks/pareto.py --tasks mnist1d:dscnn "${common[@]}" --targets size=40% --out "$out/more-mnist1d-cosine"
.ci/env python benchmarks/pareto.py --tasks shapes32:mobilenet "${common[@]}" --targets size=45% --out "$out/more-shapes32-cosine"
.ci/env python benchmarks/pareto.py --tasks shapes32:mobilenet "${common[@]}" --targets size=50%,45% --keep-best-qat \
  --out "$out/more-shapes32-cosine-keepbest"

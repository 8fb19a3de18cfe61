#!/usr/bin/env bash
# Uniform W2A8 QAT with cosine (the default) on this machine's digits and MNIST-1D networks: the
# baseline of the <= 0.30-of-W2A8 target for the cosine budget plans; 3 seeds.
#   bash benchmarks/results/qat-schedule-cpu/w2.sh      (from the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
for task in digits:resnet8 mnist1d:dscnn; do
  .ci/env python benchmarks/pareto.py --tasks "$task" --costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 \
    --jobs 2 --threads 1 --no-progress --resume --methods uniform --uniform-bits 2 --qat-schedule cosine \
    --out "benchmarks/results/qat-schedule-cpu/w2-${task%%:*}-cosine"
done

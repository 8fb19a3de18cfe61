#!/usr/bin/env bash
# Issue 15, QAT learning-rate schedule A/B: per task, uniform W8A8 QAT and the gradient
# strategy's budget plans (committed default recipe) with the constant QAT rate (the default
# when this ran, at baedf48; with the FP32 and onnxruntime int8 baselines beside it) and with
# --qat-schedule cosine (the default since); 3 seeds. The constant run now names its schedule.
#   bash benchmarks/results/qat-schedule-cpu/run.sh            (from the repository root)
#   .ci/env python benchmarks/results/qat-schedule-cpu/summary.py > benchmarks/results/qat-schedule-cpu/summary.md
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out=benchmarks/results/qat-schedule-cpu
common=(--costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 --jobs 2 --threads 1 --no-progress --resume
        --uniform-bits 8 --strategies gradient)
for spec in ${TASKS:-digits:resnet8=size=35%,12% mnist1d:dscnn=size=45%,35% shapes32:mobilenet=size=50%,35%}; do
  task=${spec%%=*} targets=${spec#*=} key=${spec%%:*}
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --methods uniform,fp32,ort --targets "$targets" \
    --qat-schedule constant --out "$out/$key-constant"
  .ci/env python benchmarks/pareto.py --tasks "$task" "${common[@]}" --methods uniform --targets "$targets" \
    --qat-schedule cosine --out "$out/$key-cosine"
done

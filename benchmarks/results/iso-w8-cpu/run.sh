#!/usr/bin/env bash
# Issue 15's "<= 0.45 of W8A8 within 0.5 points on every task": shapes32 is the task that misses it
# (size=45%: 73.07 +- 0.32 vs W8A8 75.50, benchmarks/results/qat-schedule-cpu/more.sh). This screen
# asks what the compressed plan's QAT needs: distillation from the FP32 model instead of labels
# (--no-labels), and more QAT epochs (12 instead of 6), each with its own W8A8 reference; 3 seeds.
#   bash benchmarks/results/iso-w8-cpu/run.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
out=benchmarks/results/iso-w8-cpu
common=(--tasks shapes32:mobilenet --costs size --epochs 12 --seeds 0,1,2 --jobs 2 --threads 1 --no-progress
        --resume --methods uniform --uniform-bits 8 --strategies gradient --targets size=45%)
.ci/env python benchmarks/pareto.py "${common[@]}" --finetune-epochs 6 --no-labels --out "$out/shapes32-kd-6"
.ci/env python benchmarks/pareto.py "${common[@]}" --finetune-epochs 12 --out "$out/shapes32-labels-12"
.ci/env python benchmarks/pareto.py "${common[@]}" --finetune-epochs 12 --no-labels --out "$out/shapes32-kd-12"

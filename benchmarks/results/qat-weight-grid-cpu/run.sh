#!/usr/bin/env bash
# Issue 15, shapes32 at size=45%: is the 4-bit weight grid what keeps the plan 3 points below W8A8?
# A screen of prototype weight quantizers for QAT, none of them in the library: prototype.patch adds
# them behind environment variables (read by plugin/engine/training.py's finetune), applied to a
# throw-away worktree of b8cdbdb, so the library stays as it is and anyone can repeat the figures.
#   PQ_CLIP_W=4    clamp each <= 4-bit channel's weights to its MSE-optimal range at QAT start
#   PQ_PROJECT=1   keep every weight inside its range at QAT start after each step (a fixed scale)
#   PQ_LSQ=4       learned per-channel step sizes (LSQ, log-space, Adam) for layers with <= 4-bit channels
#   PQ_QAT_LR=3e-4 the QAT learning rate (the library's default for a pruned plan is 1e-3)
#   bash benchmarks/results/qat-weight-grid-cpu/run.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../../.."
here="$PWD/benchmarks/results/qat-weight-grid-cpu"
tree="$(mktemp -d)/pq"
git worktree add -q --detach "$tree" b8cdbdb
trap 'git worktree remove --force "$tree"' EXIT
git -C "$tree" apply "$here/prototype.patch"
common=(--tasks shapes32:mobilenet --costs size --epochs 12 --finetune-epochs 6 --seeds 0,1,2 --jobs 2 --threads 1
        --no-progress --resume --qat-schedule cosine --strategies gradient)
run() {  # name, env..., -- pareto arguments
  local name=$1; shift; local vars=()
  while [ "$1" != "--" ]; do vars+=("$1"); shift; done; shift
  (cd "$tree" && env "${vars[@]}" .ci/env python benchmarks/pareto.py "${common[@]}" "$@" --out "$here/$name")
}
run base PQ_NONE=1 -- --methods uniform --uniform-bits 8 --targets size=45%
run clip4 PQ_CLIP_W=4 -- --methods none --targets size=45%
run proj4 PQ_CLIP_W=4 PQ_PROJECT=1 -- --methods none --targets size=45%
run proj8 PQ_PROJECT=1 -- --methods none --targets size=45%
run lr3e4 PQ_QAT_LR=3e-4 -- --methods none --targets size=45%
run lsq4 PQ_LSQ=4 -- --methods none --targets size=45%
run w4 PQ_NONE=1 -- --methods uniform --uniform-bits 4 --targets size=55%
# the plan side, with the library itself (no patch): the search without 2-bit weights
.ci/env python benchmarks/pareto.py "${common[@]}" --methods none --targets size=45% --weight-bits 0,4,8 \
  --out "$here/w048"

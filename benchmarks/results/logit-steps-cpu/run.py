"""benchmarks/compress_samples.py with the search's ``logit_steps`` set for every searched row.

    python benchmarks/results/logit-steps-cpu/run.py LOGIT_STEPS [compress_samples.py flags...]

LOGIT_STEPS is one of ``SearchConfig.logit_steps`` (sgd, sgd_per_cost, adam). The gradient
strategy has no ``-S`` option for it (yet), so this wraps ``Problem.search_config`` to pass it
to every search; everything else is compress_samples.py as committed.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from plugin.strategies.problem import Problem  # noqa: E402

steps = sys.argv.pop(1)
_original = Problem.search_config


def _search_config(self, **overrides):
    return _original(self, **({"logit_steps": steps} | overrides))


Problem.search_config = _search_config
sys.argv[0] = str(ROOT / "benchmarks" / "compress_samples.py")
runpy.run_path(sys.argv[0], run_name="__main__")

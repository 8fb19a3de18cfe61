"""``mpic_energy``: energy on MPIC in microjoules, from the ``mpic`` cycle count.

``energy = cycles / 250 MHz * P`` with ``P`` the mean of the four measured powers
5.30, 5.39, 5.46 and 5.38 mW, i.e. 5.3825 mW (DESIGN.md rounds it to 5.38; the paper's code
uses the mean itself). One cycle costs 5.3825e-3 / 250e6 J = 2.153e-5 uJ.

Fine-grained sparsity is not counted (MPIC does not skip zero weights; see ``mpic``); the
zero-skipping accelerator model is ``horowitz_energy``.
"""

from __future__ import annotations

from . import mpic
from ._math import Scalar, finish
from .base import CostModel
from .spec import CostInputs, LayerSpec

NAME = "mpic_energy"
UNIT = "uJ"

FREQUENCY_HZ = 250e6
MEASURED_POWER_MW = (5.30, 5.39, 5.46, 5.38)
MEAN_POWER_W = sum(MEASURED_POWER_MW) / len(MEASURED_POWER_MW) * 1e-3


def cycles_to_microjoules(cycles: Scalar) -> Scalar:
    """Energy of ``cycles`` MPIC cycles, in microjoules."""
    return cycles / FREQUENCY_HZ * MEAN_POWER_W * 1e6


def cost(spec: LayerSpec, inputs: CostInputs) -> Scalar:
    """Expected MPIC energy of one layer, per sample, in microjoules."""
    return finish(cycles_to_microjoules(mpic.cost(spec, inputs)))


COST_MODEL = CostModel(NAME, UNIT, cost, "energy on the MPIC core (cycles / 250 MHz * 5.38 mW)")

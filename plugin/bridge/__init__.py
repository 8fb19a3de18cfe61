"""The ONNX -> torch bridge: onnx2torch plus our converters, name maps, write-back, parity.

    bridged = convert(model)           # raises ConversionError with a coverage list
    check_parity(model, bridged)       # always, before any use
    ... train bridged.module ...
    new_model = write_back(model, bridged)
"""

from plugin.bridge.catalog import coverage
from plugin.bridge.convert import BridgedModel, convert
from plugin.bridge.parity import check_parity, locate_divergence
from plugin.bridge.writeback import write_back

__all__ = ["BridgedModel", "check_parity", "convert", "coverage", "locate_divergence", "write_back"]

"""Copy trained torch tensors back into the ONNX initializers they came from."""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from graph_passes.errors import ConversionError
from plugin.bridge._common import ParamBinding
from plugin.bridge.convert import BridgedModel

logger = logging.getLogger(__name__)


def _torch_tensor(bridged: BridgedModel, qualified: str):
    try:
        return bridged.module.get_parameter(qualified)
    except AttributeError:
        return bridged.module.get_buffer(qualified)


def write_back(model: onnx.ModelProto, bridged: BridgedModel) -> onnx.ModelProto:
    """A copy of ``model`` whose mapped initializers hold the torch module's current values.

    Layouts are undone (nn.Linear [N, K] -> Gemm/MatMul B [K, N] where the node stores it so);
    dtypes stay the initializer's. A shape that no longer matches raises ConversionError.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    written = 0
    for init in out.graph.initializer:
        qualified = bridged.param_map.get(init.name)
        if qualified is None:
            continue
        tensor = _torch_tensor(bridged, qualified)
        layout = bridged.layouts.get(init.name)
        onnx_shape = tuple(init.dims)
        if layout is not None:
            value = layout.to_onnx(tensor)
        else:
            value = ParamBinding(qualified, init.name, False, onnx_shape).to_onnx(tensor)
        if value.shape != onnx_shape:
            raise ConversionError(
                f"cannot write {qualified} back to initializer {init.name!r}: shape "
                f"{value.shape} != {onnx_shape}"
            )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(init.data_type)
        # reshape: np.ascontiguousarray turns a 0-d array (a scalar Gather index) into shape (1,)
        value = np.ascontiguousarray(value.astype(dtype)).reshape(onnx_shape)
        init.CopyFrom(numpy_helper.from_array(value, init.name))
        written += 1
    logger.info("wrote %d initializers back", written)
    return out

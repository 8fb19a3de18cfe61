"""Dynamic batch: pinned for analysis, recorded, made batch-agnostic and given back on export."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from graph_passes.batch import generalise_batch_reshapes, restore_dynamic_batch
from graph_passes.loading import load_model
from graph_passes.ort_utils import make_session
from graph_passes.shapes import batch_dims

TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,3,3] x) => (float[N,4] y) {{
  c = Conv (x, w)
  s = Constant <value=int64[2] {{{target}}}> ()
  f = Reshape <allowzero={allowzero}> (c, s)
  y = MatMul(f, m)
}}
"""


def _model(target: str = "1,36", allowzero: int = 0) -> onnx.ModelProto:
    model = onnx.parser.parse_model(TEXT.format(target=target, allowzero=allowzero))
    rng = np.random.default_rng(0)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal([4, 2, 1, 1]).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal([36, 4]).astype(np.float32), "m"),
    ])
    return model


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    from graph_passes.normalise import normalise

    return normalise(model, verify=True).model


def test_batch_is_pinned_recorded_and_given_back():
    loaded = load_model(_model(), batch=1)
    assert batch_dims(loaded) == {"x": "N"}
    normalised = _fold_constants(loaded)
    general, count = generalise_batch_reshapes(normalised)
    assert count == 1
    restored, ok = restore_dynamic_batch(general)
    assert ok
    assert restored.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"
    assert not batch_dims(restored)
    x = np.random.default_rng(1).standard_normal([5, 2, 3, 3]).astype(np.float32)
    batched = make_session(restored).run(None, {"x": x})[0]
    single = make_session(normalised)
    expected = np.concatenate([single.run(None, {"x": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(batched, expected, rtol=1e-5, atol=1e-6)


def test_allowzero_reshapes_use_minus_one_and_unfixable_ones_keep_batch_one():
    normalised = _fold_constants(load_model(_model(allowzero=1), batch=1))
    general, count = generalise_batch_reshapes(normalised)
    target = [numpy_helper.to_array(t) for t in general.graph.initializer if t.dims == [2]]
    assert count == 1 and [list(t) for t in target] == [[-1, 36]]
    # a target with its own -1 under allowzero=1 cannot be generalised: the batch stays 1
    fixed = _fold_constants(load_model(_model(target="1,-1", allowzero=1), batch=1))
    general, count = generalise_batch_reshapes(fixed)
    assert count == 0
    restored, ok = restore_dynamic_batch(general)
    assert not ok
    assert restored.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1

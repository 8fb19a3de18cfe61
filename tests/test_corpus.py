"""The test corpus itself: light models are found; every corpus model builds, checks and runs."""

from __future__ import annotations

import onnx
import pytest

from tests import corpus


def test_nine_light_models_are_found() -> None:
    models = corpus.light_models()
    assert len(models) == 9
    assert all(m.path.is_file() and m.family == "light" and m.exporter is None for m in models)
    assert {m.name for m in models} == set(corpus.LIGHT_NAMES)


def test_light_models_have_static_image_inputs() -> None:
    for model in corpus.light_models():
        (shape,) = model.input_shapes.values()
        assert shape == [1, 3, 224, 224], model.name


def test_corpus_names_cover_both_exporters_for_every_architecture() -> None:
    names = corpus.CORPUS_NAMES
    assert len(names) == len(set(names)) == 9 + 2 * len(corpus.TORCHVISION_SPECS)
    assert "resnet18-legacy" in names and "vit_b_16-dynamo" in names


def test_unknown_name_is_rejected() -> None:
    with pytest.raises(KeyError, match="unknown corpus model"):
        corpus.get_model("resnet18-tflite")


def test_relative_error_is_max_abs_diff_over_max_abs_reference() -> None:
    import numpy as np

    ref = np.array([1.0, -4.0], dtype=np.float32)
    assert corpus.relative_error(ref, ref + np.float32(0.02)) == pytest.approx(0.005)
    assert corpus.relative_error(ref, ref[:1]) == float("inf")


@pytest.mark.slow
@pytest.mark.parametrize("name", corpus.CORPUS_NAMES)
def test_corpus_model_builds_checks_and_matches_torch(name: str) -> None:
    model = corpus.get_model(name)
    loaded = onnx.load(model.path)  # self-contained: no external data beside it
    assert corpus.graph_input_shapes(loaded) == model.input_shapes
    parity = corpus.verify(model)  # runs onnx.checker and onnxruntime
    if model.family == "light":
        assert parity is None
        return
    assert [o.name for o in loaded.graph.output] == [corpus.OUTPUT_NAME]
    assert model.is_cnn == (not name.startswith("vit_"))
    assert parity <= corpus.PARITY_RTOL, f"{name}: ORT vs torch relative error {parity:.2e}"
    sensitivity = model.record.input_sensitivity
    assert sensitivity >= corpus.MIN_INPUT_SENSITIVITY, f"{name}: output ignores the input"

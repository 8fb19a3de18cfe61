"""plugin.data: every accepted data form, and every validation error as one-line DataError."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnx.parser
import pytest

from graph_passes.errors import DataError, InputShapeError, PrunequantError, UnsupportedModelError
from plugin.data import Dataset, InputSpec, input_specs, load_dataset

ONE_INPUT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 2, 3] x) => (float[N, 2, 3] y) { y = Relu(x) }
"""

TWO_INPUTS = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, 4] a, int64[N, 2] b) => (float[N, 4] y) { y = Relu(a) }
"""

WITH_INITIALIZER_INPUT = """
<ir_version: 3, opset_import: ["" : 11]>
g (float[2, 4] x, float[4] w) => (float[2, 4] y) <float[4] w = {1.0, 2.0, 3.0, 4.0}> {
  y = Add(x, w)
}
"""

SYMBOLIC_FEATURES = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N, C] x) => (float[N, C] y) { y = Relu(x) }
"""


def _model(text: str) -> onnx.ModelProto:
    return onnx.parser.parse_model(text)


@pytest.fixture()
def one() -> list[InputSpec]:
    return input_specs(_model(ONE_INPUT))


@pytest.fixture()
def two() -> list[InputSpec]:
    return input_specs(_model(TWO_INPUTS))


def _x(n: int = 5, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 2, 3)).astype(np.float32)


def _ab(n: int = 6) -> dict[str, np.ndarray]:
    a = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    b = np.arange(n * 2, dtype=np.int64).reshape(n, 2)
    return {"a": a, "b": b}


def _error(fn, *args, **kwargs) -> str:
    """Run ``fn``; it must raise DataError with a one-line message; return the message."""
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert info.value.exit_code == DataError.exit_code
    return message


# ------------------------------------------------------------------------------ input specs


def test_input_specs_static_except_batch(one: list[InputSpec], two: list[InputSpec]) -> None:
    (spec,) = one
    assert spec.name == "x" and spec.shape == [1, 2, 3] and spec.dtype == np.float32
    assert spec.batch_dynamic and spec.sample_shape == (2, 3)
    assert [(s.name, s.dtype) for s in two] == [("a", np.float32), ("b", np.int64)]


def test_input_specs_exclude_initializers_and_keep_fixed_batch() -> None:
    (spec,) = input_specs(_model(WITH_INITIALIZER_INPUT))
    assert spec.name == "x" and spec.shape == [2, 4] and not spec.batch_dynamic


def test_input_specs_symbolic_feature_dim_asks_for_pin() -> None:
    with pytest.raises(InputShapeError, match=r"--input-shape x=1xD"):
        input_specs(_model(SYMBOLIC_FEATURES))


def test_input_specs_scalar_input_refused() -> None:
    header = '<ir_version: 8, opset_import: ["" : 17]>'
    model = _model(header + " g (float x) => (float y) { y = Relu(x) }")
    with pytest.raises(UnsupportedModelError, match="batch axis"):
        input_specs(model)


# --------------------------------------------------------------------------- accepted forms


def test_npy_file(tmp_path: Path, one: list[InputSpec]) -> None:
    np.save(tmp_path / "x.npy", _x())
    dataset = load_dataset(tmp_path / "x.npy", one)
    assert len(dataset) == 5 and dataset.labels is None
    np.testing.assert_array_equal(dataset.arrays["x"], _x())


def test_npz_by_name_with_labels_key(tmp_path: Path, two: list[InputSpec]) -> None:
    np.savez(tmp_path / "d.npz", b=_ab()["b"], labels=np.arange(6) % 3, a=_ab()["a"])
    dataset = load_dataset(str(tmp_path / "d.npz"), two)
    np.testing.assert_array_equal(dataset.arrays["a"], _ab()["a"])
    np.testing.assert_array_equal(dataset.arrays["b"], _ab()["b"])
    assert dataset.labels is not None and dataset.labels.dtype == np.int64
    np.testing.assert_array_equal(dataset.labels, np.arange(6) % 3)


def test_npz_by_position_in_file_order(tmp_path: Path, two: list[InputSpec]) -> None:
    np.savez(tmp_path / "d.npz", _ab()["a"], _ab()["b"])  # keys arr_0, arr_1
    dataset = load_dataset(tmp_path / "d.npz", two)
    np.testing.assert_array_equal(dataset.arrays["a"], _ab()["a"])
    np.testing.assert_array_equal(dataset.arrays["b"], _ab()["b"])
    np.savez(tmp_path / "e.npz", first=_ab()["a"], second=_ab()["b"])
    assert load_dataset(tmp_path / "e.npz", two).arrays["b"].dtype == np.int64


def test_folder_concatenated_in_sorted_order(tmp_path: Path, one: list[InputSpec]) -> None:
    np.save(tmp_path / "b.npy", _x(3, seed=2))
    np.savez(tmp_path / "a.npz", x=_x(2, seed=1))
    (tmp_path / "README.txt").write_text("ignored")
    dataset = load_dataset(tmp_path, one)
    np.testing.assert_array_equal(dataset.arrays["x"], np.concatenate([_x(2, 1), _x(3, 2)]))


def test_folder_labels_from_every_file(tmp_path: Path, one: list[InputSpec]) -> None:
    np.savez(tmp_path / "0.npz", x=_x(2), labels=np.array([0, 1]))
    np.savez(tmp_path / "1.npz", x=_x(3), labels=np.array([2, 2, 1]))
    dataset = load_dataset(tmp_path, one)
    np.testing.assert_array_equal(dataset.labels, [0, 1, 2, 2, 1])


def test_in_memory_forms(one: list[InputSpec], two: list[InputSpec]) -> None:
    assert len(load_dataset(_x(), one)) == 5
    assert len(load_dataset({"x": _x()}, one)) == 5
    dataset = load_dataset([_ab()["a"], _ab()["b"]], two, labels=[0, 1, 0, 1, 0, 1])
    assert dataset.labels is not None and list(dataset.labels) == [0, 1, 0, 1, 0, 1]


def test_explicit_labels_files_win(tmp_path: Path, one: list[InputSpec]) -> None:
    np.savez(tmp_path / "d.npz", x=_x(3), labels=np.array([0, 0, 0]))
    np.save(tmp_path / "y.npy", np.array([1, 2, 3]))
    np.savez(tmp_path / "y.npz", labels=np.array([4, 5, 6]))
    assert list(load_dataset(tmp_path / "d.npz", one, tmp_path / "y.npy").labels) == [1, 2, 3]
    assert list(load_dataset(tmp_path / "d.npz", one, tmp_path / "y.npz").labels) == [4, 5, 6]


def test_from_batches_dicts_tuples_and_labels(one: list[InputSpec], two: list[InputSpec]) -> None:
    x = _x(7)
    batches = [(x[:4], np.arange(4)), (x[4:], np.arange(3))]
    dataset = Dataset.from_batches(batches, one)
    np.testing.assert_array_equal(dataset.arrays["x"], x)
    np.testing.assert_array_equal(dataset.labels, [0, 1, 2, 3, 0, 1, 2])
    data = _ab()
    dicts = ({"a": data["a"][i:i + 2], "b": data["b"][i:i + 2]} for i in range(0, 6, 2))
    assert len(Dataset.from_batches(dicts, two)) == 6
    assert Dataset.from_batches([x[:4], x[4:]], one).labels is None


def test_from_batches_max_samples_stops_endless_loader(one: list[InputSpec]) -> None:
    def endless():
        while True:
            yield _x(4)

    assert len(Dataset.from_batches(endless(), one, max_samples=10)) == 10


def test_from_batches_torch_tensors(one: list[InputSpec]) -> None:
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.from_numpy(_x(10)), torch.arange(10) % 2), batch_size=4
    )
    dataset = Dataset.from_batches(loader, one)
    np.testing.assert_array_equal(dataset.arrays["x"], _x(10))
    np.testing.assert_array_equal(dataset.labels, np.arange(10) % 2)


def test_dtype_conversions_logged(one: list[InputSpec], two: list[InputSpec],
                                  caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="plugin.data"):
        dataset = load_dataset(_x().astype(np.float64), one)
    assert dataset.arrays["x"].dtype == np.float32 and "float64 -> float32" in caplog.text
    data = _ab()
    data["b"] = data["b"].astype(np.int32)
    assert load_dataset(data, two).arrays["b"].dtype == np.int64


# --------------------------------------------------------------------- validation errors


def test_missing_file(tmp_path: Path, one: list[InputSpec]) -> None:
    message = _error(load_dataset, tmp_path / "nope.npz", one)
    assert "nope.npz" in message and "does not exist" in message


@pytest.mark.parametrize("name", ["bad.npy", "bad.npz"])
def test_corrupt_file(tmp_path: Path, one: list[InputSpec], name: str) -> None:
    junk = b"\x93NUMPY garbage" if name.endswith("npy") else b"PK\x03\x04junk"
    (tmp_path / name).write_bytes(junk)
    message = _error(load_dataset, tmp_path / name, one)
    assert name in message and "corrupt" in message


def test_truncated_npz(tmp_path: Path, one: list[InputSpec]) -> None:
    np.savez(tmp_path / "d.npz", x=_x(50))
    data = (tmp_path / "d.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
    assert "d.npz" in _error(load_dataset, tmp_path / "d.npz", one)


def test_pickled_object_arrays_refused(tmp_path: Path, one: list[InputSpec]) -> None:
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    assert "pickle" in _error(load_dataset, tmp_path / "o.npy", one)
    np.savez(tmp_path / "o.npz", x=np.array([None, 1], dtype=object))
    assert "pickle" in _error(load_dataset, tmp_path / "o.npz", one)


def test_in_memory_object_array_refused(one: list[InputSpec]) -> None:
    assert "object array" in _error(load_dataset, np.array([_x(1), 3], dtype=object), one)


def test_wrong_suffix(tmp_path: Path, one: list[InputSpec]) -> None:
    (tmp_path / "d.csv").write_text("1,2,3")
    assert "neither .npy nor .npz" in _error(load_dataset, tmp_path / "d.csv", one)


def test_empty_folder(tmp_path: Path, one: list[InputSpec]) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert "no .npy or .npz files" in _error(load_dataset, tmp_path, one)


def test_no_arrays(tmp_path: Path, one: list[InputSpec]) -> None:
    np.savez(tmp_path / "empty.npz")
    assert "no arrays" in _error(load_dataset, tmp_path / "empty.npz", one)
    assert "no input arrays" in _error(load_dataset, {}, one)


def test_wrong_number_of_inputs(tmp_path: Path, one: list[InputSpec], two: list[InputSpec]) -> None:
    np.save(tmp_path / "a.npy", _ab()["a"])
    message = _error(load_dataset, tmp_path / "a.npy", two)
    assert "one array" in message and "2 inputs" in message and "'a', 'b'" in message
    np.savez(tmp_path / "three.npz", p=_x(), q=_x(), r=_x())
    assert "3 arrays" in _error(load_dataset, tmp_path / "three.npz", one)


def test_unknown_names(tmp_path: Path, two: list[InputSpec]) -> None:
    np.savez(tmp_path / "d.npz", a=_ab()["a"], c=_ab()["b"])
    message = _error(load_dataset, tmp_path / "d.npz", two)
    assert "['c']" in message and "not model inputs" in message


def test_missing_input_by_name(tmp_path: Path, two: list[InputSpec]) -> None:
    np.savez(tmp_path / "d.npz", a=_ab()["a"])
    assert "['b']" in _error(load_dataset, tmp_path / "d.npz", two)


def test_shape_mismatch(tmp_path: Path, one: list[InputSpec]) -> None:
    np.save(tmp_path / "x.npy", np.zeros((5, 3, 2), np.float32))
    message = _error(load_dataset, tmp_path / "x.npy", one)
    assert "[5,3,2]" in message and "[N,2,3]" in message and "x.npy" in message


def test_missing_batch_axis_hint(one: list[InputSpec]) -> None:
    message = _error(load_dataset, np.zeros((2, 3), np.float32), one)
    assert "without the batch axis" in message and "np.expand_dims" in message


def test_zero_samples(one: list[InputSpec]) -> None:
    assert "0 samples" in _error(load_dataset, np.zeros((0, 2, 3), np.float32), one)


def test_float_for_int_input_and_int_for_float_refused(two: list[InputSpec]) -> None:
    data = _ab()
    data["b"] = data["b"].astype(np.float32)
    assert "float32 but model input 'b' is int64" in _error(load_dataset, data, two)
    data = _ab()
    data["a"] = data["a"].astype(np.uint8)
    assert "uint8 but model input 'a' is float32" in _error(load_dataset, data, two)


def test_int_values_out_of_range(one: list[InputSpec]) -> None:
    spec = [InputSpec("i", [1, 2], np.dtype(np.int32))]
    assert "outside" in _error(load_dataset, np.array([[0, 2**40]], np.int64), spec)
    assert load_dataset(np.array([[0, 7]], np.int64), spec).arrays["i"].dtype == np.int32


def test_float_overflow_on_conversion(one: list[InputSpec]) -> None:
    x = _x().astype(np.float64)
    x[1, 0, 0] = 1e300
    assert "outside the range of float32" in _error(load_dataset, x, one)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_inf(one: list[InputSpec], bad: float) -> None:
    x = _x()
    x[3, 1, 2] = bad
    message = _error(load_dataset, {"x": x}, one)
    assert "NaN/Inf" in message and "sample 3" in message and "'x'" in message


def test_inconsistent_sample_counts(two: list[InputSpec]) -> None:
    data = _ab()
    data["b"] = data["b"][:4]
    message = _error(load_dataset, data, two)
    assert "'a': 6" in message and "'b': 4" in message


def test_inconsistent_sample_counts_within_one_folder_file(tmp_path: Path,
                                                            two: list[InputSpec]) -> None:
    data = _ab()
    np.savez(tmp_path / "0.npz", a=data["a"][:4], b=data["b"][:2])
    np.savez(tmp_path / "1.npz", a=data["a"][:2], b=data["b"][:4])  # totals match: 6 and 6
    message = _error(load_dataset, tmp_path, two)
    assert "0.npz" in message and "'a': 4" in message


def test_labels_count(one: list[InputSpec]) -> None:
    assert "4 labels but the data has 5 samples" in _error(load_dataset, _x(), one, np.arange(4))


def test_labels_not_integer(one: list[InputSpec]) -> None:
    assert "not integer class ids" in _error(load_dataset, _x(), one, np.zeros(5, np.float32))


def test_labels_one_hot(one: list[InputSpec]) -> None:
    assert "argmax" in _error(load_dataset, _x(), one, np.eye(5, dtype=np.int64))


def test_labels_negative(one: list[InputSpec]) -> None:
    assert "negative" in _error(load_dataset, _x(), one, np.array([0, 1, -1, 2, 0]))


def test_labels_beyond_num_classes(one: list[InputSpec]) -> None:
    message = _error(load_dataset, _x(), one, np.array([0, 1, 3, 2, 0]), num_classes=3)
    assert "class id 3" in message and "3 classes" in message
    dataset = load_dataset(_x(), one, np.array([0, 1, 3, 2, 0]))
    assert "class id 3" in _error(dataset.require_num_classes, 2)


def test_labels_file_problems(tmp_path: Path, one: list[InputSpec]) -> None:
    assert "does not exist" in _error(load_dataset, _x(), one, tmp_path / "y.npy")
    np.savez(tmp_path / "y.npz", y=np.arange(5))
    assert "no key 'labels'" in _error(load_dataset, _x(), one, tmp_path / "y.npz")


def test_labels_in_some_folder_files_only(tmp_path: Path, one: list[InputSpec]) -> None:
    np.savez(tmp_path / "0.npz", x=_x(2), labels=np.array([0, 1]))
    np.savez(tmp_path / "1.npz", x=_x(3))
    message = _error(load_dataset, tmp_path, one)
    assert "no labels" in message and "'1.npz'" in message


def test_bad_batch_in_iterable(one: list[InputSpec]) -> None:
    message = _error(Dataset.from_batches, [_x(2), np.zeros((2, 5), np.float32)], one)
    assert "batch 1" in message
    assert "no batches" in _error(Dataset.from_batches, [], one)


def test_unsupported_data_type(one: list[InputSpec]) -> None:
    assert "cannot use a int" in _error(load_dataset, 3, one)


def test_every_data_error_is_a_prunequant_error() -> None:
    assert issubclass(DataError, PrunequantError) and DataError.exit_code == 10


# ------------------------------------------------------------------ batches, split, subset


def test_batches_cover_everything_in_order(one: list[InputSpec]) -> None:
    dataset = load_dataset(_x(10), one, np.arange(10))
    feeds = list(dataset.batches(4))
    assert [len(f["x"]) for f in feeds] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in feeds]), _x(10))
    labels = np.concatenate([y for _, y in dataset.labelled_batches(3)])
    np.testing.assert_array_equal(labels, np.arange(10))


def test_shuffled_batches_deterministic_per_seed(one: list[InputSpec]) -> None:
    dataset = load_dataset(_x(10), one, np.arange(10))
    order = lambda seed: np.concatenate([y for _, y in dataset.labelled_batches(3, True, seed)])
    np.testing.assert_array_equal(order(1), order(1))
    assert sorted(order(1)) == list(range(10)) and list(order(1)) != list(order(2))


def test_batch_size_must_be_positive(one: list[InputSpec]) -> None:
    dataset = load_dataset(_x(), one)
    assert "positive integer" in _error(lambda: list(dataset.batches(0)))


def test_labelled_batches_without_labels(one: list[InputSpec]) -> None:
    assert "no labels" in _error(lambda: list(load_dataset(_x(), one).labelled_batches(2)))


def test_split_deterministic_disjoint_and_complete(one: list[InputSpec]) -> None:
    dataset = load_dataset(_x(20), one, np.arange(20))
    train, held = dataset.split(0.25, seed=3)
    again_train, again_held = dataset.split(0.25, seed=3)
    assert len(held) == 5 and len(train) == 15
    np.testing.assert_array_equal(held.labels, again_held.labels)
    np.testing.assert_array_equal(train.arrays["x"], again_train.arrays["x"])
    assert sorted([*train.labels, *held.labels]) == list(range(20))
    np.testing.assert_array_equal(held.arrays["x"], _x(20)[held.labels])
    assert list(dataset.split(0.25, seed=4)[1].labels) != list(held.labels)


def test_split_errors(one: list[InputSpec]) -> None:
    dataset = load_dataset(_x(3), one)
    assert "between 0 and 1" in _error(dataset.split, 1.5)
    assert "at least one sample" in _error(dataset.split, 0.1)


def test_subset(one: list[InputSpec]) -> None:
    dataset = load_dataset(_x(10), one, np.arange(10))
    assert list(dataset.subset(3).labels) == [0, 1, 2]
    random = dataset.subset(4, seed=0)
    assert len(random) == 4 and list(random.labels) == sorted(random.labels)
    assert list(dataset.subset(4, seed=0).labels) == list(random.labels)
    assert dataset.subset(50) is dataset
    assert "positive integer" in _error(dataset.subset, 0)

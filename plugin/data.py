"""Evaluation, calibration and training data: load, validate against the model, batch.

Every check runs up front, before any model is run, and every problem is one
:class:`~graph_passes.errors.DataError` whose message names the file or key, the model input,
what was expected and what was found, and what to do.

Accepted data (``--data`` on the CLI, ``data`` in :func:`load_dataset`):

* a ``.npy`` file: one array, the model's single input;
* a ``.npz`` file: one array per model input. Arrays are matched **by name** when every key is
  the name of a model input. When no key is an input name and the number of arrays equals the
  number of inputs (``np.savez(path, x)`` writes ``arr_0``), they are matched **by position**:
  the arrays in the order they were written to the file, the inputs in the model's order. A key
  named ``labels`` holds the labels (unless the model has an input of that name);
* a folder of ``.npy`` / ``.npz`` files: each file is matched as above and the files are
  concatenated along the batch axis in sorted file-name order (other files are ignored);
* from Python also a ``Mapping`` name -> array, a sequence of arrays (by position) or one array;
  :meth:`Dataset.from_batches` takes any iterable of batches (a torch ``DataLoader`` works: torch
  tensors are converted without importing torch here).

Shapes: dim 0 is the batch axis and can hold any number N >= 1 of samples; every other dim must
equal the model's. An input whose dim 0 is not a batch (a recurrent state ``[layers, 1, hidden]``,
four copies of one sample ``[4, 1, 32, 32]``: ``InputSpec.whole``, see
:func:`graph_passes.batch.batch_layout`) holds N *whole* inputs: ``[N, layers, 1, hidden]``
(``np.stack`` of the per-sample arrays); such a model runs one sample at a time
(``Dataset.per_sample``, batch 1 throughout). Dtypes: float -> float and int -> int conversions (float64 -> float32,
int32 -> int64, ...) are made with an info log line when the values fit; float data for an
integer input and integer data for a float input are refused (an image stored as uint8 usually
needs the model's own normalisation, which prunequant cannot guess). NaN and Inf are refused.

Labels (``--labels``): integer class ids of shape ``[N]``, from a ``.npy``, a ``.npz`` with key
``labels``, or the ``labels`` key of the data ``.npz``; explicit labels win over that key.
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx.helper

from graph_passes.errors import DataError, InputShapeError, UnsupportedModelError
from graph_passes.shapes import format_dims, graph_inputs, value_dims

logger = logging.getLogger(__name__)

LABELS_KEY = "labels"
_ARRAY_SUFFIXES = (".npy", ".npz")
_LOAD_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)

DataSource = str | os.PathLike | Mapping[str, Any] | Sequence[Any] | np.ndarray
LabelSource = str | os.PathLike | np.ndarray | Sequence[int]
_Named = list[tuple[str | None, Any]]  # (key or None, array) in file / argument order


# ------------------------------------------------------------------------------- input specs


def dims_text(dims: Sequence[Any]) -> str:
    """``(3, 'N', 8)`` -> ``'3,N,8'`` (shapes in messages are written ``[3,N,8]``)."""
    return ",".join(str(d) for d in dims)



@dataclass(frozen=True)
class InputSpec:
    """One model input. ``shape`` is static; dim 0 is the batch axis.

    ``batch_dynamic`` is True when the model declares dim 0 symbolic (``shape[0]`` is then 1, a
    placeholder); False when the model fixes the batch size to ``shape[0]``.
    """

    name: str
    shape: list[int]
    dtype: np.dtype
    batch_dynamic: bool = True
    #: dim 0 is not a batch axis: a sample is the whole input (data ``[N, *shape]``)
    whole: bool = False

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample (every dim but the batch; the whole shape of a whole input)."""
        return tuple(self.shape) if self.whole else tuple(self.shape[1:])

    def describe(self) -> str:
        """``'input' [N,1,8,8] float32``."""
        text = f"{self.name!r} [{dims_text(['N', *self.sample_shape])}] {self.dtype}"
        return f"{text} (N whole inputs: its dim 0 is not a batch)" if self.whole else text


def with_whole(specs: Sequence[InputSpec], whole: Iterable[str]) -> list[InputSpec]:
    """``specs`` with the inputs named in ``whole`` marked as whole inputs (and only those)."""
    names = set(whole)
    return [InputSpec(s.name, s.shape, s.dtype, s.batch_dynamic, s.name in names) for s in specs]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """Specs of the model's graph inputs (initializers excluded), in the model's order.

    A symbolic dim 0 is the batch axis and is allowed; any other unknown dim raises
    :class:`InputShapeError` asking for ``--input-shape``.
    """
    return [_input_spec(value) for value in graph_inputs(model)]


def _input_spec(value: onnx.ValueInfoProto) -> InputSpec:
    if value.type.WhichOneof("value") != "tensor_type":
        raise UnsupportedModelError(
            f"input {value.name!r} is not a tensor; prunequant supports tensor inputs only"
        )
    dims = value_dims(value)
    if dims is None:
        raise InputShapeError(
            f"input {value.name!r} has unknown rank; pin it with "
            f"--input-shape {value.name}=NxD1x..."
        )
    if not dims:
        raise UnsupportedModelError(
            f"input {value.name!r} is a scalar (rank 0) with no batch axis; prunequant needs a "
            "batch axis (dim 0) on every input"
        )
    symbolic = [axis for axis, d in enumerate(dims) if not isinstance(d, int)]
    if any(axis > 0 for axis in symbolic):
        example = format_dims([1] + [d if isinstance(d, int) else "D" for d in dims[1:]])
        raise InputShapeError(
            f"input {value.name!r} has symbolic dims (shape [{dims_text(dims)}]); pin them with "
            f"--input-shape {value.name}={example} (the sizes your data has)"
        )
    elem_type = value.type.tensor_type.elem_type
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, TypeError, ValueError) as exc:
        raise UnsupportedModelError(
            f"input {value.name!r} has element type {elem_type}, which has no numpy dtype"
        ) from exc
    shape = [1 if symbolic else int(dims[0]), *(int(d) for d in dims[1:])]
    return InputSpec(value.name, shape, dtype, batch_dynamic=bool(symbolic))


# ---------------------------------------------------------------------------------- Dataset


@dataclass
class Dataset:
    """Validated model inputs (name -> array, dim 0 = samples) and optional int64 labels."""

    arrays: dict[str, np.ndarray]
    labels: np.ndarray | None = None
    source: str = "in-memory data"
    specs: list[InputSpec] = field(default_factory=list, repr=False)
    #: the model runs one sample at a time (its inputs take no batch in dim 0; batch 1 throughout)
    per_sample: bool = False

    @property
    def whole(self) -> frozenset[str]:
        """The inputs whose arrays stack whole model inputs (their dim 0 is not a batch)."""
        return frozenset(s.name for s in self.specs if s.whole)

    def feeds(self, indices: np.ndarray | Sequence[int]) -> dict[str, np.ndarray]:
        """The model's feed for the samples at ``indices``: their slices of each array; a whole
        input takes one sample (``indices`` of length 1) as the model's whole input."""
        indices = np.asarray(indices)
        whole = self.whole
        if whole and len(indices) != 1:
            raise ValueError(f"inputs {sorted(whole)} take one sample at a time, not {len(indices)}")
        return {name: array[indices[0]] if name in whole else array[indices]
                for name, array in self.arrays.items()}

    def __len__(self) -> int:
        return int(next(iter(self.arrays.values())).shape[0]) if self.arrays else 0

    @classmethod
    def from_batches(
        cls,
        batches: Iterable[Any],
        specs: list[InputSpec],
        *,
        max_samples: int | None = None,
        num_classes: int | None = None,
    ) -> Dataset:
        """Collect an iterable of batches (e.g. a torch ``DataLoader``) into a Dataset.

        A batch is a dict name -> array (a ``labels`` key holds labels), a tuple/list of
        ``len(specs)`` arrays in the model's input order, the same plus labels as the last
        element, or one array for a single-input model. Arrays may be torch tensors. Stops after
        ``max_samples`` samples when given (needed for endless loaders).
        """
        if max_samples is not None:
            _positive_int(max_samples, "max_samples")
        parts = _Parts([], [], [], "the batch iterable")
        count = 0
        for index, batch in enumerate(batches):
            where = f"batch {index}"
            named, labels = _split_batch(batch, specs, where)
            parts.arrays.append(_validated_arrays(named, specs, where))
            parts.labels.append(labels)
            parts.names.append(where)
            count += len(next(iter(parts.arrays[-1].values())))
            if max_samples is not None and count >= max_samples:
                break
        if not parts.arrays:
            raise DataError("the batch iterable yielded no batches; pass a non-empty data loader")
        dataset = _assemble(parts, specs, num_classes)
        return dataset.subset(max_samples) if max_samples is not None else dataset

    @property
    def num_samples(self) -> int:
        return len(self)

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[dict[str, np.ndarray]]:
        """Feeds (input name -> array) of ``batch_size`` samples; the last one may be smaller."""
        for indices in self.batch_indices(batch_size, shuffle, seed):
            yield {name: array[indices] for name, array in self.arrays.items()}

    def labelled_batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[tuple[dict[str, np.ndarray], np.ndarray]]:
        """Like :meth:`batches`, with the batch's labels; DataError when there are none."""
        labels = self.require_labels()
        for indices in self.batch_indices(batch_size, shuffle, seed):
            yield {name: a[indices] for name, a in self.arrays.items()}, labels[indices]

    def batch_indices(
        self, batch_size: int, shuffle: bool = False, seed: int = 0
    ) -> Iterator[np.ndarray]:
        """Sample indices per batch; with ``shuffle``, a permutation fixed by ``seed``."""
        size = _positive_int(batch_size, "batch size")
        n = len(self)
        order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
        for start in range(0, len(order), size):
            yield order[start:start + size]

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """``(train, held_out)``: ``fraction`` of the samples, chosen by ``seed``, are held out.

        Deterministic for a given seed; both parts keep the original sample order and hold at
        least one sample.
        """
        if not isinstance(fraction, (int, float)) or not 0.0 < float(fraction) < 1.0:
            raise DataError(f"split fraction must be between 0 and 1 (exclusive), got {fraction!r}")
        n_held = int(round(len(self) * float(fraction)))
        if n_held < 1 or n_held >= len(self):
            raise DataError(
                f"cannot hold out {fraction:.0%} of {len(self)} samples from {self.source}: "
                "each part needs at least one sample; use more data or another fraction"
            )
        order = np.random.default_rng(seed).permutation(len(self))
        held = np.sort(order[:n_held])
        kept = np.sort(order[n_held:])
        return self.take(kept, "train part"), self.take(held, "held-out part")

    def subset(self, n: int, seed: int | None = None) -> Dataset:
        """The first ``n`` samples, or ``n`` random ones (original order) when ``seed`` is given.

        Asking for more samples than there are returns all of them (with an info log).
        """
        n = _positive_int(n, "subset size")
        if n >= len(self):
            if n > len(self):
                logger.info("asked for %d samples; %s has only %d, using all", n, self.source,
                            len(self))
            return self
        if seed is None:
            return self.take(np.arange(n), f"first {n} samples")
        chosen = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return self.take(chosen, f"{n} random samples")

    def take(self, indices: np.ndarray, what: str = "subset") -> Dataset:
        """A new Dataset of the samples at ``indices``."""
        labels = self.labels[indices] if self.labels is not None else None
        arrays = {name: array[indices] for name, array in self.arrays.items()}
        return Dataset(arrays, labels, f"{what} of {self.source}", self.specs, self.per_sample)

    def require_labels(self) -> np.ndarray:
        if self.labels is None:
            raise DataError(
                f"{self.source} has no labels; pass --labels LABELS.npy or add a 'labels' key to "
                "the data .npz"
            )
        return self.labels

    def require_num_classes(self, num_classes: int, what: str = "the model") -> None:
        """DataError when a label is not a valid class id for ``num_classes`` classes."""
        if self.labels is not None:
            _check_label_range(self.labels, num_classes, f"labels of {self.source}", what)


# ------------------------------------------------------------------------------ load_dataset


def load_dataset(
    data: DataSource,
    specs: list[InputSpec],
    labels: LabelSource | None = None,
    *,
    num_classes: int | None = None,
) -> Dataset:
    """Load ``data`` (see the module docs), validate it against ``specs`` and attach labels.

    ``num_classes``, when known, also checks every label is below it.
    """
    if not specs:
        raise DataError("the model has no inputs, so there is nothing to feed it data")
    parts = _read_parts(data, specs)
    if labels is not None:
        if any(part is not None for part in parts.labels):
            logger.info("using the labels passed explicitly, not the %r key of %s", LABELS_KEY,
                        parts.source)
        parts.labels = [None] * len(parts.arrays)
    dataset = _assemble(parts, specs, num_classes)
    if labels is not None:
        dataset.labels = _checked_labels(_read_labels(labels), len(dataset), num_classes,
                                         _labels_name(labels))
    return dataset


@dataclass
class _Parts:
    """Validated pieces of a dataset (files of a folder, batches of an iterable)."""

    arrays: list[dict[str, np.ndarray]]
    labels: list[Any]
    names: list[str]
    source: str


def _read_parts(data: DataSource, specs: list[InputSpec]) -> _Parts:
    if not isinstance(data, (str, os.PathLike)):
        named, labels = _in_memory_arrays(data, specs)
        return _Parts([_validated_arrays(named, specs, "data")], [labels], ["data"], "data")
    path = Path(os.fspath(data))
    is_folder = _is_dir(path)
    parts = _Parts([], [], [], f"data {'folder' if is_folder else 'file'} {str(path)!r}")
    for file in _folder_files(path) if is_folder else [path]:
        named, labels = _read_array_file(file, specs)
        parts.arrays.append(_validated_arrays(named, specs, f"data file {str(file)!r}"))
        parts.labels.append(labels)
        parts.names.append(f"file {file.name!r}")
    return parts


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _folder_files(folder: Path) -> list[Path]:
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        raise DataError(f"cannot list data folder {str(folder)!r}: {exc.strerror or exc}") from exc
    files = [p for p in entries if p.suffix.lower() in _ARRAY_SUFFIXES and p.is_file()]
    if not files:
        raise DataError(
            f"data folder {str(folder)!r} holds no .npy or .npz files; put the input arrays there "
            "(saved with np.save / np.savez) or pass one file"
        )
    ignored = len(entries) - len(files)
    if ignored:
        logger.info("data folder %s: ignoring %d files that are not .npy/.npz", folder, ignored)
    logger.info("data folder %s: %d files, concatenated in sorted order", folder, len(files))
    return files


def _assemble(parts: _Parts, specs: list[InputSpec], num_classes: int | None) -> Dataset:
    """Concatenate validated parts; labels must be in all parts or in none."""
    arrays = {s.name: _concat([p[s.name] for p in parts.arrays]) for s in specs}
    _require_same_count(arrays, parts.source)
    have = [lab is not None for lab in parts.labels]
    if any(have) and not all(have):
        raise DataError(
            f"{parts.source}: {parts.names[have.index(False)]} has no labels but others do; give "
            "labels for all files/batches or for none (or pass --labels)"
        )
    labels = None
    if all(have):
        labels = _checked_labels(_concat(parts.labels), len(arrays[specs[0].name]), num_classes,
                                 f"labels of {parts.source}")
    return Dataset(arrays, labels, parts.source, list(specs))


def _concat(arrays: list[Any]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=0)


def _require_same_count(arrays: Mapping[str, np.ndarray], source: str) -> None:
    counts = {name: int(a.shape[0]) for name, a in arrays.items()}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{name!r}: {n}" for name, n in counts.items())
        raise DataError(
            f"{source}: the inputs hold different numbers of samples ({listed}); every input "
            "needs the same number of samples N along dim 0"
        )


# ---------------------------------------------------------------------------- reading files


def _read_array_file(path: Path, specs: list[InputSpec]) -> tuple[_Named, Any]:
    """``[(key or None, array)]`` in file order, and the ``labels`` array if the file has one."""
    what = f"data file {str(path)!r}"
    _require_file(path, what, "--data")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return [(None, _np_load(path, what))], None
    if suffix == ".npz":
        arrays = _read_npz(path, what)
        input_names = {s.name for s in specs}
        has_labels = LABELS_KEY in arrays and LABELS_KEY not in input_names
        labels = arrays.pop(LABELS_KEY) if has_labels else None
        return list(arrays.items()), labels
    raise DataError(
        f"{what} is neither .npy nor .npz; save the inputs with np.save (one input) or np.savez "
        "(one array per input), or pass a folder of such files"
    )


def _require_file(path: Path, what: str, flag: str) -> None:
    if not path.exists():
        raise DataError(f"{what} does not exist; check the {flag} path")
    if not path.is_file():
        raise DataError(f"{what} is not a regular file; pass a .npy or .npz file")


#: one array of a data file may hold at most this many bytes (split larger data into a folder of
#: files); an .npz member's declared uncompressed size is checked against it before decompressing
MAX_ARRAY_BYTES = 4 * 1024**3
#: an .npz member over 64 MiB that would expand more than this many times is a zip bomb
MAX_COMPRESSION_RATIO = 1000


def _header_bytes(handle: Any, what: str, name: str) -> int:
    """The data bytes an .npy header (at the handle's position) declares; DataError for a
    malformed header, an object dtype or a declared size over MAX_ARRAY_BYTES."""
    fmt = np.lib.format
    try:
        version = fmt.read_magic(handle)
        reader = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
        shape, _, dtype = reader(handle, max_header_size=10000) if version != (3, 0) else (
            fmt._read_array_header(handle, version, max_header_size=10000))  # noqa: SLF001
    except (ValueError, EOFError, OSError, SyntaxError) as exc:
        raise DataError(_load_failure(what, exc)) from exc
    if dtype.hasobject:
        raise DataError(_load_failure(what, ValueError("Object arrays cannot be loaded when allow_pickle=False")))
    count = 1
    for dim in shape:
        count *= int(dim)
    nbytes = count * dtype.itemsize
    if nbytes > MAX_ARRAY_BYTES:
        raise DataError(f"{what}: {name} declares shape [{dims_text(shape)}] of {dtype} = {nbytes:.3g} bytes, "
                        f"over the {MAX_ARRAY_BYTES:.3g}-byte limit of one array; split the data into a "
                        "folder of smaller files (or the file is corrupt)")
    return nbytes


def _check_npy_header(path: Path, what: str) -> None:
    """Refuse an .npy whose header declares more data than the file holds, before allocating."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            nbytes = _header_bytes(handle, what, "the array")
            offset = handle.tell()
    except OSError as exc:
        raise DataError(_load_failure(what, exc)) from exc
    if offset + nbytes > size:
        raise DataError(f"{what}: its header declares {nbytes:,} bytes of data but the file holds "
                        f"{max(0, size - offset):,}; the file is truncated or corrupt - save it again")


def _check_npz_members(path: Path, what: str) -> None:
    """Before anything is decompressed: every member's declared uncompressed size, its .npy
    header (read from the first bytes) and the compression ratio must be sane."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                name = f"member {info.filename!r}"
                if info.file_size > MAX_ARRAY_BYTES + 65536:
                    raise DataError(f"{what}: {name} declares {info.file_size:.3g} uncompressed bytes, over the "
                                    f"{MAX_ARRAY_BYTES:.3g}-byte limit of one array; split the data into a "
                                    "folder of smaller files")
                if (info.file_size > 64 * 1024**2
                        and info.file_size > MAX_COMPRESSION_RATIO * max(1, info.compress_size)):
                    raise DataError(f"{what}: {name} would expand {info.file_size / max(1, info.compress_size):,.0f}"
                                    " times (a zip bomb?); refusing to decompress it")
                if not info.filename.endswith(".npy"):
                    continue
                with archive.open(info) as handle:
                    nbytes = _header_bytes(handle, what, name)
                if nbytes > info.file_size:
                    raise DataError(f"{what}: {name} declares {nbytes:,} bytes of data but holds "
                                    f"{info.file_size:,}; the file is corrupt - save it again")
    except DataError:
        raise
    except _LOAD_ERRORS as exc:
        raise DataError(_load_failure(what, exc)) from exc


def _np_load(path: Path, what: str) -> np.ndarray:
    if path.suffix.lower() != ".npz":
        _check_npy_header(path, what)
    try:
        return np.load(path, allow_pickle=False)
    except _LOAD_ERRORS as exc:
        raise DataError(_load_failure(what, exc)) from exc


def _read_npz(path: Path, what: str) -> dict[str, np.ndarray]:
    if zipfile.is_zipfile(path):
        _check_npz_members(path, what)
    else:  # np.load reads it as a plain .npy (and says so below): its header first
        _check_npy_header(path, what)
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{what} is a plain .npy array, not an .npz archive; rename it to .npy")
        with loaded as archive:
            arrays = {key: archive[key] for key in archive.files}
    except _LOAD_ERRORS as exc:
        raise DataError(_load_failure(what, exc)) from exc
    if not arrays:
        raise DataError(f"{what} holds no arrays; save the inputs with np.savez(path, input=x)")
    return arrays


def _load_failure(what: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    if "pickle" in text.lower():
        return (
            f"{what} holds Python objects (a pickle), which prunequant does not load for safety; "
            "save plain numeric arrays (e.g. np.save(path, x.astype(np.float32)))"
        )
    if isinstance(exc, PermissionError):
        return f"cannot read {what}: permission denied; check its permissions"
    return (
        f"{what} cannot be read as a numpy array file ({type(exc).__name__}: {text[:120]}); it is "
        "corrupt or truncated - write it again with np.save / np.savez"
    )


# ------------------------------------------------------------------------- in-memory data


def _in_memory_arrays(data: Any, specs: list[InputSpec]) -> tuple[_Named, Any]:
    if isinstance(data, Dataset):
        return list(data.arrays.items()), data.labels
    if isinstance(data, Mapping):
        items = [(str(key), value) for key, value in data.items()]
        input_names = {s.name for s in specs}
        labels = next((v for k, v in items if k == LABELS_KEY and k not in input_names), None)
        return [(k, v) for k, v in items if k != LABELS_KEY or k in input_names], labels
    if isinstance(data, (list, tuple)):
        return [(f"[{i}]", value) for i, value in enumerate(data)], None
    if _is_array_like(data):
        return [(None, data)], None
    raise DataError(
        f"cannot use a {type(data).__name__} as data; pass a .npy/.npz path, a folder, a dict "
        "input name -> array, a list of arrays, or Dataset.from_batches(loader, specs)"
    )


def _is_array_like(value: Any) -> bool:
    return isinstance(value, np.ndarray) or hasattr(value, "__array__") or hasattr(value, "detach")


def _to_numpy(value: Any, where: str) -> np.ndarray:
    """An ndarray from an ndarray, a torch tensor (without importing torch) or a nested list."""
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where} is not a numeric array ({exc}); pass numpy arrays") from exc
    if array.dtype == object:
        raise DataError(
            f"{where} is an object array (ragged lists or Python objects); pass a numeric array "
            "with one fixed shape"
        )
    return array


def _split_batch(batch: Any, specs: list[InputSpec], where: str) -> tuple[_Named, Any]:
    """One batch of an iterable -> named arrays and optional labels."""
    if isinstance(batch, Mapping):
        return _in_memory_arrays(batch, specs)
    if isinstance(batch, (list, tuple)):
        items = list(batch)
        labels = items.pop() if len(items) == len(specs) + 1 else None
        return [(f"[{i}]", value) for i, value in enumerate(items)], labels
    if _is_array_like(batch):
        return [(None, batch)], None
    raise DataError(
        f"{where} is a {type(batch).__name__}; a batch must be a dict input name -> array, a "
        "tuple of arrays (optionally followed by labels) or one array"
    )


# ------------------------------------------------------------------------ matching to inputs


def _validated_arrays(
    named: _Named, specs: list[InputSpec], where: str
) -> dict[str, np.ndarray]:
    """Match arrays to inputs, then check and convert each; returns input name -> array."""
    matched = _match_inputs(named, specs, where)
    arrays = {}
    for spec in specs:
        key, value = matched[spec.name]
        label = _label(where, key)
        arrays[spec.name] = _checked_array(_to_numpy(value, label), spec, label)
    _require_same_count(arrays, where)  # per part: a folder could otherwise mis-pair samples
    return arrays


def _label(where: str, key: str | None) -> str:
    if key is None:
        return where
    if not key.startswith("["):
        return f"{where}, key {key!r}"
    return f"{where}{key}" if where == "data" else f"{where}, element {key.strip('[]')}"


def _match_inputs(
    named: _Named, specs: list[InputSpec], where: str
) -> dict[str, tuple[str | None, Any]]:
    names = [s.name for s in specs]
    expected = ", ".join(repr(n) for n in names)
    if not named:
        raise DataError(f"{where} holds no input arrays; the model needs {expected}")
    keys = [key for key, _ in named]
    if all(key in names for key in keys):
        missing = [n for n in names if n not in keys]
        if missing:
            raise DataError(
                f"{where} has no array for model input(s) {missing}; the model needs {expected}"
            )
        return {key: (key, value) for key, value in named}  # type: ignore[misc]
    known = [key for key in keys if key in names]
    if known or len(named) != len(specs):
        raise DataError(_mismatch_message(keys, specs, where))
    if any(key is not None and not key.startswith("[") for key in keys):
        logger.info("%s: keys %s are not input names; matching by position to %s", where, keys,
                    names)
    return {s.name: item for s, item in zip(specs, named)}


def _mismatch_message(keys: list[str | None], specs: list[InputSpec], where: str) -> str:
    names = [s.name for s in specs]
    expected = ", ".join(repr(n) for n in names)
    if keys == [None]:
        return (
            f"{where} holds one array but the model has {len(specs)} inputs ({expected}); save "
            "one array per input in an .npz with those names (np.savez(path, name=array, ...))"
        )
    unknown = [k for k in keys if k not in names]
    if any(k in names for k in keys):
        return (
            f"{where} has arrays {unknown} that are not model inputs; the model's inputs are "
            f"{expected} - rename or remove them"
        )
    return (
        f"{where} holds {len(keys)} arrays ({', '.join(map(str, keys))}) but the model has "
        f"{len(specs)} input(s) ({expected}); give one array per input, named after the input"
    )


# --------------------------------------------------------------------- per-array validation


def _checked_array(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    _check_shape(array, spec, where)
    if np.issubdtype(array.dtype, np.floating):
        _check_finite(array, spec, where)
    return _converted(array, spec, where)


def _check_shape(array: np.ndarray, spec: InputSpec, where: str) -> None:
    got = f"[{dims_text(array.shape)}]" if array.ndim else "a scalar"
    want = f"[{dims_text(['N', *spec.sample_shape])}]"
    if array.shape == spec.sample_shape:
        raise DataError(
            f"{where} has shape {got}, one sample without the batch axis; model input "
            f"{spec.name!r} expects {want} - add the batch axis (x[None] or np.expand_dims(x, 0))"
        )
    if array.ndim != 1 + len(spec.sample_shape) or array.shape[1:] != spec.sample_shape:
        if spec.whole:
            raise DataError(
                f"{where} has shape {got} but model input {spec.name!r} expects {want}: its dim 0 is "
                f"not a batch, so the data stacks N whole inputs of shape [{dims_text(spec.shape)}] "
                "(np.stack of the per-sample arrays)")
        raise DataError(
            f"{where} has shape {got} but model input {spec.name!r} expects {want} (N = any number "
            "of samples); reshape the data to match (or is it data for another model?)"
        )
    if array.shape[0] == 0:
        raise DataError(f"{where} holds 0 samples; model input {spec.name!r} needs at least one")


def _check_finite(array: np.ndarray, spec: InputSpec, where: str) -> None:
    finite = np.isfinite(array)
    if finite.all():
        return
    bad = np.flatnonzero(~finite.reshape(array.shape[0], -1).all(axis=1))
    raise DataError(
        f"{where} (input {spec.name!r}) has {int((~finite).sum())} NaN/Inf values in "
        f"{len(bad)} samples (first: sample {int(bad[0])}); clean or drop those samples"
    )


def _converted(array: np.ndarray, spec: InputSpec, where: str) -> np.ndarray:
    """Same dtype: as is. float->float and int->int (values fitting): converted. Else DataError."""
    have, want = array.dtype, spec.dtype
    if have == want:
        return array
    if _kind(have) != _kind(want) or _kind(want) == "other":
        raise DataError(
            f"{where} is {have} but model input {spec.name!r} is {want}; {_cast_hint(want)}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        converted = array.astype(want)
    if _kind(want) == "float" and not np.isfinite(converted).all():
        raise DataError(
            f"{where} has values outside the range of {want} (model input {spec.name!r}); "
            f"scale the data into range"
        )
    if _kind(want) == "int" and not _fits_int(array, want):
        info = np.iinfo(want)
        raise DataError(
            f"{where} ({have}) has values outside [{info.min}, {info.max}] of model input "
            f"{spec.name!r} ({want}); fix the values"
        )
    logger.info("%s: converted %s -> %s for input %r", where, have, want, spec.name)
    return converted


def _cast_hint(want: np.dtype) -> str:
    if _kind(want) == "float":
        return (f"convert it and normalise it as the model expects (e.g. x.astype(np.{want.name}) "
                "/ 255 for 8-bit images)")
    return f"pass {want} values (x.astype(np.{want.name}) if they are whole numbers)"


def _kind(dtype: np.dtype) -> str:
    if np.issubdtype(dtype, np.floating):
        return "float"
    if np.issubdtype(dtype, np.integer):
        return "int"
    return "other"


def _fits_int(array: np.ndarray, dtype: np.dtype) -> bool:
    if np.can_cast(array.dtype, dtype, "safe") or array.size == 0:
        return True
    info = np.iinfo(dtype)
    return int(array.min()) >= info.min and int(array.max()) <= info.max


# -------------------------------------------------------------------------------- labels


def _labels_name(labels: LabelSource) -> str:
    if isinstance(labels, (str, os.PathLike)):
        return f"labels file {os.fspath(labels)!r}"
    return "labels"


def _read_labels(labels: LabelSource) -> np.ndarray:
    if not isinstance(labels, (str, os.PathLike)):
        return _to_numpy(labels, "labels")
    path = Path(os.fspath(labels))
    what = _labels_name(labels)
    _require_file(path, what, "--labels")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return _np_load(path, what)
    if suffix == ".npz":
        arrays = _read_npz(path, what)
        if LABELS_KEY not in arrays:
            raise DataError(
                f"{what} has no key {LABELS_KEY!r} (keys: {sorted(arrays)}); save it with "
                "np.savez(path, labels=y) or pass a .npy"
            )
        return arrays[LABELS_KEY]
    raise DataError(f"{what} is neither .npy nor .npz; save the class ids with np.save(path, y)")


def _checked_labels(
    labels: Any, n_samples: int, num_classes: int | None, what: str
) -> np.ndarray:
    labels = _to_numpy(labels, what)
    if labels.ndim == 2 and labels.shape[1] > 1:
        raise DataError(
            f"{what} has shape [{dims_text(labels.shape)}] (one-hot or scores?); pass integer "
            "class ids of shape [N] (e.g. y.argmax(axis=1))"
        )
    if labels.ndim != 1:
        raise DataError(
            f"{what} has shape [{dims_text(labels.shape)}]; pass integer class ids of shape [N] "
            "(e.g. y.reshape(-1))"
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(
            f"{what} are {labels.dtype}, not integer class ids; convert them "
            "(y.astype(np.int64)) after checking they are whole numbers"
        )
    if len(labels) != n_samples:
        raise DataError(
            f"{what} has {len(labels)} labels but the data has {n_samples} samples; give one "
            "label per sample, in the same order"
        )
    if len(labels) and int(labels.min()) < 0:
        first = int(np.flatnonzero(labels < 0)[0])
        raise DataError(
            f"{what} has negative class ids (first: {int(labels[first])} at sample {first}); "
            "class ids must be 0..C-1"
        )
    if num_classes is not None:
        _check_label_range(labels, num_classes, what, "the model")
    return labels.astype(np.int64, copy=False)


def _check_label_range(labels: np.ndarray, num_classes: int, what: str, model: str) -> None:
    if len(labels) == 0 or int(labels.max()) < num_classes:
        return
    first = int(np.flatnonzero(labels >= num_classes)[0])
    raise DataError(
        f"{what} has class id {int(labels[first])} (sample {first}) but {model} has "
        f"{num_classes} classes (ids 0..{num_classes - 1}); check the labels belong to this model"
    )


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise DataError(f"{what} must be a positive integer, got {value!r}")
    return int(value)

"""CompressionPlan: the one contract between search and export (JSON, versioned).

A plan says, for one input model (identified by the sha256 of its bytes):

- per channel group (analysis id): the group size and the kept group-channel indices;
- per weight layer (ONNX node name): the bit-width of every output channel (0 = pruned),
  optionally the per-channel weight scales, and optionally a fine-grained (unstructured)
  ``sparsity`` (see :class:`LayerPlan`);
- per activation site (tensor name): bit-width, signedness and clip;
- the cost under every cost model before and after compression; free-form metadata.

File format (``format`` / ``version`` first, keys sorted, integer and float lists on one line,
UTF-8, trailing newline; the same plan always gives the same bytes)::

    {
      "format": "prunequant.plan",
      "version": 1,
      "activations": {"x": {"bits": 8, "clip": 6.0, "signed": false}},
      "costs": {"after": {"size": 12.5}, "before": {"size": 50.0}},
      "groups": {"g0": {"kept": [0, 2], "size": 3}},
      "layers": {"conv1": {"bits": [8, 0, 4], "scales": [0.01, 1.0, 0.2]},
                 "conv2": {"bits": [4, 4], "scales": null, "sparsity": 0.5}},
      "metadata": {"seed": 0, "strategy": "gradient"},
      "model_sha256": "<64 hex digits>"
    }

Every inconsistency, on load or when a plan is built in Python, raises :class:`PlanError` with
one line that names the offending field. This module does not import torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from graph_passes.bitwidths import ACTIVATION_BITS as _ACT_WIDTHS, PRUNED, WEIGHT_BITS as _WEIGHT_WIDTHS
from cost_models.spec import zeroed_per_channel
from graph_passes.errors import InputFileError, OutputError, PlanError

logger = logging.getLogger(__name__)

PLAN_FORMAT = "prunequant.plan"
PLAN_VERSION = 1
WEIGHT_BITS: frozenset[int] = frozenset((PRUNED, *_WEIGHT_WIDTHS))
ACTIVATION_BITS: frozenset[int] = frozenset(_ACT_WIDTHS)
_TOP_LEVEL_KEYS = ("format", "version", "model_sha256", "groups", "layers", "activations", "costs", "metadata")
_SHA256 = re.compile(r"[0-9a-f]{64}")


# ----------------------------------------------------------------------------- field checks


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_positive_number(value: object, where: str) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise PlanError(f"{where} must be a finite number > 0, got {value!r}")
    return float(value)


#: sane ranges of a plan's numbers. An activation clip is the largest magnitude an activation
#: keeps: outside [1e-6, 1e6] an 8-bit step is below float32 resolution of typical activations or
#: larger than any of them (every value rounds to 0: a model at chance accuracy). A weight scale
#: (clip / levels of one channel) outside [1e-12, 1e12] is no float32 weight's. apply_plan
#: recomputes weight scales from the weights anyway; the gate checks the rest.
CLIP_RANGE = (1e-6, 1e6)
SCALE_RANGE = (1e-12, 1e12)
#: a plan file larger than this is refused before it is read (a resnet50 plan is ~2 MB)
MAX_PLAN_BYTES = 64 * 1024 * 1024


def sound_weight_scale(value: float) -> float:
    """A weight scale a plan can hold: ``value``, or the floor ``SCALE_RANGE[0]`` for a
    (near-)dead channel, whose weights are ~0 (PP-OCRv4's DBNet has channels of |w| ~ 5e-34
    after its BatchNorms fold: max|w| / 127 = 4e-36). The floor is exact where it applies: it
    is larger than the channel's own scale, so no weight clips, and every weight below
    ``SCALE_RANGE[0] / 2`` quantizes to the integer 0 (the dead channel computes 0, as it did
    to within 1e-12). A scale above ``SCALE_RANGE[1]`` (|w| > 1e14) is left to the check."""
    value = float(value)
    return SCALE_RANGE[0] if 0 < value < SCALE_RANGE[0] else value


def _require_in_range(value: object, where: str, bounds: tuple[float, float]) -> float:
    number = _require_positive_number(value, where)
    low, high = bounds
    if not low <= number <= high:
        raise PlanError(f"{where} = {value!r} is outside the sane range [{low:g}, {high:g}]; the plan is "
                        "corrupt or was edited - re-create it")
    return number


def _require_int_list(values: object, where: str) -> tuple[int, ...]:
    if not isinstance(values, (list, tuple)):
        raise PlanError(f"{where} must be a list of integers, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not _is_int(value):
            raise PlanError(f"{where}[{i}] must be an integer, got {value!r}")
    return tuple(values)


def _require_mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PlanError(f"{where} must be a JSON object, got {type(value).__name__}")
    for key in value:
        if not isinstance(key, str) or not key:
            raise PlanError(f"{where} has an empty or non-string key {key!r}")
    return value


def _require_keys(obj: Mapping[str, Any], required: tuple[str, ...], where: str) -> None:
    missing = [key for key in required if key not in obj]
    if missing:
        raise PlanError(f"{where} is missing field '{missing[0]}'")
    unknown = sorted(set(obj) - set(required))
    if unknown:
        raise PlanError(f"{where} has unknown field '{unknown[0]}' (expected {', '.join(required)})")


# ----------------------------------------------------------------------------- dataclasses


@dataclass(frozen=True)
class GroupPlan:
    """A channel group: ``size`` channels before pruning; ``kept`` sorted group indices."""

    size: int
    kept: tuple[int, ...]

    def __post_init__(self) -> None:
        where = "group"
        if not _is_int(self.size) or self.size < 1:
            raise PlanError(f"{where}.size must be an integer >= 1, got {self.size!r}")
        kept = _require_int_list(self.kept, f"{where}.kept")
        object.__setattr__(self, "kept", kept)
        for i, index in enumerate(kept):
            if index < 0:
                raise PlanError(f"{where}.kept[{i}] = {index} is negative; channel indices start at 0")
            if index >= self.size:
                raise PlanError(f"{where}.kept[{i}] = {index} is outside [0, {self.size})")
            if i and index <= kept[i - 1]:
                raise PlanError(f"{where}.kept must be strictly increasing, got {kept[i - 1]} then {index}")

    @property
    def pruned(self) -> tuple[int, ...]:
        kept = set(self.kept)
        return tuple(i for i in range(self.size) if i not in kept)


#: the largest fine-grained sparsity a layer may have (every kept channel keeps a nonzero weight
#: as long as floor(sparsity * n) < n; a layer of 100% zeros is a pruned channel, not sparsity)
MAX_SPARSITY = 0.99


@dataclass(frozen=True)
class LayerPlan:
    """A weight layer: one bit-width per output channel (0 = pruned), optional scales, and the
    fine-grained ``sparsity`` in ``[0, MAX_SPARSITY]`` (default 0: dense).

    Sparsity rule (shared by the fake-quant engine, the export and the cost models): in every
    kept output channel, among its weights at *kept* input positions (``n`` of them: fan-in of
    the kept input channels x kernel area), the ``floor(sparsity * n)`` of smallest ``|w|`` are
    zero, ties broken by the lower position in the channel's row-major order (input channel,
    then kernel). Ranking the float weight orders the quantized integers ``|q|`` the same way
    (quantization is monotonic), with their ties broken by the float value. The mask follows the
    weights: recomputed on every forward pass, so QAT may move it; the export writes the zeros
    of the weights it exports as exact integer zeros. In the JSON the field is written only when
    it is not 0 (a dense plan's bytes are unchanged)."""

    bits: tuple[int, ...]
    scales: tuple[float, ...] | None = None
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        sparsity = self.sparsity
        if not _is_number(sparsity) or not math.isfinite(sparsity) or not 0 <= sparsity <= MAX_SPARSITY:
            raise PlanError(f"layer.sparsity must be a number in [0, {MAX_SPARSITY}], got {sparsity!r}")
        object.__setattr__(self, "sparsity", float(sparsity))
        bits = _require_int_list(self.bits, "layer.bits")
        if not bits:
            raise PlanError("layer.bits is empty; a weight layer has at least one output channel")
        for i, value in enumerate(bits):
            if value not in WEIGHT_BITS:
                raise PlanError(f"layer.bits[{i}] = {value} is not one of {sorted(WEIGHT_BITS)}")
        object.__setattr__(self, "bits", bits)
        if self.scales is not None:
            object.__setattr__(self, "scales", self._checked_scales(len(bits)))

    def _checked_scales(self, n_channels: int) -> tuple[float, ...]:
        if not isinstance(self.scales, (list, tuple)):
            raise PlanError(f"layer.scales must be a list of numbers or null, got {type(self.scales).__name__}")
        if len(self.scales) != n_channels:
            raise PlanError(f"layer.scales has {len(self.scales)} entries but bits has {n_channels}")
        return tuple(_require_in_range(s, f"layer.scales[{i}]", SCALE_RANGE) for i, s in enumerate(self.scales))

    @property
    def kept(self) -> tuple[int, ...]:
        """Indices of the output channels that are not pruned."""
        return tuple(i for i, b in enumerate(self.bits) if b != 0)


@dataclass(frozen=True)
class ActivationPlan:
    """An activation site: bit-width, signed (symmetric INT-b) or not (PACT UINT-b), clip."""

    bits: int
    signed: bool
    clip: float

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or self.bits not in ACTIVATION_BITS:
            raise PlanError(f"activation.bits = {self.bits!r} is not one of {sorted(ACTIVATION_BITS)}")
        if not isinstance(self.signed, bool):
            raise PlanError(f"activation.signed must be true or false, got {self.signed!r}")
        object.__setattr__(self, "clip", _require_in_range(self.clip, "activation.clip", CLIP_RANGE))


def _checked_costs(costs: Mapping[str, Any], where: str) -> dict[str, float]:
    out = {}
    for name, value in _require_mapping(costs, where).items():
        if not _is_number(value) or not math.isfinite(value) or value < 0:
            raise PlanError(f"{where}['{name}'] must be a finite number >= 0, got {value!r}")
        out[name] = float(value)
    return out


def _with_where(error: PlanError, where: str) -> PlanError:
    """Re-raise a field error under the full path of the entry it came from."""
    message = error.message
    for prefix in ("group", "layer", "activation"):
        if message.startswith(prefix + ".") or message.startswith(prefix + " "):
            message = where + message[len(prefix):]
            break
    return PlanError(message)


def _checked_entries(entries: Mapping[str, Any], kind: type, where: str) -> dict[str, Any]:
    out = {}
    for key, entry in _require_mapping(entries, where).items():
        if not isinstance(entry, kind):
            raise PlanError(f"{where}['{key}'] must be a {kind.__name__}, got {type(entry).__name__}")
        out[key] = entry
    return out


@dataclass(frozen=True)
class CompressionPlan:
    """The whole plan; see the module docstring for the JSON format."""

    model_sha256: str
    groups: dict[str, GroupPlan] = field(default_factory=dict)
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    activations: dict[str, ActivationPlan] = field(default_factory=dict)
    cost_before: dict[str, float] = field(default_factory=dict)
    cost_after: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        digest = self.model_sha256
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest.lower()):
            raise PlanError(f"model_sha256 must be 64 hexadecimal digits, got {digest!r}")
        object.__setattr__(self, "model_sha256", digest.lower())
        object.__setattr__(self, "groups", _checked_entries(self.groups, GroupPlan, "groups"))
        object.__setattr__(self, "layers", _checked_entries(self.layers, LayerPlan, "layers"))
        object.__setattr__(self, "activations", _checked_entries(self.activations, ActivationPlan, "activations"))
        before = _checked_costs(self.cost_before, "costs.before")
        after = _checked_costs(self.cost_after, "costs.after")
        if set(before) != set(after):
            odd = sorted(set(before) ^ set(after))[0]
            raise PlanError(f"cost model '{odd}' appears in only one of costs.before and costs.after")
        object.__setattr__(self, "cost_before", before)
        object.__setattr__(self, "cost_after", after)
        object.__setattr__(self, "metadata", dict(_require_mapping(self.metadata, "metadata")))
        _check_json_value(self.metadata, "metadata")

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT,
            "version": PLAN_VERSION,
            "model_sha256": self.model_sha256,
            "groups": {k: {"size": g.size, "kept": list(g.kept)} for k, g in self.groups.items()},
            "layers": {k: _layer_dict(layer) for k, layer in self.layers.items()},
            "activations": {
                k: {"bits": a.bits, "signed": a.signed, "clip": a.clip} for k, a in self.activations.items()
            },
            "costs": {"before": dict(self.cost_before), "after": dict(self.cost_after)},
            "metadata": self.metadata,
        }

    def to_json(self) -> str:
        """Byte-stable JSON text (sorted keys, compact scalar lists, trailing newline)."""
        data = self.to_dict()
        head = {"format": data.pop("format"), "version": data.pop("version")}
        return _dump({**head, **dict(sorted(data.items()))}, 0, sort=False) + "\n"

    @classmethod
    def from_dict(cls, data: object) -> CompressionPlan:
        obj = _require_mapping(data, "plan")
        _check_header(obj)
        _require_keys(obj, _TOP_LEVEL_KEYS, "plan")
        costs = _require_mapping(obj["costs"], "costs")
        _require_keys(costs, ("before", "after"), "costs")
        return cls(
            model_sha256=obj["model_sha256"],
            groups=_parse_entries(obj["groups"], "groups", _parse_group),
            layers=_parse_entries(obj["layers"], "layers", _parse_layer),
            activations=_parse_entries(obj["activations"], "activations", _parse_activation),
            cost_before=costs["before"],
            cost_after=costs["after"],
            metadata=obj["metadata"],
        )

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "plan") -> CompressionPlan:
        """Parse and validate; errors are prefixed with ``source`` (e.g. the file name)."""
        try:
            data = json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicate_keys)
            return cls.from_dict(data)
        except PlanError as error:
            raise PlanError(f"{source}: {error.message}") from None
        except RecursionError:
            raise PlanError(f"{source}: JSON nested too deeply to be a plan; re-create the plan") from None
        except (ValueError, UnicodeDecodeError) as error:
            raise PlanError(f"{source}: not valid JSON ({error}); re-create the plan") from None

    # ------------------------------------------------------------------ files

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (temporary file in the same folder, then ``os.replace``)."""
        target = Path(path)
        _atomic_write(target, self.to_json().encode("utf-8"))
        logger.info("wrote compression plan %s", target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CompressionPlan:
        source = Path(path)
        return cls.from_json(_read_plan_file(source), source=str(source))

    # ------------------------------------------------------------------ model identity

    def check_model_hash(self, model: bytes | bytearray | memoryview | str) -> None:
        """Raise PlanError unless ``model`` (the model's bytes, or its sha256) is the plan's."""
        digest = _digest_of(model)
        if digest != self.model_sha256:
            raise PlanError(
                f"this plan was made for the model with sha256 {self.model_sha256[:12]}..., not for "
                f"this model (sha256 {digest[:12]}...); search again for this model or use the model "
                "the plan was made for"
            )


# ----------------------------------------------------------------------------- parsing helpers


def _read_plan_file(source: Path) -> bytes:
    """The bytes of a plan file: a regular file (a FIFO would block, /dev/zero never ends, a
    directory is no plan) of at most MAX_PLAN_BYTES, checked before reading."""
    import stat

    try:
        info = os.stat(source)
    except OSError as error:
        raise InputFileError(f"cannot read plan {source}: {error.strerror or error}; check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise InputFileError(f"plan {source} is a directory; pass the NAME.plan.json file inside it")
    if not stat.S_ISREG(info.st_mode):
        raise InputFileError(f"plan {source} is not a regular file (a FIFO or a device?); pass a plan .json file")
    if info.st_size > MAX_PLAN_BYTES:
        raise InputFileError(f"plan {source} has {info.st_size:,} bytes, more than any plan "
                             f"({MAX_PLAN_BYTES:,}); pass the NAME.plan.json that compress wrote")
    try:
        with open(source, "rb") as handle:
            raw = handle.read(MAX_PLAN_BYTES + 1)
    except OSError as error:
        raise InputFileError(f"cannot read plan {source}: {error.strerror or error}; check the path") from None
    if len(raw) > MAX_PLAN_BYTES:
        raise InputFileError(f"plan {source} grew past {MAX_PLAN_BYTES:,} bytes while being read; pass a plan file")
    return raw


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """The sha256 hex digest of a model's bytes (what ``model_sha256`` holds)."""
    return hashlib.sha256(data).hexdigest()


def _digest_of(model: bytes | bytearray | memoryview | str) -> str:
    if isinstance(model, (bytes, bytearray, memoryview)):
        return sha256_hex(model)
    if isinstance(model, str) and _SHA256.fullmatch(model.lower()):
        return model.lower()
    raise PlanError(f"check_model_hash needs the model's bytes or a sha256 hex digest, got {model!r:.80}")


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise PlanError(f"key '{key}' appears twice in one JSON object")
        out[key] = value
    return out


def _reject_constant(name: str) -> None:
    raise PlanError(f"{name} is not allowed in a plan (numbers must be finite)")


def _check_header(obj: Mapping[str, Any]) -> None:
    if obj.get("format") != PLAN_FORMAT:
        raise PlanError(f"not a prunequant plan (format is {obj.get('format')!r}, expected '{PLAN_FORMAT}')")
    version = obj.get("version")
    if version != PLAN_VERSION or not _is_int(version):
        raise PlanError(
            f"unsupported plan version {version!r}; this prunequant reads version {PLAN_VERSION} "
            "(upgrade prunequant or re-create the plan)"
        )


def _parse_entries(entries: object, where: str, parse: Any) -> dict[str, Any]:
    out = {}
    for key, entry in _require_mapping(entries, where).items():
        entry_where = f"{where}['{key}']"
        try:
            out[key] = parse(_require_mapping(entry, entry_where), entry_where)
        except PlanError as error:
            raise _with_where(error, entry_where) from None
    return out


def _parse_group(obj: Mapping[str, Any], where: str) -> GroupPlan:
    _require_keys(obj, ("size", "kept"), where)
    return GroupPlan(size=obj["size"], kept=obj["kept"])


def _parse_layer(obj: Mapping[str, Any], where: str) -> LayerPlan:
    _require_keys(obj, ("bits", "scales", "sparsity") if "sparsity" in obj else ("bits", "scales"), where)
    return LayerPlan(bits=obj["bits"], scales=obj["scales"], sparsity=obj.get("sparsity", 0.0))


def _parse_activation(obj: Mapping[str, Any], where: str) -> ActivationPlan:
    _require_keys(obj, ("bits", "signed", "clip"), where)
    return ActivationPlan(bits=obj["bits"], signed=obj["signed"], clip=obj["clip"])


def _layer_dict(layer: LayerPlan) -> dict[str, Any]:
    out: dict[str, Any] = {"bits": list(layer.bits), "scales": None if layer.scales is None else list(layer.scales)}
    if layer.sparsity:
        out["sparsity"] = layer.sparsity
    return out


def _check_json_value(value: object, where: str) -> None:
    """Metadata must survive a JSON round trip unchanged (no tuples, NaN or odd types)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise PlanError(f"{where} = {value!r} is not a finite number")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_json_value(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise PlanError(f"{where} has a non-string key {key!r}")
            _check_json_value(item, f"{where}['{key}']")
        return
    raise PlanError(f"{where} holds a {type(value).__name__}, which JSON cannot store")


# ----------------------------------------------------------------------------- writing


def _dump(value: Any, indent: int, sort: bool = True) -> str:
    """JSON with 2-space indentation; lists of scalars stay on one line."""
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = sorted(value.items()) if sort else value.items()
        pad = " " * (indent + 2)
        body = ",\n".join(f"{pad}{json.dumps(k, ensure_ascii=False)}: {_dump(v, indent + 2)}" for k, v in items)
        return "{\n" + body + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        pad = " " * (indent + 2)
        body = ",\n".join(pad + _dump(v, indent + 2) for v in value)
        return "[\n" + body + "\n" + " " * indent + "]"
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(", ", ": "))


def _atomic_write(target: Path, payload: bytes) -> None:
    try:
        handle = tempfile.NamedTemporaryFile(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp", delete=False)
    except OSError as error:
        raise OutputError(f"cannot write plan {target}: {error.strerror or error}; check the folder") from None
    try:
        with handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(handle.name, 0o644)
        os.replace(handle.name, target)
    except OSError as error:
        Path(handle.name).unlink(missing_ok=True)
        raise OutputError(f"cannot write plan {target}: {error.strerror or error}; check the folder") from None

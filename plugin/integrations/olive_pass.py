"""The prunequant pass for Microsoft Olive (``olive-ai``): ``PrunequantCompression``.

Olive finds third-party passes through a *package configuration*: a JSON file mapping a pass
type to the ``module_path`` of its class (``olive run --config WORKFLOW.json --package-config
FILE``, or ``olive.workflows.run(config, package_config=FILE)``). prunequant ships one,
:data:`PACKAGE_CONFIG` (``plugin/integrations/olive_config.json``), declaring this pass only; a
workflow that also uses Olive's own passes needs Olive's default configuration merged with it,
which ``python -m plugin.integrations.olive_pass -o FILE`` writes (:func:`write_package_config`).

In a workflow the pass is ``{"type": "PrunequantCompression", ...}`` with the settings of
``prunequant compress`` (see :meth:`PrunequantCompression._default_config`): ``data_path`` (a
``.npz``/``.npy``/folder, as ``--data``) or an Olive ``data_config`` whose dataloader yields
``(inputs, labels)`` batches, ``strategy`` and ``strategy_options``, ``target`` or ``lam``,
``cost``, ``weight_bits``, ``act_bits``, ``epochs``, ``finetune_epochs``, ``seed``... The pass
receives an ``ONNXModelHandler``, runs :func:`plugin.api.compress` on its file (search, QAT,
export, the gate) and returns an ``ONNXModelHandler`` of a folder holding the QDQ model beside
its ``NAME.plan.json`` and ``NAME.report.json``.

Every setting is checked when Olive validates the pass configuration, before any model is
loaded: a bad one fails the workflow with one line naming the setting (raised as a ``ValueError``,
which Olive passes on to the caller instead of swallowing it). Errors during the run
(``PrunequantError``: data that does not fit the model, a budget no plan meets...) are raised
the same way, with prunequant's one-line message.

Olive is imported only here: the core install (without ``olive-ai``) never imports this module.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Callable, Optional, Union

from olive.common.config_utils import ParamCategory, validate_config
from olive.data.config import DataConfig
from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam, PassParamDefault
from olive.search.search_parameter import SearchParameter, SpecialParamValue
from pydantic import model_validator

from graph_passes.errors import ConfigError, PrunequantError

logger = logging.getLogger(__name__)

#: the package configuration declaring this pass (``olive run --package-config``)
PACKAGE_CONFIG = Path(__file__).with_name("olive_config.json")
PASS_TYPE = "PrunequantCompression"
#: what PACKAGE_CONFIG holds (tests/test_olive.py checks the two agree; an install without the
#: JSON file still writes it with ``python -m plugin.integrations.olive_pass --only-prunequant``)
PASS_DECLARATION: dict[str, Any] = {
    "passes": {
        PASS_TYPE: {
            "module_path": "plugin.integrations.olive_pass.PrunequantCompression",  # not __name__: -m runs it as __main__
            "supported_providers": ["*"],
            "supported_accelerators": ["*"],
            "supported_precisions": ["int4", "int8"],
            "supported_algorithms": [],
            "supported_quantization_encodings": ["qdq"],
            "module_dependencies": ["prunequant"],
            "dataset": "dataset_required",
        }
    },
    "extra_dependencies": {"cpu": ["onnxruntime"], "gpu": ["onnxruntime-gpu"], "ort": []},
}


class OlivePassError(PrunequantError, ValueError):
    """A prunequant error raised inside an Olive workflow.

    A ``ValueError`` so that Olive's engine re-raises it to the caller (it swallows other
    exceptions into a warning and an empty result); ``exit_code`` is the original error's."""

    def __init__(self, message: str, exit_code: int = ConfigError.exit_code) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _plain(value: Any) -> bool:
    """False for Olive's placeholders (search parameters, DEFAULT_VALUE...): checked once resolved."""
    return not isinstance(value, (SearchParameter, PassParamDefault, SpecialParamValue))


def _settings_from(values: dict[str, Any]) -> Any:
    """The pass settings -> a validated :class:`plugin.api.CompressConfig` (ConfigError, one line)."""
    from cost_models import get_cost_model
    from plugin.api import CompressConfig, _check_config
    from plugin.strategies import get_strategy, resolve_options
    from plugin.targets import parse_target

    options = values.get("strategy_options") or {}
    if not isinstance(options, dict):
        raise ConfigError(f"strategy_options must be an object of NAME: VALUE, got {options!r}")
    kwargs: dict[str, Any] = {
        "strategy": values["strategy"], "strategy_options": dict(options), "cost": values["cost"],
        "target": values.get("target"), "lam": values.get("lam"),
        "epochs": values["epochs"], "finetune_epochs": values["finetune_epochs"],
        "qat_schedule": values["qat_schedule"],
        "batch_size": values["batch_size"], "max_steps_per_epoch": values.get("max_steps_per_epoch"),
        "held_out": values["held_out"], "device": values["device"], "seed": values["seed"],
        "threads": values.get("threads"), "keep_best_qat": bool(values["keep_best_qat"]),
        "progress": bool(values["progress"]), "input_shapes": _input_shapes(values.get("input_shapes")),
    }
    if values.get("weight_bits") is not None:
        kwargs["weight_precisions"] = tuple(values["weight_bits"])
    if values.get("act_bits") is not None:
        kwargs["act_bits"] = tuple(values["act_bits"])
    config = CompressConfig(**kwargs)
    config.precisions()  # ConfigError naming the bad width
    _check_config(config)
    get_cost_model(config.cost)  # CostModelError listing the known ones
    if config.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"device {config.device!r} is not one of cpu, cuda, auto")
    if config.lam is not None and config.target is not None:
        raise ConfigError("give either lam or target, not both")
    if config.target is not None:
        parse_target(config.target)
    strategy = get_strategy(config.strategy)  # ConfigError listing the known strategies
    resolve_options(strategy, config.strategy_options)  # unknown option names, unparsable values
    if config.target is not None and not getattr(strategy, "steerable", False):
        raise ConfigError(f"strategy {config.strategy!r} cannot follow a target budget (it does not search); "
                          "drop target, or use a strategy that can (`prunequant strategies`)")
    return config


def _input_shapes(shapes: Any) -> dict[str, list[int]]:
    if not shapes:
        return {}
    if not isinstance(shapes, dict):
        raise ConfigError(f"input_shapes must be an object NAME: [D, D, ...], got {shapes!r}")
    from graph_passes.shapes import parse_input_shapes

    texts = []
    for name, dims in shapes.items():
        if isinstance(dims, str):
            texts.append(f"{name}={dims}")
        elif isinstance(dims, (list, tuple)):
            texts.append(f"{name}={'x'.join(str(d) for d in dims)}")
        else:
            raise ConfigError(f"input_shapes[{name!r}] must be a list of dims or 'DxDxD', got {dims!r}")
    return parse_input_shapes(tuple(texts))


def _olive_wording(message: str) -> str:
    """prunequant's messages name CLI flags; in a workflow they are pass settings
    (``--strategy-option x`` -> ``strategy_options.x``, ``--weight-bits`` -> ``weight_bits``)."""
    message = re.sub(r" \(--[a-z][a-z-]*\)", "", message)  # "epochs (--epochs) must" -> "epochs must"
    message = message.replace("--strategy-option ", "strategy_options.")
    message = re.sub(r"-S ([A-Za-z_]\w*)=", r"strategy_options.\1=", message)
    message = re.sub(r"--lambda\b", "lam", message)
    return re.sub(r"(?<![\w-])--([a-z]+(?:-[a-z]+)*)", lambda m: m.group(1).replace("-", "_"), message)


def _reject_unknown_keys(cls: type, data: Any) -> Any:
    if isinstance(data, dict):
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise OlivePassError(f"{PASS_TYPE}: unknown setting(s) {', '.join(map(repr, unknown))}; its settings: "
                                 f"{', '.join(sorted(cls.model_fields))}")
    return data


def _check_settings(self: BasePassConfig) -> BasePassConfig:
    values = dict(self)
    if not all(_plain(v) for v in values.values()):
        return self  # searchable values: Olive validates the config again at each point
    try:
        _settings_from(values)
        data_path, data_config = values.get("data_path"), values.get("data_config")
        if (data_path is None) == (data_config is None):
            raise ConfigError("give exactly one of data_path (a .npz/.npy file or folder, as prunequant "
                              "compress --data) and data_config (an Olive data config)")
        for key in ("data_path", "labels_path"):
            path = values.get(key)
            if path is not None and not Path(os.fspath(path)).exists():
                raise ConfigError(f"{key} {str(path)!r} does not exist (relative paths are taken from the "
                                  "directory olive runs in)")
    except PrunequantError as exc:
        raise OlivePassError(f"{PASS_TYPE}: {_olive_wording(str(exc))}", exc.exit_code) from None
    return self


class PrunequantCompression(Pass):
    """Joint structured pruning and per-channel mixed-precision quantization (prunequant) of an
    ONNX model, with any registered strategy; writes a QDQ ONNX model (see the module docs)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        from plugin.space import DEFAULT_ACTIVATION_PRECISIONS, DEFAULT_WEIGHT_PRECISIONS
        from plugin.engine.config import DEFAULT_QAT_SCHEDULE

        return {
            "data_path": PassConfigParam(
                type_=Union[str, Path], category=ParamCategory.PATH,
                description="Training/calibration inputs, as `prunequant compress --data`: a .npy, a .npz "
                            "(one array per model input; a 'labels' key holds labels) or a folder of them."),
            "labels_path": PassConfigParam(
                type_=Union[str, Path], category=ParamCategory.PATH,
                description="Class labels (.npy, or .npz with key 'labels'), as --labels. Without labels the "
                            "loss distils the original model's outputs."),
            "data_config": PassConfigParam(
                type_=Union[DataConfig, dict],
                description="Instead of data_path: an Olive data config (or the name of one in the workflow's "
                            "data_configs) whose dataloader yields (inputs, labels) batches."),
            "max_samples": PassConfigParam(
                type_=int, description="With data_config: stop reading the dataloader after this many samples."),
            "strategy": PassConfigParam(
                type_=str, default_value="gradient",
                description="Search strategy: gradient, uniform, sequential, geta, bayesian, rl or a registered "
                            "one (`prunequant strategies`)."),
            "strategy_options": PassConfigParam(
                type_=dict, default_value={},
                description="The strategy's options (NAME: VALUE), as `-S NAME=VALUE`."),
            "cost": PassConfigParam(
                type_=str, default_value="size",
                description="Cost model: size, bops, mpic, mpic_energy, ne16 or a registered one."),
            "target": PassConfigParam(
                type_=str,
                description="Budget, e.g. 'size=35%' (of the all-8-bit model) or 'size=40KB'; default "
                            "'<cost>=35%' for strategies that follow a budget, when lam is not given."),
            "lam": PassConfigParam(type_=float, description="Cost weight instead of a target."),
            "weight_bits": PassConfigParam(
                type_=list[int], default_value=list(DEFAULT_WEIGHT_PRECISIONS),
                description="Weight bit-widths to choose from (0 prunes the channel): any of 0, 2, 4, 8."),
            "act_bits": PassConfigParam(
                type_=list[int], default_value=list(DEFAULT_ACTIVATION_PRECISIONS),
                description="Activation bit-widths to choose from: any of 2, 4, 8."),
            "epochs": PassConfigParam(type_=int, default_value=20, description="Search epochs."),
            "finetune_epochs": PassConfigParam(
                type_=int, default_value=10, description="QAT epochs with the plan frozen."),
            "qat_schedule": PassConfigParam(
                type_=str, default_value=DEFAULT_QAT_SCHEDULE,
                description="QAT learning rate over its epochs: cosine (down to 0 at the last step) or constant."),
            "batch_size": PassConfigParam(type_=int, default_value=64, description="Training batch size."),
            "max_steps_per_epoch": PassConfigParam(
                type_=int, description="Cap on the optimisation steps of every epoch (quick runs)."),
            "held_out": PassConfigParam(
                type_=float, default_value=0.2, description="Share of the data held out to validate the export."),
            "device": PassConfigParam(type_=str, default_value="cpu", description="cpu, cuda or auto."),
            "seed": PassConfigParam(type_=int, default_value=0, description="Same seed, same data, same plan (CPU)."),
            "threads": PassConfigParam(
                type_=int, description="torch threads (default: 1 for models under 50M MACs, else all)."),
            "input_shapes": PassConfigParam(
                type_=dict, default_value={},
                description="Pin symbolic input dims: {NAME: [D, D, ...]} (default: from the data)."),
            "keep_best_qat": PassConfigParam(
                type_=bool, default_value=False, description="QAT ends on its best held-out epoch."),
            "progress": PassConfigParam(type_=bool, default_value=False, description="tqdm progress bars."),
        }

    @classmethod
    def _validators(cls) -> dict[str, Callable]:
        return {
            "prunequant_unknown_keys": model_validator(mode="before")(classmethod(_reject_unknown_keys)),
            "prunequant_settings": model_validator(mode="after")(_check_settings),
        }

    def _run_for_config(self, model: ONNXModelHandler, config: BasePassConfig,
                        output_model_path: str) -> ONNXModelHandler:
        from plugin import api

        if not isinstance(model, ONNXModelHandler):
            raise OlivePassError(f"{PASS_TYPE} compresses ONNX models; got a {type(model).__name__} "
                                 "(convert it first, e.g. with OnnxConversion)")
        values = dict(config)
        try:
            settings = _settings_from(values)
            source = Path(model.model_path)
            out_dir = Path(output_model_path)
            if out_dir.suffix == ".onnx":
                out_dir = out_dir.with_suffix("")
            out_dir.mkdir(parents=True, exist_ok=True)
            output = out_dir / source.name
            data, labels = self._data(values, source)
            result = api.compress(str(source), data, labels=labels, output=str(output), config=settings)
        except PrunequantError as exc:
            raise OlivePassError(f"{PASS_TYPE}: {_olive_wording(str(exc))}", exc.exit_code) from None
        report = result.report
        logger.info("%s: wrote %s (%s)", PASS_TYPE, output, _summary(report))
        attributes = dict(model.model_attributes or {})
        # file names inside the model folder (Olive moves the folder from its cache to output_dir)
        attributes["prunequant"] = {"plan": output.with_suffix(".plan.json").name,
                                    "report": output.with_suffix(".report.json").name,
                                    "strategy": settings.strategy, "summary": _summary(report)}
        return ONNXModelHandler(model_path=str(out_dir), onnx_file_name=source.name,
                                model_attributes=attributes)

    @staticmethod
    def _data(values: dict[str, Any], model_file: Path) -> tuple[Any, Any]:
        """(data, labels) for :func:`plugin.api.compress`: the files as given, or the batches of an
        Olive data config collected into a :class:`plugin.data.Dataset`."""
        if values.get("data_config") is None:
            labels = values.get("labels_path")
            return str(values["data_path"]), (str(labels) if labels is not None else None)
        import onnx

        from plugin.data import Dataset, input_specs

        data_config = validate_config(values["data_config"], DataConfig)
        loader = data_config.to_data_container().create_dataloader()
        specs = input_specs(onnx.load(str(model_file), load_external_data=False))
        batches = (_as_prunequant_batch(batch) for batch in loader)
        return Dataset.from_batches(batches, specs, max_samples=values.get("max_samples")), None


def _as_prunequant_batch(batch: Any) -> Any:
    """Olive's ``(inputs, labels)`` batch -> a batch :meth:`Dataset.from_batches` reads (a dict
    of inputs gets the labels under the ``labels`` key)."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and isinstance(batch[0], dict):
        inputs, labels = batch
        return {**inputs, "labels": labels} if labels is not None else dict(inputs)
    return batch


def _summary(report: dict) -> str:
    """``size 0.31 of 8-bit, held-out accuracy 99.21% (FP32 99.60%), 41,234 B``."""
    parts = []
    before, after = report.get("cost_before_8bit") or {}, report.get("cost_after") or {}
    if before.get("size") and "size" in after:
        parts.append(f"size {after['size'] / before['size']:.3f} of 8-bit")
    quality = report.get("quality") or {}
    if quality.get("accuracy_after") is not None:
        text = f"held-out accuracy {100 * quality['accuracy_after']:.2f}%"
        if quality.get("accuracy_before") is not None:
            text += f" (FP32 {100 * quality['accuracy_before']:.2f}%)"
        parts.append(text)
    if (report.get("file") or {}).get("bytes"):
        parts.append(f"{report['file']['bytes']:,} B")
    return ", ".join(parts) or "see the report"


def package_config(merge_default: bool = True) -> dict[str, Any]:
    """Olive's package configuration with this pass: Olive's default one (every built-in pass)
    merged with :data:`PACKAGE_CONFIG`, or only the latter."""
    ours = json.loads(json.dumps(PASS_DECLARATION))
    if not merge_default:
        return ours
    from olive.package_config import OlivePackageConfig

    merged = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    merged.setdefault("passes", {}).update(ours["passes"])
    extras = merged.setdefault("extra_dependencies", {})
    for key, value in ours.get("extra_dependencies", {}).items():
        extras.setdefault(key, value)
    return merged


def write_package_config(path: str | os.PathLike, merge_default: bool = True) -> Path:
    """Write :func:`package_config` to ``path`` (for ``olive run --package-config``)."""
    target = Path(path)
    target.write_text(json.dumps(package_config(merge_default), indent=2) + "\n")
    return target


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m plugin.integrations.olive_pass",
        description="Write an Olive package configuration declaring the PrunequantCompression pass "
                    "(merged with Olive's default one, so Olive's own passes still resolve).")
    parser.add_argument("-o", "--output", required=True, help="where to write the JSON")
    parser.add_argument("--only-prunequant", action="store_true",
                        help="declare only PrunequantCompression (the file shipped as olive_config.json)")
    args = parser.parse_args(argv)
    written = write_package_config(args.output, merge_default=not args.only_prunequant)
    logger.info("wrote %s", written)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

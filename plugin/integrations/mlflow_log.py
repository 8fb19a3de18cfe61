"""Log a compress run to MLflow (the optional extra ``prunequant[mlflow]``).

    prunequant compress model.onnx --data calib.npz -o small.onnx --mlflow-uri sqlite:///mlflow.db

    from plugin import api
    from plugin.integrations.mlflow_log import check_tracking_uri, log_run
    check_tracking_uri("sqlite:///mlflow.db", "digits")     # optional: fail before a long search
    result = api.compress("model.onnx", "calib.npz", output="small.onnx")
    run_id = log_run(result, "sqlite:///mlflow.db", "digits", files=["small.onnx", *api.sidecar_paths("small.onnx")])

This module sits above the library (it uses :mod:`plugin.api`'s results; the library never imports
it), like the other integrations.

Two steps, both through :class:`mlflow.tracking.MlflowClient` (no global MLflow state is set):

* :func:`check_tracking_uri` before the search: mlflow importable (else ConfigError naming the
  extra), the URI usable (the experiment is looked up, and created when missing, with HTTP retries
  off and a short timeout): an unreachable server or a URI MLflow refuses is one line at once
  (OutputError), not after an hour of search;
* :func:`log_run` once the model passed the gate and was written: parameters (strategy, its
  options, target, cost model, precisions, epochs, seed, the input model's hashes), metrics
  (accuracy and top-1 agreement before/after, size and every cost model before/after, file bytes,
  OpenVINO's agreement when the report has it, wall time), and as artifacts the model, its
  NAME.plan.json and NAME.report.json (under ``model/``).

MLflow 3 refuses its file store (``file:`` / a plain path) unless ``MLFLOW_ALLOW_FILE_STORE=true``
is set; a local store without a server is ``sqlite:///PATH.db``. For a new experiment in a local
SQLite store the artifacts go beside the database (``PATH-artifacts/``), not into the current
directory (MLflow's default ``./mlruns``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from graph_passes.errors import ConfigError, OutputError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'prunequant[mlflow]'"
DEFAULT_EXPERIMENT = "prunequant"
#: seconds one request of the up-front check may take (no retries)
CHECK_TIMEOUT_S = 10
_MAX_PARAM_CHARS = 6000


def import_mlflow() -> Any:
    """The ``mlflow`` module, or ConfigError naming the extra to install."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient  # noqa: F401 - the part we use
    except ImportError as exc:
        raise ConfigError(f"--mlflow-uri needs MLflow, which is not installed ({exc}); install it with "
                          f"{INSTALL_HINT}, or drop --mlflow-uri") from exc
    return mlflow


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split())
    for stop in (". Please", ". See "):  # MLflow appends long advice and links
        head, sep, _ = text.partition(stop)
        if sep and len(head) > 20:
            text = head + "."
            break
    return (text or type(exc).__name__)[:limit]


def _redacted(uri: str) -> str:
    """The URI without a password (http://user:secret@host -> http://user:***@host)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        creds, _, host = rest.partition("@")
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return uri


@contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """MLflow's INFO lines (database migrations, run links) stay out of the command's stderr; its
    warnings and errors still show. The logger's level is put back afterwards."""
    loggers = [logging.getLogger(name) for name in ("mlflow", "alembic")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        if lg.getEffectiveLevel() < logging.WARNING:
            lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


@contextmanager
def _quick_requests() -> Iterator[None]:
    """MLflow's HTTP client with no retries and a short timeout (its defaults retry for minutes)."""
    wanted = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": str(CHECK_TIMEOUT_S)}
    saved = {key: os.environ.get(key) for key in wanted}
    os.environ.update(wanted)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _sqlite_artifact_root(uri: str) -> str | None:
    """``sqlite:///dir/x.db`` -> a file URI of ``dir/x-artifacts``; None for other stores."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or uri == prefix + ":memory:":
        return None
    path = Path(uri[len(prefix):]).expanduser()
    return (path.parent.resolve() / f"{path.stem}-artifacts").as_uri()


def _client(uri: str) -> Any:
    import_mlflow()
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, uri: str, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise OutputError(f"MLflow experiment {name!r} at {_redacted(uri)} is deleted; restore it or give "
                              "another --mlflow-experiment")
        return experiment.experiment_id
    return client.create_experiment(name, artifact_location=_sqlite_artifact_root(uri))


def check_tracking_uri(uri: str, experiment: str | None = None) -> str:
    """Fail fast: the experiment's id at ``uri`` (created when missing), or one line saying why
    MLflow cannot be used (ConfigError: mlflow missing or an empty URI; OutputError: the store
    refuses the URI or cannot be reached)."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"--mlflow-uri must be a tracking URI such as sqlite:///mlflow.db or "
                          f"http://host:5000, got {uri!r}")
    if experiment is not None and (not isinstance(experiment, str) or not experiment.strip()):
        raise ConfigError(f"--mlflow-experiment must be a non-empty name, got {experiment!r}")
    name = experiment or DEFAULT_EXPERIMENT
    start = time.perf_counter()
    import_mlflow()
    try:
        with _quick_requests(), _quiet_mlflow():
            experiment_id = _experiment_id(_client(uri), uri, name)
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - MLflow, SQLAlchemy and requests raise many types
        raise OutputError(f"MLflow tracking URI {_redacted(uri)!r} cannot be used: {_first_line(exc)} "
                          "(a local store without a server: --mlflow-uri sqlite:///PATH.db)") from exc
    logger.info("MLflow: experiment %r (%s) at %s, checked in %.1f s", name, experiment_id, _redacted(uri),
                time.perf_counter() - start)
    return experiment_id


# ----------------------------------------------------------------------------- what a run logs


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        text = ",".join(str(v) for v in value)
    elif isinstance(value, dict):
        text = json.dumps(value, sort_keys=True, default=str)
    else:
        text = str(value)
    return text[:_MAX_PARAM_CHARS]


def _file_sha256(path: str) -> str | None:
    try:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()
    except OSError:
        return None


def run_params(report: dict, metadata: dict | None = None) -> dict[str, str]:
    """The parameters of a compress run, from its report (``report["config"]`` is the config)."""
    config = report.get("config", {}) or {}
    metadata = metadata or {}
    params: dict[str, Any] = {
        "strategy": report.get("strategy", config.get("strategy")),
        "target": metadata.get("target") or config.get("target") or "none",
        "cost": config.get("cost"),
        "lambda": config.get("lam"),
        "weight_precisions": config.get("weight_precisions"),
        "activation_precisions": (config.get("act_bits") if config.get("act_bits") is not None
                                  else config.get("activation_precisions")),
        "epochs": config.get("epochs"),
        "finetune_epochs": config.get("finetune_epochs"),
        "batch_size": config.get("batch_size"),
        "seed": config.get("seed"),
        "held_out": config.get("held_out"),
        "device": config.get("device"),
        "input_model": report.get("model"),
        "input_model_digest": report.get("plan_model_sha256"),
        "prunequant_version": (report.get("versions") or {}).get("prunequant"),
    }
    model = report.get("model")
    if isinstance(model, str) and os.path.isfile(model):
        params["input_model_sha256"] = _file_sha256(model)
    options = metadata.get("strategy_options", config.get("strategy_options")) or {}
    for key, value in sorted(options.items()):
        params[f"strategy_option.{key}"] = value
    return {key: _text(value) for key, value in params.items() if value is not None}


def run_metrics(report: dict) -> dict[str, float]:
    """The metrics of a compress run: quality and every cost model before/after, file size, wall time."""
    metrics: dict[str, Any] = {}
    quality = report.get("quality", {}) or {}
    for key in ("accuracy_before", "accuracy_after", "accuracy_after_ort_optimized"):
        metrics[key] = quality.get(key)
    if quality.get("top1_agreement_with_original") is not None:
        metrics["agreement_before"] = 1.0  # the original agrees with itself
        metrics["agreement_after"] = quality["top1_agreement_with_original"]
    metrics["fake_quant_top1_agreement"] = quality.get("fake_quant_top1_agreement")
    for out in quality.get("outputs_vs_original", []) or []:
        if out.get("sqnr_db") is not None:
            metrics[f"sqnr_db.{out.get('name')}"] = out["sqnr_db"]
    before, after = report.get("cost_before_8bit", {}) or {}, report.get("cost_after", {}) or {}
    for name, value in before.items():
        metrics[f"cost_before.{name}"] = value
    for name, value in after.items():
        metrics[f"cost_after.{name}"] = value
        if before.get(name):
            metrics[f"cost_ratio.{name}"] = value / before[name]
    if "size" in before:
        metrics["size_bytes_before"] = before["size"] / 8
    if "size" in after:
        metrics["size_bytes_after"] = after["size"] / 8
    file = report.get("file", {}) or {}
    metrics["file_bytes_after"] = file.get("bytes")
    metrics["fp32_weight_bytes_before"] = file.get("fp32_weight_bytes")
    openvino = ((report.get("runtimes") or {}).get("openvino") or {})
    if openvino.get("status") == "ok":
        metrics["openvino_top1_agreement_with_onnxruntime"] = openvino.get("top1_agreement_with_onnxruntime")
        metrics["openvino_max_abs_diff"] = openvino.get("max_abs_diff")
    seconds = report.get("seconds", {}) or {}
    if seconds:
        metrics["wall_seconds"] = sum(float(v) for v in seconds.values())
        for phase, value in seconds.items():
            metrics[f"seconds.{phase}"] = value
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None:
            continue
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def _artifact_files(result: Any, files: list[str | os.PathLike] | None, staging: Path) -> list[Path]:
    """``files`` as written (the model's external data too), or the result's model, plan and report
    written to ``staging`` (NAME.onnx, NAME.plan.json, NAME.report.json) when none are given."""
    if files:
        paths = [Path(p) for p in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise OutputError(f"cannot log {missing[0]!r} to MLflow: it is not a file")
        data = Path(f"{paths[0]}.data")
        return [*paths, data] if data.is_file() and data not in paths else paths
    import onnx

    stem = Path(result.output).stem if result.output else "model"
    model_path = staging / f"{stem}.onnx"
    onnx.save_model(result.model, str(model_path))
    (staging / f"{stem}.plan.json").write_text(result.plan.to_json())
    (staging / f"{stem}.report.json").write_text(json.dumps(result.report, indent=2, default=str))
    return [model_path, staging / f"{stem}.plan.json", staging / f"{stem}.report.json"]


def log_run(result: Any, uri: str, experiment: str | None = None, *, files: list[str | os.PathLike] | None = None,
            run_name: str | None = None, tags: dict[str, str] | None = None) -> str:
    """Log a :class:`plugin.api.CompressResult` as one MLflow run (see the module docs); returns
    the run id. ``files``: the written model, plan and report to log as artifacts (None: the
    result's model, plan and report are staged in a temporary folder and logged from there).
    OutputError when MLflow fails (the written files stay: they passed the gate)."""
    from mlflow.entities import Metric, Param, RunTag

    experiment_id = check_tracking_uri(uri, experiment)
    client = _client(uri)
    report = result.report
    metadata = getattr(result.plan, "metadata", {}) or {}
    name = run_name or (Path(result.output).stem if result.output else f"prunequant-{report.get('strategy')}")
    all_tags = {"prunequant.strategy": str(report.get("strategy")), "prunequant.output": str(result.output),
                **(tags or {})}
    now = int(time.time() * 1000)
    written = f"the model was written to {result.output}, but " if result.output else ""
    run_id: str | None = None
    params: list[Any] = []
    metrics: list[Any] = []
    with _quiet_mlflow():
        try:
            run = client.create_run(experiment_id, run_name=name, tags=all_tags)
            run_id = run.info.run_id
            params = [Param(k, v) for k, v in run_params(report, metadata).items()]
            metrics = [Metric(k, v, now, 0) for k, v in run_metrics(report).items()]
            for i in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
                client.log_batch(run_id, params=params[i:i + 100])
            for i in range(0, len(metrics), 1000):
                client.log_batch(run_id, metrics=metrics[i:i + 1000])
            client.log_batch(run_id, tags=[RunTag("prunequant.model_digest", str(report.get("plan_model_sha256")))])
            with tempfile.TemporaryDirectory(prefix="prunequant-mlflow-") as tmp:
                for path in _artifact_files(result, files, Path(tmp)):
                    client.log_artifact(run_id, str(path), artifact_path="model")
            client.set_terminated(run_id, "FINISHED")
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types
            if run_id is not None:
                try:
                    client.set_terminated(run_id, "FAILED")
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    pass
            if isinstance(exc, OutputError):
                raise
            raise OutputError(f"{written}logging the run to MLflow at {_redacted(uri)!r} failed: {_first_line(exc)}") from exc
    logger.info("MLflow: logged run %s (%d params, %d metrics) to %s", run_id, len(params), len(metrics),
                _redacted(uri))
    return run_id


__all__ = ["DEFAULT_EXPERIMENT", "INSTALL_HINT", "check_tracking_uri", "import_mlflow", "log_run", "run_metrics",
           "run_params"]

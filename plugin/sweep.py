"""Sweeps: many compress runs as jobs on Ray, gathered into one Pareto front.

    from plugin import sweep
    spec = sweep.SweepSpec(model="model.onnx", data="train.npz", output="runs/",
                           base={"epochs": 4, "finetune_epochs": 2})
    jobs = sweep.grid(["gradient", "bayesian"], sweep.parse_targets("size=50%,35%,25%"), [0, 1, 2])
    result = sweep.run_sweep(spec, jobs)            # local Ray; address="ray://host:10001" joins a cluster
    result.records, result.fronts, result.failed

Every job is one :func:`plugin.api.compress` call writing ``OUT/<job-id>/model.onnx`` (plus its plan
and report) and then ``OUT/<job-id>/result.json``, the job's complete record, written last and
atomically: a job is finished exactly when that file holds a record of status ``ok`` for the same
job settings and model. A resumed sweep skips those; every other job (never started, half-finished,
failed, or with other settings) is run again from an empty folder. A failed job records its
one-line error and the sweep goes on; :class:`SweepResult.failed` counts them (the CLI exits
with :class:`~graph_passes.errors.SweepJobsFailed`).

Every record stores its provenance: the prunequant version, the source commit when known, the
library versions, the command line and the SHA-256 of the input model file. The gathered
results are ``OUT/sweep.json`` (every record and the fronts), ``OUT/sweep.csv`` (one row per
job) and ``OUT/sweep.png`` (accuracy vs size and vs energy, the front drawn per strategy).

Ray is imported only when jobs run (the ``sweep`` extra: ``pip install prunequant[sweep]``).
On a cluster (``address``), every path given must be readable at the same place on every node
and prunequant must be installed there.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from graph_passes.errors import ConfigError, OutputError

from .provenance import command_line, commit, file_sha256, prunequant_version, versions

logger = logging.getLogger(__name__)

RESULT_NAME = "result.json"
SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep.png")
#: CompressConfig fields a sweep sets per job or refuses (the job's own, or meaningless here)
_JOB_FIELDS = ("strategy", "target", "seed", "progress", "threads")
#: the two fronts: the axis name -> the cost model whose ratio to the all-8-bit model is plotted
FRONT_COSTS = {"size": "size", "energy": "mpic_energy"}

CSV_FIELDS = ["job_id", "label", "status", "strategy", "target", "seed", "lam", "accuracy", "accuracy_source",
              "heldout_accuracy", "eval_accuracy", "size_bytes", "size_ratio", "energy_uJ", "energy_ratio",
              "bops", "mpic_cycles", "file_bytes", "search_s", "finetune_s", "wall_s", "on_size_front",
              "on_energy_front", "error", "prunequant", "commit", "model_sha256"]


# ----------------------------------------------------------------------------- what to run


@dataclass
class SweepSpec:
    """What every job shares: the model, the data (paths, so a job can run on any node), the
    output folder and the CompressConfig fields common to all jobs (``base``)."""

    model: str
    data: str
    output: str
    labels: str | None = None
    eval_data: str | None = None  # scored with onnxruntime after each job (e.g. a test split)
    eval_labels: str | None = None
    base: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass
class Job:
    """One compress run: ``config`` holds CompressConfig fields beyond the spec's ``base``."""

    id: str
    strategy: str
    target: str | None
    seed: int
    config: dict[str, Any] = field(default_factory=dict)
    label: str | None = None

    def settings(self, base: dict[str, Any]) -> dict[str, Any]:
        """The job's CompressConfig fields (JSON-ready: tuples as lists), as recorded."""
        merged = {**base, **self.config, "strategy": self.strategy, "target": self.target, "seed": self.seed}
        return json.loads(json.dumps(merged, default=list))


def parse_targets(text: str) -> list[str]:
    """``"size=50%,35%,25%"`` -> ``["size=50%", "size=35%", "size=25%"]`` (an item without a cost
    name takes the previous one's: ``size=50%,mpic=30%,20%`` also works); each is validated."""
    from .targets import parse_target

    out: list[str] = []
    cost: str | None = None
    for item in (t.strip() for t in (text or "").split(",")):
        if not item:
            raise ConfigError(f"--targets {text!r}: an empty item; give e.g. size=50%,35%,25%")
        if "=" in item:
            cost = item.partition("=")[0].strip()
        elif cost is None:
            raise ConfigError(f"--targets {text!r}: the first item needs a cost model, e.g. size=50%,35%")
        else:
            item = f"{cost}={item}"
        parse_target(item)
        if item in out:
            raise ConfigError(f"--targets: {item} given twice")
        out.append(item)
    return out


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]`` (non-negative integers, no repeats)."""
    seeds: list[int] = []
    for item in (t.strip() for t in str(text).split(",")):
        if not item.isdigit():
            raise ConfigError(f"--seeds {text!r}: expected non-negative integers, e.g. 0,1,2")
        if int(item) in seeds:
            raise ConfigError(f"--seeds: {item} given twice")
        seeds.append(int(item))
    return seeds


def parse_strategies(text: str) -> list[str]:
    """``"gradient,bayesian"`` -> the names, each a registered strategy."""
    from .strategies import available_strategies, get_strategy

    names = [t.strip() for t in (text or "").split(",")]
    for name in names:
        if not name:
            raise ConfigError(f"--strategies {text!r}: an empty item; give e.g. gradient,bayesian,rl")
        if name not in available_strategies():
            get_strategy(name)  # ConfigError listing the known names
    if len(set(names)) != len(names):
        raise ConfigError(f"--strategies {text!r}: a strategy given twice")
    return names


def parse_job_options(texts: Iterable[str], strategies: Sequence[str]) -> dict[str, dict[str, str]]:
    """``-S STRATEGY.NAME=VALUE`` (repeatable) -> {strategy: {name: value}}; validated against
    each strategy's options (``prunequant strategies``)."""
    from .strategies import get_strategy, resolve_options

    out: dict[str, dict[str, str]] = {}
    for text in texts:
        key, sep, value = text.partition("=")
        strategy, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"-S {text!r}: expected STRATEGY.NAME=VALUE, e.g. -S bayesian.trials=20")
        if strategy not in strategies:
            raise ConfigError(f"-S {text!r}: {strategy!r} is not one of --strategies ({', '.join(strategies)})")
        if name in out.get(strategy, {}):
            raise ConfigError(f"-S {strategy}.{name}: given twice")
        out.setdefault(strategy, {})[name] = value.strip()
    for strategy, options in out.items():
        resolve_options(get_strategy(strategy), options)  # ConfigError naming a bad option
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "", text.replace("%", "pct").replace("=", ""))


def job_id(strategy: str, target: str | None, seed: int, extra: str = "") -> str:
    """A folder name: ``gradient_size35pct_s0`` (``extra`` tells apart jobs of other settings)."""
    parts = [strategy, _slug(target) if target else "none", *([_slug(extra)] if extra else []), f"s{seed}"]
    return "_".join(parts)


def grid(strategies: Sequence[str], targets: Sequence[str], seeds: Sequence[int],
         options: dict[str, dict[str, Any]] | None = None) -> list[Job]:
    """Every (strategy, target, seed). A strategy that cannot follow a budget (``uniform``,
    ``geta``) runs once per seed, without a target."""
    from .strategies import get_strategy

    jobs: list[Job] = []
    for strategy in strategies:
        cls = get_strategy(strategy)
        config = {"strategy_options": dict((options or {}).get(strategy, {}))}
        for target in (targets if getattr(cls, "steerable", False) and targets else [None]):
            for seed in seeds:
                jobs.append(Job(job_id(strategy, target, seed), strategy, target, int(seed), dict(config)))
    return jobs


def check_jobs(jobs: Sequence[Job], base: dict[str, Any]) -> None:
    """ConfigError before anything runs: repeated ids, fields a job may not set, options a
    strategy does not take, a config ``compress`` would refuse."""
    from .api import CompressConfig, _check_config
    from .strategies import get_strategy, resolve_options

    known = set(CompressConfig.__dataclass_fields__)
    for name in base:
        if name in _JOB_FIELDS or name not in known:
            raise ConfigError(f"sweep: {name!r} cannot be a setting shared by every job")
    seen: set[str] = set()
    for job in jobs:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", job.id) or job.id in seen:
            raise ConfigError(f"sweep: job id {job.id!r} is repeated or not a plain folder name")
        seen.add(job.id)
        bad = [k for k in job.config if k in _JOB_FIELDS or k not in known]
        if bad:
            raise ConfigError(f"sweep job {job.id}: {bad[0]!r} is not a per-job CompressConfig field")
        config = CompressConfig(**{**base, **job.config, "strategy": job.strategy, "target": job.target,
                                   "seed": job.seed})
        _check_config(config)
        resolve_options(get_strategy(job.strategy), config.strategy_options)


# ----------------------------------------------------------------------------- one job


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _ratio(after: dict, before: dict, name: str) -> float | None:
    a, b = after.get(name), before.get(name)
    return float(a) / float(b) if a is not None and b else None


def run_job(job: dict[str, Any], spec: dict[str, Any], provenance: dict[str, Any]) -> dict[str, Any]:
    """Run one job (plain Python: Ray calls it in a worker; also callable in-process) and write
    its record, ``OUT/<job-id>/result.json``, last and atomically. Errors are recorded, not
    raised (Ctrl-C still stops it)."""
    from .api import CompressConfig, compress

    start = time.perf_counter()
    folder = Path(spec["output"]) / job["id"]
    settings = job["settings"]
    record: dict[str, Any] = {
        "job_id": job["id"], "label": job.get("label") or job["id"], "strategy": job["strategy"],
        "target": job["target"], "seed": job["seed"], "settings": settings,
        "provenance": {**provenance, "host": socket.gethostname()},
        "worker_pid": os.getpid(), "started_at": time.time(),
    }
    if folder.exists():  # a half-finished or failed run: start again from an empty folder
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    threads = int(job.get("threads") or 1)
    try:
        import torch

        torch.set_num_threads(threads)
        if file_sha256(spec["model"]) != provenance["model_sha256"]:
            raise ConfigError(f"the model file {spec['model']!r} changed since the sweep started (its SHA-256 "
                              "differs); start a new sweep")
        fields = {k: (tuple(v) if isinstance(v, list) else v) for k, v in settings.items()
                  if k not in ("strategy_options", "input_shapes")}
        config = CompressConfig(**fields, strategy_options=dict(settings.get("strategy_options") or {}),
                                input_shapes=dict(settings.get("input_shapes") or {}), progress=False,
                                threads=threads)
        output = folder / "model.onnx"
        result = compress(spec["model"], spec["data"], labels=spec.get("labels"), output=str(output), config=config)
        report = result.report
        record.update(_measures(report, output))
        if spec.get("eval_data"):
            record["eval_accuracy"] = _eval_accuracy(output, spec["eval_data"], spec.get("eval_labels"))
        record["accuracy"], record["accuracy_source"] = (
            (record["eval_accuracy"], "eval_data") if record.get("eval_accuracy") is not None
            else (record.get("heldout_accuracy"), "held_out"))
        record["provenance"]["plan_model_sha256"] = report.get("plan_model_sha256")
        record["status"] = "ok"
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a failed job is a result: its one-line error
        record["status"] = "failed"
        record["error"] = _one_line(exc)
        logger.warning("sweep job %s failed: %s", job["id"], record["error"])
    record["wall_s"] = round(time.perf_counter() - start, 3)
    record["finished_at"] = time.time()
    _write_atomic(folder / RESULT_NAME, json.dumps(record, indent=2, default=str))
    return record


def _measures(report: dict[str, Any], output: Path) -> dict[str, Any]:
    before, after, seconds = report["cost_before_8bit"], report["cost_after"], report.get("seconds", {})
    quality = report.get("quality", {})
    history = report.get("history")
    return {
        "heldout_accuracy": quality.get("accuracy_after"),
        "heldout_accuracy_fp32": quality.get("accuracy_before"),
        "top1_agreement": quality.get("top1_agreement_with_original"),
        "size_bytes": after["size"] / 8 if "size" in after else None,
        "size_ratio": _ratio(after, before, "size"),
        "energy_uJ": after.get("mpic_energy"),
        "energy_ratio": _ratio(after, before, "mpic_energy"),
        "bops": after.get("bops"), "mpic_cycles": after.get("mpic"),
        "cost_before_8bit": before, "cost_after": after,
        "file_bytes": report.get("file", {}).get("bytes"),
        "search_s": seconds.get("search"), "finetune_s": seconds.get("finetune"), "seconds": seconds,
        "history_entries": len(history) if isinstance(history, list) else None,
        "files": {"model": output.name, "plan": "model.plan.json", "report": "model.report.json"},
    }


def _eval_accuracy(model: Path, data: str, labels: str | None) -> float | None:
    import onnx

    from .data import input_specs, load_dataset
    from .evaluate import evaluate

    dataset = load_dataset(data, input_specs(onnx.load(str(model))), labels)
    return evaluate(str(model), dataset, batch_size=256, progress=False).accuracy


# ----------------------------------------------------------------------------- the sweep


@dataclass
class SweepResult:
    output: Path
    records: list[dict[str, Any]]
    fronts: dict[str, list[str]]
    ran: int  # jobs run by this call (the others were finished before: resumed)
    skipped: int
    files: dict[str, Path]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r.get("status") != "ok"]


def load_record(output: str | os.PathLike, job: Job, settings: dict[str, Any], model_sha256: str
                ) -> dict[str, Any] | None:
    """The finished record of ``job`` in ``output``, or None (never run, half-finished, failed,
    unreadable, or made with other settings or another model: all run again)."""
    path = Path(output) / job.id / RESULT_NAME
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("status") != "ok" or record.get("job_id") != job.id:
        return None
    if record.get("settings") != settings or record.get("provenance", {}).get("model_sha256") != model_sha256:
        return None
    return record


def sweep_provenance(model: str, command: str | None = None) -> dict[str, Any]:
    """What every record stores about how it was made."""
    return {"prunequant": prunequant_version(), "commit": commit(),
            "command": command if command is not None else command_line(),
            "model": str(model), "model_sha256": file_sha256(model), "versions": versions()}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("prunequant sweep runs its jobs on Ray, which is not installed: "
                          "install prunequant[sweep] (pip install 'prunequant[sweep]')") from None
    return ray


def _check_inputs(spec: SweepSpec) -> None:
    from graph_passes.errors import InputFileError

    for what, path in (("model", spec.model), ("data", spec.data), ("labels", spec.labels),
                       ("eval data", spec.eval_data), ("eval labels", spec.eval_labels)):
        if path is not None and not Path(path).exists():
            raise InputFileError(f"the {what} {path!r} does not exist")
    out = Path(spec.output)
    if out.exists() and not out.is_dir():
        raise OutputError(f"the sweep output {spec.output!r} is a file; -o names a folder")
    if not out.parent.exists():
        raise OutputError(f"the folder {str(out.parent)!r} of the sweep output does not exist; create it first")


def prepare_output(spec: SweepSpec, resume: bool) -> None:
    """The output folder: new, or an earlier sweep's with ``resume``; anything else is refused
    (a sweep never mixes its records into another folder's files)."""
    out = Path(spec.output)
    if out.exists() and any(out.iterdir()) and not resume:
        raise OutputError(f"the sweep output {spec.output!r} is not empty; give --resume to continue the sweep "
                          "in it, or another -o")
    out.mkdir(exist_ok=True)


def run_sweep(spec: SweepSpec, jobs: Sequence[Job], *, address: str | None = None, num_cpus: int | None = None,
              cpus_per_job: float = 1.0, resume: bool = False, progress: bool = True,
              command: str | None = None, executor: Callable[..., list[dict[str, Any]]] | None = None
              ) -> SweepResult:
    """Run ``jobs`` (skipping those finished in ``spec.output`` when ``resume``), then write the
    gathered results. ``address`` joins a running Ray cluster (``ray.init(address)``); without it a
    local Ray gets ``num_cpus`` CPUs (default: the machine's, at most what the jobs can use).
    Each job reserves ``cpus_per_job`` CPUs (fractions share a CPU) and runs torch on
    max(1, floor(cpus_per_job)) threads. ``executor`` replaces Ray (tests, debugging)."""
    if not jobs:
        raise ConfigError("sweep: no jobs (give at least one strategy and one seed)")
    if not (isinstance(cpus_per_job, (int, float)) and 0 < cpus_per_job <= 1024):
        raise ConfigError(f"--cpus-per-job must be a number > 0, got {cpus_per_job!r}")
    if num_cpus is not None and (isinstance(num_cpus, bool) or not isinstance(num_cpus, int) or num_cpus < 1):
        raise ConfigError(f"--num-cpus must be an integer >= 1, got {num_cpus!r}")
    if address is not None and num_cpus is not None:
        raise ConfigError("--num-cpus sets up a local Ray; with --address the cluster has its own CPUs: give one")
    base = dict(spec.base)
    check_jobs(jobs, base)
    _check_inputs(spec)
    spec = SweepSpec(**{**asdict(spec), "model": str(Path(spec.model).resolve()),
                        "data": str(Path(spec.data).resolve()), "output": str(Path(spec.output).resolve()),
                        **{k: str(Path(v).resolve()) for k in ("labels", "eval_data", "eval_labels")
                           if (v := getattr(spec, k)) is not None}})
    ray = _import_ray() if executor is None else None
    prepare_output(spec, resume)
    provenance = sweep_provenance(spec.model, command)
    settings = {job.id: job.settings(base) for job in jobs}
    finished = {job.id: rec for job in jobs if resume
                and (rec := load_record(spec.output, job, settings[job.id], provenance["model_sha256"]))}
    pending = [job for job in jobs if job.id not in finished]
    threads = max(1, int(math.floor(cpus_per_job)))
    payloads = [{"id": j.id, "strategy": j.strategy, "target": j.target, "seed": j.seed, "label": j.label,
                 "settings": settings[j.id], "threads": threads} for j in pending]
    logger.info("sweep: %d jobs, %d finished before, %d to run", len(jobs), len(finished), len(pending))
    spec_json = spec.to_json()
    if pending:
        if executor is not None:
            records = executor(payloads, spec_json, provenance)
        else:
            records = _run_on_ray(ray, payloads, spec_json, provenance, address, num_cpus, cpus_per_job,
                                  len(jobs), len(finished), progress)
        finished.update({r["job_id"]: r for r in records})
    ordered = [finished[j.id] for j in jobs if j.id in finished]
    fronts = pareto_fronts(ordered)
    files = write_results(spec, ordered, fronts, provenance)
    return SweepResult(Path(spec.output), ordered, fronts, len(pending), len(jobs) - len(pending), files)


def _run_on_ray(ray: Any, payloads: list[dict], spec: dict, provenance: dict, address: str | None,
                num_cpus: int | None, cpus_per_job: float, total: int, done: int, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    started = not ray.is_initialized()
    if started:
        if address is not None:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        else:
            wanted = num_cpus or max(1, min(os.cpu_count() or 1, math.ceil(len(payloads) * cpus_per_job)))
            # the workers import prunequant from where this process does (a source checkout too)
            root = str(Path(__file__).resolve().parents[1])
            path = os.environ.get("PYTHONPATH", "")
            if root not in path.split(os.pathsep):
                os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, path) if p)
            ray.init(num_cpus=wanted, include_dashboard=False, log_to_driver=False,
                     object_store_memory=100 * 1024 * 1024, logging_level=logging.WARNING)
    records: list[dict] = []
    try:
        remote = ray.remote(num_cpus=cpus_per_job, max_retries=0)(run_job)
        spec_ref, prov_ref = ray.put(spec), ray.put(provenance)
        futures = {remote.remote(p, spec_ref, prov_ref): p for p in payloads}
        left = list(futures)
        with tqdm(total=total, initial=done, desc="sweep jobs", unit="job", disable=not progress) as bar:
            while left:
                ready, left = ray.wait(left, num_returns=1)
                for ref in ready:
                    payload = futures[ref]
                    try:
                        record = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the worker died: the job failed
                        record = _lost_job(payload, provenance, spec, exc)
                    records.append(record)
                    bar.update(1)
                    if record.get("status") != "ok":
                        bar.write(f"job {record['job_id']} failed: {record.get('error')}")
    finally:
        if started:
            ray.shutdown()
    return records


def _lost_job(payload: dict, provenance: dict, spec: dict, exc: BaseException) -> dict:
    """The record of a job whose worker died before writing its own (its folder is redone on resume:
    no result.json of status ok is written)."""
    cause = getattr(exc, "cause", None) or exc
    record = {"job_id": payload["id"], "label": payload.get("label") or payload["id"],
              "strategy": payload["strategy"], "target": payload["target"], "seed": payload["seed"],
              "settings": payload["settings"], "provenance": provenance, "status": "failed",
              "error": _one_line(cause).split(" Traceback")[0][:500]}
    folder = Path(spec["output"]) / payload["id"]
    if folder.is_dir():
        _write_atomic(folder / RESULT_NAME, json.dumps(record, indent=2, default=str))
    return record


def run_in_process(payloads: list[dict], spec: dict, provenance: dict) -> list[dict]:
    """An ``executor`` for :func:`run_sweep` without Ray: the jobs one after another, here."""
    return [run_job(p, spec, provenance) for p in payloads]


# ----------------------------------------------------------------------------- gathering


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
    """Ids of the points (id, cost, accuracy) no other point beats: none at lower-or-equal cost
    with higher-or-equal accuracy, one of them strictly. Ordered by cost."""
    front: list[str] = []
    best = -math.inf
    for pid, cost, acc in sorted(points, key=lambda p: (p[1], -p[2])):
        if acc > best:
            front.append(pid)
            best = acc
    return front


def pareto_fronts(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Job ids on the front of accuracy vs size and vs energy: over all jobs (``size``,
    ``energy``) and per strategy (``size/gradient``, ...)."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("accuracy") is not None]
    fronts: dict[str, list[str]] = {}
    for axis in FRONT_COSTS:
        key = f"{axis}_ratio"
        points = [(r["job_id"], r[key], r["accuracy"]) for r in ok if r.get(key) is not None]
        fronts[axis] = pareto_front(points)
        for strategy in sorted({r["strategy"] for r in ok}):
            fronts[f"{axis}/{strategy}"] = pareto_front(
                [(r["job_id"], r[key], r["accuracy"]) for r in ok if r.get(key) is not None and r["strategy"] == strategy])
    return fronts


def _csv_row(record: dict[str, Any], fronts: dict[str, list[str]]) -> dict[str, Any]:
    prov = record.get("provenance", {})
    row = {k: record.get(k) for k in CSV_FIELDS}
    row["lam"] = (record.get("settings") or {}).get("lam")
    row["on_size_front"] = record["job_id"] in fronts.get("size", [])
    row["on_energy_front"] = record["job_id"] in fronts.get("energy", [])
    row["prunequant"], row["commit"], row["model_sha256"] = prov.get("prunequant"), prov.get("commit"), prov.get("model_sha256")
    return row


def write_results(spec: SweepSpec, records: Sequence[dict[str, Any]], fronts: dict[str, list[str]],
                  provenance: dict[str, Any]) -> dict[str, Path]:
    """OUT/sweep.json, OUT/sweep.csv and OUT/sweep.png, each written atomically."""
    out = Path(spec.output)
    failed = [r for r in records if r.get("status") != "ok"]
    document = {"format": "prunequant-sweep/1", "spec": spec.to_json(), "provenance": provenance,
                "jobs": len(records), "failed": len(failed), "fronts": fronts, "records": list(records)}
    paths = {"json": out / "sweep.json", "csv": out / "sweep.csv", "png": out / "sweep.png"}
    _write_atomic(paths["json"], json.dumps(document, indent=2, default=str))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow(_csv_row(record, fronts))
    _write_atomic(paths["csv"], text.getvalue())
    _plot(records, fronts, paths["png"])
    return paths


def _plot(records: Sequence[dict[str, Any]], fronts: dict[str, list[str]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r.get("status") == "ok" and r.get("accuracy") is not None]
    strategies = sorted({r["strategy"] for r in ok})
    colours = {s: plt.get_cmap("tab10")(i % 10) for i, s in enumerate(strategies)}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    by_id = {r["job_id"]: r for r in ok}
    for ax, (axis, cost) in zip(axes, FRONT_COSTS.items()):
        key = f"{axis}_ratio"
        for strategy in strategies:
            pts = [r for r in ok if r["strategy"] == strategy and r.get(key) is not None]
            ax.scatter([r[key] for r in pts], [100 * r["accuracy"] for r in pts], color=colours[strategy],
                       alpha=0.6, s=22, label=strategy)
            front = [by_id[i] for i in fronts.get(f"{axis}/{strategy}", [])]
            if front:
                ax.step([r[key] for r in front], [100 * r["accuracy"] for r in front], where="post",
                        color=colours[strategy], linewidth=1.2)
        ax.set_xlabel(f"{cost} relative to the all-8-bit model")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"accuracy vs {axis}")
        ax.grid(alpha=0.3)
    if strategies:
        axes[0].legend(fontsize=8)
    failed = len(records) - len(ok)
    fig.suptitle(f"prunequant sweep: {len(ok)} jobs" + (f", {failed} failed (not shown)" if failed else ""))
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=".sweep.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)


def summary_lines(result: SweepResult) -> list[str]:
    """A table of every job for the CLI: front membership marked with * (size) and + (energy)."""
    size, energy = set(result.fronts.get("size", [])), set(result.fronts.get("energy", []))
    lines = [f"{'job':<34} {'acc %':>6} {'size':>6} {'energy':>7} {'search s':>8}  front"]
    for r in result.records:
        if r.get("status") != "ok":
            lines.append(f"{r['job_id']:<34} FAILED: {r.get('error')}")
            continue
        mark = ("*" if r["job_id"] in size else " ") + ("+" if r["job_id"] in energy else " ")

        def fmt(value: Any, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        lines.append(f"{r['job_id']:<34} {fmt(r.get('accuracy') and 100 * r['accuracy'], '6.2f')} "
                     f"{fmt(r.get('size_ratio'), '6.3f')} {fmt(r.get('energy_ratio'), '7.3f')} "
                     f"{fmt(r.get('search_s'), '8.1f')}  {mark}")
    return lines


__all__ = ["Job", "SweepResult", "SweepSpec", "check_jobs", "grid", "job_id", "load_record", "pareto_front",
           "pareto_fronts", "parse_job_options", "parse_seeds", "parse_strategies", "parse_targets", "run_in_process",
           "run_job", "run_sweep", "summary_lines", "sweep_provenance", "write_results"]

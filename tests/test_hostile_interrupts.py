"""Interrupts (issue 10, class 5): SIGINT, SIGTERM and SIGHUP at several moments of a real
``prunequant export`` (a subprocess) leave nothing behind: no hidden ``.NAME.onnx.tmp-*``
folder, no half-written output, and pre-existing outputs exactly as they were. The staging
moment is hit deterministically through the test hook PRUNEQUANT_TEST_PAUSE_WHEN_STAGED (the
writer sleeps once everything is staged, after naming the staging folder in a marker file).

The same guarantees without a subprocess: the writer's own signal handling (library use, no
CLI), a failing rename in the commit, a backup that cannot be restored.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

from graph_passes import writing
from graph_passes.errors import OutputError

from .hostile_helpers import conv_model, snapshot

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGHUP": signal.SIGHUP}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Conv model and a valid plan for it (torch-free), in a folder of their own."""
    from graph_passes.digest import model_digest
    from graph_passes.prepare import prepare_model
    from plugin.space import Precisions, SearchSpace

    folder = tmp_path_factory.mktemp("tiny")
    conv_model(folder / "m.onnx", np.random.default_rng(0).standard_normal((4, 3, 3, 3)).astype(np.float32))
    prepared = prepare_model(str(folder / "m.onnx"))
    space = SearchSpace(prepared.analysis, Precisions.parse("0,4,8", "8"), model_sha256=model_digest(prepared.original))
    (folder / "p.plan.json").write_text(space.plan(layer_bits={n: 8 for n in space.layers}, site_bits=8).to_json())
    return folder


def _start(work: Path, pause: float | None) -> tuple[subprocess.Popen, Path]:
    marker = work / "marker.txt"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if pause is not None:
        env["PRUNEQUANT_TEST_PAUSE_WHEN_STAGED"] = str(pause)
        env["PRUNEQUANT_TEST_STAGED_FILE"] = str(marker)
    cmd = [str(Path(sys.executable).with_name("prunequant")), "export", "m.onnx", "--plan", "p.plan.json",
           "-o", "out/o.onnx", "--no-progress"]
    # a test run in the background of a non-interactive shell inherits SIGINT ignored: reset all three
    return subprocess.Popen(cmd, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_default_signals), marker


def _default_signals() -> None:
    for sig in SIGNALS.values():
        signal.signal(sig, signal.SIG_DFL)


def _prepare(work: Path, tiny: Path) -> dict[str, str]:
    for name in ("m.onnx", "p.plan.json"):
        (work / name).write_bytes((tiny / name).read_bytes())
    out = work / "out"
    out.mkdir()
    (out / "o.onnx").write_bytes(b"previous model")  # a previous run's outputs must survive
    (out / "o.plan.json").write_text("{}")
    return snapshot(work)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SIGNALS))
def test_signal_while_staged_leaves_nothing(tmp_path: Path, tiny: Path, name: str) -> None:
    before = _prepare(tmp_path, tiny)
    proc, marker = _start(tmp_path, pause=120)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never reached staging"
            time.sleep(0.05)
        stage = Path(marker.read_text().split(maxsplit=1)[1].strip())
        assert stage.is_dir() and stage.name.startswith(".o.onnx.tmp-")
        assert sorted(p.name for p in stage.iterdir()) == ["o.onnx", "o.plan.json", "o.report.json"]
        proc.send_signal(SIGNALS[name])
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"interrupted ({'Ctrl-C' if name == 'SIGINT' else name})"), err
    assert "Traceback" not in err
    marker.unlink()
    assert snapshot(tmp_path) == before  # staging gone, previous outputs untouched


@pytest.mark.parametrize("delay", [0.3, 4.0])
def test_sigterm_before_staging_leaves_nothing(tmp_path: Path, tiny: Path, delay: float) -> None:
    """Early (while Python imports: the default action ends the process) or during the work (the
    CLI's handler: exit 130); either way nothing is left."""
    before = _prepare(tmp_path, tiny)
    proc, marker = _start(tmp_path, pause=120)
    time.sleep(delay)
    if marker.exists():  # pragma: no cover - a very fast machine: staging already reached
        pytest.skip("staging reached before the signal")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, -signal.SIGTERM), err
    assert "Traceback" not in err
    marker.unlink(missing_ok=True)
    assert snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- in-process writer


def _model() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    return helper.make_model(helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]))


def _existing(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "o.onnx").write_bytes(b"old model")
    (tmp_path / "o.plan.json").write_text("old plan")
    (tmp_path / "o.report.json").write_text("old report")
    return snapshot(tmp_path)


SIDECARS = {"o.plan.json": "new plan", "o.report.json": "new report"}


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_failed_commit_restores_every_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: int) -> None:
    before = _existing(tmp_path)
    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        if Path(dst).parent == tmp_path:  # a move into place (not a move aside)
            calls["n"] += 1
            if calls["n"] == fail_at:
                raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(writing.os, "replace", flaky)
    with pytest.raises(OutputError, match="nothing was written"):
        writing.write_outputs(tmp_path / "o.onnx", _model(), SIDECARS)
    assert snapshot(tmp_path) == before


def test_backup_that_cannot_be_restored_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _existing(tmp_path)
    real = os.replace
    state = {"placed": 0}

    def broken(src, dst):
        src, dst = Path(src), Path(dst)
        if dst.parent == tmp_path and src.name.endswith(".previous"):
            raise OSError(5, "I/O error")  # the restore fails
        if dst.parent == tmp_path:
            state["placed"] += 1
            if state["placed"] == 2:
                raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(writing.os, "replace", broken)
    with pytest.raises(OutputError, match="previous version kept at"):
        writing.write_outputs(tmp_path / "o.onnx", _model(), SIDECARS)
    kept = [p for p in tmp_path.rglob("*.previous")]
    assert kept and {p.read_text() for p in kept} <= {"old plan", "old report", "old model"}


@pytest.mark.parametrize("kind", ["dir", "fifo"])
def test_special_file_at_a_sidecar_is_refused_untouched(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "o.plan.json"
    if kind == "dir":
        target.mkdir()
        (target / "keep").write_text("precious")
    else:
        os.mkfifo(target)
    before = snapshot(tmp_path)
    with pytest.raises(OutputError, match="not a regular file"):
        writing.write_outputs(tmp_path / "o.onnx", _model(), SIDECARS)
    assert snapshot(tmp_path) == before


def _signal_during(monkeypatch: pytest.MonkeyPatch, where: str, sig: int) -> None:
    real = getattr(writing, where)

    def wrapped(*args, **kwargs):
        os.kill(os.getpid(), sig)
        time.sleep(0.05)  # let a deferred signal wait
        return real(*args, **kwargs)

    monkeypatch.setattr(writing, where, wrapped)


def test_library_sigint_while_staging_cleans_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Python's own SIGINT handler, whatever this process inherited (a background, non-interactive
    # parent starts it with SIGINT ignored, and an ignored signal must stay ignored)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = _existing(tmp_path)
        _signal_during(monkeypatch, "_write_bytes", signal.SIGINT)
        with pytest.raises(KeyboardInterrupt):
            writing.write_outputs(tmp_path / "o.onnx", _model(), SIDECARS)
        assert snapshot(tmp_path) == before
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


def test_library_signal_during_commit_is_deferred(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A signal during the renames waits for them: the new files are all in place, then the
    caller's handler runs (here one that records and returns: the write is still complete)."""
    _existing(tmp_path)
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        _signal_during(monkeypatch, "_commit", signal.SIGTERM)
        with pytest.raises(KeyboardInterrupt):
            writing.write_outputs(tmp_path / "o.onnx", _model(), SIDECARS)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [signal.SIGTERM]
    assert (tmp_path / "o.plan.json").read_text() == "new plan"
    assert onnx.load(str(tmp_path / "o.onnx")).graph.node[0].op_type == "Relu"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]


def test_ignored_signal_stays_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        _signal_during(monkeypatch, "_write_bytes", signal.SIGHUP)
        writing.write_outputs(tmp_path / "o.onnx", _model(), SIDECARS)
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert json.dumps(sorted(os.listdir(tmp_path))) == json.dumps(["o.onnx", "o.plan.json", "o.report.json"])

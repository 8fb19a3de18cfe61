"""Shared pieces of the hostile-input battery (tests/test_hostile_*.py): a work folder holding
the digits model, data and a plan; a runner that checks the contract of every refusal (the exit
code, one line on stderr, no traceback, nothing written or left behind, inputs unchanged)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from plugin.cli import main

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits"


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (hidden ones included): path -> content hash or kind. Special
    files are never opened (a FIFO would block)."""
    out: dict[str, str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            rel = str(path.relative_to(folder))
            info = os.lstat(path)
            if stat.S_ISLNK(info.st_mode):
                out[rel] = "link:" + os.readlink(path)
            elif stat.S_ISDIR(info.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(info.st_mode):
                out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() + f":{info.st_ino}"
            else:
                out[rel] = f"special:{stat.S_IFMT(info.st_mode)}"
    return out


@dataclass
class Outcome:
    code: int
    stderr: str
    stdout: str


def run_cli(args: list[str], cwd: Path) -> Outcome:
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd)
    try:
        result = runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)
    return Outcome(result.exit_code, result.stderr, result.stdout)


def assert_refused(args: list[str], cwd: Path, code: int, needle: str | None = None,
                   extra_watch: list[Path] = ()) -> Outcome:
    """Run the CLI in ``cwd``; it must exit ``code`` with one clear line and leave ``cwd`` (and
    ``extra_watch`` folders) exactly as they were."""
    watched = [cwd, *extra_watch]
    before = [snapshot(f) for f in watched]
    out = run_cli(args, cwd)
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.code == code, f"exit {out.code}, expected {code}: {out.stderr.strip()[-600:]}"
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {out.stderr[-800:]}"
    assert lines[0].startswith(("error: ", "Error: ", "interrupted")), lines[0]
    if needle is not None:
        assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    for folder, was in zip(watched, before):
        now = snapshot(folder)
        assert now == was, f"{folder} changed: added {sorted(set(now) - set(was))}, removed " \
                           f"{sorted(set(was) - set(now))}, changed " \
                           f"{sorted(k for k in set(now) & set(was) if now[k] != was[k])}"
    return out


def digits_plan_dict() -> dict:
    """A valid all-8-bit plan for the digits model (torch-free, built once per session)."""
    from graph_passes.digest import model_digest
    from graph_passes.prepare import prepare_model
    from plugin.space import Precisions, SearchSpace

    prepared = prepare_model(str(DIGITS / "model.onnx"))
    space = SearchSpace(prepared.analysis, Precisions.parse("0,2,4,8", "8"),
                        model_sha256=model_digest(prepared.original))
    plan = space.plan(layer_bits={n: 8 for n in space.layers}, site_bits=8)
    return json.loads(plan.to_json())


def populate(folder: Path, plan: dict) -> None:
    """m.onnx (digits), t.npz (64 test samples with labels), x.npy (inputs only), p.plan.json."""
    shutil.copy(DIGITS / "model.onnx", folder / "m.onnx")
    with np.load(DIGITS / "test.npz") as z:
        arrays = {k: z[k] for k in z.files}
    key = next(k for k in arrays if k != "labels")
    np.savez(folder / "t.npz", **{key: arrays[key][:64], "labels": arrays["labels"][:64]})
    np.save(folder / "x.npy", arrays[key][:64])
    np.save(folder / "y.npy", arrays["labels"][:64].astype(np.int64))
    (folder / "p.plan.json").write_text(json.dumps(plan, indent=1))


def conv_model(path: Path, weight: np.ndarray, *, group: int = 1, kernel_shape: list[int] | None = None,
               in_dims: list[int] | None = None, metadata: dict[str, str] | None = None) -> Path:
    """x [1, C, 8, 8] -> Conv(weight) -> Relu -> y; the knobs make it invalid in one way each."""
    cin = weight.shape[1] * group if weight.ndim == 4 else 3
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, in_dims or [1, cin, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", "c", "h", "w"])
    attrs: dict = {"group": group}
    if kernel_shape:
        attrs["kernel_shape"] = kernel_shape
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", **attrs),
             helper.make_node("Relu", ["c"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [x], [y], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for key, value in (metadata or {}).items():
        model.metadata_props.add(key=key, value=value)
    onnx.save(model, str(path))
    return path


def tiny_data(path: Path, channels: int = 3, n: int = 16) -> Path:
    np.savez(path, x=np.random.default_rng(0).standard_normal((n, channels, 8, 8)).astype(np.float32))
    return path


Maker = Callable[[Path], object]

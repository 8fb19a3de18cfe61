"""The exit-code contract: the README's table is the source, checked against
``graph_passes.errors`` and the CLI's own codes, and every code in it is triggered through the
real CLI.

Real inputs trigger 0, 2, 3, 4, 5, 10, 11, 12, 13, 14 and 64. Codes 1, 6, 7, 8, 9, 15, 70 and 130
need a failure deep inside a long run (a graph pass or the bridge breaking, an exported model
that disagrees, a bug, a Ctrl-C), so the function the command calls is monkeypatched to raise
the error class (or RuntimeError / KeyboardInterrupt); test_compress_cli.py sends a real SIGINT.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import helper, numpy_helper

from graph_passes import errors
from plugin.cli import main
from plugin.cli.errors import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, error_classes

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DIGITS = REPO / "samples" / "digits"

CONV_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[{dims}] x) => (float[1,4,4,4] y) {{
  t = Conv <pads=[1,1,1,1]> (x, w)
  y = Relu(t)
}}
"""


def readme_table() -> dict[int, tuple[list[str], str]]:
    """``code -> (class names in backticks, meaning)`` from the README's "Exit codes" table."""
    text = README.read_text(encoding="utf-8")
    match = re.search(r"^### Exit codes\n(.*?)(?=^#)", text, re.S | re.M)
    assert match, "README.md has no '### Exit codes' section"
    rows: dict[int, tuple[list[str], str]] = {}
    for line in match.group(1).splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].isdigit():
            continue
        code = int(cells[0])
        assert code not in rows, f"exit code {code} listed twice in the README"
        rows[code] = (re.findall(r"`(\w+)`", cells[1]) or [cells[1]], cells[2])
    assert rows, "the README's exit-code table is empty"
    return rows


CLI_CODES = {EXIT_OK: "", EXIT_USAGE: "usage", EXIT_INTERNAL: "internal", EXIT_INTERRUPTED: "interrupted"}


def test_readme_table_matches_the_error_classes() -> None:
    table = readme_table()
    classes = error_classes()
    expected = {cls.exit_code for cls in classes.values()} | set(CLI_CODES)
    assert set(table) == expected, f"README codes {sorted(table)} != errors.py + CLI codes {sorted(expected)}"
    for name, cls in classes.items():
        assert name in table[cls.exit_code][0], f"{name} (exit {cls.exit_code}) is not in that README row"
    for code, (names, _) in table.items():
        for name in names:
            if name in classes:
                assert classes[name].exit_code == code, f"README says {name} exits {code}"
            else:
                assert code in CLI_CODES and name in (CLI_CODES[code], ""), (code, name)
    assert len(set(expected)) == len(expected)
    assert EXIT_USAGE != errors.InputFileError.exit_code


# ----------------------------------------------------------------------------- triggers


def _conv_model(dims: str = "1,3,4,4") -> onnx.ModelProto:
    model = onnx.parser.parse_model(CONV_TEXT.format(dims=dims))
    w = np.random.default_rng(0).standard_normal([4, 3, 3, 3]).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "w"))
    return model


def _save(model: onnx.ModelProto, path: Path) -> str:
    path.write_bytes(model.SerializeToString())
    return str(path)


Trigger = Callable[[Path, pytest.MonkeyPatch], list[str]]


def _inspect_raising(exc: BaseException) -> Trigger:
    """``inspect`` of a good model whose analysis raises ``exc`` (the monkeypatched cases)."""

    def trigger(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
        def fail(*_args, **_kwargs):
            raise exc

        monkeypatch.setattr("plugin.inspect_cmd.build_inspect_report", fail)
        return ["inspect", _save(_conv_model(), tmp / "ok.onnx"), "--no-bridge"]

    return trigger


def _custom_domain(tmp: Path, _mp: pytest.MonkeyPatch) -> list[str]:
    model = _conv_model()
    model.graph.node[1].op_type, model.graph.node[1].domain = "Twice", "my.ops"
    model.opset_import.append(helper.make_opsetid("my.ops", 1))
    return ["inspect", _save(model, tmp / "custom.onnx"), "--no-bridge"]


def _bad_data(tmp: Path, _mp: pytest.MonkeyPatch) -> list[str]:
    np.savez(tmp / "wrong.npz", x=np.zeros([4, 3, 2, 2], np.float32))
    return ["evaluate", _save(_conv_model(), tmp / "ok.onnx"), "--data", str(tmp / "wrong.npz")]


def _compress(tmp: Path, *extra: str) -> list[str]:
    return ["compress", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "calib.npz"),
            "-o", str(tmp / "out.onnx"), "--no-progress", *extra]


def _bad_plan(tmp: Path, _mp: pytest.MonkeyPatch) -> list[str]:
    (tmp / "bad.plan.json").write_text('{"format": "something else"}')
    return ["export", str(DIGITS / "model.onnx"), "--plan", str(tmp / "bad.plan.json"), "-o", str(tmp / "out.onnx")]


def _sweep_failed(tmp: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``sweep`` whose jobs ran and some failed (test_sweep.py runs a real one on local Ray)."""
    def fail(*_args, **_kwargs):
        raise errors.SweepJobsFailed("1 of 3 sweep jobs failed (first: uniform_none_s0: ConfigError: ...)")

    monkeypatch.setattr("plugin.sweep.run_sweep", fail)
    return ["sweep", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "train.npz"), "-o", str(tmp / "sweep"),
            "--no-progress"]


# code -> (how, trigger, what stderr says)
TRIGGERS: dict[int, tuple[str, Trigger, str]] = {
    0: ("real", lambda tmp, mp: ["inspect", _save(_conv_model(), tmp / "ok.onnx"), "--no-bridge"], ""),
    1: ("monkeypatch", _inspect_raising(errors.PrunequantError("something else went wrong")), "error: "),
    2: ("real", lambda tmp, mp: ["inspect", str(tmp / "missing.onnx")], "missing.onnx"),
    # (a text file named .onnx is also an InputFileError: "not an ONNX model")
    3: ("real", lambda tmp, mp: ["inspect", _save(_broken_model(), tmp / "broken.onnx"), "--no-bridge"], "checker"),
    4: ("real", lambda tmp, mp: ["inspect", _save(_conv_model("1,3,h,w"), tmp / "sym.onnx"), "--no-bridge"],
        "--input-shape"),
    5: ("real", _custom_domain, "my.ops"),
    6: ("monkeypatch", _inspect_raising(errors.PassError("fold_constants", "broke")), "fold_constants"),
    7: ("monkeypatch", _inspect_raising(errors.VerificationError("outputs differ")), "outputs differ"),
    8: ("monkeypatch", _inspect_raising(errors.PruningError("group g9 is blocked")), "g9"),
    9: ("monkeypatch", _inspect_raising(errors.ConversionError("no converter for Foo")), "Foo"),
    10: ("real", _bad_data, "error: "),
    11: ("real", lambda tmp, mp: _compress(tmp, "--target", "size=0.25"), "size=25%"),
    12: ("real", _bad_plan, "not a prunequant plan"),
    13: ("real", lambda tmp, mp: ["compress", str(DIGITS / "model.onnx"), "--data", str(DIGITS / "calib.npz"),
                                  "-o", str(tmp / "no" / "such" / "dir" / "m.onnx")], "does not exist"),
    14: ("real", lambda tmp, mp: _compress(tmp, "--weight-bits", "0,3,8"), "--weight-bits"),
    15: ("monkeypatch", _sweep_failed, "sweep jobs failed"),
    EXIT_USAGE: ("real", lambda tmp, mp: ["compress", str(DIGITS / "model.onnx"), "-o", str(tmp / "o.onnx")],
                 "Missing option '--data'"),
    EXIT_INTERNAL: ("monkeypatch", _inspect_raising(RuntimeError("boom")), "prunequant bug"),
    EXIT_INTERRUPTED: ("monkeypatch", _inspect_raising(KeyboardInterrupt()), "interrupted"),
}


def _broken_model() -> onnx.ModelProto:
    """Parses, but fails the onnx checker: a node reads a tensor nothing defines."""
    model = _conv_model()
    model.graph.node[1].input[0] = "undefined_tensor"
    return model


@pytest.mark.parametrize("code", sorted(readme_table()))
def test_every_readme_code_is_triggered_through_the_cli(code: int, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    assert code in TRIGGERS, f"README exit code {code} has no trigger in this test"
    _how, trigger, needle = TRIGGERS[code]
    args = trigger(tmp_path, monkeypatch)
    before = set(p.name for p in tmp_path.iterdir())
    result = CliRunner().invoke(main, args)
    assert result.exit_code == code, (args, result.exit_code, result.stderr, result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    if code != EXIT_OK:
        assert needle in result.stderr, result.stderr
        assert result.stdout == ""
    if code not in (EXIT_OK, EXIT_USAGE):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert set(p.name for p in tmp_path.iterdir()) == before, "something was written"


def test_every_trigger_is_in_the_readme() -> None:
    assert set(TRIGGERS) == set(readme_table())

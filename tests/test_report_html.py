"""`prunequant report NAME.report.json -o NAME.html`: one self-contained page (embedded PNGs, no
external assets, no script) with the report's figures; bad inputs are one line, the README's exit
code, and nothing written."""

from __future__ import annotations

import base64
import json
import os
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner

from plugin.cli import main
from plugin.report_html import pareto_points, render

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "samples" / "digits"


def _run(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


class _Page(HTMLParser):
    """Tags, images and links of a page; fails on nothing, so also checks the tags balance."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.tags: list[str] = []
        self.stack: list[str] = []
        self.refs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        for key in ("href", "src"):
            if key in attrs and tag != "img":
                self.refs.append(attrs[key])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    assert page.stack == [], page.stack
    return page


def _png_ok(uri: str) -> bool:
    prefix = "data:image/png;base64,"
    return uri.startswith(prefix) and base64.b64decode(uri[len(prefix):])[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def compressed(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "d.onnx"
    code, _, err = _run("compress", DIGITS / "model.onnx", "--data", DIGITS / "train.npz", "-o", out,
                        "--epochs", "1", "--finetune-epochs", "1", "--no-progress")
    assert code == 0, err
    return out


@pytest.mark.slow
def test_page_of_a_real_compress(compressed):
    report_path = compressed.with_name("d.report.json")
    report = json.loads(report_path.read_text())
    html_path = compressed.with_name("d.html")
    code, stdout, err = _run("report", report_path, "-o", html_path)
    assert code == 0, err
    assert "2 figures" in stdout and "d.plan.json" in stdout
    text = html_path.read_text()
    page = _parse(text)
    assert "script" not in page.tags and page.refs == []  # self-contained: no links, no script
    assert len(page.images) == 2 and all(_png_ok(src) for src in page.images)  # layers, history
    body = "".join(page.text)
    # the before/after table: costs, file bytes, accuracy, fidelity, gate
    after, before, quality = report["cost_after"], report["cost_before_8bit"], report["quality"]
    assert f"{after['size'] / 8:,.0f} B" in body and f"{before['size'] / 8:,.0f} B" in body
    assert f"{after['bops']:.3g}" in body and f"{after['mpic']:.3g}" in body
    assert f"{report['file']['bytes']:,} B" in body and f"{report['file']['fp32_weight_bytes']:,} B" in body
    assert f"{100 * quality['accuracy_after']:.2f}%" in body
    assert f"{quality['outputs_vs_original'][0]['sqnr_db']:.1f} dB" in body
    assert "min SQNR" in body and "40 dB" in body and "25 dB" in body
    for name, layer in report["layers"].items():
        assert name in body
        for bits, count in layer["bits"].items():
            assert f"{count} x {bits}-bit" in body
    # the plan beside the report: its activation widths
    plan = json.loads(compressed.with_name("d.plan.json").read_text())
    assert "Activation bit-widths" in body and next(iter(plan["activations"])) in body
    assert oct(os.stat(html_path).st_mode & 0o777) != oct(0o600)  # a normal file's mode, not mkstemp's

    code, _, err = _run("report", report_path, "-o", compressed.with_name("np.html"), "--no-plan")
    assert code == 0, err
    assert "Activation bit-widths" not in compressed.with_name("np.html").read_text()


def _synthetic(history: list) -> dict:
    return {"model": "m.onnx", "strategy": "bayesian", "config": {"cost": "size"},
            "cost_before_8bit": {"size": 8000.0, "bops": 1e6}, "cost_after": {"size": 2000.0, "bops": 3e5},
            "layers": {"conv": {"channels_before": 8, "channels_after": 6, "bits": {"4": 6}},
                       "fc": {"channels_before": 4, "channels_after": 4, "bits": {"8": 3, "2": 1}}},
            "history": history}


def test_trials_history_is_a_pareto_plot():
    trials = [{"kind": "trial", "trial": i, "score": s, "cost": {"size": c}, "feasible": c <= 0.5}
              for i, (s, c) in enumerate([(0.9, 0.5), (0.8, 0.3), (0.85, 0.6), (0.95, 0.7), (0.7, 0.2)])]
    history = [*trials, {"kind": "pareto_front", "cost_model": "size", "points": []}, {"kind": "evaluator"}]
    assert pareto_points(trials, "size") == [(0.2, 0.7), (0.3, 0.8), (0.5, 0.9), (0.7, 0.95)]
    page = render(_synthetic(history))
    parsed = _parse(page.html)
    assert len(parsed.images) == len(page.figures) == 2 and all(_png_ok(s) for s in parsed.images)
    assert "5 trials and their Pareto front" in page.html
    assert "1,000 B" in page.html and "250 B" in page.html and "0.250" in page.html  # size 8000 -> 2000 bits
    assert "2 x 0-bit" not in page.html and "3 x 8-bit, " not in page.html and "1 x 2-bit, 3 x 8-bit" in page.html


def test_no_history_is_said_not_drawn():
    page = render(_synthetic([{"stage": "prune", "target": "size=50%"}]))
    assert len(_parse(page.html).images) == len(page.figures) == 1
    assert "no per-epoch series" in page.html


def _report_file(path: Path, sha: str = "abc") -> Path:
    report = _synthetic([{"epoch": 1, "task_loss": 0.5, "cost": 0.4}, {"epoch": 2, "task_loss": 0.3, "cost": 0.3}])
    report["plan_model_sha256"] = sha
    path.write_text(json.dumps(report))
    return path


@pytest.mark.parametrize("case, code, needle", [
    ("missing", 2, "does not exist"),
    ("empty", 2, "is empty"),
    ("not json", 2, "not valid JSON"),
    ("a list", 2, "not a prunequant report"),
    ("no layers", 2, "'layers'"),
    ("bad plan", 12, "not valid JSON"),
    ("not a plan", 12, "not a prunequant plan"),
    ("other model", 12, "another model"),
    ("over the report", 13, "the report given as input"),
    ("over the plan", 13, "the plan given as input"),
    ("no directory", 13, "does not exist"),
])
def test_bad_inputs_exit_with_their_code_and_write_nothing(tmp_path, case, code, needle):
    report = tmp_path / "m.report.json"
    plan = tmp_path / "m.plan.json"
    out = tmp_path / "m.html"
    if case != "missing":
        _report_file(report)
    if case == "empty":
        report.write_text("")
    elif case == "not json":
        report.write_text("{\"layers\": ")
    elif case == "a list":
        report.write_text("[1, 2]")
    elif case == "no layers":
        report.write_text(json.dumps({"cost_before_8bit": {}, "cost_after": {}}))
    elif case == "bad plan":
        plan.write_text("not json")
    elif case == "not a plan":
        plan.write_text("{}")
    elif case == "other model":
        plan.write_text(json.dumps({"format": "prunequant.plan", "model_sha256": "def", "layers": {}}))
    elif case == "over the report":
        out = report
    elif case == "over the plan":
        plan.write_text(json.dumps({"format": "prunequant.plan", "model_sha256": "abc"}))
        out = plan
    elif case == "no directory":
        out = tmp_path / "nowhere" / "m.html"
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    exit_code, stdout, err = _run("report", report, "-o", out)
    lines = err.strip().splitlines()
    assert exit_code == code, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(before)


def test_synthetic_report_renders_with_its_plan(tmp_path):
    report = _report_file(tmp_path / "m.report.json")
    (tmp_path / "m.plan.json").write_text(json.dumps({
        "format": "prunequant.plan", "model_sha256": "abc", "layers": {},
        "activations": {"relu_out": {"bits": 4, "clip": 2.5, "signed": False}}}))
    code, stdout, err = _run("report", report, "-o", tmp_path / "m.html")
    assert code == 0, err
    text = (tmp_path / "m.html").read_text()
    assert "relu_out" in text and "task_loss, cost per epoch" in text
    assert len(_parse(text).images) == 2


#: a real sweep's sweep.json (benchmarks/pareto.py through plugin.sweep, 24 jobs on digits)
SWEEP = Path(__file__).resolve().parents[1] / "benchmarks/results/pareto-strategies-cpu/sweep/sweep.json"


def test_sweep_pareto_plot_and_jobs_join_the_page(tmp_path):
    report = _report_file(tmp_path / "m.report.json")
    code, stdout, err = _run("report", report, "-o", tmp_path / "m.html", "--sweep", SWEEP)
    assert code == 0, err
    text = (tmp_path / "m.html").read_text()
    page = _parse(text)
    assert len(page.images) == 3 and all(_png_ok(src) for src in page.images)  # layers, history, sweep
    body = "".join(page.text)
    sweep = json.loads(SWEEP.read_text())
    ok = [r for r in sweep["records"] if r["status"] == "ok"]
    assert f"{len(ok)} of {len(sweep['records'])} jobs finished" in body
    for record in ok:  # every finished job is a row, with its accuracy
        assert record["job_id"] in body and f"{100 * record['accuracy']:.2f}%" in body
    assert sweep["provenance"]["model_sha256"][:16] in body
    from plugin.report_html import _sweep_points
    points = _sweep_points(sweep, "size_ratio")
    assert sorted(points) == sorted({r["strategy"] for r in ok})
    assert sum(len(p) for p in points.values()) == len(ok)


@pytest.mark.parametrize("case, needle", [("not a sweep", "not a prunequant sweep"), ("missing", "does not exist")])
def test_a_bad_sweep_is_one_line_and_writes_nothing(tmp_path, case, needle):
    report = _report_file(tmp_path / "m.report.json")
    sweep = tmp_path / "sweep.json"
    if case == "not a sweep":
        sweep.write_text(json.dumps({"records": []}))
    code, _, err = _run("report", report, "-o", tmp_path / "m.html", "--sweep", sweep)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "m.html").exists()


def test_other_runtimes_are_shown_with_their_status():
    from plugin.report_html import render

    report = _synthetic([])
    report["runtimes"] = {"onnxruntime": {"version": "1.x", "role": "the gate"},
                          "openvino": {"status": "ok", "version": "2026.4", "samples": 512,
                                       "top1_agreement_with_onnxruntime": 0.998, "max_abs_diff": 0.11}}
    body = "".join(_parse(render(report).html).text)
    assert "Other runtimes" in body and "openvino" in body and "99.80%" in body and "2026.4" in body
    report["runtimes"]["openvino"] = {"status": "unsupported", "reason": "INT2 tensor 'w' (node 'dq')"}
    body = "".join(_parse(render(report).html).text)
    assert "unsupported" in body and "INT2 tensor" in body


# ----------------------------------------------------------------------------- a real browser

#: browsers that can screenshot a page headless (Debian: apt-get install chromium-headless-shell);
#: PRUNEQUANT_CHROMIUM names another binary
_BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome")
_SHOT_SIZE = (1000, 1400)


def _chromium() -> str | None:
    import shutil

    named = os.environ.get("PRUNEQUANT_CHROMIUM")
    if named:
        return shutil.which(named) or (named if os.access(named, os.X_OK) else None)
    return next((path for path in map(shutil.which, _BROWSERS) if path), None)


def _png_header(data: bytes) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) of a PNG whose chunks all pass their CRC and whose
    image data inflates (zlib) to exactly its rows; AssertionError otherwise."""
    import struct
    import zlib

    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        assert zlib.crc32(kind + body) == struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0], kind
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    assert header is not None and idat, "no IHDR or no image data"
    width, height, depth, color = header[:4]
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[color]
    assert header[6] == 0 and len(zlib.decompress(idat)) == height * (1 + width * channels * depth // 8)
    return width, height, depth, color


def test_report_renders_in_headless_chromium(tmp_path):
    """The page as a browser draws it: a screenshot of the window's size, not blank, with the
    embedded figures' colours (the PNG data URIs decoded by the browser) and dark text."""
    import subprocess

    import numpy as np

    browser = _chromium()
    if browser is None:
        message = f"no headless Chromium ({', '.join(_BROWSERS)}); apt-get install chromium-headless-shell"
        if os.environ.get("PRUNEQUANT_CI") == "1":
            pytest.fail(f"PRUNEQUANT_CI=1 but {message} (.ci/run installs it)")
        pytest.skip(message)
    report = _report_file(tmp_path / "m.report.json")
    page = tmp_path / "m.html"
    code, _, err = _run("report", report, "-o", page)
    assert code == 0, err
    shot = tmp_path / "m.png"
    width, height = _SHOT_SIZE
    command = [browser, "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
               "--force-device-scale-factor=1", f"--user-data-dir={tmp_path / 'profile'}",
               f"--window-size={width},{height}", f"--screenshot={shot}", page.as_uri()]
    if "headless-shell" not in Path(browser).name:
        command.insert(1, "--headless")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    assert _png_header(shot.read_bytes())[:2] == _SHOT_SIZE
    from matplotlib.image import imread

    pixels = np.round(imread(shot)[:, :, :3] * 255).astype(np.int16)
    assert pixels.shape == (_SHOT_SIZE[1], _SHOT_SIZE[0], 3)
    assert pixels.std() > 20  # not a blank page
    white = (pixels > 245).all(axis=2)
    assert 0.02 < 1 - white.mean() < 0.9
    dark = (pixels < 80).all(axis=2).sum()  # text: headings, the table
    colourful = ((pixels.max(axis=2) - pixels.min(axis=2)) > 80).sum()  # the figures' bars and lines
    assert dark > 2000 and colourful > 2000, (dark, colourful)

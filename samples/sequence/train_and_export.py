"""Train and export the ``sequence`` sample: a two-layer LSTM classifier on a generated task.

Regenerate every artefact in this folder with::

    python samples/sequence/train_and_export.py

Data (generated offline, seed 0): 2-channel sequences of 16 steps; each of 4 classes is a pair of
sinusoids (class-specific frequencies, random phase and amplitude) plus Gaussian noise
(sigma 0.3). 600 train / 300 test samples (small on purpose: the folder stays under 200 KB).
Input ``[N, 16, 2]`` (batch first).

Network: LSTM(2 -> 24), LSTM(24 -> 24), the last step's output, Linear(24 -> 4). Exported by
torch's legacy exporter (opset 17) as two ONNX ``LSTM`` nodes; input ``input``, output
``logits``, dynamic batch axis.

Writes ``model.onnx``, ``train.npz`` (with labels; also the calibration data), ``test.npz`` and ``meta.json`` next to
this file. Deterministic: same seed and library versions -> same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

SEED = 0
SEQ_LEN = 16
FEATURES = 2
CLASSES = 4
HIDDEN = 24
N_TRAIN = 600
N_TEST = 300
EPOCHS = 30
BATCH_SIZE = 64
LR = 1e-2
OPSET = 17
MAX_REL_ERR = 1e-4
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sample_tools import export_and_verify, seed_everything, train  # noqa: E402


class SequenceNet(nn.Module):
    """[N, 16, 2] -> LSTM 24 -> LSTM 24 -> last step -> Linear(24, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.lstm1 = nn.LSTM(FEATURES, HIDDEN, batch_first=True)
        self.lstm2 = nn.LSTM(HIDDEN, HIDDEN, batch_first=True)
        self.classifier = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm1(x)
        y, _ = self.lstm2(y)
        return self.classifier(y[:, -1])


def make_data(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    labels = rng.integers(0, CLASSES, n)
    t = np.arange(SEQ_LEN, dtype=np.float64)[None, :, None]
    freq_a = (0.15 + 0.12 * labels)[:, None, None]
    freq_b = (0.55 - 0.1 * labels)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi, (n, 1, FEATURES))
    amp = rng.uniform(0.6, 1.4, (n, 1, FEATURES))
    mix = np.array([1.0, -0.7])[None, None, :]
    x = amp * np.sin(freq_a * t + phase) + mix * np.cos(freq_b * t + phase)
    x += rng.normal(0, 0.3, x.shape)
    return x.astype(np.float32), labels.astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    out: Path = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(SEED)
    rng = np.random.default_rng(SEED)
    x_tr, y_tr = make_data(N_TRAIN, rng)
    x_te, y_te = make_data(N_TEST, rng)
    model = SequenceNet()
    t0 = time.perf_counter()
    train(model, x_tr, y_tr, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, weight_decay=0.0, seed=SEED)
    train_s = time.perf_counter() - t0
    path = out / "model.onnx"
    checked = export_and_verify(model, path, x_te, y_te, OPSET, MAX_REL_ERR, keep_batchnorm=False)
    rel_err, acc = checked["rel_err"], checked["ort_acc"]
    np.savez_compressed(out / "train.npz", input=x_tr, labels=y_tr)
    np.savez_compressed(out / "test.npz", input=x_te, labels=y_te)
    meta = {
        "name": "sequence",
        "task": "4-class generated sinusoid sequences, 16 steps x 2 channels (offline)",
        "input": {"name": "input", "shape": ["batch", SEQ_LEN, FEATURES], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", CLASSES], "dtype": "float32"},
        "n_train": N_TRAIN, "n_test": N_TEST,
        "test_accuracy": acc,
        "ort_vs_torch_max_rel_error": rel_err,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "model_size_bytes": path.stat().st_size,
        "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "onnx_ops": checked["op_types"],
        "opset": OPSET, "seed": SEED,
        "training": {"optimizer": "Adam", "lr": LR, "schedule": "OneCycleLR", "epochs": EPOCHS,
                     "batch_size": BATCH_SIZE, "seconds": round(train_s, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"sequence: test acc {acc:.4f} (onnxruntime), params {meta['n_params']}, "
          f"model {meta['model_size_bytes']} B, rel err {rel_err:.2e}, train {train_s:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

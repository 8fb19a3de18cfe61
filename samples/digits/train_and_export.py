"""Train and export the ``digits`` sample: a small residual CNN on scikit-learn's digits.

Regenerate every artefact in this folder with::

    python samples/digits/train_and_export.py

Data: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels scaled to
[0, 1], input shape [N, 1, 8, 8] float32. Fixed stratified split:
``train_test_split(test_size=0.3, random_state=0, stratify=y)``.

Writes ``model.onnx`` (FP32, opset 17, BatchNormalization nodes kept in the graph),
``calib.npz``, ``train.npz``, ``test.npz`` and ``meta.json`` next to this file.
The run is deterministic: same seed and library versions -> same weights.
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
import sklearn
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

SEED = 0
EPOCHS = 40
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
N_CALIB = 512
OPSET = 17
MAX_REL_ERR = 1e-4
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sample_tools import export_and_verify, seed_everything, train  # noqa: E402




def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ResidualBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, identity shortcut, Add, ReLU."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(x + y)


class DigitsNet(nn.Module):
    """[N,1,8,8] -> 16 -> 32 -> residual(32) -> maxpool 4x4 -> 64 -> GAP -> Linear(64,10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 16),
            conv_bn_relu(16, 32),
            ResidualBlock(32),
            nn.MaxPool2d(2),
            conv_bn_relu(32, 64),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=0.3, random_state=0, stratify=y
    )
    return (
        np.ascontiguousarray(x_tr, dtype=np.float32),
        np.ascontiguousarray(y_tr),
        np.ascontiguousarray(x_te, dtype=np.float32),
        np.ascontiguousarray(y_te),
    )


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random +-1 pixel translation (zero padded): cheap and keeps digits legible."""
    n = x.shape[0]
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=gen)
    dy = torch.randint(0, 3, (n,), generator=gen)
    out = torch.empty_like(x)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out








def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    seed_everything(SEED)
    x_tr, y_tr, x_te, y_te = load_data()
    model = DigitsNet()
    train(model, x_tr, y_tr, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY,
          seed=SEED, augment=augment)
    train_s = time.perf_counter() - t0

    model_path = out / "model.onnx"
    checked = export_and_verify(model, model_path, x_te, y_te, OPSET, MAX_REL_ERR)
    op_types, rel_err, ort_acc, torch_acc = (checked[k] for k in ("op_types", "rel_err", "ort_acc", "torch_acc"))

    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(x_tr), size=min(N_CALIB, len(x_tr)), replace=False))
    np.savez_compressed(out / "calib.npz", input=x_tr[calib_idx])
    np.savez_compressed(out / "train.npz", input=x_tr, labels=y_tr)
    np.savez_compressed(out / "test.npz", input=x_te, labels=y_te)

    n_params = int(sum(p.numel() for p in model.parameters()))
    meta = {
        "name": "digits",
        "task": "scikit-learn digits, 10 classes, 8x8 grayscale scaled to [0, 1]",
        "input": {"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "split": "train_test_split(test_size=0.3, random_state=0, stratify=y)",
        "n_train": int(len(x_tr)),
        "n_test": int(len(x_te)),
        "n_calib": int(len(calib_idx)),
        "test_accuracy": ort_acc,
        "test_accuracy_torch": torch_acc,
        "ort_vs_torch_max_rel_error": rel_err,
        "n_params": n_params,
        "model_size_bytes": model_path.stat().st_size,
        "model_sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
        "onnx_ops": op_types,
        "opset": OPSET,
        "seed": SEED,
        "training": {
            "optimizer": "Adam",
            "lr": LR,
            "schedule": "OneCycleLR",
            "weight_decay": WEIGHT_DECAY,
            "epochs": EPOCHS,
            "batch_size": BATCH_SIZE,
            "augmentation": "random +-1 pixel translation",
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "scikit-learn": sklearn.__version__,
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"digits: test acc {ort_acc:.4f} (onnxruntime), params {n_params}, "
        f"model {meta['model_size_bytes']} B, rel err {rel_err:.2e}, train {train_s:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

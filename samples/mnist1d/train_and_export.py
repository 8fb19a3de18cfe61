"""Train and export the ``mnist1d`` sample: a 1-D CNN on MNIST-1D.

Regenerate every artefact in this folder with::

    python samples/mnist1d/train_and_export.py

Data: generated offline with the ``mnist1d`` package's procedural generator
(``mnist1d.data.make_dataset``; never ``get_dataset``, which may download a pickle),
15,000 samples, seed 0, the package's default 80/20 split -> 12,000 train / 3,000 test.
Input shape [N, 1, 40] float32 (the generator already standardises the signal).

Writes ``model.onnx`` (FP32, opset 17, BatchNormalization nodes kept in the graph),
``calib.npz``, ``train.npz`` (a 4,000-sample subset of the training split, for
fine-tuning), ``test.npz`` (the whole test split) and ``meta.json`` next to this file.
The run is deterministic: same seed and library versions -> same weights.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

SEED = 0
NUM_SAMPLES = 15_000
EPOCHS = 30
BATCH_SIZE = 128
LR = 3e-3
WEIGHT_DECAY = 1e-4
N_CALIB = 1000
N_TRAIN_SAVED = 4000
OPSET = 17
MAX_REL_ERR = 1e-4
SEQ_LEN = 40
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sample_tools import export_and_verify, seed_everything, train  # noqa: E402




def conv_bn_relu(c_in: int, c_out: int, k: int = 5) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv1d(c_in, c_out, k, padding=k // 2, bias=False),
        nn.BatchNorm1d(c_out),
        nn.ReLU(inplace=True),
    )


class MNIST1DNet(nn.Module):
    """[N,1,40] -> 32 -> 64 -> pool -> 64 -> pool -> 64 -> GAP -> Linear(64,10)."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            conv_bn_relu(1, 32),
            conv_bn_relu(32, 64),
            nn.MaxPool1d(2),
            conv_bn_relu(64, 64),
            nn.MaxPool1d(2),
            conv_bn_relu(64, 64, k=3),
            nn.AdaptiveAvgPool1d(1),
            nn.Flatten(),
        )
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = NUM_SAMPLES
    args.seed = SEED
    ds = make_dataset(args)  # pure numpy generator, no network access
    x_tr = ds["x"].astype(np.float32)[:, None, :]
    x_te = ds["x_test"].astype(np.float32)[:, None, :]
    return (
        np.ascontiguousarray(x_tr),
        np.ascontiguousarray(ds["y"].astype(np.int64)),
        np.ascontiguousarray(x_te),
        np.ascontiguousarray(ds["y_test"].astype(np.int64)),
    )








def _pkg_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    seed_everything(SEED)
    x_tr, y_tr, x_te, y_te = load_data()
    t1 = time.perf_counter()
    seed_everything(SEED)  # the generator reseeds numpy/random; start training from a known state
    model = MNIST1DNet()
    train(model, x_tr, y_tr, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY,
          seed=SEED)
    train_s = time.perf_counter() - t1

    model_path = out / "model.onnx"
    checked = export_and_verify(model, model_path, x_te, y_te, OPSET, MAX_REL_ERR)
    op_types, rel_err, ort_acc, torch_acc = (checked[k] for k in ("op_types", "rel_err", "ort_acc", "torch_acc"))

    rng = np.random.default_rng(SEED)
    train_idx = np.sort(rng.choice(len(x_tr), size=min(N_TRAIN_SAVED, len(x_tr)), replace=False))
    calib_idx = np.sort(rng.choice(train_idx, size=min(N_CALIB, len(train_idx)), replace=False))
    np.savez_compressed(out / "calib.npz", input=x_tr[calib_idx])
    np.savez_compressed(out / "train.npz", input=x_tr[train_idx], labels=y_tr[train_idx])
    np.savez_compressed(out / "test.npz", input=x_te, labels=y_te)

    n_params = int(sum(p.numel() for p in model.parameters()))
    meta = {
        "name": "mnist1d",
        "task": "MNIST-1D, 10 classes, length-40 1-D signals (mnist1d generator, offline)",
        "input": {"name": "input", "shape": ["batch", 1, SEQ_LEN], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", 10], "dtype": "float32"},
        "split": (
            f"mnist1d.data.make_dataset(num_samples={NUM_SAMPLES}, seed={SEED}, "
            "train_split=0.8); model trained on the full train split"
        ),
        "n_train_used_for_training": int(len(x_tr)),
        "n_train": int(len(train_idx)),
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
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "numpy": np.__version__,
            "mnist1d": _pkg_version("mnist1d"),
        },
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"mnist1d: test acc {ort_acc:.4f} (onnxruntime), params {n_params}, "
        f"model {meta['model_size_bytes']} B, rel err {rel_err:.2e}, "
        f"data {t1 - t0:.0f}s, train {train_s:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

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
import os
import platform
import random
import sys
import time
import warnings
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


def seed_everything(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


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


def train(model: nn.Module, x_tr: np.ndarray, y_tr: np.ndarray) -> None:
    gen = torch.Generator().manual_seed(SEED)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    steps_per_epoch = (len(xt) + BATCH_SIZE - 1) // BATCH_SIZE
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=LR, total_steps=EPOCHS * steps_per_epoch
    )
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(EPOCHS):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * BATCH_SIZE : (s + 1) * BATCH_SIZE]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            loss = loss_fn(model(xt[idx]), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def export(model: nn.Module, path: Path) -> None:
    dummy = torch.zeros(2, 1, SEQ_LEN, dtype=torch.float32)
    # TrainingMode.PRESERVE on an eval() model exports inference-mode
    # BatchNormalization nodes instead of letting the exporter's eval peephole fuse
    # them into the convolutions: prunequant folds BatchNorm itself.
    with warnings.catch_warnings():
        # Legacy-exporter deprecation notice and the PRESERVE + constant-folding hint
        # (the model is in eval mode, so folding is safe here).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*constant folding.*", category=UserWarning)
        torch.onnx.export(
            model,
            (dummy,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=True,
        )


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


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
    train(model, x_tr, y_tr)
    train_s = time.perf_counter() - t1

    with torch.no_grad():
        torch_te = model(torch.from_numpy(x_te)).numpy()
    torch_acc = float((torch_te.argmax(1) == y_te).mean())

    model_path = out / "model.onnx"
    export(model, model_path)
    onnx_model = onnx.load(str(model_path))
    onnx.checker.check_model(onnx_model, full_check=True)
    op_types = sorted({n.op_type for n in onnx_model.graph.node})
    if "BatchNormalization" not in op_types:
        raise RuntimeError("expected BatchNormalization nodes in the exported graph")

    ort_te = ort_logits(model_path, x_te)
    rel_err = float(np.abs(ort_te - torch_te).max() / max(np.abs(torch_te).max(), 1e-12))
    if rel_err > MAX_REL_ERR:
        raise RuntimeError(f"onnxruntime/torch mismatch: max rel error {rel_err:.3e}")
    ort_acc = float((ort_te.argmax(1) == y_te).mean())

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

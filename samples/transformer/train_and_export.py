"""Train and export the ``transformer`` sample: a 2-layer transformer encoder on sklearn's digits.

Regenerate every artefact in this folder with::

    python samples/transformer/train_and_export.py

Data: scikit-learn's bundled 8x8 digits (1797 images, no download), pixels scaled to [0, 1],
each image read as a sequence of its 8 rows: input ``[N, 8, 8]`` (batch, tokens, features).
Fixed stratified split ``train_test_split(test_size=0.3, random_state=0, stratify=y)`` ->
1257 train / 540 test (the digits sample's split).

Network: Linear(8 -> 32) row embedding + a learned position embedding (8 x 32), two pre-norm
encoder blocks (ViT style: d_model 32, 4 heads of 8 with separate Q/K/V Linear layers, MLP
32 -> 64 -> 32 with GELU, no dropout), a final LayerNorm, mean over the 8 tokens,
Linear(32 -> 10). Exported by torch's legacy exporter (opset 17): per block Q/K/V MatMuls,
Reshape [-1, 8, 4, 8] + Transpose to heads, the two activation x activation MatMuls, Softmax,
the merge Reshape [-1, 8, 32] and the output projection; LayerNormalization and Erf (GELU)
nodes. Input ``input``, output ``logits``, dynamic batch axis.

Writes ``model.onnx``, ``train.npz`` (with labels; also the calibration data), ``test.npz`` and
``meta.json`` next to this file. Deterministic: same seed and library versions -> same weights.
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
TOKENS = 8
FEATURES = 8
D_MODEL = 32
HEADS = 4
HEAD_DIM = D_MODEL // HEADS
MLP = 64
LAYERS = 2
CLASSES = 10
EPOCHS = 150
BATCH_SIZE = 64
LR = 3e-3
WEIGHT_DECAY = 1e-4
OPSET = 17
MAX_REL_ERR = 1e-4
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from sample_tools import export_and_verify, seed_everything, train  # noqa: E402


class Block(nn.Module):
    """Pre-norm encoder block (ViT style): x + attn(LN(x)), then x + MLP(LN(x)).

    Q, K and V are separate Linear layers (as in Hugging Face BERT/ViT); the head split and merge
    are ``reshape(-1, TOKENS, HEADS, HEAD_DIM)`` / ``reshape(-1, TOKENS, D_MODEL)`` with a
    leading -1, so the exported graph runs any batch size (``nn.MultiheadAttention``'s legacy
    export folds the batch into its head Reshapes: [S, B*H, Dh]).
    """

    def __init__(self) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(D_MODEL)
        self.q = nn.Linear(D_MODEL, D_MODEL)
        self.k = nn.Linear(D_MODEL, D_MODEL)
        self.v = nn.Linear(D_MODEL, D_MODEL)
        self.out = nn.Linear(D_MODEL, D_MODEL)
        self.norm2 = nn.LayerNorm(D_MODEL)
        self.fc1 = nn.Linear(D_MODEL, MLP)
        self.fc2 = nn.Linear(MLP, D_MODEL)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, TOKENS, HEADS, HEAD_DIM).transpose(1, 2)  # [B, H, S, Dh]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        q, k, v = self._heads(self.q(h)), self._heads(self.k(h)), self._heads(self.v(h))
        scores = torch.matmul(q, k.transpose(-1, -2)) * (HEAD_DIM ** -0.5)
        y = torch.matmul(torch.softmax(scores, dim=-1), v).transpose(1, 2).reshape(-1, TOKENS, D_MODEL)
        x = x + self.out(y)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    """[N, 8, 8] -> Linear(8, 32) + position -> 2 blocks (4 heads) -> LN -> mean -> Linear(32, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, D_MODEL)
        self.position = nn.Parameter(torch.zeros(1, TOKENS, D_MODEL))
        nn.init.normal_(self.position, std=0.1)
        self.blocks = nn.ModuleList(Block() for _ in range(LAYERS))
        self.norm = nn.LayerNorm(D_MODEL)
        self.classifier = nn.Linear(D_MODEL, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.embed(x) + self.position
        for block in self.blocks:
            y = block(y)
        return self.classifier(self.norm(y).mean(dim=1))


def shift_rows(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Augmentation: translate each image by up to one pixel (rows and columns, zero fill)."""
    out = torch.zeros_like(x)
    dy, dx = (torch.randint(-1, 2, (2,), generator=gen)).tolist()
    src = x[:, max(0, -dy):TOKENS - max(0, dy), max(0, -dx):FEATURES - max(0, dx)]
    out[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
    return out


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)  # [N, 8, 8]: 8 row tokens of 8 pixels
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return x_tr, x_te, y_tr, y_te


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output folder")
    out: Path = parser.parse_args(argv).out
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(SEED)
    x_tr, x_te, y_tr, y_te = load_data()
    model = DigitsTransformer()
    t0 = time.perf_counter()
    train(model, x_tr, y_tr, epochs=EPOCHS, batch_size=BATCH_SIZE, lr=LR, weight_decay=WEIGHT_DECAY,
          seed=SEED, augment=shift_rows)
    train_s = time.perf_counter() - t0
    path = out / "model.onnx"
    checked = export_and_verify(model, path, x_te, y_te, OPSET, MAX_REL_ERR, keep_batchnorm=False)
    rel_err, acc = checked["rel_err"], checked["ort_acc"]
    np.savez_compressed(out / "train.npz", input=x_tr, labels=y_tr)
    np.savez_compressed(out / "test.npz", input=x_te, labels=y_te)
    meta = {
        "name": "transformer",
        "task": "scikit-learn digits, each 8x8 image as a sequence of 8 row tokens of 8 pixels",
        "input": {"name": "input", "shape": ["batch", TOKENS, FEATURES], "dtype": "float32"},
        "output": {"name": "logits", "shape": ["batch", CLASSES], "dtype": "float32"},
        "network": {"d_model": D_MODEL, "heads": HEADS, "head_dim": D_MODEL // HEADS, "mlp": MLP,
                    "layers": LAYERS, "norm": "pre", "activation": "gelu", "pool": "mean"},
        "n_train": len(x_tr), "n_test": len(x_te),
        "test_accuracy": acc,
        "ort_vs_torch_max_rel_error": rel_err,
        "n_params": int(sum(p.numel() for p in model.parameters())),
        "model_size_bytes": path.stat().st_size,
        "model_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "onnx_ops": checked["op_types"],
        "opset": OPSET, "seed": SEED,
        "training": {"optimizer": "Adam", "lr": LR, "weight_decay": WEIGHT_DECAY, "schedule": "OneCycleLR",
                     "epochs": EPOCHS, "batch_size": BATCH_SIZE, "augment": "+-1 pixel shift",
                     "seconds": round(train_s, 1)},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "onnx": onnx.__version__, "onnxruntime": ort.__version__, "numpy": np.__version__,
                     "sklearn": sklearn.__version__},
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"transformer: test acc {acc:.4f} (onnxruntime), params {meta['n_params']}, "
          f"model {meta['model_size_bytes']} B, rel err {rel_err:.2e}, train {train_s:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

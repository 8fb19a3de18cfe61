"""What the sample scripts share: seeding, the training loop, export, and the onnxruntime check.

Each ``samples/<name>/train_and_export.py`` defines its data and network and calls these.
"""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

Augment = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def seed_everything(seed: int) -> None:
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def train(model: nn.Module, x_tr: np.ndarray, y_tr: np.ndarray, *, epochs: int, batch_size: int,
          lr: float, weight_decay: float, seed: int, augment: Augment | None = None) -> None:
    """Adam + OneCycleLR, cross-entropy, deterministic batches drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(x_tr)
    yt = torch.from_numpy(y_tr)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            if len(idx) < 2:  # BatchNorm needs more than one sample
                continue
            xb = xt[idx] if augment is None else augment(xt[idx], gen)
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def export(model: nn.Module, path: Path, sample_shape: tuple[int, ...], opset: int,
           keep_batchnorm: bool = True) -> None:
    """Legacy exporter, input "input", output "logits", dynamic batch, BatchNorm kept (with
    ``keep_batchnorm=False``: the exporter's default eval-mode export, for models without it)."""
    dummy = torch.zeros(2, *sample_shape, dtype=torch.float32)
    if not keep_batchnorm:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
        return
    # TrainingMode.PRESERVE on an eval() model exports inference-mode
    # BatchNormalization nodes instead of letting the exporter's eval peephole fuse
    # them into the convolutions: prunequant folds BatchNorm itself.
    with warnings.catch_warnings():
        # Legacy-exporter deprecation notice and the PRESERVE + constant-folding hint
        # (the model is in eval mode, so folding is safe here).
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*constant folding.*", category=UserWarning)
        torch.onnx.export(
            model, (dummy,), str(path), dynamo=False, opset_version=opset,
            input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
        )


def ort_logits(path: Path, x: np.ndarray) -> np.ndarray:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"input": x})[0]


def export_and_verify(model: nn.Module, model_path: Path, x_te: np.ndarray, y_te: np.ndarray,
                      opset: int, max_rel_err: float, keep_batchnorm: bool = True) -> dict:
    """Export, check (full checker, BatchNorm kept unless ``keep_batchnorm`` is False,
    onnxruntime == torch within ``max_rel_err``) and measure accuracy."""
    with torch.no_grad():
        torch_te = model(torch.from_numpy(x_te)).numpy()
    export(model, model_path, tuple(x_te.shape[1:]), opset, keep_batchnorm=keep_batchnorm)
    onnx_model = onnx.load(str(model_path))
    onnx.checker.check_model(onnx_model, full_check=True)
    op_types = sorted({n.op_type for n in onnx_model.graph.node})
    if keep_batchnorm and "BatchNormalization" not in op_types:
        raise RuntimeError("expected BatchNormalization nodes in the exported graph")
    ort_te = ort_logits(model_path, x_te)
    rel_err = float(np.abs(ort_te - torch_te).max() / max(np.abs(torch_te).max(), 1e-12))
    if rel_err > max_rel_err:
        raise RuntimeError(f"onnxruntime/torch mismatch: max rel error {rel_err:.3e}")
    return {
        "op_types": op_types,
        "rel_err": rel_err,
        "ort_acc": float((ort_te.argmax(1) == y_te).mean()),
        "torch_acc": float((torch_te.argmax(1) == y_te).mean()),
    }

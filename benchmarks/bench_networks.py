"""Benchmark networks in the spirit of the paper, trained here and exported to ONNX.

Each network comes in a 1-D (``Conv1d``, MNIST-1D) and a 2-D (``Conv2d``, images) flavour:

* ``resnet8``   - MLPerf Tiny ResNet-8 (the paper's CIFAR-10 network): 3x3 stem, three
  residual stages (16, 32/2, 64/2 channels x ``width``), 1x1 projection shortcuts where the
  shape changes, GAP, FC.
* ``dscnn``     - MLPerf Tiny DS-CNN (the paper's Speech Commands network): a strided stem
  conv then 4 depthwise-separable blocks (depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU),
  GAP, FC.
* ``mobilenet`` - MobileNetV2-style: inverted residual blocks (1x1 expand, depthwise 3x3,
  linear 1x1 projection, identity residual where shapes match), GAP, FC.

The trained model is exported with torch's legacy exporter (opset 17, ``TrainingMode.PRESERVE``
on an eval-mode model so BatchNormalization stays in the graph, dynamic batch) and from then on
treated as a third-party ONNX file. Cached under ``~/.cache/prunequant/bench/`` keyed by the
task, network, width, epochs and seed.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

NETWORKS = ("resnet8", "dscnn", "mobilenet")
CACHE = Path(os.environ.get("PRUNEQUANT_BENCH_CACHE", Path.home() / ".cache" / "prunequant" / "bench"))
OPSET = 17


def _ops(dim: int):
    if dim == 1:
        return nn.Conv1d, nn.BatchNorm1d, nn.AdaptiveAvgPool1d
    return nn.Conv2d, nn.BatchNorm2d, nn.AdaptiveAvgPool2d


def _cbr(dim: int, c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1, relu: bool = True):
    conv, bn, _ = _ops(dim)
    layers = [conv(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups, bias=False), bn(c_out)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class ResBlock(nn.Module):
    def __init__(self, dim: int, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.a = _cbr(dim, c_in, c_out, 3, stride)
        self.b = _cbr(dim, c_out, c_out, 3, 1, relu=False)
        self.short = None if stride == 1 and c_in == c_out else _cbr(dim, c_in, c_out, 1, stride, relu=False)
        self.relu = nn.ReLU()

    def forward(self, x):
        s = x if self.short is None else self.short(x)
        return self.relu(self.b(self.a(x)) + s)


class ResNet8(nn.Module):
    def __init__(self, dim: int, in_ch: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c = [max(4, int(round(w * width))) for w in (16, 32, 64)]
        _, _, gap = _ops(dim)
        self.features = nn.Sequential(_cbr(dim, in_ch, c[0], 3), ResBlock(dim, c[0], c[0], 1),
                                      ResBlock(dim, c[0], c[1], 2), ResBlock(dim, c[1], c[2], 2),
                                      gap(1), nn.Flatten())
        self.fc = nn.Linear(c[2], num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class DSCNN(nn.Module):
    def __init__(self, dim: int, in_ch: int, num_classes: int, width: float = 1.0, stem_stride: int = 2) -> None:
        super().__init__()
        c = max(8, int(round(64 * width)))
        _, _, gap = _ops(dim)
        k = 5 if dim == 1 else 3
        blocks = [_cbr(dim, in_ch, c, k, stem_stride)]
        for _ in range(4):
            blocks += [_cbr(dim, c, c, 3, groups=c), _cbr(dim, c, c, 1)]
        self.features = nn.Sequential(*blocks, gap(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


class InvertedResidual(nn.Module):
    def __init__(self, dim: int, c_in: int, c_out: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = c_in * expand
        self.body = nn.Sequential(_cbr(dim, c_in, hidden, 1), _cbr(dim, hidden, hidden, 3, stride, groups=hidden),
                                  _cbr(dim, hidden, c_out, 1, relu=False))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileNetish(nn.Module):
    def __init__(self, dim: int, in_ch: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        c = [max(4, int(round(w * width))) for w in (16, 24, 32, 64)]
        _, _, gap = _ops(dim)
        self.features = nn.Sequential(
            _cbr(dim, in_ch, c[0], 3),
            InvertedResidual(dim, c[0], c[1], 2, 4), InvertedResidual(dim, c[1], c[1], 1, 4),
            InvertedResidual(dim, c[1], c[2], 2, 4), InvertedResidual(dim, c[2], c[2], 1, 4),
            _cbr(dim, c[2], c[3], 1), gap(1), nn.Flatten())
        self.fc = nn.Linear(c[3], num_classes)

    def forward(self, x):
        return self.fc(self.features(x))


def build_network(name: str, dim: int, in_ch: int, num_classes: int, width: float, sample_len: int) -> nn.Module:
    if name == "resnet8":
        return ResNet8(dim, in_ch, num_classes, width)
    if name == "dscnn":
        return DSCNN(dim, in_ch, num_classes, width, stem_stride=1 if sample_len <= 8 else 2)
    if name == "mobilenet":
        return MobileNetish(dim, in_ch, num_classes, width)
    raise ValueError(f"unknown network {name!r}; known: {', '.join(NETWORKS)}")


def _augment(x: torch.Tensor, gen: torch.Generator, shift: int) -> torch.Tensor:
    """Random circular shift of up to ``shift`` samples/pixels along the spatial axes."""
    if shift <= 0:
        return x
    dims = tuple(range(2, x.ndim))
    s = [int(torch.randint(-shift, shift + 1, (1,), generator=gen)) for _ in dims]
    return torch.roll(x, s, dims)


def train_fp32(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int = 0,
               batch_size: int = 64, lr: float = 3e-3, shift: int = 1) -> None:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = (len(xt) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    # oneDNN's CPU convolution backward corrupts the heap when training these small nets with
    # torch 2.14.1 on some AMD EPYC machines ("corrupted double-linked list", measured
    # 2026-11-30, benchmarks only so far); torch's native kernels are used instead.
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # (mkldnn.flags() would also warn about TF32)
    try:
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for s in range(steps):
                idx = perm[s * batch_size:(s + 1) * batch_size]
                if len(idx) < 2:
                    continue
                loss = loss_fn(model(_augment(xt[idx], gen, shift)), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    finally:
        torch.backends.mkldnn.enabled = enabled
    model.eval()


def export_onnx(model: nn.Module, path: Path, sample_shape: tuple[int, ...]) -> None:
    dummy = torch.zeros(2, *sample_shape, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                          input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True)


def get_model(task, network: str, width: float, epochs: int, seed: int = 0, log=print) -> tuple[Path, dict]:
    """Train (or load from the cache) ``network`` on ``task`` and return (onnx path, meta)."""
    key = json.dumps({"task": task.name, "net": network, "width": width, "epochs": epochs, "seed": seed,
                      "n_train": len(task.x_train), "opset": OPSET, "v": 1}, sort_keys=True)
    tag = hashlib.sha256(key.encode()).hexdigest()[:12]
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"{task.name}-{network}-w{width:g}-e{epochs}-{tag}.onnx"
    meta_path = path.with_suffix(".json")
    if path.exists() and meta_path.exists():
        return path, json.loads(meta_path.read_text())
    torch.manual_seed(seed)
    sample_len = task.sample_shape[-1]
    model = build_network(network, task.dim, task.in_channels, task.num_classes, width, sample_len)
    start = time.perf_counter()
    shift = 1 if task.name == "digits" else (2 if task.name == "shapes32" else 0)
    train_fp32(model, task.x_train, task.y_train, epochs, seed, shift=shift)
    seconds = time.perf_counter() - start
    tmp = path.with_suffix(".tmp.onnx")
    export_onnx(model, tmp, task.sample_shape)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(task.x_test)).argmax(1).numpy() == task.y_test).mean())
    meta = {"key": json.loads(key), "torch_test_acc": acc, "train_seconds": seconds,
            "params": int(sum(p.numel() for p in model.parameters()))}
    os.replace(tmp, path)
    meta_path.write_text(json.dumps(meta, indent=2))
    log(f"  trained {network} on {task.name}: torch test acc {100 * acc:.2f}%, {meta['params']} params, "
        f"{seconds:.0f}s -> {path}")
    return path, meta

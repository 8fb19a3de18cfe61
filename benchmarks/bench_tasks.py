"""Benchmark tasks, all generated or shipped offline (no downloads).

* ``digits``  - scikit-learn's bundled 8x8 digits (1,797 images), [N, 1, 8, 8] in [0, 1];
  stratified 70/30 split (``random_state=0``), the same split as ``samples/digits``.
* ``mnist1d`` - MNIST-1D from the ``mnist1d`` package's procedural generator
  (``mnist1d.data.make_dataset``; never ``get_dataset``, which may download a pickle);
  15,000 samples (seed 0), the generator's own 80/20 split -> 12,000 train / 3,000 test;
  [N, 1, 40].
* ``shapes32`` - a generated 32x32 RGB image task (10 classes of geometric shapes drawn at a
  random position / size / colour on a random-colour background, with Gaussian pixel noise and
  a random distractor blob), 12,000 train / 3,000 test. Why: CIFAR-10 (the paper's ResNet-8
  task) cannot be downloaded here; this task has the same input geometry (3x32x32, so the
  MLPerf-Tiny ResNet-8 runs unchanged) and is hard enough that 2-bit weights cost accuracy, so
  "iso-accuracy" is not trivially met by every baseline as on digits. It is *not* CIFAR-10 and
  absolute accuracies are not comparable to the paper's; every method sees exactly the same
  data, so the comparison between methods is fair.

``load_task(name, quick=False)`` returns a :class:`Task`. In quick mode the compression-time
training subset is smaller (``train_compress``); the FP32 model is always trained on the full
training split and accuracy is always measured on the full test split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TASKS = ("digits", "mnist1d", "shapes32")


@dataclass
class Task:
    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    dim: int  # 1: [N, C, L]; 2: [N, C, H, W]
    num_classes: int
    description: str

    @property
    def in_channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x_train.shape[1:])

    def compress_subset(self, n: int | None, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """A stratification-free random subset of the training split (the data prunequant sees)."""
        if n is None or n >= len(self.x_train):
            return self.x_train, self.y_train
        idx = np.sort(np.random.default_rng(seed).choice(len(self.x_train), size=n, replace=False))
        return self.x_train[idx], self.y_train[idx]


def _digits() -> Task:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = d.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return Task("digits", np.ascontiguousarray(x_tr), y_tr, np.ascontiguousarray(x_te), y_te, 2, 10,
                "scikit-learn digits 8x8, 1257 train / 540 test")


def _mnist1d(num_samples: int = 15_000) -> Task:
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = 0
    ds = make_dataset(args)  # pure numpy generator
    x_tr = np.ascontiguousarray(ds["x"].astype(np.float32)[:, None, :])
    x_te = np.ascontiguousarray(ds["x_test"].astype(np.float32)[:, None, :])
    return Task("mnist1d", x_tr, ds["y"].astype(np.int64), x_te, ds["y_test"].astype(np.int64), 1, 10,
                f"MNIST-1D generated offline ({num_samples} samples, seed 0), "
                f"{len(x_tr)} train / {len(x_te)} test, length 40")


def _shape_mask(cls: int, yy: np.ndarray, xx: np.ndarray, cy: float, cx: float, r: float,
                angle: float) -> np.ndarray:
    """Boolean 32x32 mask of shape ``cls`` centred at (cy, cx), radius r, rotated by angle."""
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy  # rotated coordinates
    dist = np.sqrt(dx * dx + dy * dy)
    t = max(1.2, 0.28 * r)  # stroke thickness
    if cls == 0:  # filled disc
        return dist <= r
    if cls == 1:  # ring
        return np.abs(dist - r) <= t / 1.5
    if cls == 2:  # filled square
        return (np.abs(u) <= r * 0.8) & (np.abs(v) <= r * 0.8)
    if cls == 3:  # hollow square
        a = r * 0.85
        inside = (np.abs(u) <= a) & (np.abs(v) <= a)
        return inside & ~((np.abs(u) <= a - t) & (np.abs(v) <= a - t))
    if cls == 4:  # triangle (pointing along the rotated v axis)
        return (v <= r * 0.6) & (v >= -r) & (np.abs(u) <= (v + r) * 0.6)
    if cls == 5:  # plus
        return ((np.abs(u) <= t / 1.4) & (np.abs(v) <= r)) | ((np.abs(v) <= t / 1.4) & (np.abs(u) <= r))
    if cls == 6:  # two parallel bars
        return (np.abs(u) <= r) & (np.abs(np.abs(v) - r * 0.5) <= t / 1.6)
    if cls == 7:  # half disc
        return (dist <= r) & (v >= 0)
    if cls == 8:  # triangle outline
        outer = (v <= r * 0.6) & (v >= -r) & (np.abs(u) <= (v + r) * 0.6)
        inner = (v <= r * 0.6 - t) & (v >= -r + 2.2 * t) & (np.abs(u) <= (v + r - 2.2 * t) * 0.6)
        return outer & ~inner
    if cls == 9:  # three dots in a row
        out = np.zeros_like(dist, dtype=bool)
        for k in (-1, 0, 1):
            out |= np.sqrt((u - k * r * 0.7) ** 2 + v * v) <= max(1.3, r * 0.28)
        return out
    raise ValueError(cls)


def make_shapes32(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` RGB 32x32 images of 10 shape classes (balanced), float32 roughly in [-1, 1]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32].astype(np.float32)
    y = np.arange(n) % 10
    rng.shuffle(y)
    x = np.empty((n, 3, 32, 32), np.float32)
    for i in range(n):
        bg = rng.uniform(0, 1, 3).astype(np.float32)
        fg = rng.uniform(0, 1, 3).astype(np.float32)
        while np.abs(fg - bg).sum() < 0.6:  # keep the shape visible
            fg = rng.uniform(0, 1, 3).astype(np.float32)
        img = np.broadcast_to(bg[:, None, None], (3, 32, 32)).copy()
        # a distractor blob of a third colour
        blob = rng.uniform(0, 1, 3).astype(np.float32)
        by, bx, br = rng.uniform(0, 32), rng.uniform(0, 32), rng.uniform(2, 5)
        mask_b = (yy - by) ** 2 / br**2 + (xx - bx) ** 2 / (br * rng.uniform(0.4, 1.6)) ** 2 <= 1
        img[:, mask_b] = blob[:, None]
        r = rng.uniform(5, 11)
        cy, cx = rng.uniform(r, 32 - r), rng.uniform(r, 32 - r)
        mask = _shape_mask(int(y[i]), yy, xx, cy, cx, r, rng.uniform(0, 2 * np.pi))
        img[:, mask] = fg[:, None]
        img += rng.normal(0, 0.12, img.shape).astype(np.float32)
        x[i] = img
    return (x - 0.5) * 2.0, y.astype(np.int64)


def _shapes32(n_train: int = 12_000, n_test: int = 3_000) -> Task:
    x_tr, y_tr = make_shapes32(n_train, seed=1)
    x_te, y_te = make_shapes32(n_test, seed=2)
    return Task("shapes32", x_tr, y_tr, x_te, y_te, 2, 10,
                f"generated 3x32x32 shapes (10 classes, random pose/colour/clutter/noise), "
                f"{n_train} train / {n_test} test")


_CACHE: dict[str, Task] = {}
_BUILDERS = {"digits": _digits, "mnist1d": _mnist1d, "shapes32": _shapes32}
_VERSION = 1


def load_task(name: str, cache_dir: Path | None = None) -> Task:
    """The task's arrays; generated ones are cached as ``.npz`` in ``cache_dir`` (the bench cache)."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    if name in _CACHE:
        return _CACHE[name]
    path = None if cache_dir is None or name == "digits" else Path(cache_dir) / f"task-{name}-v{_VERSION}.npz"
    if path is not None and path.exists():
        z = np.load(path, allow_pickle=False)
        task = Task(name, z["x_train"], z["y_train"], z["x_test"], z["y_test"], int(z["dim"]),
                    int(z["num_classes"]), str(z["description"]))
    else:
        task = _BUILDERS[name]()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, x_train=task.x_train, y_train=task.y_train, x_test=task.x_test, y_test=task.y_test,
                     dim=task.dim, num_classes=task.num_classes, description=task.description)
            os.replace(tmp, path)
    _CACHE[name] = task
    return task

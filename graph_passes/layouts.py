"""Channel layouts: which channel "atom" sits at each position of a tensor's channel axis.

Every output channel of a weight layer (and every channel of a tensor we cannot see through) is
an *atom*. A tensor's :class:`Layout` lists, per position of its channel axis, the atom found
there: a Concat concatenates layouts, a Slice cuts one, a Flatten repeats each atom H*W times.
Two atoms are *tied* when they must be removed together (an Add of two branches ties them
position by position; a depthwise conv ties its input to its output). Ties and blocks live in
the :class:`AtomTable`; groups are derived from it once propagation is over.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Layout:
    """The channel axis of a tensor and the atom at each position along it."""

    axis: int
    atoms: np.ndarray  # int64, one atom id per position

    def __post_init__(self) -> None:
        self.atoms = np.asarray(self.atoms, dtype=np.int64)

    @property
    def size(self) -> int:
        return int(self.atoms.shape[0])

    def with_axis(self, axis: int) -> "Layout":
        return Layout(axis, self.atoms)


@dataclass
class AtomTable:
    """Atoms (numbered 0..count-1, born in batches, one batch per producing node), the ties
    between them (edges, resolved into components once propagation is over) and the reasons some
    of them are blocked. Kept as arrays: a large model has tens of thousands of atoms."""

    batch_node: list[str] = field(default_factory=list)
    batch_start: list[int] = field(default_factory=list)
    batch_is_weight: list[bool] = field(default_factory=list)
    count: int = 0
    tie_edges: list[np.ndarray] = field(default_factory=list)
    blocks: list[tuple[np.ndarray, str]] = field(default_factory=list)

    def new(self, node: str, count: int, is_weight_layer: bool) -> np.ndarray:
        self.batch_node.append(node)
        self.batch_start.append(self.count)
        self.batch_is_weight.append(is_weight_layer)
        ids = np.arange(self.count, self.count + count, dtype=np.int64)
        self.count += count
        return ids

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie two equally long atom arrays position by position."""
        if a.shape != b.shape:
            raise ValueError(f"cannot tie layouts of sizes {a.shape} and {b.shape}")
        self.tie_edges.append(np.stack([a, b], axis=1))

    def tie_all(self, atoms: np.ndarray) -> None:
        """Tie every atom of the array to every other (they go as one unit)."""
        flat = atoms.ravel()
        if flat.size > 1:
            self.tie_edges.append(np.stack([flat[:-1], flat[1:]], axis=1))

    def block(self, atoms: np.ndarray, reason: str) -> None:
        if atoms.size:
            self.blocks.append((np.unique(atoms), reason))

    # --- read side, after propagation ------------------------------------------------------
    def batch_of(self) -> np.ndarray:
        """Batch index of every atom."""
        sizes = np.diff(np.asarray(self.batch_start + [self.count], dtype=np.int64))
        return np.repeat(np.arange(len(self.batch_start), dtype=np.int64), sizes)

    def is_weight(self) -> np.ndarray:
        return np.asarray(self.batch_is_weight, dtype=bool)[self.batch_of()] if self.count else np.zeros(0, bool)

    def blocked_mask(self) -> np.ndarray:
        mask = np.zeros(self.count, dtype=bool)
        for atoms, _ in self.blocks:
            mask[atoms] = True
        return mask

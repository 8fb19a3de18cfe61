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
from networkx.utils import UnionFind


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
class AtomSource:
    """Where an atom was born: output channel ``channel`` of node ``node`` (or a graph input)."""

    node: str
    channel: int
    is_weight_layer: bool


@dataclass
class AtomTable:
    """Atoms, their sources, the ties between them and the reasons some are blocked."""

    sources: list[AtomSource] = field(default_factory=list)
    ties: UnionFind = field(default_factory=UnionFind)
    blocked: dict[int, list[str]] = field(default_factory=dict)

    def new(self, node: str, count: int, is_weight_layer: bool) -> np.ndarray:
        start = len(self.sources)
        self.sources.extend(AtomSource(node, c, is_weight_layer) for c in range(count))
        ids = np.arange(start, start + count, dtype=np.int64)
        for a in ids.tolist():
            self.ties[a]  # register the singleton
        return ids

    def tie(self, a: np.ndarray, b: np.ndarray) -> None:
        """Tie two equally long atom arrays position by position."""
        if a.shape != b.shape:
            raise ValueError(f"cannot tie layouts of sizes {a.shape} and {b.shape}")
        for x, y in zip(a.tolist(), b.tolist()):
            if x != y:
                self.ties.union(x, y)

    def tie_all(self, atoms: np.ndarray) -> None:
        """Tie every atom of the array to every other (they go as one unit)."""
        flat = atoms.ravel().tolist()
        if len(flat) > 1:
            self.ties.union(*flat)

    def block(self, atoms: np.ndarray, reason: str) -> None:
        for a in np.unique(atoms).tolist():
            reasons = self.blocked.setdefault(a, [])
            if reason not in reasons:
                reasons.append(reason)

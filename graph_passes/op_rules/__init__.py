"""Per-op channel rules. Importing this package registers every rule."""

from . import elementwise, shape_ops, spatial, weights  # noqa: F401  (registration)
from .context import PropagationContext, PruneContext
from .registry import OpRule, find_rule, register, registered_ops

__all__ = ["OpRule", "PropagationContext", "PruneContext", "find_rule", "register", "registered_ops"]

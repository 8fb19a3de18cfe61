"""Per-op channel rules. Importing this package registers every rule."""

from . import elementwise, recurrent, shape_ops, spatial, weights  # noqa: F401  (registration)
from . import attention  # noqa: F401,E402  (extends weights' MatMul: imported after it)
from .context import PropagationContext, PruneContext
from .registry import EmbeddingFacts, OpRule, ProductFacts, find_rule, register, registered_ops
from .weights import COST_KINDS, AffineFold, WeightFacts, WeightOpRule, flat_pair, weight_rule

__all__ = ["AffineFold", "COST_KINDS", "EmbeddingFacts", "OpRule", "ProductFacts", "PropagationContext", "PruneContext", "WeightFacts", "WeightOpRule",
           "find_rule", "flat_pair", "register", "registered_ops", "weight_rule"]

"""Search strategies behind one protocol (see :mod:`plugin.strategies.base`)."""

from .base import Strategy, StrategyOption, StrategyResult, resolve_options
from .registry import ENTRY_POINT_GROUP, available_strategies, get_strategy, register_strategy

__all__ = ["ENTRY_POINT_GROUP", "Strategy", "StrategyOption", "StrategyResult", "available_strategies",
           "get_strategy", "register_strategy", "resolve_options"]

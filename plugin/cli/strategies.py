"""`prunequant strategies`: the registered search strategies, their options and defaults.

A strategy that fails to load (a missing optional dependency, a broken third-party package) is
listed with its error; the others are still described and the command exits 0.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from .errors import handle_errors

logger = logging.getLogger(__name__)


def describe_strategy(name: str) -> dict[str, Any]:
    """Name, summary, whether it follows --target, and its options; ``error`` when it cannot load."""
    from plugin.strategies import get_strategy

    try:
        strategy = get_strategy(name)
    except Exception as exc:  # listed, not fatal: the other strategies still work
        logger.debug("strategy %r failed to load", name, exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return {"name": name, "error": f"{type(exc).__name__}: {first}"}
    options = getattr(strategy, "options", {}) or {}
    return {
        "name": name,
        "summary": " ".join(str(getattr(strategy, "summary", "")).split()),
        "steerable": bool(getattr(strategy, "steerable", False)),
        "options": [
            {"name": option.name, "type": getattr(option.type, "__name__", str(option.type)),
             "default": option.default, "help": option.help}
            for option in options.values()
        ],
    }


def _text(entry: dict[str, Any]) -> str:
    if "error" in entry:
        return f"{entry['name']}\n  failed to load: {entry['error']}"
    follows = "yes" if entry["steerable"] else "no (a --target is not used)"
    lines = [f"{entry['name']}: {entry['summary']}", f"  follows --target: {follows}"]
    if entry["options"]:
        lines.append("  options (-S NAME=VALUE):")
        for option in entry["options"]:
            lines.append(f"    {option['name']}={option['default']!s}  ({option['type']}) {option['help']}")
    else:
        lines.append("  options: none")
    return "\n".join(lines)


@click.command("strategies")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
@handle_errors
def strategies_command(as_json: bool) -> None:
    """List the search strategies `compress --strategy` accepts: built-in, registered at run time,
    and installed through the `prunequant.strategies` entry-point group; for each, what it does,
    whether it follows --target, and its -S/--strategy-option options with their defaults."""
    from plugin.strategies import available_strategies

    entries = [describe_strategy(name) for name in available_strategies()]
    if as_json:
        click.echo(json.dumps(entries, indent=2, default=str))
    else:
        click.echo("\n\n".join(_text(entry) for entry in entries))

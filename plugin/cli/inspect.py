"""`prunequant inspect`: the analysis report of a model; nothing is written."""

from __future__ import annotations

import json

import click

from .errors import handle_errors

_INPUT_SHAPE_HELP = (
    "Pin a model input's shape, e.g. --input-shape input=1x3x224x224. Needed when the model has "
    "symbolic dims (such as a dynamic batch); repeat for several inputs."
)


@click.command("inspect")
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD", help=_INPUT_SHAPE_HELP)
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V",
              help="Make a model input a constant, e.g. --input-value sr=16000 (a sample rate, a flag); "
                   "an If on it is folded. Integer inputs otherwise get values the graph allows.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON (for pipelines).")
@click.option("--no-verify", is_flag=True, help="Skip the onnxruntime check of the normalised model.")
@click.option("--bridge/--no-bridge", default=True, show_default=True,
              help="Also convert to torch and measure parity (what `compress` trains on).")
@click.option("--inexact-hidden-width", is_flag=True,
              help="Count the inexact groups (a transformer's residual hidden width through LayerNorm / "
                   "RMSNorm) as prunable, as `compress --inexact-hidden-width` does. Both coverages "
                   "are reported either way.")
@click.option("--max-rows", default=60, show_default=True, type=click.IntRange(min=1),
              help="Rows per table in the text report.")
@handle_errors
def inspect_command(model: str, input_shapes: tuple[str, ...], as_json: bool, no_verify: bool, bridge: bool,
                    max_rows: int, input_values: tuple[str, ...] = (), inexact_hidden_width: bool = False) -> None:
    """Analyse MODEL: weight layers, parameters, MACs, channel groups (which channels must be
    removed together, and which cannot be removed and why), ops without a rule, and whether the
    model can be trained through the torch bridge.

    Nothing is written. The model is loaded safely (external data only from its own
    directory), normalised (constants folded, BatchNorm folded into convs) and the normalised
    model is checked against the original with onnxruntime.
    """
    from plugin.inspect_cmd import build_inspect_report

    report = build_inspect_report(model, input_shapes, verify=not no_verify, bridge=bridge,
                                  input_values=input_values, inexact_hidden_width=inexact_hidden_width)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.to_text(max_rows=max_rows))

"""`prunequant export`: apply a saved plan to a model, without searching (:func:`plugin.api.apply_plan`)."""

from __future__ import annotations

import json
import os

import click

from .errors import handle_errors

_SHAPE_HELP = "Pin a model input's shape (NAME=DxDxD); needed for symbolic dims other than the batch."


@click.command("export")
@click.argument("model", type=str)
@click.option("--plan", "plan_path", required=True, metavar="PLAN.json",
              help="A NAME.plan.json written by `prunequant compress` (or `export`).")
@click.option("-o", "--output", required=True,
              help="Where to write the model (plus NAME.plan.json and NAME.report.json).")
@click.option("--data", default=None,
              help="Held-out inputs (.npy, .npz or a folder) for the gate and the report's fidelity figures "
                   "[default: generated inputs].")
@click.option("--labels", default=None, help="Class labels (.npy or .npz key 'labels') for the report's accuracy.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD", help=_SHAPE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
@handle_errors
def export_command(model: str, plan_path: str, output: str, data: str | None, labels: str | None,
                   input_shapes: tuple[str, ...], as_json: bool, no_progress: bool) -> None:
    """Apply a saved plan to MODEL without searching: remove the plan's pruned channels and
    quantize weights and activations with its bit-widths (no fine-tuning: the weights are the
    model's own). The plan must have been made for this model (its hash is checked). The model
    passes the same gate as `compress` before it is written, atomically, with its plan and report.

    \b
    Example:
      prunequant export model.onnx --plan small.plan.json -o again.onnx --data calib.npz
    """
    from graph_passes.shapes import parse_input_shapes
    from graph_passes.writing import check_output_path

    shapes = parse_input_shapes(input_shapes)
    check_output_path(output)

    from plugin import api

    # the plan by path: apply_plan reads it before the model, and refuses an -o whose sidecar
    # NAME.plan.json would overwrite it
    result = api.apply_plan(model, plan_path, output=output, input_shapes=shapes or None, data=data, labels=labels,
                            progress=not no_progress)
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
        return
    size = os.path.getsize(output) if os.path.exists(output) else result.model.ByteSize()
    written = [path for path in [output, *api.sidecar_paths(output)] if os.path.exists(path)] or [output]
    click.echo(f"wrote {', '.join(written)} (model {size:,} bytes)")

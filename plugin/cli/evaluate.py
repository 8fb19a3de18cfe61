"""`prunequant evaluate`: accuracy on labelled data, agreement with a reference model, in
onnxruntime or OpenVINO (``--runtime``)."""

from __future__ import annotations

import json
import logging

import click

from .errors import handle_errors

logger = logging.getLogger(__name__)

_DATA_HELP = (
    "Input data: a .npy (the model's single input), an .npz (one array per input, keys = input "
    "names; an optional 'labels' key holds the labels), or a folder of .npy/.npz files "
    "(concatenated in sorted order). Dim 0 is the sample axis."
)
_LABELS_HELP = "Integer class ids, shape [N]: a .npy, or an .npz with key 'labels'."
_REFERENCE_HELP = (
    "Reference model, usually the original this one was compressed from: reports top-1 "
    "agreement and the relative error of every output."
)
_INPUT_SHAPE_HELP = (
    "Pin a symbolic input dim other than the batch, e.g. --input-shape input=1x3x224x224; "
    "repeat for several inputs."
)


@click.command("evaluate")
@click.argument("model", type=click.Path(dir_okay=True, path_type=str))
@click.option("--data", "data", required=True, metavar="PATH", help=_DATA_HELP)
@click.option("--labels", "labels", metavar="PATH", help=_LABELS_HELP)
@click.option("--reference", "reference", metavar="REF.onnx", help=_REFERENCE_HELP)
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD",
              help=_INPUT_SHAPE_HELP)
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1),
              help="Samples per onnxruntime run (a model with a fixed batch uses its own).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="Evaluate only the first N samples.")
@click.option("--runtime", type=click.Choice(["onnxruntime", "openvino"]), default="onnxruntime",
              show_default=True,
              help="Run MODEL in onnxruntime or in OpenVINO on CPU (the extra prunequant[openvino]); "
                   "--reference always runs in onnxruntime.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (for pipelines).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@handle_errors
def evaluate_command(model: str, data: str, labels: str | None, reference: str | None,
                     input_shapes: tuple[str, ...], batch_size: int, limit: int | None,
                     as_json: bool, no_progress: bool, runtime: str = "onnxruntime") -> None:
    """Measure MODEL on data with onnxruntime (CPU, or OpenVINO with --runtime openvino): top-1
    accuracy when labels are given,
    top-1 agreement and output error against --reference when one is given, or both.

    \b
    Examples:
      prunequant evaluate model.onnx --data test.npz            # .npz with 'labels'
      prunequant evaluate small.onnx --data calib.npz --reference model.onnx --json
      prunequant evaluate model.onnx --data x.npy --labels y.npy
      prunequant evaluate small.onnx --data test.npz --runtime openvino --reference small.onnx

    Nothing is written. The data is checked against the model's inputs before anything runs
    (names, shapes, dtypes, NaN/Inf, labels).
    """
    from graph_passes.shapes import parse_input_shapes

    from plugin.data import load_dataset
    from plugin.evaluate import evaluate, load_runnable

    shapes = parse_input_shapes(input_shapes)
    if runtime == "openvino":  # before the model is loaded: a missing extra is one line at once
        from plugin.runtimes import import_openvino

        import_openvino()
    runnable = load_runnable(model, shapes or None)
    dataset = load_dataset(data, runnable.specs, labels)
    if limit is not None:
        dataset = dataset.subset(limit)
    result = evaluate(runnable, dataset, reference=reference, batch_size=batch_size,
                      input_shapes=shapes or None, progress=False if no_progress else None,
                      runtime=runtime)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(result.to_text())

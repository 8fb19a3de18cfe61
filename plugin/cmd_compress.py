"""`prunequant compress` and `prunequant export`."""

from __future__ import annotations

import json

import click

_SHAPE_HELP = "Pin a model input's shape (NAME=DxDxD); needed for symbolic dims other than the batch."


def _handle(fn):
    from .cli import handle_errors

    return handle_errors(fn)


def _bits(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r}: give comma-separated bit-widths, e.g. 8 or 2,4,8") from None


@click.command("compress")
@click.argument("model", type=str)
@click.option("--data", required=True, help="Inputs: .npy, .npz (one array per model input) or a folder of them.")
@click.option("--labels", default=None, help="Class labels (.npy or .npz key 'labels'): cross-entropy instead of distillation.")
@click.option("-o", "--output", required=True, help="Where to write the compressed model (plus NAME.plan.json, NAME.report.json).")
@click.option("--cost", default="size", show_default=True, help="Cost model the search minimises: size, bops, mpic, mpic_energy, ne16, or a registered one.")
@click.option("--lambda", "lam", type=float, default=None, help="Weight of the cost in the loss, relative to the 8-bit model's cost (instead of --target).")
@click.option("--target", default=None, help="Budget the discretised plan must meet: size=0.25 (of the 8-bit model), size=40KB, mpic=1.2e6 ... [default: size=0.35 when no --lambda]")
@click.option("--epochs", default=20, show_default=True, help="Search epochs.")
@click.option("--finetune-epochs", default=10, show_default=True, help="QAT epochs with the plan frozen.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--act-bits", default=None, help="Fix activation precisions, e.g. 8 for targets that need 8-bit activations [default: search 2,4,8].")
@click.option("--weight-bits", default="0,2,4,8", show_default=True, help="Weight precisions to search (0 = prune).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Same seed, same data, same plan (on CPU).")
@click.option("--threads", type=int, default=None, help="torch threads [default: 1 for models under 50M MACs, else all].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD", help=_SHAPE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
def compress_command(model, data, labels, output, cost, lam, target, epochs, finetune_epochs, batch_size,
                     act_bits, weight_bits, device, seed, threads, input_shapes, as_json, no_progress):
    """Compress MODEL: one joint search removes channels and gives every remaining weight channel
    its own bit-width, then quantization-aware fine-tuning, then export to a QDQ ONNX model
    that is validated (checker, onnxruntime, parity with the fake-quantized model) before it
    is written atomically.

    \b
    Examples:
      prunequant compress samples/digits/model.onnx --data samples/digits/train.npz -o digits_pq.onnx
      prunequant compress model.onnx --data calib.npz -o small.onnx --target size=0.25
      prunequant compress model.onnx --data calib.npz -o fast.onnx --cost mpic --act-bits 8

    Without --labels the loss distils the original model's outputs: unlabelled inputs suffice.
    """
    _handle(_run_compress)(**locals())


def _run_compress(model, data, labels, output, cost, lam, target, epochs, finetune_epochs, batch_size,
                  act_bits, weight_bits, device, seed, threads, input_shapes, as_json, no_progress):
    from graph_passes.shapes import parse_input_shapes

    from .pipeline import CompressConfig, compress, summary_table

    config = CompressConfig(
        cost=cost, lam=lam, target=target, epochs=epochs, finetune_epochs=finetune_epochs,
        batch_size=batch_size, act_bits=_bits(act_bits), weight_precisions=_bits(weight_bits),
        device=device, seed=seed, progress=not no_progress, input_shapes=parse_input_shapes(input_shapes),
        threads=threads,
    )
    result = compress(model, data, labels=labels, output=output, config=config)
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
    else:
        click.echo(summary_table(result.report))
        click.echo(f"wrote {output}")



@click.command("export")
@click.argument("model", type=str)
@click.option("--plan", "plan_path", required=True, help="A plan.json from `prunequant compress`.")
@click.option("-o", "--output", required=True, help="Where to write the model.")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD", help=_SHAPE_HELP)
def export_command(model, plan_path, output, input_shapes):
    """Apply a saved plan to MODEL without searching: remove the plan's pruned channels and
    quantize weights and activations with its bit-widths (no fine-tuning: the weights are the
    model's own). The plan must have been made for this model (its hash is checked)."""
    _handle(_run_export)(model, plan_path, output, input_shapes)


def _run_export(model, plan_path, output, input_shapes):
    from graph_passes.batch import restore_dynamic_batch
    from graph_passes.validate import validate_model
    from graph_passes.writing import check_output_path, write_outputs

    from .export import export_plan
    from .inspect_cmd import prepare_model
    from .plan import CompressionPlan, sha256_hex

    check_output_path(output)
    plan = CompressionPlan.load(plan_path)
    prepared = prepare_model(model, input_shapes)
    plan.check_model_hash(sha256_hex(prepared.model.SerializeToString()))
    exported = export_plan(prepared.model, prepared.analysis, plan)
    exported.model, _ = restore_dynamic_batch(exported.model)
    report = validate_model(exported.model, rtol=float("inf"))
    write_outputs(output, exported.model)
    click.echo(f"wrote {output} ({exported.model.ByteSize():,} bytes; validated in {report.seconds:.2f} s)")


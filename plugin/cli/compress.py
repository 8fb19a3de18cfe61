"""`prunequant compress`: search a plan with a strategy, fine-tune, export, gate, write.

Every flag is validated here before the model is touched (bit-widths, budget, cost model,
strategy name and option syntax, input shapes, output location); the work is
:func:`plugin.api.compress`.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import click

from graph_passes.errors import ConfigError
from plugin.engine.config import DEFAULT_QAT_SCHEDULE, QAT_SCHEDULES

from .errors import handle_errors

logger = logging.getLogger(__name__)

_SHAPE_HELP = "Pin a model input's shape (NAME=DxDxD); needed for symbolic dims other than the batch."
_TARGET_HELP = (
    "Budget the plan must meet, relative with % (size=35%: 35% of the all-8-bit model) or absolute "
    "with a unit of the cost model (size=40KB, size=39KiB, mpic=1.2e6cycles, mpic_energy=350uJ, "
    "bops=2e9BOPs). Only strategies that follow --target use it (`prunequant strategies`). "
    "[default: <cost>=35% when no --lambda]"
)


def parse_strategy_options(texts: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``("temperature=5", "steps=3")`` -> ``{"temperature": "5", "steps": "3"}``; values stay text
    (the strategy parses them); ConfigError naming the flag for malformed or repeated names."""
    options: dict[str, str] = {}
    for text in texts:
        name, sep, value = text.partition("=")
        name = name.strip()
        if not sep or not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError(f"--strategy-option {text!r}: expected NAME=VALUE, e.g. -S epochs_per_round=2 "
                              "(`prunequant strategies` lists each strategy's options)")
        if name in options:
            raise ConfigError(f"--strategy-option {name}: given twice")
        options[name] = value.strip()
    return options


def check_flags(*, cost: str, target: str | None, weight_bits: str | None, act_bits: str | None,
                strategy: str, strategy_options: tuple[str, ...], input_shapes: tuple[str, ...],
                output: str | None, sparsity: float | None = None, bits: str | None = None) -> dict[str, Any]:
    """Validate every flag without loading the model; the keyword arguments they give the config.

    Torch-free and fast: this is why a wrong flag fails in well under a second, naming the flag.
    """
    from plugin.space import Precisions

    precisions = Precisions.parse(weight_bits, act_bits)  # first: no onnx import before a bad width is named

    from cost_models import get_cost_model
    from graph_passes.shapes import parse_input_shapes
    from graph_passes.writing import check_output_path
    from plugin.strategies import available_strategies, get_strategy
    from plugin.targets import parse_target

    get_cost_model(cost)  # unknown: CostModelError listing the known ones
    if target is not None:
        parse_target(target)
    if strategy not in available_strategies():
        get_strategy(strategy)  # raises ConfigError listing the known names
    options = parse_strategy_options(strategy_options)
    if target is not None and options.get("target"):
        raise ConfigError("--target and -S target=...: give one of them")
    if strategy == "rl" and options.get("target"):
        parse_target(options["target"])
    geta_widths = _explicit_targets(strategy, options, sparsity, bits, weight_bits)
    shapes = parse_input_shapes(input_shapes)
    if output is not None:
        check_output_path(output)
    kwargs: dict[str, Any] = {"cost": cost, "target": target, "strategy": strategy, "strategy_options": options,
                              "input_shapes": shapes}
    if weight_bits is not None:
        kwargs["weight_precisions"] = precisions.weights
    if geta_widths is not None:
        kwargs["weight_precisions"] = geta_widths
    if act_bits is not None:
        kwargs["act_bits"] = precisions.activations
    return kwargs


def _explicit_targets(strategy: str, options: dict[str, Any], sparsity: float | None, bits: str | None,
                      weight_bits: str | None) -> tuple[int, ...] | None:
    """``--sparsity`` / ``--bits`` (targets of ``--strategy geta``) -> its options, validated; the
    weight widths ``--bits`` implies (0 plus the export's widths in the range), or None."""
    given = [flag for flag, value in (("--sparsity", sparsity), ("--bits", bits)) if value is not None]
    if strategy != "geta":
        if given:
            raise ConfigError(f"{' and '.join(given)}: only --strategy geta takes explicit targets; drop "
                              f"{'them' if len(given) > 1 else 'it'} or use --strategy geta")
        return None
    from plugin.strategies.geta import parse_bits, parse_sparsity, range_widths

    for flag, name, value in (("--sparsity", "sparsity", sparsity), ("--bits", "bits", bits)):
        if value is not None and name in options:
            raise ConfigError(f"{flag} and -S {name}=...: give one of them")
    if sparsity is not None:
        options["sparsity"] = str(parse_sparsity(sparsity))
    elif "sparsity" in options:
        parse_sparsity(options["sparsity"], "-S sparsity")
    if bits is None:
        if "bits" in options:
            parse_bits(options["bits"], "-S bits")
        return None
    if weight_bits is not None:
        raise ConfigError("--bits and --weight-bits: give one (with --strategy geta, --bits LO-HI sets the weight "
                          "widths, e.g. --bits 2-8)")
    lo, hi = parse_bits(bits)
    options["bits"] = f"{lo}-{hi}"
    return (0, *range_widths(lo, hi))


def _study_flags(strategy: str, options: tuple[str, ...], **flags: Any) -> tuple[str, ...]:
    """``--trials/--study/--storage/--resume`` -> ``-S`` options of ``--strategy bayesian``; refused
    (one line) with any other strategy or when the same option is also given with ``-S``."""
    given = {name: value for name, value in flags.items() if value not in (None, False)}
    if not given:
        return options
    names = ", ".join(f"--{name}" for name in given)
    if strategy != "bayesian":
        raise ConfigError(f"{names}: only --strategy bayesian keeps a study; drop them or use --strategy bayesian")
    named = {text.partition("=")[0].strip() for text in options}
    for name in given:
        if name in named:
            raise ConfigError(f"--{name} and -S {name}=...: give one of them")
    return (*options, *(f"{name}={value}" for name, value in given.items()))


@click.command("compress")
@click.argument("model", type=str)
@click.option("--data", required=True,
              help="Inputs: .npy, .npz (one array per model input) or a folder of them.")
@click.option("--labels", default=None,
              help="Class labels (.npy or .npz key 'labels'): cross-entropy instead of distillation.")
@click.option("-o", "--output", required=True,
              help="Where to write the compressed model (plus NAME.plan.json, NAME.report.json).")
@click.option("--strategy", default="gradient", show_default=True, metavar="NAME",
              help="Search strategy: gradient, uniform, sequential, or a registered one (`prunequant strategies`).")
@click.option("-S", "--strategy-option", "strategy_options", multiple=True, metavar="NAME=VALUE",
              help="A strategy-specific option (repeatable); `prunequant strategies` lists them with defaults.")
@click.option("--cost", default="size", show_default=True,
              help="Cost model the search minimises: size, bops, mpic, mpic_energy, ne16, or a registered one.")
@click.option("--lambda", "lam", type=float, default=None,
              help="Weight of the cost in the loss, relative to the 8-bit model's cost (instead of --target).")
@click.option("--target", default=None, metavar="COST=N%|COST=N UNIT", help=_TARGET_HELP)
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=0), help="Search epochs.")
@click.option("--finetune-epochs", default=10, show_default=True, type=click.IntRange(min=0),
              help="QAT epochs with the plan frozen.")
@click.option("--qat-schedule", type=click.Choice(list(QAT_SCHEDULES)), default=DEFAULT_QAT_SCHEDULE,
              show_default=True, help="QAT's learning rate over its epochs: cosine (down to 0 at the last step), "
                                      "or constant.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--weight-bits", default=None, metavar="B[,B...]",
              help="Weight bit-widths to choose from (0 = prune the channel): any of 0,2,4,8. "
                   "[default: 0,2,4,8]")
@click.option("--act-bits", default=None, metavar="B[,B...]",
              help="Activation bit-widths to choose from, any of 2,4,8; e.g. 8 for targets that need "
                   "8-bit activations [default: search 2,4,8].")
@click.option("--sparsity", type=float, default=None, metavar="FLOAT",
              help="--strategy geta: fraction of the prunable group channels to remove, in [0, 1) [default: 0.3].")
@click.option("--bits", default=None, metavar="LO-HI",
              help="--strategy geta: weight bit-width range, ends from 2, 4, 8 (e.g. 2-8) [default: 2-8].")
@click.option("--trials", type=click.IntRange(min=1), default=None, metavar="N",
              help="--strategy bayesian: completed trials the study ends with, over all its workers [default: 40].")
@click.option("--study", "study", default=None, metavar="NAME",
              help="--strategy bayesian: the optuna study's name [default: bayesian-<model hash>].")
@click.option("--storage", default=None, metavar="URL|FILE",
              help="--strategy bayesian: optuna storage shared by workers, an RDB URL (sqlite:///s.db, "
                   "postgresql://...) or a journal file [default: OUT.study.db beside -o].")
@click.option("--resume", is_flag=True,
              help="--strategy bayesian: continue (or join) the existing study of that name.")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--seed", default=0, show_default=True, help="Same seed, same data, same plan (on CPU).")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="torch threads [default: 1 for models under 50M MACs, else all].")
@click.option("--input-shape", "input_shapes", multiple=True, metavar="NAME=DxDxD", help=_SHAPE_HELP)
@click.option("--input-value", "input_values", multiple=True, metavar="NAME=V",
              help="Make a model input a constant (e.g. --input-value sr=16000): an If on it is folded, and "
                   "the compressed model no longer takes that input.")
@click.option("--inexact-hidden-width", is_flag=True,
              help="Also prune a transformer's residual hidden width (the channels every block's residual Add "
                   "and LayerNorm/RMSNorm share). Not exact: the norms' statistics change, QAT recovers; "
                   "`prunequant inspect` shows the coverage with and without it.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of the table.")
@click.option("--no-progress", is_flag=True, help="No progress bars (logs only).")
@click.option("--mlflow-uri", "mlflow_uri", default=None, metavar="URI",
              help="Log the run to MLflow (the extra prunequant[mlflow]): parameters, metrics, and the model, "
                   "plan and report as artifacts, once the model passed the gate and was written; e.g. "
                   "sqlite:///mlflow.db or http://host:5000 (checked before the search starts).")
@click.option("--mlflow-experiment", "mlflow_experiment", default=None, metavar="NAME",
              help="MLflow experiment of the run (created when missing) [default: prunequant].")
@handle_errors
def compress_command(model: str, data: str, labels: str | None, output: str, strategy: str,
                     strategy_options: tuple[str, ...], cost: str, lam: float | None, target: str | None,
                     epochs: int, finetune_epochs: int, batch_size: int, weight_bits: str | None,
                     act_bits: str | None, sparsity: float | None, bits: str | None, device: str, seed: int,
                     threads: int | None,
                     input_shapes: tuple[str, ...], as_json: bool, no_progress: bool, trials: int | None = None,
                     study: str | None = None, storage: str | None = None, resume: bool = False,
                     mlflow_uri: str | None = None, mlflow_experiment: str | None = None,
                     input_values: tuple[str, ...] = (), inexact_hidden_width: bool = False,
                     qat_schedule: str = DEFAULT_QAT_SCHEDULE) -> None:
    """Compress MODEL: a search strategy chooses which channels to remove and the bit-width of
    every remaining weight channel and activation; then quantization-aware fine-tuning, then
    export to a QDQ ONNX model that is validated (checker, onnxruntime, agreement with the
    fake-quantized model) before it is written atomically with NAME.plan.json and
    NAME.report.json.

    \b
    Strategies (--strategy; `prunequant strategies` lists all, with their -S options):
      gradient    (default) one joint differentiable search of pruning and per-channel
                  bit-widths; follows --lambda or --target (budget), searches --weight-bits
                  and --act-bits for --epochs epochs.
      uniform     no search, no pruning: one width for every layer, then QAT; give one
                  non-zero --weight-bits and one --act-bits width, e.g. --weight-bits 8
                  --act-bits 8 is W8A8 QAT (--weight-bits 4 --act-bits 8: W4A8); no --target.
      sequential  pruning alone searched to the budget (--target or --lambda) and
                  fine-tuned, then mixed precision (--weight-bits, --act-bits) on the
                  pruned model.
      geta        explicit targets, one training run (GETA): --sparsity of the prunable
                  group channels removed, every layer's width in --bits LO-HI; no --target.
      bayesian    uniform quantization (-S bits), then optuna chooses a pruning ratio per
                  channel group (--trials, --target or --lambda); the study is kept in
                  OUT.study.db (--resume) or shared by workers (--storage URL --study NAME).
      rl          a DDPG agent picks per layer a keep ratio and weight/activation widths,
                  minimising mpic_energy at <= -S accuracy_loss (1.7) points lost, without
                  retraining (-S episodes); --target, if given, is kept by an action wall.

    \b
    Examples:
      prunequant compress samples/digits/model.onnx --data samples/digits/train.npz -o digits_pq.onnx
      prunequant compress model.onnx --data calib.npz -o small.onnx --target size=25%
      prunequant compress model.onnx --data calib.npz -o small.onnx --target size=40KB
      prunequant compress model.onnx --data calib.npz -o fast.onnx --cost mpic --act-bits 8
      prunequant compress model.onnx --data calib.npz -o w8a8.onnx --strategy uniform --weight-bits 8 --act-bits 8

    Without --labels the loss distils the original model's outputs: unlabelled inputs suffice.
    """
    strategy_options = _study_flags(strategy, strategy_options, trials=trials, study=study, storage=storage,
                                    resume=resume)
    settings = check_flags(cost=cost, target=target, weight_bits=weight_bits, act_bits=act_bits, strategy=strategy,
                           strategy_options=strategy_options, input_shapes=input_shapes, output=output,
                           sparsity=sparsity, bits=bits)
    if mlflow_uri is not None:  # an unusable tracking URI fails now, in seconds, not after the search
        from plugin.integrations.mlflow_log import check_tracking_uri

        check_tracking_uri(mlflow_uri, mlflow_experiment)
    from plugin import api

    config = api.CompressConfig(
        lam=lam, epochs=epochs, finetune_epochs=finetune_epochs, qat_schedule=qat_schedule,
        batch_size=batch_size, device=device,
        seed=seed, progress=not no_progress, threads=threads, inexact_hidden_width=inexact_hidden_width, **settings,
    )
    source = model
    if input_values:  # pinned inputs: compress the model in which they are constants
        from graph_passes.feeds import pin_input_values
        from graph_passes.loading import load_model

        api.check_output_not_input(output, model=model, data=data, labels=labels)
        source = pin_input_values(load_model(model, config.input_shapes or None, batch=1), input_values)
    result = api.compress(source, data, labels=labels, output=output, config=config)
    run_id = None
    if mlflow_uri is not None:  # the model passed the gate and was written: log it with its plan and report
        from plugin.integrations.mlflow_log import log_run

        run_id = log_run(result, mlflow_uri, mlflow_experiment, files=[output, *api.sidecar_paths(output)])
    if as_json:
        click.echo(json.dumps(result.report, indent=2, default=str))
    else:
        click.echo(api.summary_table(result.report))
        click.echo(f"wrote {output}")
        if run_id is not None:
            click.echo(f"logged MLflow run {run_id} (experiment {mlflow_experiment or 'prunequant'})")

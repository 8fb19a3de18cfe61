"""`prunequant sweep`: every (strategy, target, seed) as a compress job on Ray, gathered into a
Pareto front; the work is :func:`plugin.sweep.run_sweep`. Flags are checked before Ray starts."""

from __future__ import annotations

import json
import logging

import click

from .errors import handle_errors

logger = logging.getLogger(__name__)


@click.command("sweep")
@click.argument("model", type=str)
@click.option("--data", required=True, help="Training/calibration inputs (as for compress).")
@click.option("--labels", default=None, help="Class labels (as for compress).")
@click.option("--eval-data", default=None,
              help="Data every result is also scored on with onnxruntime (e.g. a test split); its accuracy is "
                   "the fronts' [default: the held-out split of --data].")
@click.option("--eval-labels", default=None, help="Labels of --eval-data (or a 'labels' key in it).")
@click.option("-o", "--output", required=True, metavar="DIR",
              help="Sweep folder: DIR/<job-id>/ per job, DIR/sweep.json, sweep.csv, sweep.png.")
@click.option("--strategies", default="gradient", show_default=True, metavar="NAME[,NAME...]",
              help="Strategies to run (`prunequant strategies`); one that cannot follow a budget runs once per seed.")
@click.option("--targets", default="size=50%,35%,25%", show_default=True, metavar="COST=N%[,N%...]",
              help="Budgets (as compress --target); an item without a cost model takes the previous one's.")
@click.option("--seeds", default="0", show_default=True, metavar="N[,N...]", help="Seeds of every combination.")
@click.option("-S", "--strategy-option", "strategy_options", multiple=True, metavar="STRATEGY.NAME=VALUE",
              help="An option of one strategy (repeatable), e.g. -S bayesian.trials=20 -S rl.episodes=80.")
@click.option("--cost", default="size", show_default=True, help="Cost model of --lambda (as for compress).")
@click.option("--epochs", default=20, show_default=True, type=click.IntRange(min=0), help="Search epochs.")
@click.option("--finetune-epochs", default=10, show_default=True, type=click.IntRange(min=0),
              help="QAT epochs with the plan frozen.")
@click.option("--max-steps", "max_steps", type=click.IntRange(min=1), default=None,
              help="At most this many batches per epoch (quick sweeps).")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--weight-bits", default=None, metavar="B[,B...]", help="Weight bit-widths (as for compress).")
@click.option("--act-bits", default=None, metavar="B[,B...]", help="Activation bit-widths (as for compress).")
@click.option("--device", type=click.Choice(["cpu", "cuda", "auto"]), default="cpu", show_default=True)
@click.option("--address", default=None, metavar="ADDR",
              help="Join a running Ray cluster (ray://HOST:10001 or HOST:6379); paths must be the same on every "
                   "node [default: a local Ray].")
@click.option("--num-cpus", type=click.IntRange(min=1), default=None,
              help="CPUs of the local Ray [default: the machine's, at most what the jobs use].")
@click.option("--cpus-per-job", type=click.FloatRange(min=0, min_open=True), default=None,
              help="CPUs each job reserves; torch runs on floor(N) threads, at least 1 [default: 1].")
@click.option("--jobs-per-cpu", type=click.IntRange(min=1), default=None,
              help="Jobs sharing one CPU (--cpus-per-job 1/N), for jobs that mostly wait.")
@click.option("--resume", is_flag=True, help="Continue a stopped sweep in DIR: finished jobs are skipped.")
@click.option("--json", "as_json", is_flag=True, help="Print sweep.json's fronts and records instead of the table.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@handle_errors
def sweep_command(model: str, data: str, labels: str | None, eval_data: str | None, eval_labels: str | None,
                  output: str, strategies: str, targets: str, seeds: str, strategy_options: tuple[str, ...],
                  cost: str, epochs: int, finetune_epochs: int, max_steps: int | None, batch_size: int,
                  weight_bits: str | None, act_bits: str | None, device: str, address: str | None,
                  num_cpus: int | None, cpus_per_job: float | None, jobs_per_cpu: int | None, resume: bool,
                  as_json: bool, no_progress: bool) -> None:
    """Run every (strategy, target, seed) combination as a compress job on Ray and gather the
    Pareto fronts of accuracy vs size and vs energy (mpic_energy).

    \b
    Every job writes DIR/<job-id>/model.onnx (+ plan, report) and, last and atomically,
    DIR/<job-id>/result.json: its record with the prunequant version, the git commit when known,
    the command line and the input model's SHA-256. --resume skips finished jobs and redoes the
    rest (half-finished or failed). A failed job records its one-line error and the sweep goes
    on; the exit code is then 15.

    \b
    Examples:
      prunequant sweep samples/digits/model.onnx --data samples/digits/train.npz -o sweep/ \\
          --strategies gradient,bayesian,rl --targets size=50%,35%,25% --seeds 0,1,2
      prunequant sweep model.onnx --data calib.npz -o sweep/ --address ray://head:10001 --resume
    """
    from graph_passes.errors import ConfigError, SweepJobsFailed

    from .compress import check_flags

    if cpus_per_job is not None and jobs_per_cpu is not None:
        raise ConfigError("--cpus-per-job and --jobs-per-cpu: give one of them")
    if address is not None and num_cpus is not None:
        raise ConfigError("--num-cpus sets up a local Ray; with --address the cluster has its own CPUs: give one")
    from plugin import sweep

    names = sweep.parse_strategies(strategies)
    budgets = sweep.parse_targets(targets)
    seed_list = sweep.parse_seeds(seeds)
    options = sweep.parse_job_options(strategy_options, names)
    base: dict = {"epochs": epochs, "finetune_epochs": finetune_epochs, "max_steps_per_epoch": max_steps,
                  "batch_size": batch_size, "device": device}
    for name in names:  # the flags compress itself would check, per strategy (fails before Ray starts)
        checked = check_flags(cost=cost, target=budgets[0], weight_bits=weight_bits, act_bits=act_bits,
                              strategy=name, strategy_options=(), input_shapes=(), output=None)
        base.update({k: v for k, v in checked.items() if k in ("cost", "weight_precisions", "act_bits")})
    spec = sweep.SweepSpec(model=model, data=data, output=output, labels=labels, eval_data=eval_data,
                           eval_labels=eval_labels, base=base)
    jobs = sweep.grid(names, budgets, seed_list, options)
    per_job = 1.0 / jobs_per_cpu if jobs_per_cpu else (cpus_per_job or 1.0)
    result = sweep.run_sweep(spec, jobs, address=address, num_cpus=num_cpus, cpus_per_job=per_job, resume=resume,
                             progress=not no_progress)
    if as_json:
        click.echo(json.dumps({"fronts": result.fronts, "records": result.records}, indent=2, default=str))
    else:
        for line in sweep.summary_lines(result):
            click.echo(line)
        click.echo(f"{len(result.records)} jobs ({result.skipped} finished before, {result.ran} run now); "
                   f"* on the size front, + on the energy front; wrote "
                   + ", ".join(str(p) for p in result.files.values()))
    if result.failed:
        raise SweepJobsFailed(f"{len(result.failed)} of {len(result.records)} sweep jobs failed (first: "
                              f"{result.failed[0]['job_id']}: {result.failed[0].get('error')}); each error is in "
                              f"{result.files['json']}; --resume retries them")

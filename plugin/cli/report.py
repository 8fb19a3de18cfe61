"""`prunequant report`: one self-contained HTML page for a NAME.report.json (:mod:`plugin.report_html`)."""

from __future__ import annotations

import click

from .errors import handle_errors


@click.command("report")
@click.argument("report", type=str)
@click.option("-o", "--output", required=True, metavar="OUT.html", help="Where to write the HTML page.")
@click.option("--plan", "plan_path", default=None, metavar="PLAN.json",
              help="The plan to show with the report [default: NAME.plan.json beside NAME.report.json, if present].")
@click.option("--no-plan", is_flag=True, help="Do not read a plan, even one beside the report.")
@click.option("--sweep", "sweep_path", default=None, metavar="SWEEP.json",
              help="Add a sweep's Pareto plot and job table (the sweep.json `prunequant sweep` wrote).")
@handle_errors
def report_command(report: str, output: str, plan_path: str | None, no_plan: bool, sweep_path: str | None) -> None:
    """Render REPORT (a NAME.report.json written by `compress` or `export`) as one HTML page:
    the before/after table, each layer's pruned and kept channels by bit-width, the strategy's
    history (per-epoch loss and cost, or trials and their Pareto front), the gate's figures, the
    other runtimes' agreement (OpenVINO) and, with --sweep, a sweep's Pareto plot and jobs.
    Images are embedded; the page needs no network and no JavaScript.

    \b
    Examples:
      prunequant report small.report.json -o small.html
      prunequant report small.report.json -o small.html --plan small.plan.json
      prunequant report sw/gradient_size35pct_s0/model.report.json -o sw.html --sweep sw/sweep.json

    A missing, empty or non-report REPORT exits 2; a malformed plan, or one for another model,
    exits 12. The page is written atomically, never over the report or the plan.
    """
    from graph_passes.errors import ConfigError

    from plugin.report_html import render_report_file

    if no_plan and plan_path is not None:
        raise ConfigError("--plan and --no-plan contradict each other; give one")
    page = render_report_file(report, output, plan_path=plan_path, use_plan=not no_plan, sweep_path=sweep_path)
    plan = f", plan {page.plan_path}" if page.plan_path else ""
    count = len(page.figures)
    click.echo(f"wrote {output} ({count} figure{'' if count == 1 else 's'}{plan})")

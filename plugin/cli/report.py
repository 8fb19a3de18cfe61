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
@handle_errors
def report_command(report: str, output: str, plan_path: str | None, no_plan: bool) -> None:
    """Render REPORT (a NAME.report.json written by `compress` or `export`) as one HTML page:
    the before/after table, each layer's pruned and kept channels by bit-width, the strategy's
    history (per-epoch loss and cost, or trials and their Pareto front) and the gate's figures.
    Images are embedded; the page needs no network and no JavaScript.

    \b
    Examples:
      prunequant report small.report.json -o small.html
      prunequant report small.report.json -o small.html --plan small.plan.json

    A missing, empty or non-report REPORT exits 2; a malformed plan, or one for another model,
    exits 12. The page is written atomically, never over the report or the plan.
    """
    from graph_passes.errors import ConfigError

    from plugin.report_html import render_report_file

    if no_plan and plan_path is not None:
        raise ConfigError("--plan and --no-plan contradict each other; give one")
    page = render_report_file(report, output, plan_path=plan_path, use_plan=not no_plan)
    plan = f", plan {page.plan_path}" if page.plan_path else ""
    count = len(page.figures)
    click.echo(f"wrote {output} ({count} figure{'' if count == 1 else 's'}{plan})")

"""`hawqtool batch JOBS.yaml`: many runs from one file (batch.py), a summary table at the end."""
from __future__ import annotations

import json
from pathlib import Path

import click

from ._base import _setup_logging, common, guarded, main
from .params import TEXT, PathArg


@main.command()
@click.argument("jobs_file", type=PathArg(), metavar="JOBS.yaml")
@click.option("-o", "--output", type=PathArg(), default=Path("batch"), show_default=True,
              help="Folder holding one sub-folder per job and batch_summary.json.")
@click.option("--gpus", type=TEXT, default=None, metavar="0,1,...",
              help="Run one job per listed GPU at a time (CUDA_VISIBLE_DEVICES); default: one job after another.")
@click.option("--only", type=TEXT, default=None, metavar="NAME|INDEX",
              help="Run just this job (its name or 0-based index, e.g. $SLURM_ARRAY_TASK_ID in an array job); its "
                   "summary goes to OUT/NAME/batch_summary.json.")
@common
@guarded
def batch(jobs_file, output, gpus, only, as_json, verbose, quiet):
    """Run every job of JOBS.yaml (`defaults:` + `jobs:`, each a recipe and/or run settings; an avg_bits list is a
    sweep sharing one sensitivity). A rerun resumes; a failed job stops none of the others; exit 0 only if every
    job succeeded.

    \b
    hawqtool batch jobs.yaml -o batch/
    hawqtool batch jobs.yaml -o batch/ --gpus 0,1,2,3
    """
    from ..batch import check_gpus, read_jobs, row, run_batch, select
    from ..errors import UserError
    from ..outputs import claim_output
    from ..progress import Reporter
    from ..render import batch_table

    _setup_logging(verbose)
    ids = check_gpus(gpus)
    select(read_jobs(jobs_file)[1], only)  # every key checked before anything runs
    # an array task (--only) leaves the folder to its siblings: each run locks its own folder
    claim_output(output, "batch", inputs=[jobs_file], lock=only is None)
    rep = Reporter(quiet or as_json)
    outcomes = run_batch(Path(jobs_file), Path(output), gpus=ids, only=only, say=rep.say)
    rows = [row(o) for o in outcomes]
    if as_json:
        click.echo(json.dumps(rows))
    elif not quiet:
        rep.console.print(batch_table(rows))
        rep.say(f"wrote {Path(output) / (only and rows[0]['job'] or '') / 'batch_summary.json'}")
    failed = [r for r in rows if r["state"] != "done"]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} runs failed (first: {failed[0]['job']}: {failed[0]['error']}); "
                        f"their logs are OUT/JOB/job.log, and a rerun resumes them")

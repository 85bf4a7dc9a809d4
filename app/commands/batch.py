"""`imagegate batch ...`: a JSONL file submitted as batches, through a running server's HTTP API."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from imagegate.app.commands import cli


@cli.group()
def batch() -> None:
    """Submit a JSONL file of image requests as batches, follow them, download the images.
    An HTTP client of a running server (see client/batch.py)."""


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", required=True, envvar="IMAGEGATE_URL", show_envvar=True, help="The server's base URL.")
@click.option("--key", required=True, envvar="IMAGEGATE_KEY", show_envvar=True, help="An API key.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Where images and the resume state (.imagegate-batch.json) go.",
)
@click.option("--wait", is_flag=True, help="Follow the batches and download every image; exit 1 if any failed.")
@click.option("--chunk-size", default=5000, show_default=True, type=click.IntRange(1, 10000), help="Lines per batch.")
def batch_submit(file: Path, url: str, key: str, out: Path, wait: bool, chunk_size: int) -> None:
    """Submit FILE (JSONL: {"custom_id", "body"} per line, or OpenAI Batch API lines).
    Running the same command again resumes and never submits anything twice."""
    from imagegate.client.batch import submit

    sys.exit(submit(file, url, key, out, wait, chunk_size))


@batch.command("status")
@click.argument("batch_id")
@click.option("--url", required=True, envvar="IMAGEGATE_URL", show_envvar=True, help="The server's base URL.")
@click.option("--key", required=True, envvar="IMAGEGATE_KEY", show_envvar=True, help="An API key.")
@click.option("--json", "as_json", is_flag=True, help="Print the batch object as JSON.")
def batch_status(batch_id: str, url: str, key: str, as_json: bool) -> None:
    """Show a batch's progress."""
    from imagegate.client.batch import status

    sys.exit(status(batch_id, url, key, as_json))


@batch.command("results")
@click.argument("batch_id")
@click.option("--url", required=True, envvar="IMAGEGATE_URL", show_envvar=True, help="The server's base URL.")
@click.option("--key", required=True, envvar="IMAGEGATE_KEY", show_envvar=True, help="An API key.")
def batch_results(batch_id: str, url: str, key: str) -> None:
    """Print a batch's results JSONL (one line per request, in file order)."""
    from imagegate.client.batch import results

    sys.exit(results(batch_id, url, key))

"""Medians over repeats, the rich table, and the JSON file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table


def median_row(runs: list[dict]) -> dict:
    """The median of every numeric figure over the runs of one row (text: the last run's)."""
    merged: dict = {}
    for run in runs:
        for side, value in run.items():
            if isinstance(value, dict):
                for figure, number in value.items():
                    merged.setdefault(side, {}).setdefault(figure, []).append(number)
            else:
                merged.setdefault(side, []).append(value)
    result: dict = {}
    for side, value in merged.items():
        if isinstance(value, dict):
            result[side] = {figure: _median(numbers) for figure, numbers in value.items()}
        else:
            result[side] = _median(value)
    return result


def _median(values: list):
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if numbers and all(isinstance(v, (int, float)) or v is None for v in values):
        return statistics.median(numbers)  # a run that could not measure (None) does not count
    return values[-1]


def _format(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        if value != value:
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _cell(figures: dict) -> str:
    return "\n".join(f"{name}: {_format(value)}" for name, value in figures.items())


def print_table(results: dict, titles: dict, context: str, console: Console | None = None) -> None:
    console = console or Console(width=200)
    table = Table(title=f"imagegate benchmark ({context})", show_lines=True)
    table.add_column("row", max_width=34)
    table.add_column("imagegate")
    table.add_column("baseline(s), same run")
    table.add_column("load 1m", justify="right")
    for row, figures in results.items():
        if "error" in figures:
            table.add_row(titles[row], f"[red]failed: {figures['error']}", "", "")
            continue
        baselines = [
            f"[bold]{side}[/bold]\n{_cell(values)}"
            for side, values in figures.items()
            if isinstance(values, dict) and side != "imagegate"
        ]
        table.add_row(
            titles[row], _cell(figures.get("imagegate", {})), "\n".join(baselines), _format(figures.get("load 1m"))
        )
    console.print(table)


def save_json(path: Path, results: dict, context: dict) -> None:
    path.write_text(json.dumps({"context": context, "rows": results}, indent=2, default=str))


def markdown_table(results: dict, titles: dict) -> str:
    """The same table in Markdown, for docs/performance.md."""
    lines = ["| row | imagegate | baseline(s), same run | load 1m |", "| --- | --- | --- | --- |"]
    for row, figures in results.items():
        if "error" in figures:
            lines.append(f"| {titles[row]} | failed: {figures['error']} | | |")
            continue
        ours = "<br>".join(f"{name}: {_format(value)}" for name, value in figures.get("imagegate", {}).items())
        baselines = "<br>".join(
            f"**{side}**<br>" + "<br>".join(f"{name}: {_format(value)}" for name, value in values.items())
            for side, values in figures.items()
            if isinstance(values, dict) and side != "imagegate"
        )
        lines.append(f"| {titles[row]} | {ours} | {baselines} | {_format(figures.get('load 1m'))} |")
    return "\n".join(lines) + "\n"

"""`lavida-agent world`: sample, detect and score ShapesWorld data."""

from __future__ import annotations

import click


@click.group()
def world() -> None:
    """ShapesWorld: sample data, detect objects, score prompts and edits."""

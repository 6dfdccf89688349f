"""The `lavida-agent` command line.

Every command takes `--json` for machine-readable output where it prints results, and
reports errors as one line on stderr with a non-zero exit (`--debug` shows tracebacks).
Heavy imports (torch, the model) happen inside the commands, so `--help` stays fast.
"""

from __future__ import annotations

import click

from lavida_agent import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="lavida-agent")
def cli() -> None:
    """Run the Lavida-O style unified masked-diffusion model as an agent."""


def _register_subcommands() -> None:
    from lavida_agent.cli_world import world

    cli.add_command(world)


_register_subcommands()


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="lavida-agent")

"""The ``labelmatch`` command line.

Each stage's commands live in their own module and register on :data:`app`. Errors that
labelmatch raises on purpose are printed as one line (``error: file:line: field 'x': ...``) and
exit with status 2; nothing is half-written (artifacts are written atomically).
"""

from __future__ import annotations

import importlib
import sys

import typer

from labelmatch.core.errors import LabelmatchError

app = typer.Typer(
    name="labelmatch",
    help="Semantic label-matching document classifiers: train, tune, evaluate, export, serve.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: Modules (under ``labelmatch.cli``) whose import registers commands on ``app``.
COMMAND_MODULES = ["core", "cluster", "feedback", "grpo", "tune", "export", "serve", "batch", "monitor",
                   "pipeline", "encoder"]


def register_commands() -> None:
    """Import every command module so its commands register on :data:`app`."""
    for name in COMMAND_MODULES:
        importlib.import_module(f"labelmatch.cli.{name}")


def main() -> None:
    """Entry point of the ``labelmatch`` script."""
    register_commands()
    try:
        app()
    except LabelmatchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)

"""The ``laco`` command line: one typer app; each command lives in its own module of this package.

A command module defines functions decorated with ``@app.command()`` and keeps heavy imports
inside them, so ``laco --help`` stays fast.
"""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="laco",
    help="Layer-wise visual token compression (LaCo) for multimodal LLMs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)



@app.callback()
def _root() -> None:
    """Layer-wise visual token compression (LaCo) for multimodal LLMs."""


# one module per command group; each registers its commands on `app` when imported
_COMMAND_MODULES = ["info", "probe", "bench", "generate", "convert", "eval", "compare", "train"]
for _name in _COMMAND_MODULES:
    importlib.import_module(f"laco.cli.{_name}")


def main() -> None:
    """Entry point: user errors (bad config, bad input) print one clear line and exit 2, no traceback."""
    import sys

    try:
        app()
    except (ValueError, TypeError, FileNotFoundError, KeyError) as err:
        print(f"laco: error: {err}", file=sys.stderr)
        sys.exit(2)

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


def _print_version(value: bool) -> None:
    if value:
        from laco import __version__

        typer.echo(f"laco {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="print laco's version and exit"),
) -> None:
    """Layer-wise visual token compression (LaCo) for multimodal LLMs."""


def comma_list(text: str | None, cast=str) -> list | None:
    """The one reading of a comma-list option: ``"a, b,,c"`` -> ``["a", "b", "c"]`` (empty items dropped),
    each item through ``cast`` (its ValueError propagates: the command words the error for its option);
    ``None`` or ``""`` -> ``None``. Lists of methods split on commas outside parentheses:
    ``laco.compressors.spec.parse_methods`` reads those."""
    if not text:
        return None
    return [cast(p.strip()) for p in text.split(",") if p.strip()]


# one module per command group; each registers its commands on `app` when imported
_COMMAND_MODULES = ["info", "probe", "bench", "gpu_check", "generate", "convert", "export", "eval", "compare", "train", "serve"]
for _name in _COMMAND_MODULES:
    importlib.import_module(f"laco.cli.{_name}")


def user_error_line(err: BaseException) -> str | None:
    """The one line a user-caused failure prints (``None``: a real bug, keep its traceback).

    Bad arguments and configs (ValueError, TypeError, KeyError), files that are missing, unreadable or
    not what they claim (OSError, PIL decode errors, safetensors / YAML / JSON parse errors) are the
    user's to fix; the message names the file where the exception knows it.
    """
    import json

    if isinstance(err, _click_exceptions().ClickException):  # typer's own argument checks (ranges, types, missing)
        return err.format_message()
    if isinstance(err, OSError):
        name = err.filename if err.filename is not None else None
        reason = err.strerror or str(err)
        return f"{reason}: {name}" if name is not None else reason
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err})"
    if isinstance(err, KeyError):
        return f"missing key {err}"
    if isinstance(err, (ValueError, TypeError)):
        return str(err)
    kind = f"{type(err).__module__}.{type(err).__name__}"
    if kind.startswith(("PIL.", "yaml.", "safetensors")):
        return f"{type(err).__name__}: {err}"
    return None


def _click_exceptions():
    try:  # typer >= 0.20 vendors click
        from typer._click import exceptions
    except ImportError:  # pragma: no cover - older typer on click
        from click import exceptions
    return exceptions


def main() -> None:
    """Entry point: user errors (bad arguments, configs, files) print one ``laco: error:`` line and exit 2.

    Only real bugs keep their traceback."""
    import sys

    cx = _click_exceptions()
    try:
        code = app(standalone_mode=False)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:
        print("laco: aborted", file=sys.stderr)
        sys.exit(130)
    except cx.ClickException as err:
        if type(err).__name__ == "NoArgsIsHelpError":  # bare `laco` / `laco CMD`: the help, as typer shows it
            from typer import rich_utils

            rich_utils.rich_format_error(err)
            sys.exit(err.exit_code)
        ctx = getattr(err, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(err.format_message() + hint)
    except Exception as err:
        line = user_error_line(err)
        if line is None:
            raise
        _fail(line)
    sys.exit(code if isinstance(code, int) else 0)


def _fail(line: str) -> None:
    import sys

    print(f"laco: error: {' '.join(line.split())}", file=sys.stderr)
    sys.exit(2)

"""The ``sppscl`` command: a thin layer over stage one and stage two.

Every command takes an explicit argument list through ``main(argv)``, so tests run the real paths.
Errors are handled in one place, ``main``: an error the user can act on (bad data, options, ``--set`` values,
output locations, a full disk) prints one line naming the file/row/id/key and what to do, never a traceback;
``--debug`` or ``SPPSCL_DEBUG=1`` adds the traceback. Exit codes: 0 done; 1 the run failed (full disk,
problems found by ``data verify``, failed sweep runs, an internal error); 2 the command cannot run as
given (bad input, option or output location); 130 interrupted (rerun the same command to resume).
"""

from __future__ import annotations

import os
import sys
import traceback

import typer
from rich.markup import escape

from .. import __version__
from ..errors import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE
from ..presets import app as presets_app
from . import cache, data, experiments, training, use
from .console import INTERRUPTED, console, err_console, error_exit, state

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="SPP-SCL image-text sentiment analysis: extract frozen features once (stage one), train the heads from the cache (stage two).",
    epilog="Exit codes: 0 done, 1 the run failed (full disk, problems found, failed runs), 2 bad input, option or output location, "
    "130 interrupted. --debug (or SPPSCL_DEBUG=1) shows the traceback of an error.",
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect and check datasets before extraction.")
app.add_typer(data.data_app, name="data")
app.add_typer(presets_app, name="presets")
app.add_typer(use.checkpoint_app, name="checkpoint")
app.add_typer(cache.cache_app, name="cache")
app.add_typer(experiments.sweep_app, name="sweep")

# the command line, in the order of the work: stage one, stage two, many runs, using a model
app.command()(data.extract)
app.command()(training.train)
app.command()(training.evaluate)
app.command()(training.probe)
app.command()(use.demo)
app.command()(experiments.reproduce)
app.command()(experiments.cv)
app.command()(experiments.ensemble)
app.command()(use.predict)
app.command()(use.analyze)
app.command()(use.report)
app.command()(use.serve)


@app.callback(invoke_without_command=True)
def _root(
    version: bool = typer.Option(False, "--version", help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (also SPPSCL_DEBUG=1)."),
) -> None:
    state.debug = state.debug or debug
    if version:
        console.print(f"sppscl {__version__}")
        raise typer.Exit()



def set_key_hint(e: Exception, argv: list[str]) -> str | None:
    """For an unknown option that is a configuration key (``--epochs 3``): the ``--set`` to write instead."""
    from ..config import STAGE_SECTIONS, config_keys

    # typer carries its own copy of click's exceptions: NoSuchOption is matched by name
    option = getattr(e, "option_name", None)
    if type(e).__name__ != "NoSuchOption" or not isinstance(option, str) or not option.startswith("--"):
        return None
    key = option[2:].replace("-", "_")
    full = config_keys().get(key)
    if full is None:
        return None
    value = "VALUE"
    for i, arg in enumerate(argv):
        if arg == option and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value = argv[i + 1]
        elif arg.startswith(option + "="):
            value = arg.split("=", 1)[1]
    names, ctx = [], getattr(e, "ctx", None)
    while ctx is not None and ctx.parent is not None:  # the root's own name is the program's, whatever ran it
        names.insert(0, ctx.info_name)
        ctx = ctx.parent
    command = f"`sppscl {' '.join(names)}`" if names else "this command"
    stage = "extract" if command in ("`sppscl extract`", "`sppscl data verify`") else "train"
    if full.split(".", 1)[0] not in STAGE_SECTIONS[stage]:
        return f"no option {option} on {command}: {key} is a configuration key ({full}) of another stage, which {command} does not use"
    return f"no option {option} on {command}: {key} is a configuration key ({full}); use --set {key}={value}"


def main(argv: list[str] | None = None) -> int:
    """Run the CLI on an explicit argument list; returns the exit code (for tests and ``python -m sppscl``).

    The one place where errors become messages and exit codes (see the module docstring).
    """
    state.debug = os.environ.get("SPPSCL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    state.argv = list(argv if argv is not None else sys.argv[1:])
    try:
        # in non-standalone mode click returns an Exit's code instead of raising it
        code = app(args=argv if argv is not None else sys.argv[1:], standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_FAILED if e.code else 0
    except typer.TyperException as e:  # usage errors: unknown option, bad type or range, missing value
        hint = set_key_hint(e, state.argv)
        if hint:
            err_console.print(f"[bold red]error:[/] {escape(hint)}", highlight=False)
            return EXIT_USAGE
        if hasattr(e, "show"):
            e.show()
        else:
            err_console.print(f"[bold red]error:[/] {escape(e.format_message())}", highlight=False)
        return e.exit_code
    except BaseException as e:  # noqa: BLE001 - the one place every other error becomes a message
        if state.debug:
            traceback.print_exc()
        code, message = error_exit(e)
        err_console.print(f"[bold red]error:[/] {escape(message)}", markup=True, highlight=False)
        return code
    if code == EXIT_INTERRUPTED:
        # typer turns Ctrl-C into this code itself, silently
        err_console.print(f"[bold red]error:[/] {INTERRUPTED}", highlight=False)
    return code if isinstance(code, int) else 0


def run() -> None:
    """The ``sppscl`` console script."""
    sys.exit(main())


if __name__ == "__main__":
    run()

"""The ``fedecay`` command line (Typer + Rich). Only this layer prints; the rest logs.

One module per command group: :mod:`.data` (``data synth|check``), :mod:`.experiments`
(``train``, ``simulate``, ``compare``, ``bench``), :mod:`.merchant` (``score``,
``monitor``), :mod:`.explain` (``explain``), :mod:`.privacy` (``privacy egress|audit``),
:mod:`.deploy` (``deploy certs|node-key``); :mod:`.checks` fails fast on bad arguments
before TensorFlow loads, :mod:`.errors` turns user errors into one line (exit code 2),
:mod:`.console` draws progress, :mod:`.runs` finds the model in a run folder.

``main(argv)`` returns the exit code (0 done, 2 a user error or data check's NOT OK,
130 interrupted, 143 terminated by SIGTERM); a bug raises with its traceback.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Annotated

import click
import typer

from common.runtime import quiet_tensorflow

from . import data, deploy, experiments, explain, merchant, privacy
from .console import Console, configure_logging
from .errors import USER_ERROR, Terminated, fail, os_error_text, stop_code, usage_error_text

__all__ = ["app", "main", "os_error_text"]

#: Accepted anywhere on the command line, before or after the command.
VERBOSE_FLAGS = ("-v", "--verbose")
QUIET_FLAGS = ("-q", "--quiet")

app = typer.Typer(
    name="fedecay",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    suggest_commands=False,  # click suggests a close command name itself
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(data.app, name="data")
experiments.register(app)
merchant.register(app)
explain.register(app)
app.add_typer(privacy.app, name="privacy")
app.add_typer(deploy.app, name="deploy")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedecay")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


def _show_version(value: bool) -> None:
    if value:
        print(f"fedecay {_version()}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option(
        "--version", is_eager=True, callback=_show_version,
        help="Show the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option(
        "-v", "--verbose", help="Debug logs (anywhere on the line).")] = False,
    quiet: Annotated[bool, typer.Option(
        "-q", "--quiet", help="Only results and errors: no progress, no hints (anywhere on "
        "the line).")] = False,
) -> None:
    """Federated learning of e-commerce interest decay and re-activation. Every command
    checks its arguments before it loads TensorFlow or creates a folder; an error is one
    line on stderr with exit code 2. Each command ends with the next useful one.
    """


def split_flags(argv: list[str]) -> tuple[list[str], bool, bool]:
    """``argv`` without ``-v``/``-q`` (wherever they are, up to ``--``), and whether each
    was given."""
    rest, verbose, quiet = [], False, False
    for i, arg in enumerate(argv):
        if arg == "--":
            rest.extend(argv[i:])
            break
        if arg in VERBOSE_FLAGS:
            verbose = True
        elif arg in QUIET_FLAGS:
            quiet = True
        else:
            rest.append(arg)
    return rest, verbose, quiet


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises :class:`~.errors.Terminated` in the command while the block runs,
    so it unwinds as on Ctrl-C (Python's default would end the process on the spot,
    leaving a half-made run folder). Only where SIGTERM still has the system's default
    (a caller's own handler is kept) and on the main thread (signals go there)."""
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def terminate(signum: int, frame: FrameType | None) -> None:
        raise Terminated

    signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def main(argv: list[str] | None = None) -> int:
    """Run ``fedecay`` with ``argv`` (default: the process's); returns the exit code."""
    quiet_tensorflow()  # before any command imports TensorFlow
    args, verbose, quiet = split_flags(list(sys.argv[1:] if argv is None else argv))
    if verbose and quiet:
        fail("-v/--verbose and -q/--quiet exclude each other; choose one")
        return USER_ERROR
    configure_logging(verbose, quiet)
    console = Console(verbose=verbose, quiet=quiet)
    command = typer.main.get_command(app)
    try:
        with _sigterm_unwinds():
            code = command.main(args=args, prog_name="fedecay", standalone_mode=False,
                                obj=console)
    except click.exceptions.NoArgsIsHelpError as err:
        print(err.ctx.get_help() if err.ctx is not None else "")
        return 0
    except click.UsageError as err:
        fail(usage_error_text(err))
        return USER_ERROR
    except click.ClickException as err:
        fail(err.format_message())
        return err.exit_code
    except click.Abort as err:  # click's form of Ctrl-C (or SIGTERM) outside a command
        cause = err.__cause__
        return stop_code(cause if isinstance(cause, KeyboardInterrupt) else KeyboardInterrupt())
    finally:
        console.close()
    return code if isinstance(code, int) else 0

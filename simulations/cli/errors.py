"""One line for every error the user can fix; a bug keeps its traceback.

A command's exception becomes ``error: <what is wrong>`` on stderr and exit code 2 when
it comes from the user's input or the machine (a bad key, a missing or unreadable file,
a full disk); Ctrl-C is ``interrupted`` and exit code 130. Anything else is a bug in
fedecay and is raised again, so its traceback shows where.
"""

from __future__ import annotations

import errno
import functools
import gzip
import lzma
import os
import sys
import zipfile
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import click
import typer

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: a user error, and Ctrl-C (128 + SIGINT).
USER_ERROR = 2
INTERRUPTED = 130
TERMINATED = 143  # 128 + SIGTERM, as a shell reports a process SIGTERM ended


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, ``timeout``, ``kill``): the command unwinds as on Ctrl-C,
    so a run folder with no result is removed, and exits with :data:`TERMINATED`."""


def stop_code(err: KeyboardInterrupt) -> int:
    """The exit code of a command ``err`` stopped, after printing why on stderr."""
    terminated = isinstance(err, Terminated)
    print("terminated" if terminated else "interrupted", file=sys.stderr, flush=True)
    return TERMINATED if terminated else INTERRUPTED

# What went wrong, as the verb of "cannot <verb> <path>: <reason>", by errno.
_OS_VERBS = {
    errno.ENOENT: "open", errno.EISDIR: "open", errno.ENOTDIR: "use", errno.EACCES: "access",
    errno.EPERM: "access", errno.ENOSPC: "write", errno.EROFS: "write", errno.EDQUOT: "write",
    errno.EEXIST: "create", errno.ENAMETOOLONG: "use", errno.EPIPE: "write",
}
_OS_HINTS = {
    errno.EISDIR: " (a folder where a file was expected)",
    errno.ENOTDIR: " (a part of the path is a file, not a folder)",
}


def os_error_text(err: OSError) -> str:
    """One line for an OSError: ``cannot <verb> <path>: <reason>``.

    An OSError raised with a message of our own (no errno) is shown as it is.
    """
    if err.strerror is None:
        return str(err)
    verb = _OS_VERBS.get(err.errno or 0, "use")
    hint = _OS_HINTS.get(err.errno or 0, "")
    if err.filename is None:
        return f"cannot {verb}: {err.strerror}{hint}"
    path = os.fsdecode(err.filename) if isinstance(err.filename, bytes) else err.filename
    if err.filename2 is not None:
        return f"cannot {verb} {path} (to {err.filename2}): {err.strerror}{hint}"
    return f"cannot {verb} {path}: {err.strerror}{hint}"


#: A command's parameters that name its input files, with the flag the user typed.
_INPUT_FLAGS = (("events", "--events"), ("file", "file"), ("model", "--model"),
                ("interventions", "--interventions"), ("input", "--input"),
                ("preset", "--preset"), ("run", "--run"))


def inputs_text(params: Mapping[str, Any]) -> str:
    """The input files a command was given, for errors that do not carry a path."""
    given = [f"{flag} {params[name]}" for name, flag in _INPUT_FLAGS
             if params.get(name) not in (None, "", "-")
             and (name != "preset" or Path(str(params[name])).exists())]
    return "; ".join(given) or "the input"


def user_error(err: BaseException, inputs: str = "the input") -> str | None:
    """The one-line message for an error the user can fix, or None for a bug."""
    if isinstance(err, UnicodeDecodeError):  # before ValueError: it is one
        return (f"cannot read {inputs}: not UTF-8 text (byte "
                f"{err.object[err.start:err.start + 1].hex()} at offset {err.start})")
    if isinstance(err, gzip.BadGzipFile | EOFError | zlib.error | lzma.LZMAError
                  | zipfile.BadZipFile):
        return (f"cannot read {inputs}: the compressed file is truncated or corrupt "
                f"({type(err).__name__}: {err})")
    if isinstance(err, ValueError):  # so are common.schema.DataError and TOMLDecodeError
        return str(err)
    if isinstance(err, OSError):
        return os_error_text(err)
    if isinstance(err, RuntimeError) and str(err).startswith("Symlink loop from "):
        # pathlib's resolve() (Python 3.11) says so instead of raising ELOOP
        path = str(err).removeprefix("Symlink loop from ").strip("'")
        return f"cannot open {path}: Too many levels of symbolic links"
    return None


def fail(text: str) -> None:
    """Print ``error: <text>`` as one line on stderr."""
    line = " ".join(part.strip() for part in text.splitlines() if part.strip())
    print(f"error: {line}", file=sys.stderr, flush=True)


def _close_console() -> None:
    """Stop the progress display before the error line, so the line stays whole."""
    ctx = click.get_current_context(silent=True)
    console = ctx.find_root().obj if ctx is not None else None
    if console is not None and hasattr(console, "close"):
        console.close()


def guarded(command: F) -> F:
    """Run a command so that user errors are one line and exit code 2 (see module doc).

    The command may return an exit code (``data check``'s NOT OK is 2); None is 0.
    """

    @functools.wraps(command)
    def run(*args: Any, **params: Any) -> Any:
        try:
            return command(*args, **params)
        except (click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt as err:
            _close_console()
            raise typer.Exit(stop_code(err)) from None
        except Exception as err:
            _close_console()
            text = user_error(err, inputs_text(params))
            if text is None:  # not the user's input nor the machine: a bug, so show where
                print(f"error: internal error ({type(err).__name__}), a bug in fedecay; "
                      "please report it with the traceback below", file=sys.stderr, flush=True)
                raise
            fail(text)
            raise typer.Exit(USER_ERROR) from None

    return run  # type: ignore[return-value]


def usage_error_text(err: click.ClickException) -> str:
    """A click usage error (unknown option, bad value) as one line with where to look."""
    text = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        return f"{text} (see: {ctx.command_path} --help)"
    return text

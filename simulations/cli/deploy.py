"""``fedecay deploy certs|node-key``: the files a test deployment needs."""

from __future__ import annotations

import shlex
from typing import Annotated

import typer

from . import checks
from .console import current
from .errors import guarded

app = typer.Typer(help="Files a test deployment needs (TLS certificates, node keys).",
                  no_args_is_help=True)

OverwriteOption = Annotated[bool, typer.Option(
    "--overwrite", help="Replace existing files (all of them, or none if writing fails).")]


def _q(path: object) -> str:
    return shlex.quote(str(path))


@app.command("certs")
@guarded
def certs(
    dir: Annotated[str, typer.Argument(metavar="DIR", show_default=False)],
    host: Annotated[list[str] | None, typer.Option(
        metavar="HOST", show_default="127.0.0.1 and localhost",
        help="Host name or IP for the server certificate's SAN (repeatable).")] = None,
    overwrite: OverwriteOption = False,
) -> None:
    """A test CA and a server certificate for the SuperLink's TLS, written into DIR."""
    console = current()
    folder = checks.output_folder(dir, "DIR")
    from server.certs import make_certs, subject_alt_names

    hosts = tuple(host) if host else ("127.0.0.1", "localhost")
    subject_alt_names(hosts, "--host")  # named as the command line names it
    paths = make_certs(folder, hosts=hosts, overwrite=overwrite)
    for name, path in paths.items():
        print(f"wrote {name:<12} {path}")
    console.next(f"fedecay deploy node-key {_q(folder.parent / 'keys')} --name merchant-a  "
                 "(one key pair per merchant's SuperNode)")


@app.command("node-key")
@guarded
def node_key(
    dir: Annotated[str, typer.Argument(metavar="DIR", show_default=False)],
    name: Annotated[str, typer.Option(
        metavar="NAME", help="File name of the key pair (NAME, NAME.pub).")] = "node",
    overwrite: OverwriteOption = False,
) -> None:
    """An ECDSA P-384 key pair that authenticates one SuperNode, written into DIR."""
    console = current()
    folder = checks.output_folder(dir, "DIR")
    from server.certs import make_node_key

    paths = make_node_key(folder, name, overwrite=overwrite)
    for label, path in paths.items():
        print(f"wrote {label:<12} {path}")
    console.next("fedecay data check EVENTS_FILE  (what the merchant brings, before joining; "
                 "see docs/deployment.md)")

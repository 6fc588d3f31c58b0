"""The one way fedecay writes a file: all of it or none of it.

A crash, a full disk or Ctrl-C while writing leaves the previous file (or no file)
in place, never half a file, and never a stray temp file beside it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike[str], *, durable: bool = True) -> Iterator[Path]:
    """Yield a temp path beside ``path``; when the block ends normally, rename it over ``path``.

    The temp name is private to this process and thread and keeps ``path``'s suffix
    (writers such as Keras pick the format from it). On any exception the temp file is
    removed and the exception goes on; ``path`` is untouched.

    Parameters
    ----------
    path
        The file to write.
    durable
        Flush the file and its folder to disk (``fsync``) so the rename survives a power
        cut. Cheap files that are rebuilt anyway can skip it.
    """
    path = Path(path)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.tmp{path.suffix}")
    try:
        yield tmp
        if durable:
            fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        with contextlib.suppress(OSError):  # some file systems cannot sync a folder
            fsync(path.parent)


def write_bytes(path: str | os.PathLike[str], data: bytes, *, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` all at once (see :func:`replacing`)."""
    with replacing(path, durable=durable) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike[str], text: str, *, durable: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` all at once (see :func:`replacing`)."""
    return write_bytes(path, text.encode("utf-8"), durable=durable)


def fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder's renames) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

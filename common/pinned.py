"""Patches of a library's internals, pinned to the exact version they were written for.

Each seam module (``common.keras_seam``, ``server.flower_seam``,
``simulations.flower_seam``, ``simulations.ray_seam``) holds every access the project
makes to Flower's, Keras' or Ray's private code, one small function per patch. Each
function asks its module's :class:`Pin` whether the installed version is the one the
patch was written against; when it is not, the function takes the library's own
(public) path instead, and the pin logs one warning per process naming the version
found and the patches left out.

Each patch also records the SHA-256 of the source of every library function it
replaces, mimics or reads (``*_SOURCES`` beside it); ``tests/test_flower_seam.py``
recomputes them, so an upgrade that changes any of them fails a test by name even
before the version pin is moved.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import logging
from typing import Any


@functools.cache
def installed_version(distribution: str) -> str | None:
    """The installed version of ``distribution`` (as pip names it), or None if absent."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


@dataclasses.dataclass(frozen=True)
class Pin:
    """The version of ``distribution`` that a seam module's patches were written for.

    Parameters
    ----------
    distribution : str
        The package's distribution name (``"flwr"``, ``"keras"``).
    version : str
        The exact version the patches were read against.
    logger : str
        The seam module's logger name: the one warning is logged there.
    patches : tuple of str
        The names of the module's patch functions, listed in the warning.
    """

    distribution: str
    version: str
    logger: str
    patches: tuple[str, ...]

    def holds(self) -> bool:
        """True when the pinned version is installed; otherwise warn once and say False."""
        found = installed_version(self.distribution)
        if found == self.version:
            return True
        _warn_once(self, found)
        return False


@functools.cache
def _warn_once(pin: Pin, found: str | None) -> None:
    """Log, once per process for each pin and version found, that the patches are off."""
    logging.getLogger(pin.logger).warning(
        "%s %s is installed, not the %s that %s was written against: %s's own code "
        "runs instead of its patches (%s)", pin.distribution, found or "(none)",
        pin.version, pin.logger, pin.distribution, ", ".join(pin.patches))


def source_digest(target: str) -> str:
    """SHA-256 of the source of ``target``, named as ``"package.module:Qual.name"``."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, property):
        obj = obj.fget
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()

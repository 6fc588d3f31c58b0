"""How long work reports how far it got, without knowing who is watching.

Library code (training epochs, snapshot building, federated rounds, scoring) takes a
:class:`Progress` and calls ``progress.task(...)`` for each step; the command line
hands in one that draws Rich progress bars on a terminal and prints one plain line per
step elsewhere. The default, :data:`SILENT`, does nothing, so library calls and tests
need no setup.
"""

from __future__ import annotations

from typing import Any, Protocol


class Task(Protocol):
    """One step under way (``with progress.task(...) as t: t.advance()``)."""

    def advance(self, amount: float = 1.0, **fields: Any) -> None:
        """``amount`` more units done; ``fields`` (e.g. ``auc=0.79``) describe the latest."""

    def __enter__(self) -> Task: ...

    def __exit__(self, *exc: object) -> None: ...


class Progress(Protocol):
    """Something that shows tasks: see :func:`common.progress.SILENT` for the no-op."""

    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        """Start a step of ``total`` units (``None``: unknown length)."""
        ...


class _SilentTask:
    def advance(self, amount: float = 1.0, **fields: Any) -> None:
        pass

    def __enter__(self) -> _SilentTask:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Silent:
    def task(self, description: str, total: float | None = None, unit: str = "") -> Task:
        return _SilentTask()


#: Reports nothing: the default wherever a ``progress`` argument is optional.
SILENT: Progress = _Silent()

"""Every access of the simulation layer to Ray's private internals (ray 2.55.1).

As in ``simulations.flower_seam``: each patch checks :data:`PIN` and, with another Ray
installed, leaves Ray as it is (one warning per process); ``*_SOURCES`` hold the SHA-256
of the Ray functions a patch depends on (``tests/test_flower_seam.py`` checks them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from common.pinned import Pin

PIN = Pin("ray", "2.55.1", __name__, ("no_auto_start",))

#: ``no_auto_start`` clears the flag ``auto_init_ray`` reads before it calls
#: ``ray.init``; ``wrap_auto_init`` puts that call before Ray's public API functions.
AUTO_START_SOURCES = {
    "ray._private.auto_init_hook:auto_init_ray":
        "02f462d5d2999125f06cdca05c274ff3c67fc38e14d7b58949b9010e48f2e73e",
    "ray._private.auto_init_hook:wrap_auto_init":
        "9bd0d547228144af20573fb6d213de1f3020b1ab77de5227c30720a710bcc305",
}

#: Every patch of this module and the Ray sources it depends on.
PATCHES = {"no_auto_start": AUTO_START_SOURCES}


@contextlib.contextmanager
def no_auto_start() -> Iterator[None]:
    """Ray's auto-start off inside the block, and after it when the block raised.

    Any Ray call after ``ray.shutdown`` starts a new local Ray instance. After Ctrl-C one
    of Flower's threads, still finishing while the process exits, made such a call and
    left a Ray instance running; an exception therefore leaves the auto-start off (the
    engine's threads may still be finishing). Flower starts Ray itself (``init_ray``), so
    nothing relies on the auto-start. With another Ray nothing is changed."""
    if not PIN.holds():
        yield
        return
    from ray._private import auto_init_hook

    before = auto_init_hook.enable_auto_connect
    auto_init_hook.enable_auto_connect = False
    yield
    auto_init_hook.enable_auto_connect = before

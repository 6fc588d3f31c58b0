"""Every access of the server layer to Flower's private internals (flwr 1.42.0).

One small function per patch; each checks :data:`PIN` and, with another Flower
installed, takes Flower's own public path instead (one warning per process). The
``*_SOURCES`` constants hold the SHA-256 of the source of each Flower function a patch
relies on, as found in 1.42.0 (``tests/test_flower_seam.py`` checks them).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.app import Array

from common.pinned import Pin

log = logging.getLogger(__name__)

PIN = Pin("flwr", "1.42.0", __name__,
          ("npy_header", "array_returning", "read_optimizer_state",
           "write_optimizer_state", "server_task_identity"))

_STRATEGY = "flwr.serverapp.strategy"

#: ``npy_header``: an ``Array`` of numpy's serialization type is ``np.save``'s bytes,
#: a header then the raw values, and ``numpy()`` reads them back with ``np.load``.
NPY_LAYOUT_SOURCES = {
    "flwr.app:Array.from_numpy_ndarray":
        "707d56acb12260aca722619acb605ccd7fcf42937b3a2e29faf0eb2a2a4ab58d",
    "flwr.app:Array.numpy": "3e01beebfff173bf95549f823ba1d7c939ecc47711cf77dfb5ff4d7332c2fc0d",
}

#: ``array_returning`` subclasses ``Array`` (whose ``__setattr__`` watches the fields),
#: stores it in an ``ArrayRecord`` item by item (no copy into a plain ``Array``), and
#: relies on Flower's aggregation reading each tensor through ``numpy()``.
READ_ARRAY_SOURCES = {
    "flwr.app:Array.__init__": "1bee5bf070c3f83be2678d316a7f036f67d1be4a210526cd077a0cb48178257b",
    "flwr.app:Array.__setattr__":
        "1125aed9ca65fe01cb17c8a28f3eec58a47d4ff73694acd4da4787f63c12ad99",
    "flwr.app:Array.numpy": "3e01beebfff173bf95549f823ba1d7c939ecc47711cf77dfb5ff4d7332c2fc0d",
    "flwr.app.message.typeddict:TypedDict.__setitem__":
        "3abed9f351a50e5ab5820f0c0542d571274552ce131df828846361dad05943dc",
    f"{_STRATEGY}.strategy_utils:aggregate_arrayrecords":
        "bd25bc7aa6340bdcba247006a52a3c14cb9b535fc16f9aee6d123012a5caa7c1",
}

#: ``read_optimizer_state`` / ``write_optimizer_state``: the attributes in which the
#: server optimizers keep their state between rounds, set where they are used.
OPTIMIZER_STATE_SOURCES = {
    f"{_STRATEGY}.fedopt:FedOpt.__init__":
        "f78e60e40406bb979cee03e0690bb32e44876181ac6360a8a80d67185ef4c90c",
    f"{_STRATEGY}.fedopt:FedOpt.configure_train":
        "8e5b11b6ce85524ce44f594e1ca2d4c87d120edfbd210532f5e38bb0d73e70bd",
    f"{_STRATEGY}.fedopt:FedOpt._compute_deltat_and_mt":
        "a03c0e5a01cb30664244486bea70ea2579fa034120b439a2719eae267dd5769e",
    f"{_STRATEGY}.fedadam:FedAdam.aggregate_train":
        "8755033891800f9df775e1f7d6373e7ed39acc19663911c5ef3e204b96c2b0e9",
    f"{_STRATEGY}.fedyogi:FedYogi.aggregate_train":
        "aef6af1030f0f07c71a00c8c2fce31d2521e55acc991c623c14a9db4ba7a467f",
    f"{_STRATEGY}.fedavgm:FedAvgM.__init__":
        "67668f6302d819a8aec955e71bb6087a10f49087d144e3f5da095d987abc3e11",
    f"{_STRATEGY}.fedavgm:FedAvgM.configure_train":
        "58e3b6959aed079933b164bc78a3cfa785adc1bcda3254d15df55589ba4e0219",
    f"{_STRATEGY}.fedavgm:FedAvgM.aggregate_train":
        "ebb415852dcdffc19c2c86b85180712649c660679e4edf5bb612e9900d01a6d8",
}

#: ``server_task_identity`` saves and restores the identity's private class attributes
#: (the public getters raise while it is unset).
TASK_IDENTITY_SOURCES = {
    "flwr.supercore.task_identity:_TaskIdentityMeta":
        "464d7e46fc5a29edddb2e4dd81543e7e902b17ec905a017934e5e0f89522e245",
    "flwr.supercore.task_identity:TaskIdentity":
        "49ac1df12b14034549bbe1ce04447ba8e0e11a49a9622dd5b8b3e4b2c43d1bc0",
}

#: Every patch of this module and the Flower sources it depends on.
PATCHES = {
    "npy_header": NPY_LAYOUT_SOURCES,
    "array_returning": READ_ARRAY_SOURCES,
    "read_optimizer_state": OPTIMIZER_STATE_SOURCES,
    "write_optimizer_state": OPTIMIZER_STATE_SOURCES,
    "server_task_identity": TASK_IDENTITY_SOURCES,
}


# ------------------------------------------------------------------------- tensors

def npy_header(reference: np.ndarray) -> bytes | None:
    """The bytes Flower's ``Array`` puts before the raw values of an array like ``reference``.

    Returns
    -------
    bytes or None
        ``np.save``'s header for ``reference``'s dtype and shape (C order); None with
        another Flower, whose byte layout is not assumed (read each tensor through
        ``Array.numpy``).
    """
    if not PIN.holds():
        return None
    reference = np.ascontiguousarray(reference)
    data = Array(reference).data
    return data[:len(data) - reference.nbytes]


class _ReadArray(Array):
    """A tensor already read and checked: ``numpy()`` returns a copy of the values read
    (what Flower's aggregation and DP clipping call, once more per tensor) instead of
    deserializing it again."""

    def __init__(self, source: Array, value: np.ndarray) -> None:
        super().__init__(dtype=source.dtype, shape=source.shape, stype=source.stype,
                         data=source.data)
        self.__dict__["_value"] = value

    def numpy(self) -> np.ndarray:
        return self.__dict__["_value"].copy()


def array_returning(source: Array, value: np.ndarray) -> Array:
    """``source``, whose ``numpy()`` gives a copy of ``value`` without parsing its bytes.

    ``value`` must be what ``source.numpy()`` gives. With another Flower, ``source``
    itself (deserialized again where it is used).
    """
    if not PIN.holds():
        return source
    return _ReadArray(source, value)


# --------------------------------------------------------------- server optimizers

#: Strategy attributes that hold server-side optimizer state (FedAdam/FedYogi/FedAvgM).
OPTIMIZER_STATE: tuple[str, ...] = ("current_arrays", "m_t", "v_t", "momentum_vector")


def read_optimizer_state(strategy: Any) -> dict[str, Any]:
    """The server optimizer's state kept by ``strategy`` (attributes that are set).

    With another Flower, an empty dict: a resumed run then starts the server optimizer
    afresh, as Flower itself does.
    """
    if not PIN.holds():
        return {}
    return {name: value for name in OPTIMIZER_STATE
            if (value := getattr(strategy, name, None)) is not None}


def write_optimizer_state(strategy: Any, state: dict[str, Any]) -> None:
    """Give ``strategy`` the server optimizer state of :func:`read_optimizer_state`.

    With another Flower the state is not written (the optimizer starts afresh).
    """
    if not PIN.holds():
        return
    for name, value in state.items():
        setattr(strategy, name, value)


# ------------------------------------------------------------------- task identity

@contextlib.contextmanager
def server_task_identity(*, run_id: int = 1, node_id: int = 1,
                         task_id: int = 1) -> Iterator[None]:
    """Within the block, the task identity is that of a running ServerApp.

    Flower's ``Message`` constructor reads it to fill in an instruction's run and source
    node; outside a ServerApp (tests, tools) it is unset. It is restored after the
    block; with another Flower it is set through the public setters and stays set.
    """
    from flwr.supercore.task_identity import TaskIdentity

    wanted = {"run_id": run_id, "node_id": node_id, "task_id": task_id}
    pinned = PIN.holds()
    saved = {name: getattr(TaskIdentity, f"_{name}") for name in wanted} if pinned else {}
    for name, value in wanted.items():
        setattr(TaskIdentity, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(TaskIdentity, f"_{name}", value)

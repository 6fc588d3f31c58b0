"""Flower's ``SecAggPlusWorkflow`` told each round's shares and threshold.

Flower's workflow takes its shares and threshold once, at construction, and derives a
round's counts from them in ``setup_stage``, right after the strategy samples the
round's clients. fedecay's counts depend on how many are sampled
(``server.secagg.effective_shares``), and distributed customer-level DP's m_min is
derived from the same counts (``server.secagg.smallest_unmasked``); so
``SecAggMixin.configure_fit`` gives them to the workflow each round
(:meth:`RoundWorkflow.give_counts`). A round whose counts were not given would run with
whatever the workflow held (everyone, or the last round's), and m_min could exceed the
smallest sum the server can unmask: a privacy shortfall nobody would see.
:class:`RoundWorkflow` refuses that round instead, after ``setup`` and before any
client shares a secret.

At ``unmask`` the workflow rebuilds every sampled client's secret with Shamir's
``combine_shares`` (``pycryptodome``'s ``Shamir.combine``: a generic pure-Python field
multiplication and an inversion per share and chunk, in a thread pool opened for each
secret although the work holds the GIL); :func:`serial_combine` has the workflow call
:func:`combine_shares` instead for the stage: the same secret from the same shares
through ``common.shamir.combine``, whose Lagrange weights depend on the share indices
only and are computed once per set of indices (figures in ``README.md``'s Overhead);
the masks it then removes come from ``common.mask_prg.pseudo_rand_gen``, Flower's
generator without a fresh ``RandomState`` a mask.

At ``collect_masked_vectors`` the workflow decodes each client's masked arrays with
Flower's ``bytes_to_ndarray`` (``np.load`` of a ``.npy``: the header's text parsed
again for every array of every client: the model's tensors and the weight, for
every client of the round); :func:`quick_decode` has
it call :func:`bytes_to_ndarray` instead for the stage: the same arrays, the header
parsed once per distinct header (every client sends the same shapes), anything else
left to Flower's function (:func:`quick_decode_default` says whether the server uses it).

At ``setup`` the workflow shuffles the sampled clients into the ring that makes each
client's neighbours with the ``random`` module, the process's shared generator.
:func:`private_ring` has that shuffle draw from a ``random.SystemRandom`` (OS entropy)
instead: the ring follows no seed, and the module is neither read, reseeded nor
restored, so a thread sharing it (the server's evaluation while the next round's keys
are exchanged, :func:`keys_ahead`) keeps its own draws. The patches are pinned like
those of ``server.flower_seam`` (:data:`PIN`, :data:`PATCHES`).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
import math
import random
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
from flwr.server.workflow import SecAggPlusWorkflow

from common.pinned import Pin
from server.config import SECAGG_MODULUS
from server.sampling import unpredictable_module_random

log = logging.getLogger(__name__)

PIN = Pin("flwr", "1.42.0", __name__,
          ("serial_combine", "keys_ahead", "private_ring", "quick_decode"))

_WORKFLOW = "flwr.server.workflow.secure_aggregation.secaggplus_workflow"

#: ``serial_combine`` swaps the workflow module's globals ``combine_shares`` and
#: ``pseudo_rand_gen``, which ``unmask_stage`` calls; :func:`combine_shares` mimics
#: Flower's (layout, unpadding, error) and pycryptodome's combination,
#: ``common.mask_prg.pseudo_rand_gen`` Flower's mask generator.
SERIAL_COMBINE_SOURCES = {
    "flwr.common.secure_aggregation.crypto.shamir:combine_shares":
        "e9339f2cd706eed48b36c7ce73e0d68a96222bce8d8590bae4cca78552b68601",
    "Crypto.Protocol.SecretSharing:Shamir.combine":
        "108acb65a5fe55788488eca708eb718b02c725d41b9c56e54228e2bae4dd70c1",
    "flwr.common.secure_aggregation.secaggplus_utils:pseudo_rand_gen":
        "19ee2545ed58c0174c0b1a56f4211d635347156163ae76a711613badad4b25e9",
    f"{_WORKFLOW}:SecAggPlusWorkflow.unmask_stage":
        "c4639d18768446e9fba0c316b61977f2b440e8ec833b3c75651fda9365d68f62",
}

#: ``keys_ahead``: :class:`RoundWorkflow` runs Flower's four stage methods itself, in two
#: halves (:meth:`RoundWorkflow.exchange_keys`, :meth:`RoundWorkflow.sum_masked`) on one
#: ``WorkflowState``, as ``SecAggPlusWorkflow.__call__`` runs them in one go; the
#: strategy (``server.secagg``) may run the first half of round r + 1 while the server
#: evaluates round r, knowing what ``DefaultWorkflow`` does between two fit rounds.
KEYS_AHEAD_SOURCES = {
    f"{_WORKFLOW}:SecAggPlusWorkflow.__call__":
        "204402b446244e5ec483089c16b212469adb8d6fcc2835a2704b94f91c358722",
    "flwr.server.workflow.default_workflows:DefaultWorkflow.__call__":
        "866c7974d30c0149fba1ad10dada0641d8f618d81ed74d5b8cfd8b97fdfc9ffa",
    "flwr.server.workflow.default_workflows:default_centralized_evaluation_workflow":
        "ec8d8eecb30a565fc7c9ff92e0834d4d3bf5adadc422e0657477650cc9e7d609",
}

#: ``private_ring``: ``setup_stage`` shuffles the ring with the workflow module's global
#: ``random`` (``random.shuffle``, that module's only use of it), which
#: :func:`private_ring` rebinds for the stage.
PRIVATE_RING_SOURCES = {
    f"{_WORKFLOW}:SecAggPlusWorkflow.setup_stage":
        "892a5a68cc6aef04f2eb95fd807d44c6f49a124f365bae0e335fc8da0078549b",
}

#: ``quick_decode``: ``collect_masked_vectors_stage`` decodes the masked arrays with the
#: workflow module's global ``bytes_to_ndarray`` (that stage its only caller), which
#: :func:`quick_decode` rebinds to :func:`bytes_to_ndarray` (Flower's, mimicked).
QUICK_DECODE_SOURCES = {
    f"{_WORKFLOW}:SecAggPlusWorkflow.collect_masked_vectors_stage":
        "e2e2900e524ba35a03b0937c99c76a22e99ff655dbe890fbd6b2366dfdfd6959",
    "flwr.compat.common.parameter:bytes_to_ndarray":
        "6038dd1205aa7c37e6fe60d3701321204d91610fe0b015e4dd395a61e7ed7458",
}

#: Every patch of this module and the Flower sources it depends on.
PATCHES = {"serial_combine": SERIAL_COMBINE_SOURCES, "keys_ahead": KEYS_AHEAD_SOURCES,
           "private_ring": PRIVATE_RING_SOURCES, "quick_decode": QUICK_DECODE_SOURCES}

#: The ring's generator: every draw reads OS entropy (``os.urandom``); it has no seed.
_RING = random.SystemRandom()
#: Held while the workflow module's ``random`` is rebound (one ``setup`` at a time).
_RING_LOCK = threading.Lock()


def combine_shares(share_list: list[bytes]) -> bytes:
    """Flower's ``combine_shares``: the secret behind ``share_list`` (each share: a 4-byte
    little-endian index, then one 16-byte share per chunk), unpadded;
    ``ValueError("Failed to combine shares")`` when it does not unpad. Each chunk is
    rebuilt as ``Shamir.combine`` would, by ``common.shamir.combine``, one after the
    other (no thread pool)."""
    from Crypto.Util.Padding import unpad

    from common.shamir import combine

    chunks = (len(share_list[0]) - 4) >> 4
    points = [int.from_bytes(share[:4], "little", signed=False) for share in share_list]
    padded = bytearray()
    for start in range(4, 4 + 16 * chunks, 16):
        padded += combine([(point, share[start:start + 16])
                           for point, share in zip(points, share_list, strict=True)])
    try:
        return unpad(bytes(padded), 16)
    except ValueError:
        raise ValueError("Failed to combine shares") from None


@contextlib.contextmanager
def serial_combine() -> Iterator[bool]:
    """Within the block, the workflow's ``unmask_stage`` rebuilds secrets with
    :func:`combine_shares` and masks with ``common.mask_prg.pseudo_rand_gen``; yields
    False (and leaves Flower's) with another Flower."""
    if not PIN.holds():
        yield False
        return
    from common.mask_prg import pseudo_rand_gen

    module: Any = importlib.import_module(_WORKFLOW)
    original = module.combine_shares, module.pseudo_rand_gen
    module.combine_shares, module.pseudo_rand_gen = combine_shares, pseudo_rand_gen
    try:
        yield True
    finally:
        module.combine_shares, module.pseudo_rand_gen = original


_NPY_MAGIC = b"\x93NUMPY"


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype[Any]]:
    """(shape, Fortran order, dtype) of a ``.npy`` header (magic included), parsed by
    numpy's own reader."""
    fp = io.BytesIO(header)
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)  # type: ignore[no-any-return]
    return np.lib.format.read_array_header_2_0(fp)  # type: ignore[no-any-return]


def _flowers_bytes_to_ndarray(tensor: bytes) -> np.ndarray:
    from flwr.common import bytes_to_ndarray as flowers

    return flowers(tensor)


def bytes_to_ndarray(tensor: bytes) -> np.ndarray:
    """Flower's ``bytes_to_ndarray`` (``np.load(BytesIO(tensor), allow_pickle=False)``):
    the same array, a fresh writable copy, from a version 1 or 2 ``.npy`` whose data fill
    the rest of ``tensor`` exactly, its header parsed once per distinct header; anything
    else (other versions, object dtypes, a wrong length, not a ``.npy``) goes to Flower's
    function, which decodes it or raises as it would."""
    view = memoryview(tensor)
    if (bytes(view[:6]) != _NPY_MAGIC or len(tensor) < 12 or tensor[6] not in (1, 2)
            or tensor[7] != 0):  # versions 1.0 and 2.0 only; numpy refuses e.g. 2.1
        return _flowers_bytes_to_ndarray(tensor)
    size = 2 if tensor[6] == 1 else 4
    start = 8 + size + int.from_bytes(view[8:8 + size], "little")
    try:
        shape, fortran, dtype = _npy_header(bytes(view[:start]))
    except ValueError:
        return _flowers_bytes_to_ndarray(tensor)
    count = math.prod(shape)
    if (dtype.hasobject or dtype.itemsize == 0
            or len(tensor) - start != count * dtype.itemsize):
        return _flowers_bytes_to_ndarray(tensor)
    flat = np.frombuffer(tensor, dtype=dtype, count=count, offset=start)
    return flat.reshape(shape, order="F" if fortran else "C").copy(order="K")


def quick_decode_default() -> bool:
    """Whether ``RoundWorkflow`` decodes the masked vectors with :func:`quick_decode`
    (it does: measured in ``README.md``'s Overhead; the bench driver's
    ``FEDECAY_BENCH_QUICK_DECODE=0`` turns it off for pairs)."""
    return True


@contextlib.contextmanager
def quick_decode() -> Iterator[bool]:
    """Within the block, ``collect_masked_vectors_stage`` decodes the masked arrays with
    :func:`bytes_to_ndarray`; yields False (and leaves Flower's) with another Flower."""
    if not PIN.holds():
        yield False
        return
    module: Any = importlib.import_module(_WORKFLOW)
    original = module.bytes_to_ndarray
    module.bytes_to_ndarray = bytes_to_ndarray
    try:
        yield True
    finally:
        module.bytes_to_ndarray = original


@contextlib.contextmanager
def private_ring(ring: random.Random | None = None) -> Iterator[bool]:
    """Within the block, ``SecAggPlusWorkflow.setup_stage`` shuffles the ring with
    ``ring`` (default: a ``random.SystemRandom``, OS entropy) where Flower's draws from
    the ``random`` module; yields True.

    Only the workflow module's global name ``random`` is rebound: the ``random`` module
    itself is not touched, so other threads' draws from it (Keras' default seeds,
    Flower's retry jitter) and any seed they set neither see nor change the ring. With
    another Flower, the module's own shuffle runs inside
    ``server.sampling.unpredictable_module_random`` (reseeded from OS entropy, restored
    on leaving; keys are then never exchanged ahead, so no other thread of ours draws
    meanwhile) and the block yields False.
    """
    if not PIN.holds():
        with unpredictable_module_random():
            yield False
        return
    module: Any = importlib.import_module(_WORKFLOW)
    with _RING_LOCK:
        original = module.random
        module.random = _RING if ring is None else ring
        try:
            yield True
        finally:
            module.random = original


def keys_ahead() -> bool:
    """Whether a round's ``setup`` and ``share_keys`` may run ahead, while the server
    evaluates the previous round (False, and Flower's ``__call__`` runs the rounds,
    with another Flower)."""
    return PIN.holds()


class RoundCountsMissing(RuntimeError):
    """A SecAgg+ round set up with shares and threshold not given for that round."""


class RoundWorkflow(SecAggPlusWorkflow):
    """``SecAggPlusWorkflow`` that must be given each round's counts.

    Parameters
    ----------
    max_weight, clipping_range, quantization_range, timeout : as Flower's workflow
        (the modulus is ``SECAGG_MODULUS``).
    """

    def __init__(self, *, max_weight: float, clipping_range: float,
                 quantization_range: int, timeout: float | None) -> None:
        # Flower's checks want valid counts now; a round never uses them (see setup_stage).
        super().__init__(1.0, 0.6, max_weight=max_weight, clipping_range=clipping_range,
                         quantization_range=quantization_range,
                         modulus_range=SECAGG_MODULUS, timeout=timeout)
        self._given: tuple[int, int] | None = None

    def give_counts(self, shares: int, threshold: int) -> None:
        """The shares and threshold of the round being set up (called from the
        strategy's ``configure_fit`` once the round's clients are sampled)."""
        self.num_shares, self.reconstruction_threshold = shares, threshold
        self._given = (shares, threshold)

    def new_state(self) -> Any:
        """A round's empty ``WorkflowState``."""
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState

        return WorkflowState()

    def exchange_keys(self, grid: Any, context: Any, state: Any) -> bool:
        """The first half of ``SecAggPlusWorkflow.__call__``: ``setup`` (the strategy
        samples the round's clients, which send their public keys) and ``share_keys``
        (each sends its neighbours their encrypted shares). False when it halted."""
        log.info("Secure aggregation commencing.")
        if self.setup_stage(grid, context, state) and \
                self.share_keys_stage(grid, context, state):
            return True
        log.info("Secure aggregation halted.")
        return False

    def sum_masked(self, grid: Any, context: Any, state: Any) -> bool:
        """The second half: ``collect_masked_vectors`` (the clients train and send their
        masked vectors) and ``unmask`` (the sum, the strategy's step). False when it
        halted."""
        if self.collect_masked_vectors_stage(grid, context, state) and \
                self.unmask_stage(grid, context, state):
            log.info("Secure aggregation completed.")
            return True
        log.info("Secure aggregation halted.")
        return False

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's ``setup`` stage, its ring shuffled by :func:`private_ring`, then a
        check that the round ran with the counts given for it: :class:`RoundCountsMissing`
        otherwise. Only public keys were exchanged so far; the secrets are shared at the
        next stage."""
        self._given = None  # only counts given while this round is set up
        try:
            with private_ring():  # the ring from OS entropy, the module untouched
                proceed = super().setup_stage(grid, context, state)
        finally:
            given, self._given = self._given, None
        if not state.sampled_node_ids:
            return proceed  # cancelled before any client was set up
        used = (state.num_shares, state.threshold)
        if given is None:
            raise RoundCountsMissing(
                f"SecAgg+ round set up without its shares and threshold for "
                f"{len(state.sampled_node_ids)} clients (configure_fit did not give them): "
                f"it would run with {used[0]} shares and threshold {used[1]}, and "
                "customer-level DP's m_min could exceed the smallest sum the server can "
                "unmask")
        if used != given:
            raise RoundCountsMissing(
                f"SecAgg+ round set up with {used[0]} shares and threshold {used[1]}, not "
                f"the {given[0]} and {given[1]} given for its "
                f"{len(state.sampled_node_ids)} clients")
        return proceed

    def collect_masked_vectors_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's ``collect_masked_vectors`` stage, its masked vectors decoded by
        :func:`quick_decode` when :func:`quick_decode_default` says so."""
        switch = quick_decode() if quick_decode_default() else contextlib.nullcontext(False)
        with switch:
            return bool(super().collect_masked_vectors_stage(grid, context, state))

    def unmask_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's ``unmask`` stage, its secrets rebuilt by :func:`serial_combine`."""
        with serial_combine():
            return bool(super().unmask_stage(grid, context, state))

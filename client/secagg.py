"""The merchant's ClientApp under secure aggregation (SecAgg+).

Flower 1.42 runs SecAgg+ only in its legacy API: a ``ClientApp(client_fn=...)`` whose
``NumPyClient`` trains, with ``secaggplus_mod`` answering the protocol's four stages
(``setup``, ``share_keys``, ``collect_masked_vectors``, ``unmask``). Only the third
stage reaches the client: it trains as the plain path does (``client.work.train_reply``)
and the mod replaces the weights by their quantised, masked form before anything leaves.

Mods, outermost first:

1. ``outer_mods`` (see every protocol message; tests use them to drop a client);
2. a guard: the merchant's data is read only at ``collect_masked_vectors``, the one
   stage that trains (the guard also points the mod at ``client.flower_seam``'s Shamir
   split without a thread pool and its once-parsed private keys: the same shares and
   keys, less work); ``setup`` checks only that the settings resolve and the files
   exist (a merchant without them leaves before any keys are made). What only the data
   tells (unreadable rows, no training snapshots), the seeded simulated faults and a
   deployed merchant's refusal of ``customer-seeded-sampling`` make it leave at
   ``collect_masked_vectors``, after the keys were shared: the dropout SecAgg+
   recovers from;
3. :func:`pairwise_keys_ahead` (the pairwise key agreements at ``share_keys``) and
   :func:`compact_masked_vectors` (the masked vector leaves as uint32) around
   ``secaggplus_mod``;
4. ``inner_mods`` (see the plain update, as the mod will mask it);
5. a check that the update survives quantisation: finite, a weight within
   ``secagg-max-weight`` and weighted values within ``secagg-clipping-range``;
   otherwise the client refuses rather than corrupt the sum;
6. client-side DP clipping (``fixedclipping_mod``) when the server asks for it; it
   sits inside the SecAgg+ mod, so the clipped update is what gets masked.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Context, Message
from flwr.app.message_type import MessageType
from flwr.client import NumPyClient
from flwr.client.mod import fixedclipping_mod, secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray, ndarray_to_bytes, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import (
    RECORD_KEY_CONFIGS,
    RECORD_KEY_STATE,
    Key,
    Stage,
)
from flwr.compat.common import recorddict_compat as compat
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from client.app import (
    DATA_ERROR,
    DATA_ERRORS,
    data_error_reply,
    error_reply,
    merchant_data,
    node_config_reply,
    resolved_config,
)
from client.config import ClientSettings, cached_settings
from client.customer_dp import SEEDED_REFUSED, seeded_refusal
from client.faults import SIMULATED_DROPOUT, simulated_fault
from client.flower_seam import (
    PAIRWISE_RECORD,
    masked_as_uint32,
    pairwise_keys,
    pairwise_keys_agreed,
    secaggplus_names,
)
from client.hosted import simulation_warms_up
from client.shards import process_shard_cache, shard_cache_bytes, shard_location
from client.work import evaluate_locally, global_round
from common.protocol import CUSTOMER_NOISE_KEY, CUSTOMER_RATE_KEY
from common.schema import DataError
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

Mod = Callable[[Message, Context, Callable[..., Message]], Message]


def quantisation_problem(weights: Sequence[np.ndarray], weight: float,
                         clipping_range: float, quantization_range: int,
                         max_weight: float) -> str | None:
    """Why SecAgg+ would corrupt this update, or None when it is safe.

    ``secaggplus_mod`` multiplies the weights by ``round(weight / max_weight * T) / T``,
    clips them to ``[-clipping_range, clipping_range]`` and quantises them: NaN turns
    into an arbitrary integer, clipped values bias the sum, and a weight above
    ``max_weight`` may overflow the sum of weights.
    """
    if not all(np.all(np.isfinite(w)) for w in weights):
        return "the update holds NaN or infinite values"
    if weight > max_weight:
        return (f"this client weighs in with {weight:g} examples, more than "
                f"federation.secagg-max-weight ({max_weight:g})")
    scale = round(weight / max_weight * quantization_range) / quantization_range
    peak = max((float(np.max(np.abs(w))) for w in weights if w.size), default=0.0) * scale
    if peak > clipping_range:
        return (f"weights scaled by num-examples / max-weight reach {peak:.4g}, beyond "
                f"federation.secagg-clipping-range ({clipping_range:g}): SecAgg+ would "
                "clip them; raise the clipping range")
    return None


class MerchantClient(NumPyClient):
    """Trains and evaluates the shared model on one merchant's snapshots."""

    def __init__(self, settings: ClientSettings, snaps: Snapshots, *,
                 warm: bool = False) -> None:
        self.settings = settings
        self.snaps = snaps
        self.warm = warm  # a simulation's process: compile the fit's layouts first

    def _model(self, parameters: list[np.ndarray]) -> Any:
        from common.model import cached_model, set_weights_of

        model = cached_model(self.settings.model, self.settings.snapshots, self.settings.seed)
        set_weights_of(model, parameters)
        return model

    def fit(self, parameters: list[np.ndarray], config: dict[str, Any]
            ) -> tuple[list[np.ndarray], int, dict[str, Any]]:
        """The plain path's training (``client.work.train_reply``: the global weights go
        in with the first epoch's compiled call; in a simulation's process every
        validation layout is compiled at the first message, as ``client.app`` has it;
        customer-level DP's noised clipped sum). Under DP every client weighs in with 1
        (the noise is calibrated to a plain mean, and a merchant's customer-level reply
        is a sum, not weights)."""
        from client.work import train_reply

        update, metrics = train_reply(self.settings, self.snaps, parameters, config,
                                      warm=self.warm)
        if CUSTOMER_RATE_KEY in config or KEY_CLIPPING_NORM in config:
            return update, 1, dict(metrics)
        log.info("train round %d: %d training snapshots", global_round(config),
                 metrics["num-examples"])
        return update, int(metrics["num-examples"]), dict(metrics)

    def evaluate(self, parameters: list[np.ndarray], config: dict[str, Any]
                 ) -> tuple[float, int, dict[str, Any]]:
        test = self.snaps.split_part("test")
        if len(test) == 0:
            raise DataError("no held-out snapshots in this merchant's data")
        metrics = evaluate_locally(self._model(parameters), test)
        return float(metrics["eval_loss"]), int(metrics["num-examples"]), metrics


def make_secagg_client_app(
    flat: Mapping[str, Any] | None = None,
    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None,
    *,
    outer_mods: Sequence[Mod] = (),
    inner_mods: Sequence[Mod] = (),
) -> ClientApp:
    """The SecAgg+ ClientApp, reading its settings as ``client.app.make_client_app`` does
    (``flat``, or the run config completed by ``resolve``) and with the process's shard
    cache of the size read now."""
    cache_bytes = shard_cache_bytes()

    def client_fn(context: Context) -> Any:
        return merchant_client(context, flat, resolve, cache_bytes).to_client()

    def guard(msg: Message, context: Context, call_next: Callable[..., Message]) -> Message:
        # A deployed node's --node-config, as the plain ClientApp checks it: a misspelt
        # key leaves at setup, before any keys are made.
        if (refused := node_config_reply(msg, context)) is not None:
            return refused
        if msg.metadata.message_type != MessageType.TRAIN:  # evaluation needs the data
            try:
                merchant_data(context, flat, resolve, process_shard_cache(cache_bytes))
            except DATA_ERRORS as err:
                return data_error_reply(msg, err)
            return call_next(msg, context)
        stage = _stage(msg)
        secaggplus_names()  # in this process: the mod's Shamir split and key parse, once
        if stage == Stage.SETUP:  # before any keys: the cheap checks only, no data read
            try:
                check_shard(context, flat, resolve)
            except DATA_ERRORS as err:
                return data_error_reply(msg, err)
        if stage != Stage.COLLECT_MASKED_VECTORS:  # key agreement and shares: no data work
            return call_next(msg, context)
        fit_config: Mapping[str, Any] = msg.content.config_records.get("fitins.config") or {}
        refusal = seeded_refusal(fit_config, context.node_config)
        if refusal is not None:  # before the data is read; a dropout SecAgg+ recovers from
            log.error("%s", refusal)
            return error_reply(msg, SEEDED_REFUSED, refusal)
        try:
            settings, snaps = merchant_data(context, flat, resolve,
                                            process_shard_cache(cache_bytes))
        except DATA_ERRORS as err:
            return data_error_reply(msg, err)
        if len(snaps.split_part("train")) == 0:
            return error_reply(msg, DATA_ERROR, "no training snapshots in this merchant's data")
        fault = simulated_fault(settings.client, settings.seed, context.node_config,
                                global_round(fit_config))
        if fault:
            return error_reply(msg, SIMULATED_DROPOUT, fault)
        return call_next(msg, context)

    clipping = [fixedclipping_mod] if flat is not None and \
        flat.get("privacy.mode") == "client-fixed" else [_clip_when_asked]
    mods = [*outer_mods, guard, pairwise_keys_ahead, compact_masked_vectors, secaggplus_mod,
            *inner_mods, _quantisation_guard, *clipping]
    return ClientApp(client_fn=client_fn, mods=list(mods))


def merchant_client(context: Context, flat: Mapping[str, Any] | None,
                    resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None,
                    cache_bytes: int) -> MerchantClient:
    """This node's :class:`MerchantClient` on its merchant's snapshots (the process's
    shard cache). In a large simulation (``client.hosted.simulation_warms_up``, the rule
    the plain path follows; a SecAgg+ message names no merchants) it compiles every
    layout of the fit at its process's first training."""
    settings, snaps = merchant_data(context, flat, resolve, process_shard_cache(cache_bytes))
    return MerchantClient(settings, snaps, warm=simulation_warms_up(context))


def check_shard(context: Context, flat: Mapping[str, Any] | None,
                resolve: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None) -> None:
    """The ``setup`` stage's checks, which read no data: the settings resolve and the
    merchant's files (or folder) exist (``FileNotFoundError`` naming the file otherwise). What only
    the data can tell (unreadable rows, no training snapshots) is found at
    ``collect_masked_vectors``, a dropout SecAgg+ recovers from."""
    settings = cached_settings(resolved_config(context, flat, resolve))
    path, _, interventions = shard_location(context.node_config, settings.client)
    for name in (path, interventions):
        if name and not os.path.exists(name):
            raise FileNotFoundError(f"merchant data {name} does not exist")


def as_uint32(data: bytes, mod_range: int) -> bytes:
    """A masked array (``secaggplus_mod`` sends int64 entries reduced mod ``mod_range``)
    re-encoded as uint32: the same numbers in half the bytes.

    The server sums the clients' arrays with numpy and reduces the sum mod ``mod_range``
    (a power of 2, at most 2**32): uint32 additions wrap mod 2**32, which that reduction
    does not tell apart from int64 ones, and the unmasking promotes to int64 again.
    """
    arr = bytes_to_ndarray(data)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= mod_range):
        raise ValueError(f"masked vector outside [0, {mod_range}): not the mod's output")
    return ndarray_to_bytes(arr.astype(np.uint32))


def compact_masked_vectors(msg: Message, context: Context, call_next: Callable[..., Message]
                           ) -> Message:
    """Halve the upload of ``collect_masked_vectors`` (see :func:`as_uint32`): Flower's
    mod sends every masked entry as int64 although it lies in [0, 2**32). Nothing to do
    when ``client.flower_seam`` has the mod encode them as uint32 itself."""
    reply = call_next(msg, context)
    if masked_as_uint32():  # client.flower_seam encoded them so already
        return reply
    configs = None if reply.has_error() else reply.content.config_records.get(RECORD_KEY_CONFIGS)
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if configs is None or state is None or Key.MASKED_PARAMETERS not in configs:
        return reply
    mod_range = int(state["mod_range"])  # type: ignore[arg-type]
    if mod_range > 2**32 or mod_range & (mod_range - 1):
        return reply  # not a power of 2 within uint32: left as the mod made it
    masked: list[bytes] = configs[Key.MASKED_PARAMETERS]  # type: ignore[assignment]
    configs[Key.MASKED_PARAMETERS] = [as_uint32(b, mod_range) for b in masked]
    return reply


def pairwise_keys_ahead(msg: Message, context: Context, call_next: Callable[..., Message]
                        ) -> Message:
    """Agree at ``share_keys`` the pairwise keys ``collect_masked_vectors`` masks with
    (``client.flower_seam.pairwise_keys``), kept in the context's state until then:
    under the server's keys ahead that stage runs while the server evaluates the last
    round, so the key agreements leave the stage where the merchants train. Every other
    stage drops them."""
    stage = _stage(msg) if msg.metadata.message_type == MessageType.TRAIN else None
    # config_records is a view of the state as it is when read: read it again after.
    agreed = context.state.config_records.pop(PAIRWISE_RECORD, None)
    if stage == Stage.SHARE_KEYS:
        reply = call_next(msg, context)
        state = context.state.config_records.get(RECORD_KEY_STATE)
        keys = None if reply.has_error() or state is None else pairwise_keys(state)
        if keys is not None:
            context.state.config_records[PAIRWISE_RECORD] = ConfigRecord(keys)
        return reply
    if stage != Stage.COLLECT_MASKED_VECTORS or agreed is None:
        return call_next(msg, context)
    with pairwise_keys_agreed(agreed):
        return call_next(msg, context)


def _stage(msg: Message) -> str | None:
    configs = msg.content.config_records.get(RECORD_KEY_CONFIGS)
    return None if configs is None else str(configs.get(Key.STAGE))


def _quantisation_guard(msg: Message, context: Context, call_next: Callable[..., Message]
                        ) -> Message:
    """Refuse (raise) an update that SecAgg+ would clip or garble; see module docstring."""
    reply = call_next(msg, context)
    state = context.state.config_records.get(RECORD_KEY_STATE)
    if msg.metadata.message_type != MessageType.TRAIN or reply.has_error() or state is None:
        return reply
    fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
    settings: Mapping[str, Any] = state  # the mod's own scalars
    fit_config: Mapping[str, Any] = msg.content.config_records.get("fitins.config") or {}
    if CUSTOMER_NOISE_KEY in fit_config:
        weights = parameters_to_ndarrays(fitres.parameters)
        if not all(np.all(np.isfinite(w)) for w in weights):  # would garble every sum
            raise ValueError("update refused before masking: the noised customer sum "
                             "holds NaN or infinite values")
        note_clipped(weights, float(settings["clipping_range"]))
        return reply
    problem = quantisation_problem(
        parameters_to_ndarrays(fitres.parameters), fitres.num_examples,
        float(settings["clipping_range"]), int(settings["target_range"]),
        float(settings["max_weight"]))
    if problem is not None:
        log.error("secure aggregation: update refused: %s", problem)
        raise ValueError(f"update refused before masking: {problem}")
    return reply


def clipped_coordinates(weights: Sequence[np.ndarray], clipping_range: float) -> int:
    """How many coordinates of ``weights`` SecAgg+ clips to ``[-range, range]`` (a
    non-finite one counts)."""
    return int(sum(np.count_nonzero(~(np.abs(w) <= clipping_range)) for w in weights))


def note_clipped(weights: Sequence[np.ndarray], clipping_range: float) -> None:
    """Customer-level DP: a noised sum is never refused (that would drop the merchant for
    what its customers did); SecAgg+ clips what lies beyond the range, and the merchant
    logs how much, locally only (the count is outside epsilon)."""
    clipped = clipped_coordinates(weights, clipping_range)
    if clipped:
        log.warning("secure aggregation: %d coordinates of the noised customer sum lie "
                    "beyond federation.secagg-clipping-range (%g): SecAgg+ clips them, which "
                    "biases the sum and voids the noise's accounting for them; raise the "
                    "range", clipped, clipping_range)


def _clip_when_asked(msg: Message, context: Context, call_next: Callable[..., Message]
                     ) -> Message:
    """Client-side DP clipping whenever the server's DP wrapper sends a clipping norm."""
    config = msg.content.config_records.get("fitins.config")
    if msg.metadata.message_type == MessageType.TRAIN and config is not None \
            and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)

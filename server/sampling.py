"""Seeded node sampling for both ways of running rounds.

Flower samples the round's nodes from the ``random`` module, in the order the nodes
connected. Here the node ids are sorted first, and each global round draws from its own
seed (:func:`round_seed`): the Message API strategies from an RNG of their own
(:class:`OwnedSampling` over a :class:`SortedGrid`), the SecAgg+ rounds from their
client manager's (:class:`SortedClientManager`). Same seed, same nodes, whatever order
they connected in. None of them draws from the ``random`` module. The SecAgg+ ring,
which decides each client's neighbours, is drawn from OS entropy instead
(``server.secagg_workflow.private_ring``; :func:`unpredictable_module_random` with
another Flower).
"""

from __future__ import annotations

import contextlib
import logging
import random
import secrets
import time
from collections.abc import Iterable, Iterator
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flwr_strategy

log = logging.getLogger(__name__)


def round_seed(seed: int, global_round: int) -> int:
    """The seed of one global round's sampling."""
    return seed * 1_000_003 + global_round


class SortedGrid:
    """A Grid whose node ids come sorted, so seeded sampling does not depend on order."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class OwnedSampling(flwr_strategy.FedAvg):
    """FedAvg's ``configure_train`` and ``configure_evaluate`` with the nodes drawn from
    ``round_rng``, the strategy's own RNG, where Flower's ``sample_nodes`` draws from the
    ``random`` module. ``server.strategy.build_strategy`` places it right after the chosen
    strategy and before FedAvg, so that strategy's own steps (FedProx's ``proximal-mu``,
    FedOpt's copy of the arrays) still run first. Same seed, same nodes as
    ``sample_nodes`` after ``random.seed``.
    """

    round_rng: random.Random

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if self.fraction_train == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_train, self.min_train_nodes, "train")
        return self._messages(server_round, arrays, config, nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.fraction_evaluate == 0.0:
            return []
        nodes = self._sample(grid, self.fraction_evaluate, self.min_evaluate_nodes, "evaluate")
        return self._messages(server_round, arrays, config, nodes, MessageType.EVALUATE)

    def _sample(self, grid: Grid, fraction: float, minimum: int, what: str) -> list[int]:
        """``flwr.serverapp.strategy.strategy_utils.sample_nodes``, drawing from
        ``round_rng``: wait for the nodes needed, then sample the share asked for."""
        size = max(int(len(list(grid.get_node_ids())) * fraction), minimum)
        needed = max(self.min_available_nodes, size)
        while len(nodes := list(grid.get_node_ids())) < needed:
            log.info("waiting for nodes to connect: %d connected, %d needed", len(nodes),
                     needed)
            time.sleep(1)
        sampled = self.round_rng.sample(nodes, size)
        log.info("configure_%s: sampled %d nodes (out of %d)", what, len(sampled), len(nodes))
        return sampled

    def _messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                  nodes: list[int], message_type: str) -> list[Message]:
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        return [Message(content=record, message_type=message_type, dst_node_id=node)
                for node in nodes]


class SortedClientManager(SimpleClientManager):
    """Samples from the node ids in sorted order, so seeded sampling ignores arrival order.

    It draws from an RNG of its own, seeded for each round by :meth:`seed_round` (the
    round's training sample, then its evaluation sample, as ``OwnedSampling`` does).
    """

    def __init__(self) -> None:
        super().__init__()
        self._rng: random.Random | None = None

    def seed_round(self, seed: int) -> None:
        """Draw the next samples from ``random.Random(seed)``."""
        self._rng = random.Random(seed)

    def sample(self, num_clients: int, min_num_clients: int | None = None,
               criterion: Any = None) -> list[ClientProxy]:
        """Wait for ``min_num_clients`` (default ``num_clients``), then draw ``num_clients``
        of the ids in sorted order that pass ``criterion`` with the round's RNG; empty
        when fewer are available."""
        if self._rng is None:
            raise RuntimeError("SortedClientManager.sample before seed_round: the round's "
                               "sample would not follow the experiment seed")
        if min_num_clients is None:
            min_num_clients = num_clients
        self.wait_for(min_num_clients)
        cids = sorted(self.clients, key=int)
        if criterion is not None:
            cids = [c for c in cids if criterion.select(self.clients[c])]
        if num_clients > len(cids):
            log.info("sampling failed: %d clients available, %d requested", len(cids),
                     num_clients)
            return []
        return [self.clients[c] for c in self._rng.sample(cids, num_clients)]


@contextlib.contextmanager
def unpredictable_module_random() -> Iterator[None]:
    """The ``random`` module seeded from OS entropy (``secrets``) inside the block; its
    earlier state is put back on leaving.

    Flower 1.42's SecAgg+ workflow takes no RNG: once the strategy has sampled the
    round's clients it shuffles them with the ``random`` module into the ring that makes
    each client's neighbours (``SecAggPlusWorkflow.setup_stage``). SecAgg+'s collusion
    bound assumes neighbourhoods the adversary cannot predict; a shuffle that followed
    the experiment seed (or a module state something else seeded, as
    ``keras.utils.set_random_seed`` does) would name every client's neighbours to anyone
    who knows the seed. Runs therefore repeat their samples, not their rings.

    Only for a Flower other than the one ``server.secagg_workflow.private_ring`` is
    pinned to (that one gives the shuffle a generator of its own): the block owns the
    process's ``random`` module while it lasts, so no other thread may draw from it or
    seed it meanwhile (keys are then never exchanged ahead of a round).
    """
    saved = random.getstate()
    random.seed(secrets.randbits(256))
    try:
        yield
    finally:
        random.setstate(saved)

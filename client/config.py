"""Client-side settings (section ``client``) and everything a ClientApp reads."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from collections.abc import Mapping
from typing import Any

from common.config import FaultConfig, ModelConfig, SnapshotConfig, TrainConfig, from_flat

#: The keys a deployed merchant's ``--node-config`` may hold (docs/deployment.md).
NODE_CONFIG_KEYS = ("data-path", "format", "interventions-path", "trainer-socket",
                    "head-refit")
#: Node config keys that name a file or socket: absolute paths only.
NODE_PATH_KEYS = ("data-path", "interventions-path", "trainer-socket")
#: What ``head-refit`` may say (``client.head_refit.declines`` reads the "no" ones).
HEAD_REFIT_VALUES = (True, False, 0, 1, "true", "false", "on", "off", "yes", "no", "1", "0")


class NodeConfigError(ValueError):
    """A deployed node's ``--node-config`` holds a key or value it cannot use."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"node config key {key!r}: {problem}")
        self.key = key  # the key at fault (the server may hear it; never the value)


@dataclasses.dataclass(frozen=True)
class ClientConfig(FaultConfig):
    """Where a simulated merchant's shard lives and the seeded fault knobs."""

    shard_dir: str = ""  # simulation: shards are <shard-dir>/<partition-id>.parquet

    def __post_init__(self) -> None:
        self.check_faults("client")


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """Everything the ClientApp reads from the run config, one typed section each."""

    snapshots: SnapshotConfig
    model: ModelConfig
    train: TrainConfig
    client: ClientConfig
    seed: int


def settings_from_flat(flat: Mapping[str, Any]) -> ClientSettings:
    """The client's settings from a flat run config (``section.key`` names)."""
    return ClientSettings(
        snapshots=from_flat(SnapshotConfig, flat, "snapshots"),
        model=from_flat(ModelConfig, flat, "model"),
        train=from_flat(TrainConfig, flat, "train"),
        client=from_flat(ClientConfig, flat, "client"),
        seed=int(flat.get("experiment.seed", 0)),
    )


def cached_settings(flat: Mapping[str, Any]) -> ClientSettings:
    """:func:`settings_from_flat`, parsed once per distinct run config (every message
    of a run hands the same one)."""
    return _settings_of(tuple(sorted((k, _hashable(v)) for k, v in flat.items())))


@functools.lru_cache(maxsize=8)
def _settings_of(items: tuple[tuple[str, Any], ...]) -> ClientSettings:
    return settings_from_flat(dict(items))


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def check_node_config(node_config: Mapping[str, Any]) -> None:
    """Refuse a deployed merchant's node config (one with ``data-path``, or one that
    looks meant to have it) that holds a key outside :data:`NODE_CONFIG_KEYS`, a
    relative or empty path, or a ``head-refit`` that is not a yes or a no.

    A misspelt key (``interventions_path``, ``head_refit``) was ignored without a word:
    the merchant trained without its interventions, or joined the head refit it meant
    to decline. A simulation's node (``partition-id``) is Flower's and is not checked.

    Raises
    ------
    NodeConfigError
        Naming the key, what was expected and, for a misspelt key, the likely one.
    """
    if "data-path" not in node_config:
        near = [key for key in node_config
                if difflib.get_close_matches(str(key), ["data-path"], n=1, cutoff=0.6)]
        if near and "partition-id" not in node_config:
            raise NodeConfigError(near[0], "unknown: did you mean 'data-path'? (a deployed "
                                  "node needs data-path)")
        return  # a simulation's node, or none at all: the data loader names what is missing
    for key in node_config:
        if key not in NODE_CONFIG_KEYS:
            close = difflib.get_close_matches(key, NODE_CONFIG_KEYS, n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise NodeConfigError(key, f"unknown: {hint}a merchant's node takes "
                                  f"{', '.join(NODE_CONFIG_KEYS)}")
    for key in NODE_PATH_KEYS:
        if key not in node_config or (key != "data-path" and node_config[key] in ("", None)):
            continue
        value = str(node_config[key])
        if key == "trainer-socket":  # client.channel expands a ~ there
            value = os.path.expanduser(value)
        if not os.path.isabs(value):
            raise NodeConfigError(key, f"{value!r} is not an absolute path; give the full "
                                  "path (the ClientApp and the warm trainer may run in "
                                  "other folders)")
    refit = node_config.get("head-refit", True)
    normal = refit.strip().lower() if isinstance(refit, str) else refit
    if isinstance(normal, float) or normal not in HEAD_REFIT_VALUES:
        raise NodeConfigError("head-refit", f"{refit!r} is neither a yes (true, on, yes, 1) "
                              "nor a no (false, off, no, 0)")

"""Client-side settings (section ``client``) and everything a ClientApp reads."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from common.config import FaultConfig, ModelConfig, SnapshotConfig, TrainConfig, from_flat


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

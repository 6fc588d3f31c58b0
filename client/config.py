"""Client-side settings (section ``client``)."""

from __future__ import annotations

import dataclasses

from common.config import FaultConfig


@dataclasses.dataclass(frozen=True)
class ClientConfig(FaultConfig):
    """Where a simulated merchant's shard lives and the seeded fault knobs."""

    shard_dir: str = ""  # simulation: shards are <shard-dir>/<partition-id>.parquet

    def __post_init__(self) -> None:
        self.check_faults("client")

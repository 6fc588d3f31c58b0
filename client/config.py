"""Client-side settings (section ``client``)."""

from __future__ import annotations

import dataclasses

from common.config import _check


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Where a simulated merchant's shard lives and the seeded fault knobs."""

    shard_dir: str = ""  # simulation: shards are <shard-dir>/<partition-id>.parquet
    dropout_prob: float = 0.0  # a sampled client fails with this probability
    straggler_prob: float = 0.0  # a sampled client is delayed ...
    straggler_delay: float = 0.0  # ... by this many seconds
    crash_prob: float = 0.0  # a sampled client's process is SIGKILLed (as by the OOM killer)

    def __post_init__(self) -> None:
        _check(0 <= self.dropout_prob <= 1, "client.dropout-prob", "must be in [0, 1]")
        _check(0 <= self.straggler_prob <= 1, "client.straggler-prob", "must be in [0, 1]")
        _check(self.straggler_delay >= 0, "client.straggler-delay", "must be >= 0")
        _check(0 <= self.crash_prob <= 1, "client.crash-prob", "must be in [0, 1]")

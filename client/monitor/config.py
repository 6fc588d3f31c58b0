"""How the monitor batches, alerts and checkpoints: the flags of ``fedecay monitor``."""

from __future__ import annotations

import dataclasses


def _check(cond: bool, key: str, message: str) -> None:
    if not cond:
        raise ValueError(f"monitor setting '{key}': {message}")


@dataclasses.dataclass(frozen=True)
class MonitorConfig:
    """How the monitor batches, alerts and checkpoints (CLI flags of ``fedecay monitor``).

    Out-of-range values raise ``ValueError`` naming the flag
    (``monitor setting 'batch': must be >= 1``).
    """

    batch: int = 1000  # rescore touched users every this many events (and on pauses)
    max_delay_seconds: float = 0.5  # ... or when the first unscored event waited this long
    cooldown_hours: float = 72.0  # no second alert for a user within this stream time
    sweep_hours: float = 24.0  # rescore every active user this often (stream time); 0 = off
    checkpoint_every: int = 100_000  # events between state checkpoints
    window_cap: int = 10_000  # most events kept per user (observation window + sequence)
    max_future_hours: float = 24.0  # events this far past the wall clock are malformed; 0 = off
    max_line_bytes: int = 1 << 20  # longer input lines are skipped (never held whole)

    def __post_init__(self) -> None:
        _check(self.batch >= 1, "batch", "must be >= 1")
        _check(self.max_delay_seconds > 0, "max-delay-seconds", "must be > 0")
        _check(self.cooldown_hours >= 0, "cooldown-hours", "must be >= 0")
        _check(self.sweep_hours >= 0, "sweep-hours", "must be >= 0")
        _check(self.checkpoint_every >= 1, "checkpoint-every", "must be >= 1")
        _check(self.window_cap >= 2, "window-cap", "must be >= 2")
        _check(self.max_future_hours >= 0, "max-future-hours", "must be >= 0")
        _check(self.max_line_bytes >= 1, "max-line-bytes", "must be >= 1")

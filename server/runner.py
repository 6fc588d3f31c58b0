"""The strategy a run uses, as the ServerApp needs it: the object that keeps the round
bookkeeping, the object that runs the rounds, and the privacy ledger."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

from server.config import ServerSettings
from server.customer_dp import wrap_customer_dp
from server.dp_accounting import CustomerLedger
from server.privacy import PrivacyLedger, num_sampled, wrap_strategy
from server.rounds import RoundBook
from server.strategy import build_strategy


@dataclasses.dataclass
class Runner:
    """The strategy that keeps the round bookkeeping and the one that runs the rounds (a
    DP wrapper around it, or the same object), with the privacy ledger if any
    (merchant or customer level)."""

    strategy: Any
    runner: Any
    ledger: PrivacyLedger | CustomerLedger | None

    @property
    def rounds(self) -> RoundBook:
        """The run's per-round bookkeeping."""
        book: RoundBook = self.strategy.rounds
        return book

    @property
    def clipping_norm(self) -> float | None:
        """The DP wrapper's clipping norm now (adaptive clipping moves it), if any."""
        value = getattr(self.runner, "clipping_norm", None)
        return None if value is None else float(value)


def build_runner(settings: ServerSettings, population: int, run_dir: Path,
                 engine_failed: threading.Event | None = None, *,
                 shifts: tuple[int, ...] = ()) -> Runner:
    """The configured strategy for ``population`` connected clients: the guarded Message
    API strategy inside the DP wrapper ``privacy.mode`` asks for, or the SecAgg+
    workflow's; the ledger writes ``run_dir/privacy.jsonl``. ``shifts``: the response
    shifts' positions in the weight list, which ``federation.shift-server-lr`` /
    ``-momentum`` step."""
    fed, dp = settings.federation, settings.privacy
    if fed.secure_aggregation:  # SecAgg+ runs in Flower's legacy workflow API
        from server.secagg import build_secagg_strategy

        strategy = runner = build_secagg_strategy(fed, dp, settings.seed, population,
                                                  engine_failed=engine_failed,
                                                  shifts=shifts)
        if dp.customer_level:  # distributed / local: the merchants add the noise
            from server.customer_secagg import attach_customer_dp

            ledger = attach_customer_dp(strategy, dp, fed, population,
                                        run_dir / "privacy.jsonl")
            return Runner(strategy, runner, ledger)
    else:
        strategy = build_strategy(fed, settings.seed, engine_failed=engine_failed,
                                  shifts=shifts, privacy=dp)
        if dp.customer_level:
            runner, ledger = wrap_customer_dp(strategy, dp, fed, population,
                                              run_dir / "privacy.jsonl", settings.seed)
            return Runner(strategy, runner, ledger)
        runner = wrap_strategy(strategy, dp, fed, population)
    merchant_ledger = PrivacyLedger(dp, population, num_sampled(fed, population),
                                    run_dir / "privacy.jsonl") if dp.enabled else None
    return Runner(strategy, runner, merchant_ledger)

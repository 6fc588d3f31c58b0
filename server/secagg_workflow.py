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
"""

from __future__ import annotations

from typing import Any

from flwr.server.workflow import SecAggPlusWorkflow

from server.config import SECAGG_MODULUS


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

    def setup_stage(self, grid: Any, context: Any, state: Any) -> bool:
        """Flower's ``setup`` stage, then a check that the round ran with the counts
        given for it: :class:`RoundCountsMissing` otherwise. Only public keys were
        exchanged so far; the secrets are shared at the next stage."""
        self._given = None  # only counts given while this round is set up
        try:
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

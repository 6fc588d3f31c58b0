"""Customer-level privacy accounting with dp-accounting, and its ledger ``privacy.jsonl``.

Every released round is one Poisson-subsampled Gaussian mechanism on the customers:
each customer is in the round with chance q (its merchant samples it), its update is
clipped to C, and the sum carries N(0, (z C)^2) noise: the server's (``central``), at
least that from the merchants' shares when at least ``min_replies`` of them are summed
(``distributed``, SecAgg+), or each merchant's own sum carries all of it (``local``).
The neighbouring relation is adding or removing one customer of one merchant (all of
that customer's events there). The accounted noise does not depend on how many
merchants replied, so every round costs the same. ε over the rounds is computed by
both of dp-accounting's accountants, RDP and PLD (privacy loss distributions, usually
tighter); the smaller is reported, both are kept.

The merchants' own sampling (``federation.fraction-train``) is not counted as
amplification: the server chooses it from a seed, so it is no secret from the server.
The customers' sampling is, at q: it holds when the merchants draw it from OS entropy
(the default); with ``privacy.seeded-sampling`` (simulation only) the lines say
``"sampling": "seeded"`` and ε assumes a sample the server could in fact recompute.

The lines carry no count of the customers a round sampled (outside ε) and are strict
JSON (a non-finite number is written ``null``). A released round gets a line with
``"pending": true`` the moment its noised sum is released (before the aggregator returns
it), then its complete line once the round is recorded: a kill in between leaves the
round on disk, counted on resume (:meth:`CustomerLedger.replay`); :func:`settled`
drops the pending lines a complete one follows.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from common import atomic, jsonl
from server.config import DPConfig

log = logging.getLogger(__name__)

UNIT_TEXT = "one customer of one merchant: all of that customer's events there"
THREAT_MODEL = {
    "central": "the server adds the noise: it sees each merchant's clipped sum and is "
               "trusted; anyone who sees only the models gets the guarantee",
    "distributed": "each merchant adds a share of the noise and SecAgg+ reveals only the "
                   "sum: holds against an honest-but-curious server (and anyone who sees "
                   "the models) while SecAgg+ holds and at least min_replies merchants "
                   "reply",
    "local": "each merchant adds all of the noise to its own sum: holds against every "
             "party that sees the replies, the server included, as long as the server "
             "sends the configured q, C and noise std (a merchant applies its "
             "instruction's); the average carries more noise than needed (the weakest "
             "utility, kept for comparison)",
}
#: How each placement's rounds are accounted (the ledger's ``accounting``).
ACCOUNTING = {
    "central": "dp-accounting: Poisson-subsampled Gaussian, add/remove one customer; "
               "epsilon = min(RDP, PLD)",
    "distributed": "dp-accounting: Poisson-subsampled Gaussian at the effective noise "
                   "multiplier z, the one of a sum of min_replies shares (each merchant "
                   "adds std z*C/sqrt(min_replies)); more replies only add noise; add/"
                   "remove one customer; epsilon = min(RDP, PLD)",
    "local": "dp-accounting: Poisson-subsampled Gaussian per merchant (each adds std z*C "
             "to its own sum; a customer is in one merchant's sum), the same for every "
             "merchant; the average carries merchants_replied times the variance needed; "
             "add/remove one customer; epsilon = min(RDP, PLD)",
}
#: The checkpoint key holding the ledger's ``checkpoint_fields()`` (customer level:
#: :class:`CustomerLedger`; merchant level: ``server.privacy.PrivacyLedger``);
#: :data:`NO_LEDGER` when the run had no privacy ledger.
CHECKPOINT_KEY = "privacy_ledger"
#: What a checkpoint of a run without differential privacy records under
#: :data:`CHECKPOINT_KEY` (None there is a checkpoint of the version before it, which
#: wrote None for a merchant-level run too).
NO_LEDGER: dict[str, Any] = {"unit": None, "released_rounds": 0}
SEEDED_NOTE = ("customer sampling and noise seeded from the run config "
               "(privacy.seeded-sampling): epsilon assumes a sample and noise nobody can "
               "recompute, so it holds only in simulation")


def strict_json(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN or Infinity)."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@contextmanager
def quiet_rdp() -> Iterator[None]:
    """Silence the RDP accountant's warning for each fractional order it skips (one
    line per order and ε query, dozens a round at low noise); its errors still show."""
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl.setLevel(level)


def customer_epsilons(rate: float, noise: float, rounds: int, delta: float
                      ) -> tuple[float, float]:
    """ε (RDP, PLD) after ``rounds`` Poisson-subsampled Gaussian rounds at rate ``rate``
    and noise multiplier ``noise``, at ``delta``; (0, 0) for no round."""
    if rounds <= 0:
        return 0.0, 0.0
    from dp_accounting import dp_event, pld, rdp

    event = dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(noise))
    with quiet_rdp():
        by_rdp = rdp.RdpAccountant()
        by_rdp.compose(event, rounds)
        eps_rdp = float(by_rdp.get_epsilon(delta))
    try:
        by_pld = pld.PLDAccountant()
        by_pld.compose(event, rounds)
        eps_pld = float(by_pld.get_epsilon(delta))
    except (ValueError, MemoryError, OverflowError):
        # Tiny noise: the loss distribution is too wide to discretise; RDP still answers.
        eps_pld = math.inf
    return eps_rdp, eps_pld


def check_checkpoint(path: Path | None, checkpoint: dict[str, Any] | None, upto: int,
                     found: int, unit: str, settings: Callable[[dict[str, Any]], str]
                     ) -> None:
    """Raise when round ``upto``'s ``checkpoint`` counted more released rounds than the
    ``found`` ones the ledger ``path`` holds up to it, or was written by a run without
    ``unit``-level accounting (its rounds released updates no ε here covers); before
    anything is rewritten. ``settings`` gives the text of what the checkpoint's
    :data:`CHECKPOINT_KEY` says its rounds were accounted with. Checkpoints of versions
    that did not record the count pass."""
    if checkpoint is None or CHECKPOINT_KEY not in checkpoint or upto <= 0:
        return  # no checkpoint, or one of a version that did not record the count
    counted = checkpoint[CHECKPOINT_KEY]
    where = f"{path}: the checkpoint of round {upto}"
    if not isinstance(counted, dict) or counted.get("unit") != unit:
        raise ValueError(
            f"{where} was written by a run without {unit}-level accounting "
            "(privacy.unit / privacy.mode differ): its rounds released updates this "
            "ledger cannot account for, so epsilon would cover only the rounds after "
            "the resume; start a new run in another folder")
    recorded = int(counted.get("released_rounds", 0))
    if found < recorded:
        state = "holds" if path is not None and path.exists() else "is missing: it holds"
        raise ValueError(
            f"{where} counted {recorded} released rounds ({settings(counted)}); the ledger "
            f"{state} {found} up to it: epsilon would be under-counted. Put the run's "
            "privacy.jsonl back, or start a new run in another folder")


def _customer_settings(counted: dict[str, Any]) -> str:
    return (f"{counted.get('placement')}, noise {counted.get('noise_multiplier')}, "
            f"customer rate {counted.get('sampling_rate')}")


class CustomerLedger:
    """ε per customer so far; one line per released round in ``path``.

    The aggregator (``server.customer_dp``) notes the customers' count when it is known
    (:meth:`learn_customers`), asks :meth:`would_exceed` before it releases a round and
    notes each release (:meth:`released`); the round recorder then calls :meth:`record`.
    """

    def __init__(self, dp: DPConfig, path: Path | None = None) -> None:
        self.dp = dp
        self.path = path
        self.customers: int | None = dp.customers or None
        self.rounds = 0
        self.epsilon = self.epsilon_rdp = self.epsilon_pld = 0.0
        #: Distributed placement: m_min, the fewest shares a released sum holds.
        self.min_replies: int | None = None
        self._released: dict[int, int] = {}  # round -> merchants whose sums were added

    @property
    def delta(self) -> float:
        """The δ ε is stated at: ``privacy.target-delta`` when set, else 1 / (10
        customers), nan until the customers' count is known."""
        if self.dp.target_delta > 0 or self.customers:
            return self.dp.delta(self.customers)
        return math.nan

    def learn_customers(self, customers: int) -> None:
        """Fix the federation's customer count (once; later calls are ignored)."""
        if self.customers is None:
            self.customers = max(int(customers), 1)

    def epsilons(self, rounds: int) -> tuple[float, float]:
        """ε (RDP, PLD) after ``rounds`` released rounds."""
        return customer_epsilons(self.dp.customer_rate, self.dp.noise_multiplier, rounds,
                                 self.dp.delta(self.customers))

    def would_exceed(self) -> bool:
        """True when ``target-epsilon`` is set and one more round would pass it (False
        while δ is unknown, i.e. neither ``target-delta`` nor the customers' count is:
        the aggregator asks again once it knows the count, before releasing anything)."""
        if self.dp.target_epsilon <= 0 or math.isnan(self.delta):
            return False
        return min(self.epsilons(self.rounds + 1)) > self.dp.target_epsilon

    next_round_exceeds = would_exceed

    @property
    def sampling(self) -> str:
        """How the merchants draw the customer sample: ``secret`` (OS entropy) or
        ``seeded`` (simulation only; see :data:`SEEDED_NOTE`)."""
        return "seeded" if self.dp.seeded_sampling else "secret"

    def released(self, server_round: int, merchants: int) -> None:
        """Note that round ``server_round`` released a noised sum of the sampled
        customers' updates from ``merchants`` merchants, and append its pending line
        (what is known now) at once: the server has seen the sum, and a kill before
        :meth:`record` must not leave the round off the ledger."""
        self._released[server_round] = int(merchants)
        line = {
            "round": server_round, "pending": True, "unit": self.dp.unit,
            "placement": self.dp.placement, "sampling_rate": self.dp.customer_rate,
            "noise_multiplier": self.dp.noise_multiplier, "sampling": self.sampling,
            "customers": self.customers, "merchants_replied": int(merchants),
            "released_rounds": self.rounds + 1, "delta": self.delta, "released": True,
            "accounting": ACCOUNTING[self.dp.placement]}
        if self.dp.placement == "distributed":
            line["min_replies"] = self.min_replies
        self._append(line)

    def record(self, server_round: int, sampled: int, aggregated: int,
               clipping_norm: float) -> dict[str, Any]:
        """Compose round ``server_round`` if it released an update and append its line;
        ``sampled`` and ``aggregated`` (merchants) are the round book's, kept for the
        line. A round that released nothing spends nothing."""
        if server_round not in self._released:
            return {"epsilon": self.epsilon, "delta": self.delta}
        merchants = self._released.pop(server_round)
        self.rounds += 1
        self._set_epsilon()
        line = {
            "round": server_round, "unit": self.dp.unit, "placement": self.dp.placement,
            "sampling_rate": self.dp.customer_rate,
            "noise_multiplier": self.dp.noise_multiplier,
            "clipping_norm": float(clipping_norm), "sampling": self.sampling,
            "customers": self.customers, "merchants_sampled": sampled,
            "merchants_replied": merchants, "released_rounds": self.rounds,
            "delta": self.delta, "epsilon_rdp": self.epsilon_rdp,
            "epsilon_pld": self.epsilon_pld, "epsilon": self.epsilon, "released": True,
            "accounting": ACCOUNTING[self.dp.placement],
        }
        if self.dp.placement == "distributed":
            line["min_replies"] = self.min_replies
        self._append(line)
        return line

    def withheld(self, server_round: int, merchants: int | None, reason: str) -> None:
        """Note, in its own line, that round ``server_round`` released nothing (it spends
        nothing): ``reason`` says why (too few replies, the budget)."""
        self._released.pop(server_round, None)
        self._append({
            "round": server_round, "released": False, "reason": reason,
            "unit": self.dp.unit, "placement": self.dp.placement,
            "sampling_rate": self.dp.customer_rate,
            "noise_multiplier": self.dp.noise_multiplier, "sampling": self.sampling,
            "customers": self.customers, "merchants_replied": merchants,
            "min_replies": self.min_replies, "released_rounds": self.rounds,
            "delta": self.delta, "epsilon": self.epsilon})

    def _append(self, line: dict[str, Any]) -> None:
        if self.path is not None:
            jsonl.append(self.path, strict_json(line), allow_nan=False)

    def _set_epsilon(self) -> None:
        self.epsilon_rdp, self.epsilon_pld = self.epsilons(self.rounds)
        self.epsilon = min(self.epsilon_rdp, self.epsilon_pld)

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint keeps of the ledger (:data:`CHECKPOINT_KEY`): the released
        rounds counted so far and the settings they were counted with."""
        return {"unit": self.dp.unit, "placement": self.dp.placement,
                "sampling_rate": self.dp.customer_rate,
                "noise_multiplier": self.dp.noise_multiplier,
                "released_rounds": self.rounds}

    def replay(self, upto: int, checkpoint: dict[str, Any] | None = None) -> int:
        """Recompose the rounds <= ``upto`` already in the file (resume) with the
        customers' count they were accounted with; the number of lines kept.

        ``checkpoint``, the state of round ``upto``'s checkpoint: when it holds
        :data:`CHECKPOINT_KEY` (checkpoints of older versions do not), the ledger must
        hold at least the released rounds it counted, else (the file deleted, or DP
        newly enabled: ε would cover only the rounds after the resume) this raises,
        naming the file and both counts, before anything is rewritten.

        Later lines (rounds past the checkpoint, to be run again) are dropped under
        ``central``: the server is trusted, and the sums it saw but did not checkpoint
        are gone with it. Under ``distributed`` and ``local`` the server is not trusted
        and has already seen those rounds' noised sums: a released one stays spent,
        kept with ``"lost": true`` (it counts toward ε and the budget, on every later
        resume too); a line that released nothing is dropped. A pending line no complete
        line of its round follows (killed between the release and the round's record)
        is a released round like any other: dropped past the checkpoint under
        ``central``, kept lost under the others. A last line a kill cut is dropped under
        ``central``; under the others it is counted as a released round with this run's
        settings, since it may have been one (ε is not under-counted): every complete
        line, dropped or not, and its readable part must then show them; unless it is
        the complete line of the round whose pending line precedes it, which that line
        counts already. A line (a cut one included) accounted under another
        ``privacy.placement`` than this run's is refused: the placement decides which
        lines are dropped."""
        if self.path is None:
            return 0
        if not self.path.exists():
            check_checkpoint(self.path, checkpoint, upto, 0, "customer", _customer_settings)
            return 0
        lines, cut = jsonl.read_with_cut(self.path)
        lines = settled(lines)
        check_checkpoint(self.path, checkpoint, upto, sum(
            1 for line in lines if line.get("released", True)
            and (line["round"] <= upto or line.get("lost"))), "customer", _customer_settings)
        trusted = self.dp.placement == "central"
        for line in lines:  # every line: the placement decides which ones are dropped
            self._check_placement(line.get("placement"), f"round {line.get('round')}")
        kept: list[dict[str, Any]] = []
        for line in lines:
            if line["round"] <= upto or line.get("lost"):
                kept.append(line)
            elif not trusted and line.get("released", True):
                kept.append({**line, "lost": True})
        completes = cut is not None and _completes_pending(cut[1], lines)
        counted_cut = cut is not None and not trusted and not completes
        # A cut line's round is counted with this run's settings: every complete line is
        # then checked (one past the checkpoint that released nothing, dropped below,
        # too), so that the settings it is counted with are confirmed by a checked line.
        for line in lines if counted_cut else kept:
            self._check_settings(line)
        if cut is not None:
            log.warning("%s: line %d is cut (the run was stopped while writing it); %s",
                        self.path, cut[0], "dropped" if trusted else
                        "dropped: its round's pending line counts it" if completes else
                        "counted as a released round, since it may have been one")
            self._check_cut_settings(cut, confirmed=bool(lines), counted=counted_cut)
            if counted_cut:
                kept.append(self._cut_round(max([upto, *(r["round"] for r in lines)]) + 1))
        counts = [line["customers"] for line in kept if line.get("customers")]
        if counts:
            self.learn_customers(int(counts[-1]))
        self.rounds = sum(1 for line in kept if line.get("released", True))
        if self.rounds and not math.isnan(self.delta):  # else once the count is learnt
            self._set_epsilon()
        atomic.write_text(self.path, "".join(json.dumps(strict_json(line), allow_nan=False)
                                             + "\n" for line in kept))
        return len(kept)

    def _check_settings(self, line: dict[str, Any]) -> None:
        """Raise when ``line`` was accounted with another unit, customer rate, noise or
        sampling mode than this run's."""
        if line.get("unit") != "customer" or line.get("sampling_rate") != \
                self.dp.customer_rate or line.get("noise_multiplier") != \
                self.dp.noise_multiplier:
            raise ValueError(f"{self.path}: round {line['round']} was accounted with "
                             "other privacy settings (privacy.unit, customer-rate or "
                             "noise-multiplier differ): resume with the same ones")
        if line.get("sampling") != self.sampling:
            raise ValueError(
                f"{self.path}: round {line['round']} was accounted with "
                f"{line.get('sampling')!r} customer sampling and this run's is "
                f"{self.sampling!r} (privacy.seeded-sampling differs): epsilon would mix "
                "a secret and a recomputable sample; resume with the same setting")

    def _check_placement(self, theirs: Any, where: str) -> None:
        """Raise when a line was accounted under another ``privacy.placement`` than this
        run's: the placement decides whether the rounds the server saw past the
        checkpoint stay spent (a ``distributed`` ledger resumed as ``central`` would drop
        them and under-count ε)."""
        if theirs != self.dp.placement:
            raise ValueError(
                f"{self.path}: {where} was accounted under privacy.placement {theirs!r} "
                f"and this run's is {self.dp.placement!r}: the placement decides which "
                "rounds past the checkpoint stay spent, so epsilon would be miscounted; "
                "resume with the same setting")

    def _check_cut_settings(self, cut: tuple[int, str], *, confirmed: bool,
                            counted: bool) -> None:
        """Raise when the cut line's readable part names another placement than this
        run's, or none while no complete line confirms it; and, when its round is
        ``counted`` with this run's settings (:meth:`_cut_round`), which must then be its
        own, when it names other privacy settings, or no noise while no complete line
        confirms them."""
        number, text = cut
        placement = _cut_field(text, "placement")
        if placement is not None:
            self._check_placement(json.loads(placement), f"line {number} (cut)")
        elif not confirmed and not counted:  # counted: no noise either, refused below
            raise ValueError(
                f"{self.path}: line {number}, its only line, was cut before its placement "
                f"was written: this run (privacy.placement {self.dp.placement!r}) would "
                "drop its round, which is right only if its run was under that placement "
                "too (a 'distributed' or 'local' round stays spent): if it was, remove "
                "the file and resume; else start a new run in another folder")
        if not counted:
            return
        ours = {"unit": self.dp.unit, "sampling_rate": self.dp.customer_rate,
                "noise_multiplier": self.dp.noise_multiplier, "sampling": self.sampling}
        for key, value in ours.items():
            found = _cut_field(text, key)
            if found is not None and json.loads(found) != value:
                raise ValueError(f"{self.path}: line {number} (cut) was accounted with "
                                 f"{key} {json.loads(found)}, this run's is {value}: "
                                 "resume with the same privacy settings")
        if not confirmed and '"noise_multiplier": ' not in text:
            raise ValueError(
                f"{self.path}: line {number}, its only line, was cut before its noise was "
                "written, so the noise its round was released with is unknown and its "
                "epsilon cannot be bounded here: start a new run in another folder, and "
                "count that round as released with the settings its run was started with")

    def _cut_round(self, server_round: int) -> dict[str, Any]:
        """The line of a round whose line a kill cut: released, with this run's settings."""
        return {"round": server_round, "unit": self.dp.unit, "placement": self.dp.placement,
                "sampling_rate": self.dp.customer_rate,
                "noise_multiplier": self.dp.noise_multiplier, "sampling": self.sampling,
                "customers": self.customers or None, "released": True, "lost": True,
                "cut": True}

    def summary_fields(self) -> dict[str, Any]:
        """What ``federation.json`` says about the unit and the accounting."""
        threat = THREAT_MODEL[self.dp.placement]
        if self.dp.seeded_sampling:
            threat = f"{threat}; {SEEDED_NOTE}"
        return {"mode": f"customer-{self.dp.placement}", "unit": "customer",
                "unit_text": UNIT_TEXT, "placement": self.dp.placement,
                "threat_model": threat, "sampling": self.sampling,
                "sampling_rate": self.dp.customer_rate, "customers": self.customers,
                "released_rounds": self.rounds, "epsilon_rdp": self.epsilon_rdp,
                "epsilon_pld": self.epsilon_pld, "accounting": ACCOUNTING[self.dp.placement],
                **({"min_replies": self.min_replies}
                   if self.dp.placement == "distributed" else {})}


def settled(lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ledger's ``lines`` without each pending line that its round's complete line
    follows: one line per released round. A pending line left alone (the run was
    killed after the release, before the round's record) stays: its round was
    released."""
    out = []
    for i, line in enumerate(lines):
        after = lines[i + 1] if i + 1 < len(lines) else None
        if (line.get("pending") and not line.get("lost") and after is not None
                and after.get("round") == line.get("round")
                and not after.get("pending") and not after.get("lost")):
            continue
        out.append(line)
    return out


def _completes_pending(text: str, lines: list[dict[str, Any]]) -> bool:
    """Whether the cut line ``text`` is of the round whose pending line is the last of
    ``lines`` (its complete line, which a kill cut: the pending line counts the round)."""
    if not lines or not lines[-1].get("pending") or lines[-1].get("lost"):
        return False
    found = _cut_field(text, "round")
    return found is not None and json.loads(found) == lines[-1].get("round")


def _cut_field(text: str, key: str) -> str | None:
    """The JSON text of ``key``'s value in a cut line's readable part, None when the cut
    came before it was written whole."""
    found = re.search(rf'"{key}": ("[^"]*"|[-+0-9.eE]+)[,}}]', text)
    return found.group(1) if found else None

"""Membership inference with customers as the unit, and a canary test.

The snapshot-level audit (:func:`simulations.privacy_audit.membership_audit`) compares
training snapshots with later, test-split ones, so a shift over time moves its AUC.
Here the audit makes its own run and removes that confound:

- **Split**: the snapshots are built once from the whole log on one shared calendar;
  then, in every merchant, a seeded share (``held_out``) of the customers that have
  training-period snapshots is withheld: their events never reach a shard, so the
  federation never trains on them. Members are the other customers of the same
  merchants; both sides are scored on their training-period snapshots only (the same
  cutoffs), so members and non-members share merchants *and* period.
- **Attack**: a customer's score is the mean log-loss of the decay head over its
  training-period snapshots (low = member; Yeom et al., 2018), and a calibrated variant:
  each snapshot's loss standardised among the candidates of the same merchant and label
  (:func:`~simulations.privacy_audit.calibrated_scores`), then averaged per customer.
  ROC-AUC with a seeded bootstrap interval over customers (0.5 = nothing learnt).
- **Canaries**: ``2 k`` inserted customers in pairs of the same merchant, each with its
  own unusual sequence: a category no real customer has and a seeded 8-event pattern of
  event types drawn uniformly (real logs are mostly views) repeated in sessions on
  seeded days over the whole period; one of each pair trains, the other is withheld.
  The attack AUC on the k trained canaries against the k withheld ones is the canary
  test: it should fall towards 0.5 when customer-level DP bounds what one customer can
  do to the model.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common import jsonl
from common.progress import SILENT, Progress
from common.snapshots import Snapshots
from common.vocabulary import EVENT_TYPES
from simulations.privacy_audit import attack_auc, calibrated_scores

log = logging.getLogger(__name__)

#: Events in a canary's repeated pattern, and the days between its sessions (low, high).
CANARY_PATTERN = 8
CANARY_GAP_DAYS = (2, 9)


@dataclasses.dataclass
class AuditSplit:
    """Who trains and who is withheld: ``(merchant, customer)`` pairs."""

    members: list[tuple[str, str]]
    held_out: list[tuple[str, str]]
    canary_members: list[tuple[str, str]]
    canary_held_out: list[tuple[str, str]]

    def withheld(self) -> set[tuple[str, str]]:
        return set(self.held_out) | set(self.canary_held_out)


def make_canaries(events: pd.DataFrame, k: int, *, seed: int,
                  merchants: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The log with ``2 k`` canary customers added, and the canaries' table.

    Canary pair j lives in one merchant (seeded choice among ``merchants``, default the
    log's); each canary has its own category ``canary-<merchant>-<i>``, its own seeded
    pattern of :data:`CANARY_PATTERN` event types (uniform over ``EVENT_TYPES``) and its
    own seeded session days, the pattern repeated once a session from the log's first
    day to its last. The table has ``user_id``, ``merchant_id``, ``pair`` and ``member``
    (True for the first of each pair, the one that will train).
    """
    if k < 1:
        raise ValueError(f"canaries: expected k >= 1, got {k}")
    if len(events) == 0:
        raise ValueError("canaries: the event log is empty")
    rng = np.random.default_rng(seed)
    pool = sorted(merchants or events["merchant_id"].astype(str).unique().tolist())
    start = events["timestamp"].min().floor("D")
    days = max(1, int((events["timestamp"].max() - start) / pd.Timedelta(days=1)))
    rows: list[dict[str, Any]] = []
    table = []
    for pair in range(k):
        merchant = str(rng.choice(pool))
        for member in (True, False):
            i = 2 * pair + (0 if member else 1)
            user = f"{merchant}-canary{i:03d}"
            pattern = rng.choice(len(EVENT_TYPES), size=CANARY_PATTERN)
            day = float(rng.integers(0, CANARY_GAP_DAYS[1]))
            while day < days:
                at = start + pd.Timedelta(days=day, hours=float(rng.uniform(8, 20)))
                for j, e in enumerate(pattern):
                    rows.append({"user_id": user, "timestamp": at + pd.Timedelta(seconds=30 * j),
                                 "event": EVENT_TYPES[int(e)], "item_id": f"{user}-item{j % 3}",
                                 "category_id": f"canary-{merchant}-{i}",
                                 "merchant_id": merchant,
                                 "value": 25.0 if EVENT_TYPES[int(e)] == "purchase" else 0.0})
                day += float(rng.integers(*CANARY_GAP_DAYS))
            table.append({"user_id": user, "merchant_id": merchant, "pair": pair,
                          "member": member})
    added = pd.DataFrame(rows)[list(events.columns)].astype(events.dtypes.to_dict())
    out = pd.concat([events, added], ignore_index=True)
    return out, pd.DataFrame(table)


def split_customers(snaps: Snapshots, held_out: float, *, seed: int,
                    canaries: pd.DataFrame | None = None) -> AuditSplit:
    """Withhold a seeded share of each merchant's customers (canaries apart).

    Candidates are the customers with training-split snapshots; in every merchant with
    at least two of them, ``round(held_out * n)`` (at least one, at most n - 1) are
    withheld, the rest are members. Canaries are split by their table's ``member``.
    """
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held-out share: expected 0 < share < 1, got {held_out}")
    canary_ids = set() if canaries is None else set(canaries["user_id"].astype(str))
    train = snaps.split == 0
    pairs = pd.DataFrame({"merchant": snaps.merchant_id[train].astype(str),
                          "user": snaps.user_id[train].astype(str)}).drop_duplicates()
    rng = np.random.default_rng(seed)
    members, held = [], []
    for merchant, group in sorted(pairs.groupby("merchant"), key=lambda g: str(g[0])):
        users = sorted(u for u in group["user"] if u not in canary_ids)
        n_out = min(max(1, round(held_out * len(users))), len(users) - 1)
        out = set(rng.choice(users, size=n_out, replace=False).tolist()) if n_out > 0 else set()
        members += [(str(merchant), u) for u in users if u not in out]
        held += [(str(merchant), u) for u in sorted(out)]
    c_in: list[tuple[str, str]] = []
    c_out: list[tuple[str, str]] = []
    if canaries is not None:
        for row in canaries.itertuples():
            (c_in if row.member else c_out).append((str(row.merchant_id), str(row.user_id)))
    return AuditSplit(members, held, c_in, c_out)


def _keys(merchant: np.ndarray, user: np.ndarray) -> np.ndarray:
    return np.char.add(np.char.add(merchant.astype(str), "\x1f"), user.astype(str))


def _pair_keys(pairs: list[tuple[str, str]]) -> np.ndarray:
    return np.array([f"{m}\x1f{u}" for m, u in pairs], dtype=str)


def training_data(data: Any, split: AuditSplit) -> Any:
    """A copy of ``data`` (a ``PreparedData``) without the withheld customers' events,
    interventions and snapshots; the calendar and merchants stay."""
    gone = split.withheld()
    ev = data.events
    ev_keys = ev["merchant_id"].astype(str) + "\x1f" + ev["user_id"].astype(str)
    keep_events = ~ev_keys.isin({f"{m}\x1f{u}" for m, u in gone}).to_numpy()
    iv = data.interventions
    if len(iv):
        iv_keys = iv["merchant_id"].astype(str) + "\x1f" + iv["user_id"].astype(str)
        iv = iv[~iv_keys.isin({f"{m}\x1f{u}" for m, u in gone}).to_numpy()].reset_index(drop=True)
    s = data.snapshots
    keep_snaps = ~np.isin(_keys(s.merchant_id, s.user_id), _pair_keys(sorted(gone)))
    return dataclasses.replace(data, events=ev[keep_events].reset_index(drop=True),
                               interventions=iv, snapshots=s.subset(keep_snaps))


def customer_scores(snaps: Snapshots, loss: np.ndarray,
                    pairs: list[tuple[str, str]]) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``loss`` (one per row of ``snaps``) over each customer's training-split
    rows, for ``pairs`` in order, and how many rows each had (customers without such rows
    are dropped from both)."""
    keys = _keys(snaps.merchant_id, snaps.user_id)
    train = snaps.split == 0
    frame = pd.DataFrame({"key": keys[train], "loss": loss[train]})
    agg = frame.groupby("key")["loss"].agg(["mean", "size"])
    wanted = [k for k in _pair_keys(pairs).tolist() if k in agg.index]
    return agg.loc[wanted, "mean"].to_numpy(float), agg.loc[wanted, "size"].to_numpy(int)


def score_customers(snaps: Snapshots, loss: np.ndarray, split: AuditSplit, *, seed: int,
                    n_boot: int) -> dict[str, Any]:
    """Both attacks on members against held-out customers, and on the canaries."""
    train = snaps.split == 0
    calibrated = np.zeros(len(snaps))
    merchants = snaps.merchant_id.astype(str)
    for m in np.unique(merchants[train]):
        rows = train & (merchants == m)
        calibrated[rows] = calibrated_scores(loss[rows], snaps.decay[rows])
    out: dict[str, Any] = {}
    for name, (inside, outside) in {
            "customers": (split.members, split.held_out),
            "canaries": (split.canary_members, split.canary_held_out)}.items():
        if not inside or not outside:
            continue
        m_loss, m_rows = customer_scores(snaps, loss, inside)
        n_loss, n_rows = customer_scores(snaps, loss, outside)
        if len(m_loss) == 0 or len(n_loss) == 0:
            raise ValueError(f"{name}: no member or no held-out customer has training-period "
                             "snapshots")
        m_cal, _ = customer_scores(snaps, calibrated, inside)
        n_cal, _ = customer_scores(snaps, calibrated, outside)
        out[name] = {
            "members": int(len(m_loss)), "non_members": int(len(n_loss)),
            "member_snapshots": int(m_rows.sum()), "non_member_snapshots": int(n_rows.sum()),
            "member_loss": float(m_loss.mean()), "non_member_loss": float(n_loss.mean()),
            **attack_auc(m_loss, n_loss, seed=seed, n_boot=n_boot),
            "calibrated": attack_auc(m_cal, n_cal, seed=seed, n_boot=n_boot)}
    return out


def prepare_audit(exp: Any, *, held_out: float, canaries: int, seed: int,
                  progress: Progress = SILENT) -> tuple[Any, AuditSplit]:
    """The experiment's data (with ``canaries`` pairs inserted) and the audit's split.

    Mirrors :func:`simulations.experiment.prepare`, with the canaries added to the log
    before the snapshots are built so that they get snapshots like everyone else.
    """
    import time

    from common.snapshots import build_snapshots
    from simulations.experiment import CHUNK_EVENTS, PreparedData, load_source, shared_calendar

    started = time.perf_counter()
    with progress.task("loading events", total=1, unit="logs") as task:
        events, interventions, truth = load_source(exp)
        task.advance(1, events=len(events))
    table = None
    if canaries:
        events, table = make_canaries(events, canaries, seed=seed)
    snap_cfg = shared_calendar(events, exp.snapshots)
    snaps, report = build_snapshots(events, snap_cfg, interventions, progress=progress,
                                    chunk_events=CHUNK_EVENTS)
    sizes = pd.Series(snaps.merchant_id[snaps.split == 0].astype(str)).value_counts()
    keep = sorted(sizes[sizes >= max(exp.data.min_merchant_snapshots, 1)].index.tolist())
    if not keep:
        raise ValueError("no merchant has enough training snapshots "
                         f"(data.min-merchant-snapshots = {exp.data.min_merchant_snapshots})")
    snaps = snaps.subset(np.isin(snaps.merchant_id.astype(str), keep))
    if table is not None:
        table = table[table["merchant_id"].isin(keep)]
    data = PreparedData(events=events, interventions=interventions, truth=truth,
                        snapshots=snaps, report=report, snapshot_config=snap_cfg,
                        merchants=keep, actions=snap_cfg.actions,
                        seconds=time.perf_counter() - started)
    return data, split_customers(snaps, held_out, seed=seed, canaries=table)


def customer_audit(exp: Any, run_dir: Path, *, held_out: float = 0.2, canaries: int = 0,
                   seed: int = 0, n_boot: int = 500,
                   progress: Progress = SILENT) -> dict[str, Any]:
    """Train the federation of ``exp`` without the withheld customers into ``run_dir``,
    attack its ``model.keras`` and write ``customer_audit.json`` beside it."""
    from common.metrics import log_losses
    from common.model import load_model
    from common.training import predict
    from simulations.experiment import write_json
    from simulations.federated import run_federated

    data, split = prepare_audit(exp, held_out=held_out, canaries=canaries, seed=seed,
                                progress=progress)
    everyone = data.snapshots.split_part("train")
    write_json(run_dir / "config.json", dict(exp.flat))
    write_json(run_dir / "audit_split.json", dataclasses.asdict(split))
    run_federated(exp, training_data(data, split), run_dir, progress=progress)
    model = load_model(run_dir / "model.keras")
    loss = log_losses(everyone.decay, predict(model, everyone)["decay"])
    result = {"run": str(run_dir), "model": str(run_dir / "model.keras"), "seed": seed,
              "held_out_share": held_out, "canary_pairs": canaries,
              "privacy": _privacy_summary(exp, run_dir),
              **score_customers(everyone, loss, split, seed=seed, n_boot=n_boot)}
    write_json(run_dir / "customer_audit.json", result)
    return result


def _privacy_summary(exp: Any, run_dir: Path) -> dict[str, Any]:
    """The unit, placement, noise and the ledger's last ε (none without DP)."""
    p = exp.privacy
    on = p.customer_level or p.enabled
    out: dict[str, Any] = {
        "dp": on, "unit": p.unit if on else None, "mode": p.mode,
        "placement": p.placement if p.customer_level else None,
        "noise_multiplier": p.noise_multiplier if on else None, "epsilon": None,
        "delta": None}
    ledger = run_dir / "privacy.jsonl"
    if ledger.exists():
        lines = jsonl.read(ledger)
        released = [r for r in lines if r.get("released", True) and "epsilon" in r]
        if released:
            out["epsilon"], out["delta"] = released[-1]["epsilon"], released[-1].get("delta")
    return out


def format_customer_audit(out: dict[str, Any]) -> str:
    p = out["privacy"]
    eps = "n/a" if p["epsilon"] is None else f"{p['epsilon']:.3g} (delta {p['delta']:.2g})"
    dp = (f"unit {p['unit']}, " + (f"placement {p['placement']}" if p["placement"]
                                   else f"mode {p['mode']}")
          + f", noise {p['noise_multiplier']}, epsilon {eps}") if p["dp"] else "no DP"
    lines = [f"model: {out['model']}", f"privacy: {dp}",
             "set        members  non-members  member loss  non-member loss     AUC "
             "(95% interval)   calibrated AUC (95% interval)"]
    for name in ("customers", "canaries"):
        r = out.get(name)
        if not r:
            continue
        c = r["calibrated"]
        lines.append(f"{name:<10} {r['members']:>7} {r['non_members']:>12} "
                     f"{r['member_loss']:>12.4f} {r['non_member_loss']:>16.4f} "
                     f"{r['auc']:>7.4f} ({r['ci_low']:.3f}..{r['ci_high']:.3f}) "
                     f"{c['auc']:>8.4f} ({c['ci_low']:.3f}..{c['ci_high']:.3f})")
    lines.append("members: customers whose snapshots trained the model; non-members: "
                 "withheld customers of the same merchants, scored on the same "
                 "(training-period) cutoffs; 0.5 = no leak")
    return "\n".join(lines)

"""What leaves a merchant, and what the trained model gives away about its rows.

- ``egress_summary``: bytes each way per round from ``metrics.jsonl`` and the metric
  names a client may send (``client.app.TRAIN_METRICS`` / ``EVALUATE_METRICS``).
- ``membership_audit``: a loss-threshold membership-inference attack (Yeom et al.,
  2018) on the decay head: a row with low log-loss is guessed to be a training row.
  Members are the training snapshots of a seeded sample of merchants, non-members
  their held-out (test-split) snapshots; the attack's ROC-AUC comes with a seeded
  bootstrap interval. 0.5 = the attacker learns nothing. A calibrated variant needs no
  shadow model either: each candidate's loss is standardised among the candidates of
  the same merchant and label (what an attacker holding the rows can do without knowing
  who is a member), which removes the difference in difficulty between merchants and
  between the two labels that a single threshold confuses with membership.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from common import jsonl
from common.snapshots import Snapshots

log = logging.getLogger(__name__)

CONFOUNDER_NOTE = (
    "members (training split) and non-members (test split) also differ in time period: "
    "test snapshots come later, so a shift over time alone can move the AUC away from "
    "0.5 (either way); the AUC is not a clean measure of membership leakage")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is this a federated run folder?")
    return jsonl.read(path)


def egress_summary(run_dir: str | Path) -> dict[str, Any]:
    """Bytes up/down per round (and per participating client) and the allowed metrics."""
    run = Path(run_dir).resolve()
    rows = [r for r in _read_jsonl(run / "metrics.jsonl") if r.get("round", 0) > 0]
    if not rows:
        raise ValueError(f"{run / 'metrics.jsonl'} records no round: the run was stopped "
                         "before its first round ended, so no byte count was kept (the "
                         "round in progress is run again on --resume)")
    finished = (run / "model.keras").is_file()
    from client.app import EVALUATE_METRICS, TRAIN_METRICS

    rounds = []
    for r in rows:
        sampled, replied = int(r.get("sampled", 0)), int(r.get("replied", 0))
        down, up = int(r.get("bytes_down", 0)), int(r.get("bytes_up", 0))
        rounds.append({
            "round": r["round"], "sampled": sampled, "replied": replied,
            "bytes_down": down, "bytes_up": up,
            "bytes_down_per_client": down / sampled if sampled else 0.0,
            "bytes_up_per_client": up / replied if replied else 0.0,
        })
    seen_train = sorted({k for r in rows for k in (r.get("train") or {})})
    seen_eval = sorted({k for r in rows for k in (r.get("client_eval") or {})})
    # The attribution round's replies (server/attribution.py) are evaluate replies too.
    attributions = run / "attributions.json"
    if attributions.exists():
        seen_eval = sorted(set(seen_eval)
                           | set(json.loads(attributions.read_text()).get("reply_metrics", [])))
    privacy = run / "privacy.jsonl"
    return {
        "run": str(run), "rounds": rounds,
        "total_bytes_down": sum(r["bytes_down"] for r in rounds),
        "total_bytes_up": sum(r["bytes_up"] for r in rounds),
        "allowed_train_metrics": list(TRAIN_METRICS),
        "allowed_evaluate_metrics": list(EVALUATE_METRICS),
        "seen_train_metrics": seen_train, "seen_evaluate_metrics": seen_eval,
        "unexpected_metrics": sorted((set(seen_train) - set(TRAIN_METRICS))
                                     | (set(seen_eval) - set(EVALUATE_METRICS))),
        "differential_privacy": privacy.exists(),
        "finished": finished,
        "notes": ([] if finished else [
            f"the run did not finish (no model.keras): only the {len(rounds)} round(s) "
            "recorded before it stopped are counted; a round in progress when it stopped "
            "may have sent more"]) + [
            "metrics.jsonl records per-round totals only: per-client figures are the round "
            "total divided by the clients sampled (down) or aggregated (up); rejected or "
            "failed replies are not counted up",
            "bytes are the weight tensors' payload, without message framing",
            "the scalar metrics are sent in the clear; differential privacy (if on) covers "
            "the model updates only, not these metrics",
        ],
    }


def format_egress(summary: dict[str, Any]) -> str:
    lines = [f"run: {summary['run']}",
             "round  sampled replied     bytes down       bytes up   down/client   up/client"]
    for r in summary["rounds"]:
        lines.append(f"{r['round']:>5} {r['sampled']:>8} {r['replied']:>7} "
                     f"{r['bytes_down']:>14,} {r['bytes_up']:>14,} "
                     f"{r['bytes_down_per_client']:>13,.0f} {r['bytes_up_per_client']:>11,.0f}")
    lines.append(f"total {'':>16} {summary['total_bytes_down']:>14,} "
                 f"{summary['total_bytes_up']:>14,}")
    lines.append("train metrics allowed:    " + ", ".join(summary["allowed_train_metrics"]))
    lines.append("evaluate metrics allowed: " + ", ".join(summary["allowed_evaluate_metrics"]))
    lines.append("seen in metrics.jsonl:    train " + (", ".join(summary["seen_train_metrics"])
                 or "-") + "; evaluate " + (", ".join(summary["seen_evaluate_metrics"]) or "-"))
    bad = summary["unexpected_metrics"]
    lines.append("unexpected metric names:  " + (", ".join(bad) if bad else "none"))
    lines += [f"note: {n}" for n in summary["notes"]]
    return "\n".join(lines)


def attack_auc(member_loss: np.ndarray, nonmember_loss: np.ndarray, *, seed: int = 0,
               n_boot: int = 500) -> dict[str, float]:
    """ROC-AUC of "low loss = member" with a bootstrap 95 % interval (classes resampled
    separately, so both are always present)."""
    from sklearn.metrics import roc_auc_score

    def auc(m: np.ndarray, n: np.ndarray) -> float:
        y = np.r_[np.ones(len(m)), np.zeros(len(n))]
        return float(roc_auc_score(y, -np.r_[m, n]))

    rng = np.random.default_rng(seed)
    boots = [auc(rng.choice(member_loss, len(member_loss)),
                 rng.choice(nonmember_loss, len(nonmember_loss))) for _ in range(n_boot)]
    low, high = np.percentile(boots, [2.5, 97.5])
    return {"auc": auc(member_loss, nonmember_loss), "ci_low": float(low),
            "ci_high": float(high), "n_boot": n_boot}


def calibrated_scores(loss: np.ndarray, label: np.ndarray) -> np.ndarray:
    """One merchant's candidate losses standardised within each label."""
    out = np.zeros(len(loss))
    for y in np.unique(label):
        group = label == y
        values = loss[group]
        out[group] = (values - values.mean()) / (values.std() + 1e-12)
    return out


def _merchant_snapshots(run: Path, snapshot_config: Any,
                        data: Any = None) -> dict[str, Snapshots]:
    """Each merchant's snapshots: those of ``data`` (a ``PreparedData``) if given, else
    rebuilt from ``shards/`` (federated run) or, failing that, from the run's
    ``config.json`` (the experiment's own data preparation)."""
    if data is not None:
        ids = data.snapshots.merchant_id.astype(str)
        return {m: data.snapshots.subset(ids == m) for m in data.merchants}
    shards = sorted((run / "shards").glob("[0-9][0-9][0-9][0-9][0-9].parquet"))
    if shards:
        from client.shards import ShardCache, shard_cache_bytes

        cache = ShardCache(shard_cache_bytes())
        out = {}
        for path in shards:
            inter = path.with_name(path.stem + "-interventions.parquet")
            out[path.stem] = cache.load(str(path), "canonical",
                                        str(inter) if inter.exists() else None,
                                        snapshot_config)
        return out
    config = run / "config.json"
    if not config.exists():
        raise FileNotFoundError(f"{run} has neither shards/ nor config.json: cannot rebuild "
                                "the training data")
    from simulations.experiment import prepare
    from simulations.settings import experiment_from_flat

    data = prepare(experiment_from_flat(json.loads(config.read_text())))
    s = data.snapshots
    ids = s.merchant_id.astype(str)
    return {m: s.subset(ids == m) for m in data.merchants}


def membership_audit(run_dir: str | Path, *, merchants: int = 4, seed: int = 0,
                     n_boot: int = 500, data: Any = None) -> dict[str, Any]:
    """Loss-threshold and calibrated membership inference on ``<run>/model.keras``.

    ``data`` (a ``PreparedData``) supplies the merchants' snapshots when the run folder
    has no shards (the centralised model of a comparison).
    """
    from common.bundle import load_model_bundle
    from common.metrics import log_losses
    from common.training import predict

    run = Path(run_dir).resolve()
    model_path = run / "model.keras" if run.is_dir() else run
    run = model_path.parent
    if not model_path.exists():
        raise FileNotFoundError(f"{model_path} not found")
    bundle = load_model_bundle(model_path)
    per_merchant = _merchant_snapshots(run, bundle.snapshots, data)
    names = sorted(per_merchant)
    rng = np.random.default_rng(seed)
    picked = sorted(rng.choice(names, size=min(merchants, len(names)), replace=False).tolist())
    member, nonmember, rows = [], [], []
    calib_m, calib_n = [], []
    for name in picked:
        snaps = per_merchant[name]
        train, test = snaps.split_part("train"), snaps.split_part("test")
        if len(train) == 0 or len(test) == 0:
            log.info("merchant %s has no training or no held-out snapshots: skipped", name)
            continue
        m_loss = log_losses(train.decay, predict(bundle.model, train)["decay"])
        n_loss = log_losses(test.decay, predict(bundle.model, test)["decay"])
        member.append(m_loss)
        nonmember.append(n_loss)
        labels = np.r_[train.decay, test.decay]
        z = calibrated_scores(np.r_[m_loss, n_loss], labels)
        calib_m.append(z[:len(m_loss)])
        calib_n.append(z[len(m_loss):])
        rows.append({"merchant": name, "members": len(m_loss), "non_members": len(n_loss),
                     "member_loss": float(m_loss.mean()),
                     "non_member_loss": float(n_loss.mean())})
    if not member:
        raise ValueError(f"{run}: no sampled merchant has both training and test snapshots")
    m_all, n_all = np.concatenate(member), np.concatenate(nonmember)
    result = attack_auc(m_all, n_all, seed=seed, n_boot=n_boot)
    calibrated = attack_auc(np.concatenate(calib_m), np.concatenate(calib_n), seed=seed,
                            n_boot=n_boot)
    return {"run": str(run), "model": str(model_path), "merchants": rows,
            "members": int(len(m_all)), "non_members": int(len(n_all)),
            "member_loss": float(m_all.mean()), "non_member_loss": float(n_all.mean()),
            **result, "calibrated": calibrated, "seed": seed, "note": CONFOUNDER_NOTE}


def format_audit(out: dict[str, Any]) -> str:
    lines = [f"model: {out['model']}",
             "merchant   members  non-members  member loss  non-member loss"]
    for r in out["merchants"]:
        lines.append(f"{r['merchant']:<10} {r['members']:>7} {r['non_members']:>12} "
                     f"{r['member_loss']:>12.4f} {r['non_member_loss']:>16.4f}")
    lines.append(f"loss-threshold attack ROC-AUC {out['auc']:.4f} "
                 f"(95% bootstrap interval {out['ci_low']:.4f} .. {out['ci_high']:.4f}, "
                 f"{out['n_boot']} resamples; 0.5 = no leak)")
    cal = out.get("calibrated")
    if cal:
        lines.append(f"calibrated attack ROC-AUC {cal['auc']:.4f} (95% interval "
                     f"{cal['ci_low']:.4f} .. {cal['ci_high']:.4f}; loss standardised per "
                     "merchant and label)")
    lines.append(f"note: {out['note']}")
    return "\n".join(lines)

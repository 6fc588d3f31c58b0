"""Batch scoring with the global model, and the bundle that carries the model's settings.

A model only makes sense with the snapshot settings it was trained with (sequence
length, hash buckets, tau, event weights, actions): the bundle is ``model.keras`` plus
a ``model.json`` sidecar of flat ``snapshots.*`` / ``policy.*`` keys.

``score_events`` builds the unlabelled snapshot of every user active before a cutoff,
predicts the three heads and applies the policy once over all users (a budget is
global). The snapshots are those of ``common.snapshots.features_at`` (the tests check
it), built by :func:`build_features` from a description of each user that the monitor
(``common.monitor``) keeps incrementally too: the recent events a snapshot looks at,
plus whole-history aggregates. Large logs are turned into features in chunks of whole
users, so memory follows the chunk, not the log.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from common import atomic
from common.config import PolicyConfig, SnapshotConfig, apply_overrides, from_flat, to_flat
from common.policy import choose_actions
from common.schema import DEFAULT_CATEGORY, DEFAULT_MERCHANT, EVENT_TYPES, DataError
from common.snapshots import (
    _TAU_SPAN,
    DAY,
    NUMERIC_FEATURES,
    SPLITS,
    STATIC_FEATURES,
    Snapshots,
    _features_at,
    _Log,
    _ranges,
    hash_categories,
    label_window,
)

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

SCORE_COLUMNS: tuple[str, ...] = ("user_id", "merchant_id", "decay_risk", "interest_forecast",
                                  "action", "uplift", "expected_gain", "category")
#: ``score_events`` progress: (users scored so far, users to score).
Progress = Callable[[int, int], None]
BUNDLE_FORMAT = "fedecay-model-bundle"
#: Rows per prediction call of the batch scorer (a fixed shape: XLA compiles it once).
PREDICT_BATCH = 1024
_SECOND = 1_000_000_000  # ns


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """A loaded model with the settings it needs; ``sources`` says where they came from."""

    model: keras.Model
    snapshots: SnapshotConfig
    policy: PolicyConfig
    sources: tuple[str, ...]


def sidecar_path(model_path: str | Path) -> Path:
    """``runs/x/model.keras`` -> ``runs/x/model.json``."""
    return Path(model_path).with_suffix(".json")


def save_model_bundle(model: keras.Model, snapshot_config: SnapshotConfig,
                      policy_config: PolicyConfig | None, path: str | Path) -> Path:
    """Save ``model`` as ``path`` (.keras) and its settings as the ``.json`` sidecar.

    Both files are written atomically (temp file, then rename). Returns the model path.
    """
    from common.model import save_model

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, path)
    write_model_settings(path, snapshot_config, policy_config)
    return path


def write_model_settings(model_path: str | Path, snapshot_config: SnapshotConfig,
                         policy_config: PolicyConfig | None) -> Path:
    """Write the ``model.json`` sidecar of an already saved model (atomically).

    With ``policy_config`` None only the snapshot settings are written; the policy then
    comes from the run's ``config.json``, ``--set`` or the defaults at load time.
    """
    flat: dict[str, Any] = {"format": BUNDLE_FORMAT, **to_flat(snapshot_config, "snapshots")}
    if policy_config is not None:
        flat.update(to_flat(policy_config, "policy"))
    side = sidecar_path(Path(model_path).resolve())
    return atomic.write_text(side, json.dumps(flat, indent=2, sort_keys=True) + "\n")


def _settings_file(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: cannot read model settings ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of flat config keys")
    return {k: v for k, v in data.items() if k.startswith(("snapshots.", "policy."))}


#: The settings a scoring model takes from ``--set``; anything else would be ignored.
MODEL_SECTIONS: tuple[str, ...] = ("snapshots", "policy")


def check_model_overrides(overrides: Sequence[str] | None) -> None:
    """Refuse ``--set`` keys a scoring model does not use, or values out of range, by
    name (``score`` and ``monitor`` read only ``snapshots.*`` and ``policy.*``)."""
    flat = apply_overrides({}, list(overrides or []))
    for key in flat:
        if key.split(".", 1)[0] not in MODEL_SECTIONS or "." not in key:
            raise ValueError(f"--set {key}: a model's settings are only snapshots.* and "
                             "policy.* keys")
    from_flat(SnapshotConfig, flat, "snapshots")
    from_flat(PolicyConfig, flat, "policy")


def load_model_bundle(path: str | Path,
                      overrides: Sequence[str] | None = None) -> ModelBundle:
    """Load a model and its settings.

    Settings, later ones winning: the defaults; the run's ``config.json`` in the model's
    folder (``snapshots.*`` / ``policy.*`` keys); the ``model.json`` sidecar;
    ``overrides`` (``key=value`` strings, as ``--set``). The shape-bearing settings
    (``max-len``, ``hash-buckets``, the number of actions) are checked against the model.
    """
    from common.model import load_model

    check_model_overrides(overrides)  # before the model: a typo answers at once
    path = Path(path).resolve()
    model = load_model(path)
    flat: dict[str, Any] = {}
    sources: list[str] = []
    for candidate in (path.parent / "config.json", sidecar_path(path)):
        if candidate.is_file():
            flat.update(_settings_file(candidate))
            sources.append(str(candidate))
    if overrides:
        flat = apply_overrides(flat, list(overrides))
        sources.append("--set")
    if not sources:
        log.warning("%s: no model.json or config.json beside the model; using default "
                    "snapshot settings (give the training ones with --set snapshots.KEY=VALUE)",
                    path)
    snaps = from_flat(SnapshotConfig, flat, "snapshots")
    policy = from_flat(PolicyConfig, flat, "policy")
    _check_is_scorer(model, path)
    check_model_settings(model, snaps, str(path))
    return ModelBundle(model, snaps, policy, tuple(sources) or ("defaults",))


def _check_is_scorer(model: keras.Model, path: Path) -> None:
    """Refuse a readable Keras model that is not one of ours, naming what it lacks."""
    try:
        inputs = model.input if isinstance(model.input, dict) else {}
    except (AttributeError, ValueError):  # a subclassed model that was never called
        inputs = {}
    layers = {layer.name for layer in model.layers}
    missing = [f"input '{k}'" for k in ("events",) if k not in inputs]
    missing += [f"layer '{k}'" for k in ("category_embedding", "activation") if k not in layers]
    if missing:
        raise ValueError(f"{path} is a Keras model but not a fedecay scoring model "
                         f"(no {', '.join(missing)})")


def check_model_settings(model: keras.Model, snaps: SnapshotConfig, name: str = "model") -> None:
    """Raise ``ValueError`` naming every key whose value cannot fit the model."""
    fits = {
        "max-len": (snaps.max_len, int(model.input["events"].shape[1])),
        "hash-buckets": (snaps.hash_buckets, model.get_layer("category_embedding").input_dim - 1),
    }
    wrong = {k: v for k, (mine, v) in fits.items() if mine != v}
    problems = [f"snapshots.{k} is {fits[k][0]} but {name} was built for {v}"
                for k, v in wrong.items()]
    n_actions = int(model.get_layer("activation").units)
    if n_actions != len(snaps.actions):
        problems.append(f"snapshots.actions lists {len(snaps.actions)} actions "
                        f"({','.join(snaps.actions)}) but {name} scores {n_actions}")
    if problems:
        fix = " ".join(f"--set snapshots.{k}={v}" for k, v in wrong.items())
        raise ValueError("config key " + "; ".join(problems)
                         + (f" (give the training settings: {fix})" if fix else ""))


def unix_ns(timestamps: Any) -> np.ndarray:
    """Unix nanoseconds of a datetime column, whatever its unit (naive = UTC).

    A ``datetime64[ns]`` column is read in place, not copied.
    """
    index = pd.DatetimeIndex(timestamps, copy=False)
    return (index if index.unit == "ns" else index.as_unit("ns")).asi8


def cutoff_ns(events: pd.DataFrame, at: Any = None) -> int:
    """The cutoff as unix ns on a whole second (rounded up); default: just after the log.

    On whole seconds "before the cutoff" means the same for every feature of the
    snapshot builder (its windows are counted in whole seconds).
    """
    if at is None or at == "":
        last = int(unix_ns(events["timestamp"]).max())
        return (last // _SECOND + 1) * _SECOND
    try:
        stamp = pd.Timestamp(at)
    except (TypeError, ValueError):
        raise ValueError(f"--at {at!r}: expected an ISO-8601 time") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    ns = int(stamp.as_unit("ns").value)
    return -(-ns // _SECOND) * _SECOND


def score_frame(user_id: np.ndarray, merchant_id: np.ndarray, pred: Mapping[str, np.ndarray],
                fading_category: np.ndarray, snap_cfg: SnapshotConfig,
                policy_cfg: PolicyConfig) -> pd.DataFrame:
    """Predictions and the policy's decisions as the score table (``SCORE_COLUMNS``)."""
    risk = np.asarray(pred["decay"], dtype=np.float64)
    decision = choose_actions(risk, pred["activation"], policy_cfg, snap_cfg.actions,
                              fading_category)
    return pd.DataFrame({
        "user_id": pd.Series(user_id, dtype="string"),
        "merchant_id": pd.Series(merchant_id, dtype="string"),
        "decay_risk": risk,
        # The interest head predicts log1p(I(T + H)); interest is never negative.
        "interest_forecast": np.expm1(np.maximum(np.asarray(pred["interest"], np.float64), 0.0)),
        "action": pd.Series(decision.action, dtype="string"),
        "uplift": decision.uplift.astype(np.float64),
        "expected_gain": decision.expected_gain.astype(np.float64),
        "category": pd.Series(decision.category, dtype="string"),
    })


@dataclasses.dataclass
class UserEvents:
    """Some users' recent events as numpy columns, with whole-history aggregates.

    The columns must hold, per user, a *suffix* of the user's history before the cutoff
    that covers the observation window and the last ``max_len + 1`` events (the one
    before the sequence gives the first step's gap). Everything older only enters the
    snapshot through the aggregates: ``interest`` (I at the cutoff), ``n_history`` and
    ``first_ns`` (tenure). The batch scorer and the monitor both describe users this way.
    """

    user: np.ndarray  # int64 [E] index into user_ids; rows grouped by user, times ascending
    ns: np.ndarray  # int64 [E] unix ns
    event: np.ndarray  # int8 [E] index into EVENT_TYPES
    cat: np.ndarray  # int32 [E] index into cat_names
    value: np.ndarray  # float64 [E] >= 0
    user_ids: np.ndarray  # object [U]
    merchant_ids: np.ndarray  # object [U]
    cat_names: np.ndarray  # object [C]
    cat_hash: np.ndarray  # int32 [C] hash_categories(cat_names, hash_buckets)
    interest: np.ndarray  # float64 [U] I(cutoff) over the whole history
    n_history: np.ndarray  # int64 [U] events before the cutoff
    first_ns: np.ndarray  # int64 [U] time of the user's first event


_STATIC = {name: STATIC_FEATURES.index(name) for name in ("log_n_history", "log_tenure_days")}


def build_features(users: UserEvents, at_ns: int, config: SnapshotConfig) -> Snapshots:
    """Unlabelled snapshots at ``at_ns`` (a whole second after every event of ``users``).

    The same numbers as ``common.snapshots.features_at`` on the users' full logs: the
    snapshot builder's own ``_features_at`` runs on the columns (built here without
    ``_prepare``'s per-event string work) with the users' interest, and the two other
    whole-history features (history length, tenure) are set from the aggregates.
    """
    n_users = len(users.user_ids)
    t0 = pd.Timestamp(int(users.ns.min()) if len(users.ns) else at_ns, unit="ns",
                      tz="UTC").floor("D")
    t = (users.ns - t0.value) / 1e9
    at = (at_ns - t0.value) / 1e9
    span = int(np.ceil(max(float(t.max(initial=0.0)), at))) + int(label_window(config) * 4) \
        + 10 * int(DAY)
    user_start = np.searchsorted(users.user, np.arange(n_users), side="left")
    gap = np.diff(t, prepend=0.0)
    gap[user_start[user_start < len(t)]] = 0.0
    weights = np.asarray(config.event_weights, dtype=np.float64)
    lg = _Log(
        user=users.user, t=t, event=users.event, weight=weights[users.event],
        cat_hash=users.cat_hash[users.cat], cat_code=users.cat, cat_names=users.cat_names,
        value=users.value, gap=gap, key=users.user * span + np.floor(t).astype(np.int64),
        span=span, user_start=user_start, user_ids=users.user_ids,
        merchant_ids=users.merchant_ids, t0=t0, t_end=at,
    )
    feats = _features_at(lg, at, config, interest=users.interest)
    rows = feats.users
    static = feats.static
    static[:, _STATIC["log_n_history"]] = np.log1p(users.n_history[rows])
    static[:, _STATIC["log_tenure_days"]] = np.log1p((at_ns - users.first_ns[rows]) / 1e9 / DAY)
    n = len(rows)
    cutoff = pd.Timestamp(at_ns, unit="ns").to_datetime64()
    return Snapshots(
        events=feats.events, categories=feats.categories, numeric=feats.numeric,
        static=static.astype(np.float32), decay=np.zeros(n, np.float32),
        interest=np.zeros(n, np.float32), interest_now=feats.interest_now.astype(np.float32),
        action=np.full(n, -1, np.int32), activation=np.zeros(n, np.float32),
        propensity=np.ones(n, np.float32), intervention=np.full(n, -1, np.int64),
        user_id=users.user_ids[rows], merchant_id=users.merchant_ids[rows],
        cutoff=np.full(n, cutoff, dtype="datetime64[ns]"),
        split=np.full(n, SPLITS.index("test"), np.int8), fading_category=feats.fading_category,
    )


def predict_batches(model: keras.Model, snaps: Snapshots, batch: int = PREDICT_BATCH,
                    buckets: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Head outputs on fixed batch shapes: :func:`common.training.predict`."""
    from common.training import predict

    return predict(model, snaps, batch, tuple(buckets))


def warm_up(model: keras.Model, sizes: Sequence[int] = (1024,)) -> None:
    """Compile the model's prediction for each batch size (XLA: seconds per shape)."""
    length = int(model.input["events"].shape[1])
    for size in sizes:
        model.predict_on_batch({
            "events": np.ones((size, length), np.int32),
            "categories": np.ones((size, length), np.int32),
            "numeric": np.zeros((size, length, len(NUMERIC_FEATURES)), np.float32),
            "static": np.zeros((size, len(STATIC_FEATURES)), np.float32),
        })


def _user_chunks(lengths: np.ndarray, chunk_events: int,
                 batch: int = 1) -> list[tuple[int, int]]:
    """(first user, end user) ranges of about ``chunk_events`` events; users never split.

    A chunk of ``batch`` users or more holds whole batches of them (but the last), so
    the model's fixed batch shape is filled with real rows, not padding.
    """
    ends = np.cumsum(lengths)
    bounds, first = [], 0
    while first < len(lengths):
        base = ends[first - 1] if first else 0
        end = max(int(np.searchsorted(ends, base + chunk_events, side="right")), first + 1)
        if end < len(lengths):
            end -= (end - first) % batch if end - first >= batch else 0
        bounds.append((first, end))
        first = end
    return bounds


def _user_runs(events: pd.DataFrame, ns: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """Lay the log out user after user: (first row of each user, user ids, merchant ids,
    users in (merchant, user) order, row order).

    A log whose users each fill one run of rows, times ascending (as ``load_events`` and
    the generator write it), is used in place (row order None): only the rows where the
    user or merchant id changes are looked for, one comparison per row and no hashing.
    Any other log is coded by (merchant, user) pair and sorted by (user, time), file
    order among ties; the row order then says how.
    """
    new = _changes(events["user_id"])
    if "merchant_id" in events:
        new = np.union1d(new, _changes(events["merchant_id"]))
    start = np.r_[0, new].astype(np.int64)
    # Checking the runs costs string work per run: a log whose id changes on most rows
    # (in time order, say) is sorted straight away.
    if len(start) <= len(ns) // 4:
        users = _strings(events["user_id"].iloc[start])
        merchants = (_strings(events["merchant_id"].iloc[start]) if "merchant_id" in events
                     else np.full(len(start), DEFAULT_MERCHANT, dtype=object))
        by_name = _by_name(merchants, users)
        m, u = merchants[by_name], users[by_name]
        repeated = ((m[1:] == m[:-1]) & (u[1:] == u[:-1])).any()  # a user in several runs
        back = np.flatnonzero(ns[1:] < ns[:-1]) + 1
        if not repeated and np.isin(back, start).all():
            return start, users, merchants, by_name, None
    code, users = pd.factorize(events["user_id"])
    users = _strings(users)
    merchants = np.full(len(users), DEFAULT_MERCHANT, dtype=object)
    if "merchant_id" in events:
        mc, mu = pd.factorize(events["merchant_id"])
        n = max(len(users), 1)
        code, pair = pd.factorize(mc.astype(np.int64) * n + code)
        pair = np.asarray(pair, dtype=np.int64)
        users, merchants = users[pair % n], _strings(mu)[pair // n]
    order = np.lexsort((ns, code))
    code = code[order]
    start = np.flatnonzero(np.r_[True, code[1:] != code[:-1]])
    users, merchants = users[code[start]], merchants[code[start]]
    return start, users, merchants, _by_name(merchants, users), order


def _strings(ids: Any) -> np.ndarray:
    """Ids as an object array of ``str``."""
    return np.asarray(ids, dtype=object).astype(str).astype(object)


def _changes(column: pd.Series) -> np.ndarray:
    """Rows whose value differs from the row before (missing counts as different)."""
    if len(column) < 2:
        return np.zeros(0, np.int64)
    if isinstance(column.dtype, pd.CategoricalDtype):
        codes = column.cat.codes.to_numpy()
        return np.flatnonzero((codes[1:] != codes[:-1]) | (codes[1:] < 0)) + 1
    try:
        import pyarrow as pa
        import pyarrow.compute as pc

        arr = pa.array(column.array)
        differs = pc.not_equal(arr.slice(1), arr.slice(0, len(arr) - 1)).fill_null(True)
        return pc.indices_nonzero(differs).to_numpy().astype(np.int64) + 1
    except (ImportError, TypeError, ValueError, NotImplementedError):
        raw = column.to_numpy(dtype=object)
        return np.flatnonzero(raw[1:] != raw[:-1]) + 1


def _by_name(merchants: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Positions of the users in (merchant id, user id) order (code point order, as ``str``)."""
    return np.lexsort((users.astype(str), merchants.astype(str)))


class _Categories:
    """Category codes of the rows a chunk looks at, in the snapshot builder's order.

    The snapshot builder codes categories by first appearance in the log, and that order
    breaks ties between fading categories. Only a chunk's rows are coded here; to rank
    their categories the log is read from its start only as far as needed to have met
    each of them (usually a small prefix: categories come up early), not hashed whole.
    A missing category is ``DEFAULT_CATEGORY``, as in the snapshot builder.
    """

    def __init__(self, events: pd.DataFrame, buckets: int) -> None:
        self._column = events["category_id"] if "category_id" in events else None
        self._buckets = buckets
        self._rank: dict[str, int] = {}  # name -> order of first appearance
        self._hash = np.zeros(0, np.int32)  # by rank: hash_categories of the name
        self._read = 0  # rows of the log read for _rank
        self._default = np.array([DEFAULT_CATEGORY], dtype=object)

    def code(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(code of each row, names by code, hashed names); codes in first-appearance order."""
        if self._column is None:
            return (np.zeros(len(rows), np.int32), self._default,
                    hash_categories(self._default, self._buckets))
        codes, names = pd.factorize(self._column.iloc[rows])  # missing -> -1
        names = _strings(names)
        if (codes < 0).any():
            if DEFAULT_CATEGORY not in names:
                names = np.append(names, np.array([DEFAULT_CATEGORY], dtype=object))
            codes = np.where(codes < 0, np.flatnonzero(names == DEFAULT_CATEGORY)[0], codes)
        rank = self._ranks(self._column, names)
        order = np.argsort(rank)
        return np.argsort(order)[codes].astype(np.int32), names[order], self._hash[rank[order]]

    def _ranks(self, column: pd.Series, names: np.ndarray) -> np.ndarray:
        """First-appearance rank of each name, reading further into the log if needed."""
        while self._read < len(column) and any(n not in self._rank for n in names):
            stop = min(len(column), max(2 * self._read, 1 << 16))
            met = [DEFAULT_CATEGORY if pd.isna(v) else str(v)
                   for v in pd.unique(column.iloc[self._read:stop])]
            new = np.array([n for n in dict.fromkeys(met) if n not in self._rank], dtype=object)
            if len(new):
                first = len(self._rank)
                self._rank.update({name: first + i for i, name in enumerate(new)})
                self._hash = np.r_[self._hash, hash_categories(new, self._buckets)]
            self._read = stop
        return np.array([self._rank[n] for n in names], dtype=np.int64)


def _search_runs(ns: np.ndarray, lo: np.ndarray, hi: np.ndarray, value: int) -> np.ndarray:
    """Per run of ascending times ``ns[lo:hi]``, the first row at or after ``value``
    (``hi`` if none).

    One binary search over all runs at once: about log2(longest run) numpy steps over
    the users, no pass over the events.
    """
    lo, hi = lo.copy(), hi.copy()
    while (open_ := lo < hi).any():
        mid = (lo + hi) // 2
        below = open_ & (ns[np.where(open_, mid, 0)] < value)
        lo = np.where(below, mid + 1, lo)
        hi = np.where(open_ & ~below, mid, hi)
    return lo


def batch_features(events: pd.DataFrame, at: Any, snap_cfg: SnapshotConfig, *,
                   chunk_events: int = 200_000,
                   batch: int = 1) -> Iterator[tuple[Snapshots, int, int]]:
    """Unlabelled snapshots of the users active before ``at``, in chunks of whole users.

    Yields (snapshots of a chunk, candidate users done, candidate users). Together the
    chunks equal ``common.snapshots.features_at(events, at, snap_cfg)`` (the test suite
    checks it), users in (merchant, user) order. Before the first chunk only the users'
    runs of rows are found (:func:`_user_runs`) and searched for the cutoff and the
    observation window; the rest is per chunk, so it overlaps the model's predictions
    (see :func:`score_events`): interest over each user's history, then features from
    only the events a snapshot looks at (the observation window and the last
    ``max_len + 1``), without the snapshot builder's per-event string work.

    ``at`` is rounded up to a whole second; None = one second after the last event's
    second, so every event counts. A chunk of ``batch`` users or more holds whole
    batches of them but the last (:func:`_user_chunks`).
    """
    if len(events) == 0:
        raise DataError("no events to score")
    if chunk_events < 1:
        raise ValueError(f"chunk_events={chunk_events}: expected a positive number of events")
    at_ns = cutoff_ns(events, at)
    cfg = dataclasses.replace(snap_cfg, start="", end="")
    ns = unix_ns(events["timestamp"])
    event = pd.Categorical(events["event"], categories=list(EVENT_TYPES)).codes
    if (event < 0).any():
        raise DataError("events with an unknown event type reached the scorer")
    # NaN for a missing value; fmax makes it 0 on the rows used.
    value = (events["value"].to_numpy(dtype=np.float64, na_value=np.nan)
             if "value" in events else np.zeros(len(events)))
    start, user_ids, merchant_ids, by_name, order = _user_runs(events, ns)
    if order is not None:
        ns, event, value = ns[order], event[order], value[order]
    # User i's events before the cutoff are rows start[i]:before[i].
    before = _search_runs(ns, start, np.r_[start[1:], len(ns)], at_ns)
    # Active = an event in the observation window (one second of slack: the snapshot
    # builder makes the exact choice). Only active users are looked at further.
    window_start = at_ns - int(round(cfg.observation_days * DAY * _SECOND)) - _SECOND
    window = _search_runs(ns, start, before, window_start)
    active = window < before
    by_name = by_name[active[by_name]]
    # Rows a snapshot looks at: the observation window and the last max_len + 1 events.
    kept = np.minimum(before - start, np.maximum(before - window, cfg.max_len + 1))
    tau = cfg.tau_days * DAY
    weights = np.asarray(cfg.event_weights, dtype=np.float64)
    log.info("%d users active at %s (%d of %d events needed)", len(by_name),
             pd.Timestamp(at_ns, unit="ns", tz="UTC"), kept[by_name].sum(), len(events))
    if len(by_name) == 0:
        yield build_features(_no_users(cfg.hash_buckets), at_ns, cfg), 0, 0
        return
    categories = _Categories(events, cfg.hash_buckets)
    for first, end in _user_chunks(kept[by_name], chunk_events, batch):
        u = by_name[first:end]
        each = np.arange(end - first)
        # Interest over the history; rows older than _TAU_SPAN tau add nothing.
        recent = _search_runs(ns, start[u], before[u], at_ns - int(_TAU_SPAN * tau * _SECOND))
        history = _ranges(recent, before[u])
        # exp(-age / tau) with age = (at_ns - ns) / 1e9, in place.
        decay = np.subtract(at_ns, ns[history]) / 1e9
        np.exp(np.divide(decay, -tau, out=decay), out=decay)
        interest = np.bincount(np.repeat(each, before[u] - recent),
                               weights=np.multiply(weights[event[history]], decay, out=decay),
                               minlength=len(u))
        part = _ranges(before[u] - kept[u], before[u])
        cat, cat_names, cat_hash = categories.code(part if order is None else order[part])
        chunk = UserEvents(
            user=np.repeat(each, kept[u]), ns=ns[part], event=event[part].astype(np.int8),
            cat=cat, value=np.fmax(value[part], 0.0), user_ids=user_ids[u],
            merchant_ids=merchant_ids[u], cat_names=cat_names, cat_hash=cat_hash,
            interest=interest, n_history=before[u] - start[u], first_ns=ns[start[u]],
        )
        yield build_features(chunk, at_ns, cfg), end, len(by_name)


def score_events(
    model: keras.Model,
    events: pd.DataFrame,
    at: Any,
    snap_cfg: SnapshotConfig,
    policy_cfg: PolicyConfig,
    *,
    chunk_events: int = 200_000,
    progress: Progress | None = None,
) -> pd.DataFrame:
    """Score every user active in the observation window before ``at``.

    Parameters
    ----------
    model : the trained model (see :func:`load_model_bundle`).
    events : a canonical event frame (``common.io.load_events``).
    at : the cutoff (anything ``pd.Timestamp`` reads; naive = UTC), rounded up to a whole
        second; None = one second after the last event's second, so every event counts.
    snap_cfg, policy_cfg : the settings the model was trained with, and the policy.
    chunk_events : about this many events are turned into features at a time; all of a
        user's events are always in the same chunk (see :func:`batch_features`).
    progress : called with (users done, users to score) after every chunk.

    Returns
    -------
    One row per active user, sorted by (merchant_id, user_id): ``SCORE_COLUMNS``. The
    policy (and its budget) is applied once, over all users.
    """
    ids: list[pd.DataFrame] = []
    preds: list[dict[str, np.ndarray]] = []
    chunks = batch_features(events, at, snap_cfg, chunk_events=chunk_events,
                            batch=PREDICT_BATCH)
    for snaps, done, total in _ahead(chunks):
        preds.append(predict_batches(model, snaps))
        ids.append(pd.DataFrame({"user_id": snaps.user_id, "merchant_id": snaps.merchant_id,
                                 "fading": snaps.fading_category}))
        if progress is not None:
            progress(done, total)
    table = pd.concat(ids, ignore_index=True)
    pred = {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}
    return score_frame(table["user_id"].to_numpy(object), table["merchant_id"].to_numpy(object),
                       pred, table["fading"].to_numpy(object), snap_cfg, policy_cfg)


def _ahead(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
    """``items``, produced by a background thread up to ``depth`` ahead of the consumer.

    The next chunk's features (numpy) are built while TensorFlow predicts this one; both
    release the GIL for most of their work. An exception in the producer is raised here.
    """
    import queue
    import threading

    box: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        """Wait for room unless the consumer has gone; False if it has."""
        while not stop.is_set():
            try:
                box.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((done, None))
        except BaseException as err:  # handed to the consumer, raised there
            put((done, err))

    thread = threading.Thread(target=produce, name="fedecay-features", daemon=True)
    thread.start()
    try:
        while True:
            item, err = box.get()
            if item is done:
                if err is not None:
                    raise err
                return
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _no_users(buckets: int) -> UserEvents:
    empty = np.zeros(0, np.int64)
    cat_names = np.array([DEFAULT_CATEGORY], dtype=object)
    cat_hash = hash_categories(cat_names, buckets)
    return UserEvents(user=empty, ns=empty, event=np.zeros(0, np.int8),
                      cat=np.zeros(0, np.int32), value=np.zeros(0), user_ids=np.zeros(0, object),
                      merchant_ids=np.zeros(0, object), cat_names=cat_names, cat_hash=cat_hash,
                      interest=np.zeros(0), n_history=empty, first_ns=empty)


def score_summary(scores: pd.DataFrame, policy_cfg: PolicyConfig) -> dict[str, Any]:
    """Users scored, the share at risk and the action mix (for the CLI's summary)."""
    n = len(scores)
    at_risk = float((scores["decay_risk"] >= policy_cfg.risk_threshold).mean()) if n else 0.0
    mix = scores["action"].value_counts(normalize=True).to_dict() if n else {}
    return {"users": n, "at_risk_share": at_risk,
            "action_mix": {str(k): float(v) for k, v in mix.items()}}


def write_scores(scores: pd.DataFrame, path: str | Path) -> Path:
    """Write the score table as .csv or .parquet (by suffix); returns the resolved path.

    In a CSV, text cells are quoted and those a spreadsheet would run as a formula are
    escaped (see :func:`escape_formulas`); Parquet keeps the values as they are.
    """
    path = scores_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic.replacing(path) as tmp:  # a full disk leaves no half-written file behind
        if path.suffix.lower() == ".csv":
            # Text quoted too: an id holding a bare CR would otherwise split its row.
            escape_formulas(scores).to_csv(tmp, index=False, quoting=csv.QUOTE_NONNUMERIC)
        else:
            scores.to_parquet(tmp, index=False)
    return path


def scores_path(path: str | Path) -> Path:
    """Check an output path for :func:`write_scores` before any work is done."""
    path = Path(path).resolve()
    if not path.name.lower().endswith((".csv", ".parquet", ".pq")):
        raise ValueError(f"--out {path}: expected a .csv or .parquet file name")
    if path.is_dir():
        raise IsADirectoryError(f"--out {path} is a folder; give a .csv or .parquet file name")
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"--out {path}: {parent} is a file, not a folder")
            break
    return path


#: A cell starting with one of these is a formula to Excel, LibreOffice or Sheets.
FORMULA_PREFIXES: tuple[str, ...] = ("=", "+", "-", "@", "\t", "\r")


def escape_formulas(frame: pd.DataFrame) -> pd.DataFrame:
    """Prefix ``'`` to text cells that start like a formula (OWASP CSV injection).

    Only text columns are touched: a user id ``=cmd|' /C calc'!A0`` becomes
    ``'=cmd|' /C calc'!A0``, while a negative uplift stays the number ``-0.25``.
    """
    out = frame.copy(deep=False)
    for column in out.columns:
        values = out[column]
        if pd.api.types.is_object_dtype(values):  # mixed: only the str cells are text
            out[column] = values.map(
                lambda v: "'" + v if isinstance(v, str) and v.startswith(FORMULA_PREFIXES)
                else v)
        elif (pd.api.types.is_string_dtype(values)
              or isinstance(values.dtype, pd.CategoricalDtype)):
            text = values.astype("string")
            risky = text.str.startswith(FORMULA_PREFIXES).fillna(False).astype(bool)
            if risky.any():
                out[column] = text.where(~risky, "'" + text)
    return out

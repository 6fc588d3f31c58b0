"""Batch scoring: what a merchant runs to score its users with the global model.

:func:`score_events` builds the unlabelled snapshot of every user active before a
cutoff (``client.batch_features``), predicts the three heads and applies the policy once
over all users (a budget is global). The model and its settings come from the bundle
(``common.bundle.load_model_bundle``): the LSTM, or a GBDT/LR model
(``common.tabular.TabularModel``) that predicts the same three outputs from the
snapshots' aggregates. The score table goes to CSV or Parquet with :func:`write_scores`.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from client.batch_features import batch_features
from common import atomic
from common.config import PolicyConfig, SnapshotConfig
from common.features import NUMERIC_FEATURES
from common.policy import choose_actions
from common.progress import SILENT, Progress, Task
from common.reasons import REASON_COLUMNS, CategoryNames, Reference, reason_columns, reference_sums
from common.reasons.ig import SCORE_IG_STEPS
from common.snapshots import Snapshots
from common.tabular import TabularModel

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

SCORE_COLUMNS: tuple[str, ...] = ("user_id", "merchant_id", "decay_risk", "interest_forecast",
                                  "action", "uplift", "expected_gain", "category",
                                  *REASON_COLUMNS)
#: Whom ``score_events`` explains (its ``reasons`` argument; ``fedecay score --reasons``).
REASON_MODES: tuple[str, ...] = ("targeted", "at-risk", "none")
#: Quadrature points ``score_events`` accepts for the reasons (``fedecay score
#: --reasons-points``); ``SCORE_IG_STEPS`` is the default.
REASON_POINTS: tuple[int, ...] = (1, 2, 4, 8)
#: Rows per prediction call of the batch scorer (a fixed shape: XLA compiles it once).
PREDICT_BATCH = 1024


def score_frame(user_id: np.ndarray, merchant_id: np.ndarray, pred: Mapping[str, np.ndarray],
                fading_category: np.ndarray, snap_cfg: SnapshotConfig,
                policy_cfg: PolicyConfig,
                reasons: Mapping[str, np.ndarray] | None = None) -> pd.DataFrame:
    """Predictions and the policy's decisions as the score table (``SCORE_COLUMNS``);
    ``reasons`` holds ``REASON_COLUMNS`` (``common.reasons.reason_columns``), empty
    text when None."""
    risk = np.asarray(pred["decay"], dtype=np.float64)
    empty = pd.Series("", index=range(len(risk)), dtype="string")
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
        **{c: empty if reasons is None else pd.Series(reasons[c], dtype="string")
           for c in REASON_COLUMNS},
    })


def predict_batches(model: keras.Model, snaps: Snapshots, batch: int = PREDICT_BATCH,
                    buckets: Sequence[int] = ()) -> dict[str, np.ndarray]:
    """Head outputs on fixed batch shapes: :func:`common.training.predict`."""
    from common.training import predict

    return predict(model, snaps, batch, tuple(buckets))


def warm_up(model: keras.Model, sizes: Sequence[int] = (1024,)) -> None:
    """Compile the model's prediction for each batch size (XLA compiles one per shape)."""
    length = int(model.input["events"].shape[1])
    for size in sizes:
        model.predict_on_batch({
            "events": np.ones((size, length), np.int32),
            "categories": np.ones((size, length), np.int32),
            "numeric": np.zeros((size, length, len(NUMERIC_FEATURES)), np.float32),
            "static": np.zeros((size, int(model.input["static"].shape[-1])), np.float32),
        })


def score_events(
    model: keras.Model | TabularModel,
    events: pd.DataFrame,
    at: Any,
    snap_cfg: SnapshotConfig,
    policy_cfg: PolicyConfig,
    *,
    chunk_events: int = 200_000,
    progress: Progress = SILENT,
    reasons: str = "targeted",
    reason_points: int = SCORE_IG_STEPS,
) -> pd.DataFrame:
    """Score every user active in the observation window before ``at``.

    Parameters
    ----------
    model : the trained model (see ``common.bundle.load_model_bundle``); a GBDT/LR
        model reads only the snapshots' aggregates.
    events : a canonical event frame (``common.io.load_events``).
    at : the cutoff (anything ``pd.Timestamp`` reads; naive = UTC), rounded up to a whole
        second; None = one second after the last event's second, so every event counts.
    snap_cfg, policy_cfg : the settings the model was trained with, and the policy.
    chunk_events : about this many events are turned into features at a time; all of a
        user's events are always in the same chunk (see
        ``client.batch_features.batch_features``).
    progress : a step in users (its total known once the first chunk is built),
        advanced after every chunk.
    reasons : whom the ``REASON_COLUMNS`` (see ``common.reasons``) explain, from
        attributions against the mean scored user (``REASON_MODES``): ``"targeted"`` the
        users the policy gives an action (not ``none``), ``"at-risk"`` every user with
        decay risk >= ``policy.risk-threshold``, ``"none"`` nobody. Empty text for the
        others. Nothing is attributed (or compiled) when no user needs a reason.
    reason_points : the attributions' quadrature points (``REASON_POINTS``; an LSTM's
        only): fewer is faster and further from the exact integral (docs/performance.md).

    Returns
    -------
    One row per active user, sorted by (merchant_id, user_id): ``SCORE_COLUMNS``. The
    policy (and its budget) is applied once, over all users. ``attrs["explained"]`` holds
    the users explained and ``attrs["explain_seconds"]`` the time their reasons took.
    """
    if reasons not in REASON_MODES:
        raise ValueError(f"reasons: expected one of {', '.join(REASON_MODES)}, got {reasons!r}")
    if reason_points not in REASON_POINTS:
        raise ValueError(f"reason points: expected one of {REASON_POINTS}, got {reason_points!r}")
    ids: list[pd.DataFrame] = []
    preds: list[dict[str, np.ndarray]] = []
    # Targets are a subset of the users at risk (and known only once the policy has
    # seen everyone): keep the snapshots of the users at risk until then.
    at_risk = _AtRisk(policy_cfg.risk_threshold) if reasons != "none" else None
    chunks = batch_features(events, at, snap_cfg, chunk_events=chunk_events,
                            batch=PREDICT_BATCH)
    with contextlib.ExitStack() as steps:
        if at_risk is not None:  # the log's category names, found while users are scored
            names = steps.enter_context(ThreadPoolExecutor(1, "fedecay-names"))
            at_risk.names = names.submit(_category_names, events)
        task: Task | None = None
        scored = 0
        for snaps, done, total in prefetch(chunks):
            if task is None:
                task = steps.enter_context(progress.task("scoring users", total, "users"))
            preds.append(model.predict(snaps) if isinstance(model, TabularModel)
                         else predict_batches(model, snaps))
            if at_risk is not None:
                at_risk.add(snaps, preds[-1]["decay"])
            ids.append(pd.DataFrame({"user_id": snaps.user_id,
                                     "merchant_id": snaps.merchant_id,
                                     "fading": snaps.fading_category}))
            task.advance(done - scored)
            scored = done
    table = pd.concat(ids, ignore_index=True)
    pred = {k: np.concatenate([p[k] for p in preds]) for k in preds[0]}
    frame = score_frame(table["user_id"].to_numpy(object),
                        table["merchant_id"].to_numpy(object), pred,
                        table["fading"].to_numpy(object), snap_cfg, policy_cfg)
    frame.attrs.update(explained=0, explain_seconds=0.0)
    if at_risk is None:
        return frame
    # Targets are users at risk the policy gives an action (its budget included).
    keep = at_risk.select(None if reasons == "at-risk"
                          else (frame["action"] != "none").to_numpy())
    if not len(keep):
        return frame  # nothing attributed, nothing compiled
    started = time.perf_counter()
    with progress.task(f"explaining {len(keep):,} {reasons} users", 1, "steps") as step:
        columns = at_risk.reasons(model, keep, events, snap_cfg, reason_points)
        step.advance()
    for c in REASON_COLUMNS:
        frame[c] = pd.Series(columns[c], dtype="string")
    frame.attrs.update(explained=len(keep), explain_seconds=time.perf_counter() - started)
    return frame


class _AtRisk:
    """The users at risk of the chunks scored so far, and the mean user's sums (the
    attributions' reference: the same whatever the chunk sizes)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.parts: list[Snapshots] = []
        self.rows: list[np.ndarray] = []
        self.seen = 0
        self.sums: list[tuple[np.ndarray, float, np.ndarray, float]] = []
        self.names: Future[np.ndarray] | None = None  # the log's category names

    def add(self, snaps: Snapshots, risk: np.ndarray) -> None:
        rows = np.flatnonzero(np.asarray(risk) >= self.threshold)
        if len(rows):
            self.parts.append(snaps.subset(rows))
            self.rows.append(rows + self.seen)
        self.seen += len(snaps)
        self.sums.append(reference_sums(snaps))

    def select(self, wanted: np.ndarray | None) -> np.ndarray:
        """Indices among the users at risk of those ``wanted`` marks (bool over every
        user scored; None: all of them)."""
        rows = self._rows()
        return np.arange(len(rows)) if wanted is None else np.flatnonzero(wanted[rows])

    def reasons(self, model: Any, keep: np.ndarray, events: pd.DataFrame,
                snap_cfg: SnapshotConfig, points: int) -> dict[str, np.ndarray]:
        """``REASON_COLUMNS`` of every user scored: the reasons of the users at risk
        ``keep`` indexes (:meth:`select`), empty text for the others (IG with ``points``
        quadrature points)."""
        numeric, steps, static, count = zip(*self.sums, strict=True)
        reference = Reference.from_sums(np.sum(numeric, axis=0), float(sum(steps)),
                                        np.sum(static, axis=0), float(sum(count)))
        found = self.names.result() if self.names is not None else _category_names(events)
        names = CategoryNames(found, snap_cfg.hash_buckets)
        part = reason_columns(model, Snapshots.concat(self.parts), keep, snap_cfg,
                              reference, names, steps=points)
        out = {c: np.full(self.seen, "", dtype=object) for c in REASON_COLUMNS}
        for c in REASON_COLUMNS:
            out[c][self._rows()[keep]] = part[c][keep]
        return out

    def _rows(self) -> np.ndarray:
        """Rows (among every user scored) of the users at risk."""
        return np.concatenate(self.rows) if self.rows else np.zeros(0, np.int64)


def _category_names(events: pd.DataFrame) -> np.ndarray:
    """The distinct category names of a log (none without a ``category_id`` column)."""
    if "category_id" not in events:
        return np.zeros(0, dtype=object)
    return events["category_id"].dropna().unique().astype(str)


def prefetch(items: Iterator[Any], depth: int = 1) -> Iterator[Any]:
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

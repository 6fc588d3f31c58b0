"""The non-neural models (GBDT, LR, T- and X-learner): features, predictions, file format.

All read one row of aggregates per snapshot (:func:`aggregate_features`) and hold a
decay classifier, an interest regressor (it predicts ``log1p(I(T + H))``, as the LSTM's
head) and one activation classifier per action (a T-learner; an action with too few
logged rows has its observed rate as a plain ``float``); the X-learner adds one effect
per non-control action (``common.uplift_learners``). :class:`TabularModel` predicts
the same three outputs as ``common.training.predict``, so the assessment, the batch
scorer and the policy treat every model alike.

Files are ``skops`` archives (a zip of ``.npy`` arrays and a JSON schema), never pickle:
:func:`load_tabular` refuses any type outside scikit-learn's estimators, builtins and
numpy (skops's default trusted set) plus the one it names below, and checks the tree
nodes that type carries before anything predicts with them.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from common.features import AGGREGATE_FEATURES
from common.uplift_learners import EFFECT_KEYS, predict_t_learner, predict_x_learner

#: The model kinds saved as ``model.skops`` (``simulations.methods.AGGREGATE_METHODS``).
TABULAR_KINDS: tuple[str, ...] = ("gbdt", "lr", "t-learner", "x-learner")
MODEL_FILE = "model.skops"
TABULAR_FORMAT = "fedecay-tabular-model"
#: Outside skops's default trusted set. scikit-learn indexes its ``nodes`` array without
#: bounds checks, so :func:`_check_trees` bounds every index before prediction.
TREE_PREDICTOR = "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"
TRUSTED: tuple[str, ...] = (TREE_PREDICTOR,)


def aggregate_features(snaps: Any) -> np.ndarray:
    """The aggregates of each snapshot (``AGGREGATE_FEATURES``, in order): what GBDT and
    LR read, at training and at scoring time (``Snapshots.static``)."""
    return np.asarray(snaps.static)


@dataclasses.dataclass(frozen=True)
class TabularModel:
    """A fitted decay classifier, interest regressor and per-action activation models."""

    kind: str
    decay: Any
    interest: Any
    activation: tuple[Any, ...]  # one classifier or constant rate per action
    features: tuple[str, ...] = AGGREGATE_FEATURES
    #: X-learner only: per non-control action ``{"treated", "control", "weight"}``.
    effects: tuple[dict[str, Any], ...] = ()

    def predict(self, snaps: Any) -> dict[str, np.ndarray]:
        """``decay`` [N], ``interest`` [N] and ``activation`` [N, A], float32."""
        x = aggregate_features(snaps)
        if self.features != AGGREGATE_FEATURES:  # a model saved by an earlier version
            x = x[:, [AGGREGATE_FEATURES.index(name) for name in self.features]]
        n, actions = len(x), len(self.activation)
        if n == 0:
            return {"decay": np.zeros(0, np.float32), "interest": np.zeros(0, np.float32),
                    "activation": np.zeros((0, actions), np.float32)}
        return {"decay": self.decay.predict_proba(x)[:, 1].astype(np.float32),
                "interest": self.interest.predict(x).astype(np.float32),
                "activation": (predict_x_learner(self.activation, self.effects, x)
                               if self.effects else predict_activation(self.activation, x))}


def predict_activation(per_action: Any, x: np.ndarray) -> np.ndarray:
    """[N, A] re-engagement probabilities of a T-learner (a float is a constant rate)."""
    return predict_t_learner(per_action, x)


def save_tabular(model: TabularModel, path: str | Path) -> Path:
    """Write ``model`` as a skops archive at ``path`` (atomically); returns the path."""
    import skops.io as sio

    from common import atomic

    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": TABULAR_FORMAT, "kind": model.kind, "features": list(model.features),
               "decay": model.decay, "interest": model.interest,
               "activation": list(model.activation), "effects": list(model.effects)}
    with atomic.replacing(path) as tmp:
        sio.dump(payload, tmp)
    return path


def load_tabular(path: str | Path) -> TabularModel:
    """Load a :func:`save_tabular` file; ``ValueError`` in one line naming the file when
    it is not one, holds an untrusted type or a tree that indexes out of range."""
    import zipfile

    import skops.io as sio

    path = Path(path).resolve()
    try:
        untrusted = [t for t in sio.get_untrusted_types(file=path) if t not in TRUSTED]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable skops model file ({type(err).__name__})"
                         ) from None
    if untrusted:
        raise ValueError(f"{path}: refusing to load untrusted type(s) {', '.join(untrusted)} "
                         "(a fedecay model holds only scikit-learn estimators)")
    try:
        payload = sio.load(path, trusted=list(TRUSTED))
    except Exception as err:  # skops raises many kinds on a damaged archive
        raise ValueError(f"{path}: cannot load the skops model "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
                         ) from None
    if not isinstance(payload, dict) or payload.get("format") != TABULAR_FORMAT:
        raise ValueError(f"{path}: a skops file but not a fedecay model (no "
                         f"format '{TABULAR_FORMAT}')")
    kind = payload.get("kind")
    if kind not in TABULAR_KINDS:
        raise ValueError(f"{path}: model kind {kind!r}; expected one of {', '.join(TABULAR_KINDS)}")
    features = tuple(str(name) for name in payload.get("features") or ())
    # Columns are read by name, so a model saved before new aggregates were added (or
    # with them in another order) still reads its own; one that needs an aggregate this
    # version does not compute cannot.
    unknown = [name for name in features if name not in AGGREGATE_FEATURES]
    if not features or unknown or len(set(features)) != len(features):
        raise ValueError(f"{path}: trained on aggregate features "
                         f"{', '.join(unknown) or '(none or repeated)'} that this version "
                         f"does not compute ({', '.join(AGGREGATE_FEATURES)}): train it again")
    activation = tuple(payload.get("activation") or ())
    effects = _effects(payload.get("effects") or (), kind, len(activation), path)
    width = len(features)
    regressors = [(f"effects[{i}].{k}", e[k]) for i, e in enumerate(effects)
                  for k in ("treated", "control")]
    for name, est in [("decay", payload.get("decay")), ("interest", payload.get("interest")),
                      *((f"activation[{i}]", m) for i, m in enumerate(activation)),
                      *regressors]:
        if name.startswith(("activation", "effects")) and isinstance(est, float):
            continue
        wanted = "predict_proba" if name == "decay" or name.startswith("activation") \
            else "predict"
        if not hasattr(est, wanted):
            raise ValueError(f"{path}: {name} is {type(est).__name__}, not a fitted model")
        if getattr(est, "n_features_in_", width) != width:
            raise ValueError(f"{path}: {name} reads {est.n_features_in_} features, "
                             f"expected {width}")
        _check_trees(est, width, f"{path}: {name}")
    return TabularModel(kind=kind, decay=payload["decay"], interest=payload["interest"],
                        activation=activation, features=features, effects=effects)


def _effects(raw: Any, kind: str, actions: int, path: Path) -> tuple[dict[str, Any], ...]:
    """The X-learner's effects of a loaded file, checked for shape (not yet for trees)."""
    effects = tuple(raw)
    if kind != "x-learner":
        if effects:
            raise ValueError(f"{path}: a {kind} model with X-learner effects")
        return ()
    if len(effects) != actions - 1:
        raise ValueError(f"{path}: {len(effects)} X-learner effects for {actions} actions "
                         f"(expected {actions - 1})")
    for i, e in enumerate(effects):
        if not isinstance(e, dict) or set(e) != set(EFFECT_KEYS) \
                or not isinstance(e["weight"], float) or not 0 <= e["weight"] <= 1:
            raise ValueError(f"{path}: effects[{i}] is not {{{', '.join(EFFECT_KEYS)}}} "
                             "with a weight in [0, 1]")
    return effects


def _check_trees(estimator: Any, width: int, where: str) -> None:
    """Every tree node of a HistGradientBoosting model points inside its tree, to a
    later node (so prediction ends), at a feature < ``width`` and a real bitset."""
    from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE

    for stage in getattr(estimator, "_predictors", None) or ():
        for tree in stage:
            nodes = tree.nodes
            if not isinstance(nodes, np.ndarray) or nodes.dtype != PREDICTOR_RECORD_DTYPE:
                raise ValueError(f"{where}: tree nodes of an unexpected type")
            inner = np.flatnonzero(nodes["is_leaf"] == 0)
            n = len(nodes)
            bad = ((nodes["left"][inner] <= inner) | (nodes["left"][inner] >= n)
                   | (nodes["right"][inner] <= inner) | (nodes["right"][inner] >= n)
                   | (nodes["feature_idx"][inner] >= width))
            cat = inner[nodes["is_categorical"][inner] != 0]
            bitsets = min(len(tree.raw_left_cat_bitsets), len(tree.binned_left_cat_bitsets))
            if n == 0 or bad.any() or (nodes["bitset_idx"][cat] >= bitsets).any():
                raise ValueError(f"{where}: a tree node indexes outside its tree or features")

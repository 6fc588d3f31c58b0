"""The model bundle: a model file plus the settings it only makes sense with.

A model needs the snapshot settings it was trained with (sequence length, hash buckets,
tau, event weights, actions) and, for scoring, a policy. The bundle keeps them in a
``model.json`` sidecar of flat ``snapshots.*`` / ``policy.*`` keys beside the model. The
server writes the sidecar of the global model it saves; a merchant's batch scorer and
monitor load both.

The model file is ``model.keras`` for the LSTM (kind ``lstm``) or ``model.skops`` for
the GBDT and LR baselines (kinds ``gbdt``, ``lr``: ``common.tabular``); the sidecar's
``kind`` key names it (a sidecar without one is an LSTM's).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common import atomic
from common.config import PolicyConfig, SnapshotConfig, apply_overrides, from_flat, to_flat

if TYPE_CHECKING:
    import keras

    from common.tabular import TabularModel

log = logging.getLogger(__name__)

BUNDLE_FORMAT = "fedecay-model-bundle"


@dataclasses.dataclass(frozen=True)
class ModelBundle:
    """A loaded model with the settings it needs; ``sources`` says where they came from."""

    model: keras.Model | TabularModel
    snapshots: SnapshotConfig
    policy: PolicyConfig
    sources: tuple[str, ...]
    kind: str = "lstm"  # or a common.tabular.TABULAR_KINDS name


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


def save_tabular_bundle(model: TabularModel, snapshot_config: SnapshotConfig,
                        policy_config: PolicyConfig | None, folder: str | Path) -> Path:
    """Save a GBDT or LR model as ``folder/model.skops`` and its ``model.json`` sidecar
    (kind ``model.kind``). Returns the model path."""
    from common.tabular import MODEL_FILE, save_tabular

    path = save_tabular(model, Path(folder) / MODEL_FILE)
    write_model_settings(path, snapshot_config, policy_config, kind=model.kind)
    return path


def write_model_settings(model_path: str | Path, snapshot_config: SnapshotConfig,
                         policy_config: PolicyConfig | None, *, kind: str = "lstm") -> Path:
    """Write the ``model.json`` sidecar of an already saved model (atomically).

    With ``policy_config`` None only the snapshot settings are written; the policy then
    comes from the run's ``config.json``, ``--set`` or the defaults at load time.
    """
    flat: dict[str, Any] = {"format": BUNDLE_FORMAT, "kind": kind,
                            **to_flat(snapshot_config, "snapshots")}
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


#: Snapshot keys that define the features a model reads: a value other than the one it
#: was trained with scores other features than it learnt, quietly. (``max-len``,
#: ``hash-buckets`` and ``actions`` are checked against the model's shapes instead.)
FEATURE_KEYS: tuple[str, ...] = (
    "snapshots.observation-days", "snapshots.tau-days", "snapshots.weight-view",
    "snapshots.weight-click", "snapshots.weight-cart", "snapshots.weight-favorite",
    "snapshots.weight-purchase")


def _saved_settings(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The ``snapshots.*`` / ``policy.*`` keys of the run's ``config.json`` and the
    sidecar beside ``path`` (the sidecar winning), each file's keys checked with the file
    named; and the files read."""
    flat: dict[str, Any] = {}
    sources: list[str] = []
    for candidate in (path.parent / "config.json", sidecar_path(path)):
        if candidate.is_file():
            found = _settings_file(candidate)
            try:
                from_flat(SnapshotConfig, found, "snapshots")
                from_flat(PolicyConfig, found, "policy")
            except ValueError as err:
                raise ValueError(f"{candidate}: {err}") from None
            flat.update(found)
            sources.append(str(candidate))
    return flat, sources


def feature_settings(path: str | Path) -> dict[str, Any]:
    """The :data:`FEATURE_KEYS` a saved model was trained with, from its settings files
    (the defaults for keys they lack); read without loading the model."""
    saved, _ = _saved_settings(Path(path).resolve())
    return _features(saved)


def _features(flat: dict[str, Any]) -> dict[str, Any]:
    """The :data:`FEATURE_KEYS` of flat settings, the defaults for keys they lack."""
    full = to_flat(from_flat(SnapshotConfig, flat, "snapshots"), "snapshots")
    return {key: full[key] for key in FEATURE_KEYS}


def feature_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The :data:`FEATURE_KEYS` whose values differ between two :func:`feature_settings`:
    ``(key, a's value, b's value)``; empty when the two models read the same features."""
    return [(key, a[key], b[key]) for key in FEATURE_KEYS if a[key] != b[key]]


def _check_feature_overrides(saved: dict[str, Any], flat: dict[str, Any],
                             sources: Sequence[str]) -> None:
    """Refuse ``--set`` values of :data:`FEATURE_KEYS` that differ from the ones the
    model's settings files give (without those files, ``--set`` is how the training
    settings are given, so anything goes)."""
    differences = feature_differences(_features(flat), _features(saved)) if sources else []
    if differences:
        key, asked, trained = differences[0]
        raise ValueError(
            f"--set {key}={asked:g}: the model was trained with {trained:g} "
            f"({sources[-1]}); other values score other features than it learnt "
            "(train a model with them instead)")


def load_model_bundle(path: str | Path,
                      overrides: Sequence[str] | None = None) -> ModelBundle:
    """Load a model and its settings.

    Settings, later ones winning: the defaults; the run's ``config.json`` in the model's
    folder (``snapshots.*`` / ``policy.*`` keys); the ``model.json`` sidecar;
    ``overrides`` (``key=value`` strings, as ``--set``; the feature-defining keys may not
    differ from the files'). All of them are checked before the model is read (a bad
    settings file answers at once, naming the file). The shape-bearing settings
    (``max-len``, ``hash-buckets``, the number of actions) are checked against the
    model, and its weights must be finite.
    """
    check_model_overrides(overrides)  # before the model: a typo answers at once
    path = Path(path).resolve()
    saved, sources = _saved_settings(path)
    flat = apply_overrides(saved, list(overrides)) if overrides else saved
    _check_feature_overrides(saved, flat, sources)
    if overrides:
        sources.append("--set")
    snaps = from_flat(SnapshotConfig, flat, "snapshots")
    policy = from_flat(PolicyConfig, flat, "policy")
    if not sources:
        log.warning("%s: no model.json or config.json beside the model; using default "
                    "snapshot settings (give the training ones with --set snapshots.KEY=VALUE)",
                    path)
    model: keras.Model | TabularModel
    if path.suffix == ".skops":
        from common.tabular import load_tabular

        model = load_tabular(path)
        if len(model.activation) != len(snaps.actions):
            raise ValueError(f"config key snapshots.actions lists {len(snaps.actions)} actions "
                             f"({','.join(snaps.actions)}) but {path} scores "
                             f"{len(model.activation)}")
        return ModelBundle(model, snaps, policy, tuple(sources) or ("defaults",), model.kind)
    from common.model import load_model

    model = load_model(path)
    _check_is_scorer(model, path)
    _check_finite(model, path)
    check_model_settings(model, snaps, str(path))
    return ModelBundle(model, snaps, policy, tuple(sources) or ("defaults",))


def _check_finite(model: keras.Model, path: Path) -> None:
    """Refuse a model with a NaN or infinite weight, naming the first: every score it
    gives would be NaN (a training run that diverged, or a damaged file)."""
    import numpy as np

    for weight in model.weights:
        if not np.all(np.isfinite(np.asarray(weight))):
            raise ValueError(f"{path} has weights that are not finite (first: {weight.path}): "
                             "its training diverged or the file is damaged; train it again")


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
    n_actions = int(model.get_layer("activation").output.shape[-1])
    if n_actions != len(snaps.actions):
        problems.append(f"snapshots.actions lists {len(snaps.actions)} actions "
                        f"({','.join(snaps.actions)}) but {name} scores {n_actions}")
    if problems:
        fix = " ".join(f"--set snapshots.{k}={v}" for k, v in wrong.items())
        raise ValueError("config key " + "; ".join(problems)
                         + (f" (give the training settings: {fix})" if fix else ""))

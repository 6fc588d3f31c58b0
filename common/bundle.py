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


def load_model_bundle(path: str | Path,
                      overrides: Sequence[str] | None = None) -> ModelBundle:
    """Load a model and its settings.

    Settings, later ones winning: the defaults; the run's ``config.json`` in the model's
    folder (``snapshots.*`` / ``policy.*`` keys); the ``model.json`` sidecar;
    ``overrides`` (``key=value`` strings, as ``--set``). The shape-bearing settings
    (``max-len``, ``hash-buckets``, the number of actions) are checked against the model.
    """
    check_model_overrides(overrides)  # before the model: a typo answers at once
    path = Path(path).resolve()
    model: keras.Model | TabularModel
    if path.suffix == ".skops":
        from common.tabular import load_tabular

        model = load_tabular(path)
    else:
        from common.model import load_model

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
    if path.suffix == ".skops":
        if len(model.activation) != len(snaps.actions):
            raise ValueError(f"config key snapshots.actions lists {len(snaps.actions)} actions "
                             f"({','.join(snaps.actions)}) but {path} scores "
                             f"{len(model.activation)}")
        return ModelBundle(model, snaps, policy, tuple(sources) or ("defaults",), model.kind)
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
    n_actions = int(model.get_layer("activation").output.shape[-1])
    if n_actions != len(snaps.actions):
        problems.append(f"snapshots.actions lists {len(snaps.actions)} actions "
                        f"({','.join(snaps.actions)}) but {name} scores {n_actions}")
    if problems:
        fix = " ".join(f"--set snapshots.{k}={v}" for k, v in wrong.items())
        raise ValueError("config key " + "; ".join(problems)
                         + (f" (give the training settings: {fix})" if fix else ""))

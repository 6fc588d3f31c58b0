"""Typed, frozen configuration objects built from flat kebab-case keys.

Presets (TOML) and Flower's ``[tool.flwr.app.config]`` both hold flat keys such as
``snapshots.max-len``; each section maps onto one dataclass here (``max_len``).
Unknown keys and out-of-range values raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from common.vocabulary import DEFAULT_ACTIONS, EVENT_TYPES

T = TypeVar("T")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested tables into dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, prefix=f"{name}."))
        else:
            flat[name] = _as_text_if_time(value)
    return flat


def _as_text_if_time(value: Any) -> Any:
    """TOML's bare dates and times (``start = 2025-01-01``) as the ISO text every setting
    takes; the settings, ``config.json`` and Flower's run config hold no date objects."""
    if isinstance(value, datetime.date | datetime.time):
        return value.isoformat()
    if isinstance(value, list):
        return [_as_text_if_time(v) for v in value]
    return value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Coerce a TOML / CLI / Flower value to the annotated field type."""
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or value == "":
            return None
        return _coerce(key, value, args[0])
    if origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(key, v, inner) for v in value)
    if hint is bool:
        if isinstance(value, str):
            low = value.strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"config key '{key}': expected true/false, got {value!r}")
        return bool(value)
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            if hint is not str and isinstance(value, bool):
                raise ValueError  # `true` is not the number 1
            out = hint(value)
        except (TypeError, ValueError, OverflowError):
            raise ValueError(
                f"config key '{key}': expected {hint.__name__}, got {value!r}"
            ) from None
        if hint is float and not math.isfinite(out):
            # inf or nan would pass range checks such as "> 0" and turn scores into inf/nan.
            raise ValueError(f"config key '{key}': expected a finite number, got {value!r}")
        return out
    return value


def from_flat(cls: type[T], flat: Mapping[str, Any], section: str) -> T:
    """Build dataclass ``cls`` from the keys of ``flat`` under ``section.``.

    Keys of other sections are ignored; an unknown key inside the section raises.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    kwargs: dict[str, Any] = {}
    prefix = f"{section}."
    for key, value in flat.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].replace("-", "_")
        if name not in fields:
            known = ", ".join(sorted(f.replace("_", "-") for f in fields))
            raise ValueError(f"unknown config key '{key}' (known in [{section}]: {known})")
        kwargs[name] = _coerce(key, value, hints[name])
    return cls(**kwargs)


def to_flat(obj: Any, section: str) -> dict[str, Any]:
    """The inverse of :func:`from_flat`, with tuples joined by commas (Flower takes scalars)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        if value is None:
            value = ""
        flat[f"{section}.{f.name.replace('_', '-')}"] = value
    return flat


def check_key(cond: bool, key: str, message: str) -> None:
    """Raise ``ValueError("config key '<key>': <message>")`` unless ``cond`` holds."""
    if not cond:
        raise ValueError(f"config key '{key}': {message}")


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """Seeded faults injected into sampled clients (the same knobs in ``client`` and
    ``simulation``); subclasses call :meth:`check_faults` with their section name."""

    dropout_prob: float = 0.0  # a sampled client fails with this probability
    straggler_prob: float = 0.0  # a sampled client is delayed ...
    straggler_delay: float = 0.0  # ... by this many seconds
    crash_prob: float = 0.0  # a sampled client's process is SIGKILLed (as by the OOM killer)

    def check_faults(self, section: str) -> None:
        """Check that the three probabilities are in [0, 1] and the delay is >= 0; the
        errors name the keys under ``section``."""
        for name in ("dropout_prob", "straggler_prob", "crash_prob"):
            check_key(0 <= getattr(self, name) <= 1, f"{section}.{name.replace('_', '-')}",
                   "must be in [0, 1]")
        check_key(self.straggler_delay >= 0, f"{section}.straggler-delay", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class SnapshotConfig:
    """How event logs become labelled snapshots (section ``snapshots``)."""

    observation_days: float = 28.0
    horizon_days: float = 14.0
    stride_days: float = 7.0
    tau_days: float = 7.0
    rho: float = 0.5
    weight_view: float = 1.0
    weight_click: float = 2.0
    weight_cart: float = 4.0
    weight_favorite: float = 3.0
    weight_purchase: float = 8.0
    max_len: int = 32
    hash_buckets: int = 64
    intervention_window_days: float = 7.0
    response_days: float = 7.0
    reengage_event: str = "purchase"
    val_cutoffs: int = 1
    test_cutoffs: int = 1
    actions: tuple[str, ...] = DEFAULT_ACTIONS
    # A shared calendar: every merchant's cutoffs are counted from ``start`` and the
    # label windows end by ``end`` (ISO dates). Empty = taken from the log itself.
    start: str = ""
    end: str = ""

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            value = getattr(self, name)
            if value:
                import pandas as pd  # only when a date is set: config checks stay light

                try:
                    pd.Timestamp(value)
                except ValueError:
                    raise ValueError(f"config key 'snapshots.{name}': expected an ISO date, "
                                     f"got {value!r}") from None
        for name in ("observation_days", "horizon_days", "stride_days", "tau_days",
                     "intervention_window_days", "response_days"):
            # Below an hour the windows hold no event and past ten years no log is long
            # enough: such values failed deep in the snapshot builder (an IndexError).
            value = getattr(self, name)
            check_key(1 / 24 <= value <= 3650, f"snapshots.{name.replace('_', '-')}",
                      f"must be between 1/24 (an hour) and 3650 days, got {value}")
        check_key(0 < self.rho < 1, "snapshots.rho", f"must be in (0, 1), got {self.rho}")
        for ev in EVENT_TYPES:
            check_key(getattr(self, f"weight_{ev}") >= 0, f"snapshots.weight-{ev}", "must be >= 0")
        check_key(any(self.event_weights), "snapshots.weight-purchase",
                  "the event weights are all 0: interest, and so the decay label, would be "
                  "0 for everyone; give at least one event a weight > 0")
        # A sequence and a category table that fit in memory (1e9 asked for terabytes).
        check_key(1 <= self.max_len <= 4096, "snapshots.max-len",
                  f"must be between 1 and 4096 events, got {self.max_len}")
        check_key(1 <= self.hash_buckets <= 1 << 20, "snapshots.hash-buckets",
                  f"must be between 1 and {1 << 20:,}, got {self.hash_buckets}")
        check_key(self.reengage_event in ("purchase", "any"), "snapshots.reengage-event",
               f"must be 'purchase' or 'any', got {self.reengage_event!r}")
        check_key(self.val_cutoffs >= 1, "snapshots.val-cutoffs", "must be >= 1")
        check_key(self.test_cutoffs >= 1, "snapshots.test-cutoffs", "must be >= 1")
        check_key(len(self.actions) >= 2 and self.actions[0] == "none", "snapshots.actions",
               "must list 'none' first and at least one action")
        check_key(len(set(self.actions)) == len(self.actions), "snapshots.actions",
                  f"names an action twice: {', '.join(self.actions)}")

    @property
    def event_weights(self) -> tuple[float, ...]:
        """The ``weight-<event>`` values in ``EVENT_TYPES`` order."""
        return tuple(getattr(self, f"weight_{ev}") for ev in EVENT_TYPES)


#: How many response aggregates there are (``common.features.RESPONSE_FEATURES``, which
#: imports this module): the length of ``model.response-centre`` and ``-scale``.
RESPONSE_WIDTH = 4


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The shared LSTM (section ``model``)."""

    event_embedding: int = 8
    category_embedding: int = 16
    lstm_units: int = 32
    bidirectional: bool = False
    dense_units: int = 32
    dropout: float = 0.1
    learning_rate: float = 3e-3
    loss_weight_decay: float = 1.0
    loss_weight_interest: float = 0.3
    loss_weight_activation: float = 0.5
    # How the activation head learns P(re-engage | action) (common.model): "contrast" =
    # a control logit every campaign row trains plus each action's shift from it;
    # "separate" = one logit per action, each trained on its own rows only.
    activation_head: str = "contrast"
    # The activation head also reads the aggregates (RESPONSE_FEATURES among them)
    # directly, beside the shared trunk.
    activation_wide: bool = True
    # What each action's shift (the uplift logit of the contrast head) reads: "response"
    # = only RESPONSE_FEATURES, standardised, linearly (a per-action logistic uplift on
    # what behaviour shows of the traits that move a customer); "shared" = the base's
    # inputs (the trunk, and the aggregates with activation-wide). The "separate" head
    # has no shifts and ignores it.
    activation_shift: str = "response"
    # False: the activation head reads the trunk's features, but its loss does not train
    # them (decay and interest alone shape the trunk; the control logit cannot overfit
    # the campaign rows through it).
    activation_trunk_gradient: bool = True
    # The centre and spread of the four RESPONSE_FEATURES (common.features) by which the
    # "response" shifts standardise them (common.model.Standardised); the defaults are the
    # synthetic log's (see common.model.Standardised). Fixed numbers, not statistics of
    # the data a process sees: every merchant must build the same model.
    response_centre: tuple[float, ...] = (0.45, -1.15, -1.1, -0.85)
    response_scale: tuple[float, ...] = (0.2, 0.43, 0.46, 0.39)
    # The "response" shifts' output is multiplied by this: under Adam (steps of about the
    # learning rate whatever the gradient's scale) the shifts then move this many times
    # faster, and jitter as much more. 1 = as built before.
    activation_shift_gain: float = 1.0
    interest_loss: str = "huber"
    # Off by default so the LSTM's inputs (and figures) stay as they were; GBDT and LR
    # read the cadence aggregates (common.features.CADENCE_FEATURES) either way.
    cadence_features: bool = False
    # XLA doubles training throughput but compiles for ~25 s in every new process: worth
    # it when a process trains many rounds (simulation), not when it trains once (a
    # deployed ClientApp runs each message in a fresh process).
    jit_compile: bool = True

    def __post_init__(self) -> None:
        for name in ("event_embedding", "category_embedding", "lstm_units", "dense_units"):
            check_key(getattr(self, name) >= 1, f"model.{name.replace('_', '-')}", "must be >= 1")
        check_key(0 <= self.dropout < 1, "model.dropout", "must be in [0, 1)")
        # Adam's step is about the learning rate in every weight: past 1 training only
        # diverges (1e6 gave a loss of 1e18 and a model scoring every user 1.0).
        check_key(0 < self.learning_rate <= 1, "model.learning-rate",
                  f"must be in (0, 1], got {self.learning_rate}")
        check_key(self.interest_loss in ("huber", "mse"), "model.interest-loss",
               "must be 'huber' or 'mse'")
        check_key(self.activation_head in ("contrast", "separate"), "model.activation-head",
                  f"must be 'contrast' or 'separate', got {self.activation_head!r}")
        check_key(self.activation_shift in ("response", "shared"), "model.activation-shift",
                  f"must be 'response' or 'shared', got {self.activation_shift!r}")
        for name, values in (("response-centre", self.response_centre),
                             ("response-scale", self.response_scale)):
            check_key(len(values) == RESPONSE_WIDTH, f"model.{name}",
                      f"expected {RESPONSE_WIDTH} numbers (one per response feature), "
                      f"got {len(values)}")
            check_key(all(math.isfinite(v) for v in values), f"model.{name}",
                      "must be finite numbers")
        check_key(min(self.response_scale) > 0, "model.response-scale",
                  f"must be > 0, got {list(self.response_scale)}")
        check_key(self.activation_shift_gain > 0, "model.activation-shift-gain",
                  f"must be > 0, got {self.activation_shift_gain}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The one fit function (section ``train``)."""

    epochs: int = 8
    batch_size: int = 256
    patience: int = 2
    # With a model whose activation shifts read only the response aggregates
    # (model.activation-shift = "response"): > 0 keeps those shifts from the last epoch
    # trained (in a federation, the last round's global model) and every other weight
    # from the best epoch by validation loss, training this many epochs past
    # ``patience``. The shifts are still being fitted when the decay loss is lowest; the
    # validation loss, mostly decay's, cannot tell when they are done. 0 = every weight
    # from the best epoch.
    shift_patience: int = 4
    class_weight: bool = False
    proximal_mu: float = 0.0
    verbose: int = 0

    def __post_init__(self) -> None:
        check_key(self.epochs >= 1, "train.epochs", "must be >= 1")
        check_key(self.batch_size >= 1, "train.batch-size", "must be >= 1")
        check_key(self.patience >= 0, "train.patience", "must be >= 0")
        check_key(self.shift_patience >= 0, "train.shift-patience", "must be >= 0")
        check_key(self.proximal_mu >= 0, "train.proximal-mu", "must be >= 0")
        check_key(self.verbose in (0, 1, 2), "train.verbose",
                  f"must be 0, 1 or 2 (Keras' fit), got {self.verbose}")


@dataclasses.dataclass(frozen=True)
class PolicyConfig:
    """The activation policy (section ``policy``)."""

    risk_threshold: float = 0.5
    budget: int = 0  # 0 = no budget: every user over the threshold may be treated
    value: float = 10.0
    cost_recommend: float = 0.05
    cost_coupon: float = 1.0
    cost_push: float = 0.1

    def __post_init__(self) -> None:
        check_key(0 <= self.risk_threshold <= 1, "policy.risk-threshold", "must be in [0, 1]")
        check_key(self.budget >= 0, "policy.budget", "must be >= 0")
        check_key(self.value >= 0, "policy.value", "must be >= 0")
        for action in ("recommend", "coupon", "push"):
            # A negative cost would pay the policy to treat: every user treated.
            check_key(self.cost(action) >= 0, f"policy.cost-{action}", "must be >= 0")

    def cost(self, action: str) -> float:
        """The ``cost-<action>`` of treating one user with ``action``; 0 for an action
        without a cost key (such as ``none``)."""
        return float(getattr(self, f"cost_{action}", 0.0))


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file into flat dotted keys; the message names the file on error."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")  # an editor's byte-order mark is fine
        return flatten(tomllib.loads(text))
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"config file {path}: not UTF-8 text (byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"config file {path}: {err}") from None


def apply_overrides(flat: Mapping[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``key=value`` strings (CLI ``--set``) on top of ``flat``.

    Values are parsed as TOML scalars where possible (``3``, ``0.5``, ``true``), else
    kept as strings.
    """
    out = dict(flat)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        try:
            value = _as_text_if_time(tomllib.loads(f"v = {raw}")["v"])
        except tomllib.TOMLDecodeError:
            value = raw
        out[key] = value
    return out

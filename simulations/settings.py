"""An experiment's settings: every section of the configuration, resolved and validated.

Nothing here reads data or imports pandas or TensorFlow, so the command line checks a
preset and every ``--set`` key in a fraction of a second, before any heavy import and
before a run folder exists. :mod:`simulations.experiment` prepares the data.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.config import (
    FaultConfig,
    ModelConfig,
    PolicyConfig,
    SnapshotConfig,
    TrainConfig,
    apply_overrides,
    check_key,
    from_flat,
    to_flat,
)
from common.vocabulary import BAD_ROWS
from server.config import DPConfig, FederationConfig, check_compatible
from simulations.synth.config import SynthConfig
from simulations.synth.presets import load_preset

SECTIONS: tuple[str, ...] = (
    "experiment", "data", "synthetic", "snapshots", "model", "train", "policy", "federation",
    "simulation", "privacy",
)


#: Seeds numpy's and scikit-learn's generators take: 0 .. SEEDS - 1.
SEEDS = 2**32


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Section ``experiment``."""

    name: str = "experiment"
    preset: str = ""
    seed: int = 0
    output_dir: str = "runs"  # relative paths resolve against the current folder
    # "tensorboard" or "tensorboard,mlflow" (see simulations.tracking)
    tracking: str = "tensorboard"

    def __post_init__(self) -> None:
        from simulations.tracking import tracking_backends

        check_path_part(self.name, "experiment.name")
        # numpy's and scikit-learn's generators take 0 .. 2**32 - 1 (they said only
        # "expected non-negative integer", or failed after the data was built)
        check_key(0 <= self.seed < SEEDS, "experiment.seed",
                  f"must be between 0 and {SEEDS - 1} (--seed), got {self.seed}")
        check_key(bool(str(self.output_dir).strip()), "experiment.output-dir", "must not be empty")
        tracking_backends(self.tracking, "experiment.tracking")

    def output_path(self) -> Path:
        return Path(self.output_dir).expanduser().resolve()


def check_path_part(value: str, key: str) -> None:
    """Refuse a value that, joined to a folder, could name a path outside that folder."""
    check_key(isinstance(value, str) and value.strip() != "", key, "must be a non-empty name")
    bad = ("/", "\\", "\0", os.sep, *((os.altsep,) if os.altsep else ()))
    check_key(not any(c in value for c in bad) and value not in (".", "..")
           and not Path(value).is_absolute(), key,
           f"must be a plain name without path separators or '..', got {value!r}")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Section ``data``: a real events file instead of the synthetic federation."""

    events: str = ""
    format: str = "auto"
    interventions: str = ""
    # Logs without a merchant column are split into this many merchants by a partitioner.
    partitioner: str = ""  # "", "iid" or "dirichlet"
    num_partitions: int = 0
    dirichlet_alpha: float = 0.5
    min_merchant_snapshots: int = 20  # merchants with fewer training snapshots are left out
    bad_rows: str = "error"  # CSV rows with the wrong number of fields: "error" or "skip"

    def __post_init__(self) -> None:
        check_key(self.bad_rows in BAD_ROWS, "data.bad-rows",
               f"must be 'error' or 'skip', got {self.bad_rows!r}")
        check_key(self.partitioner in ("", "iid", "dirichlet"), "data.partitioner",
               "must be '', 'iid' or 'dirichlet'")
        check_key(self.num_partitions >= 0, "data.num-partitions", "must be >= 0")
        check_key(self.min_merchant_snapshots >= 0, "data.min-merchant-snapshots", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class SimulationConfig(FaultConfig):
    """Section ``simulation``: how the Simulation Engine runs clients, and its faults."""

    client_cpus: float = 1.0
    ray_cpus: int = 0  # 0 = all cores of this machine
    ray_address: str = ""  # attach to an existing Ray cluster

    def __post_init__(self) -> None:
        check_key(self.client_cpus > 0, "simulation.client-cpus", "must be > 0")
        check_key(self.ray_cpus >= 0, "simulation.ray-cpus",
                  f"must be >= 0 (0 = every core), got {self.ray_cpus}")
        self.check_faults("simulation")


@dataclasses.dataclass(frozen=True)
class Experiment:
    """Every section resolved and validated; ``flat`` is what Flower's run config gets."""

    flat: Mapping[str, Any]
    experiment: ExperimentConfig
    data: DataConfig
    synthetic: SynthConfig | None
    snapshots: SnapshotConfig
    model: ModelConfig
    train: TrainConfig
    policy: PolicyConfig
    federation: FederationConfig
    simulation: SimulationConfig
    privacy: DPConfig = DPConfig()

    @property
    def seed(self) -> int:
        return self.experiment.seed

    def resolved(self) -> dict[str, Any]:
        """Every key with the value in effect, defaults filled in (what trackers log)."""
        out: dict[str, Any] = {}
        for section in SECTIONS:
            part = getattr(self, section)
            if part is not None:
                out.update(to_flat(part, section))
        return out


def experiment_from_flat(flat: Mapping[str, Any]) -> Experiment:
    """Validate flat dotted keys into an :class:`Experiment`."""
    for key in flat:
        section = key.split(".", 1)[0]
        if section not in SECTIONS or "." not in key:
            raise ValueError(f"unknown config key '{key}' (sections: {', '.join(SECTIONS)})")
    data = from_flat(DataConfig, flat, "data")
    synthetic = None if data.events else from_flat(SynthConfig, flat, "synthetic")
    exp = Experiment(
        flat=dict(flat),
        experiment=from_flat(ExperimentConfig, flat, "experiment"),
        data=data,
        synthetic=synthetic,
        snapshots=from_flat(SnapshotConfig, flat, "snapshots"),
        model=from_flat(ModelConfig, flat, "model"),
        train=from_flat(TrainConfig, flat, "train"),
        policy=from_flat(PolicyConfig, flat, "policy"),
        federation=from_flat(FederationConfig, flat, "federation"),
        simulation=from_flat(SimulationConfig, flat, "simulation"),
        privacy=from_flat(DPConfig, flat, "privacy"),
    )
    check_compatible(exp.federation, exp.privacy)
    return exp


def resolve(
    preset: str | None = None,
    *,
    events: str | None = None,
    format: str = "auto",
    interventions: str | None = None,
    overrides: list[str] | None = None,
    seed: int | None = None,
) -> Experiment:
    """Build an experiment from a preset (name or TOML path) or an events file, plus overrides."""
    if events:
        base = load_preset(preset) if preset else {}
        base = {k: v for k, v in base.items() if not k.startswith("synthetic.")}
        events_path = Path(events).resolve()
        if not events_path.exists():
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(events_path))
        base.update({"data.events": str(events_path), "data.format": format,
                     "experiment.name": _plain_name(events_path.stem, "events")})
        if interventions:
            base["data.interventions"] = str(Path(interventions).resolve())
    else:
        base = load_preset(preset or "quick")
        if not any(k.startswith("synthetic.") for k in base) and not base.get("data.events"):
            raise ValueError(f"preset '{preset}' has no [synthetic] section and no data.events: "
                             "give the events file with --events")
        base.setdefault("experiment.name", _plain_name(Path(preset or "quick").resolve().stem,
                                                       "experiment"))
        base["experiment.preset"] = preset or "quick"
    flat = apply_overrides(base, overrides)
    if flat.get("data.events"):
        # A --set synthetic key beside a real log would be ignored: say so. The preset's
        # own synthetic section simply goes.
        asked = sorted(k for k in (item.split("=", 1)[0].strip() for item in overrides or [])
                       if k.startswith("synthetic."))
        check_key(not asked, asked[0] if asked else "synthetic",
                  f"the data comes from data.events ({flat['data.events']}): the synthetic "
                  "section is not used; leave it out")
        flat = {k: v for k, v in flat.items() if not k.startswith("synthetic.")}
    for key, flag, given in (("data.events", "--events", events),
                             ("data.interventions", "--interventions", interventions),
                             ("data.format", "--format",
                              format if events and format != "auto" else None)):
        if given and flat.get(key) != base.get(key):  # --set would silently win
            raise ValueError(f"--set {key}={flat.get(key)} and {flag} {given}: give the "
                             f"{flag.lstrip('-')} once")
    if seed is not None:
        flat["experiment.seed"] = seed
    return experiment_from_flat(flat)


def _plain_name(stem: str, fallback: str) -> str:
    """A file's stem as a run name: never empty, never a path."""
    return stem if stem and stem not in (".", "..") else fallback

"""Federation settings (section ``federation``)."""

from __future__ import annotations

import dataclasses
import math

from common.config import _check

STRATEGIES: tuple[str, ...] = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedtrimmedavg", "fedmedian", "krum",
)
#: ``simulation``: the ServerApp prepares the data and evaluates on pooled held-out
#: snapshots. ``deployment``: every merchant brings its own file; the server holds no
#: data and relies on client-side evaluation (``fraction-evaluate`` > 0).
MODES: tuple[str, ...] = ("simulation", "deployment")


@dataclasses.dataclass(frozen=True)
class FederationConfig:
    """How the server runs rounds."""

    mode: str = "simulation"
    strategy: str = "fedavg"
    num_rounds: int = 5
    local_epochs: int = 1
    fraction_train: float = 1.0
    min_train_nodes: int = 2
    fraction_evaluate: float = 0.0
    min_available_nodes: int = 2
    proximal_mu: float = 0.01  # FedProx only
    server_learning_rate: float = 0.01  # FedAdam / FedYogi
    server_momentum: float = 0.9  # FedAvgM
    trim_beta: float = 0.1  # FedTrimmedAvg
    num_malicious: int = 0  # Krum
    round_timeout: float = 600.0
    patience_rounds: int = 0  # stop when validation loss has not improved for this many rounds
    resume: bool = False
    run_dir: str = ""  # where checkpoints, metrics.jsonl and model.keras go (absolute)
    eval_data: str = ""  # simulation: pooled validation + test snapshots (.npz) for evaluate_fn
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        _check(self.mode in MODES, "federation.mode",
               f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(not (self.mode == "deployment" and self.eval_data), "federation.eval-data",
               "must be empty in deployment (the server holds no merchant data)")
        _check(self.strategy in STRATEGIES, "federation.strategy",
               f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        _check(self.num_rounds >= 1, "federation.num-rounds", "must be >= 1")
        _check(self.local_epochs >= 1, "federation.local-epochs", "must be >= 1")
        _check(0 < self.fraction_train <= 1, "federation.fraction-train", "must be in (0, 1]")
        _check(0 <= self.fraction_evaluate <= 1, "federation.fraction-evaluate",
               "must be in [0, 1]")
        _check(self.min_train_nodes >= 1, "federation.min-train-nodes", "must be >= 1")
        _check(self.min_available_nodes >= 1, "federation.min-available-nodes", "must be >= 1")
        _check(self.round_timeout > 0, "federation.round-timeout", "must be > 0")
        _check(0 <= self.trim_beta < 0.5, "federation.trim-beta", "must be in [0, 0.5)")
        _check(self.patience_rounds >= 0, "federation.patience-rounds", "must be >= 0")


#: ``off``; ``server-fixed``: the server clips each update and adds Gaussian noise;
#: ``client-fixed``: the merchants clip (``fixedclipping_mod``), the server adds noise;
#: ``adaptive``: server-side clipping whose norm follows a target quantile (Andrew et al.).
DP_MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed", "adaptive")
#: Strategies whose aggregate is a plain mean of the clipped updates, the only case
#: in which noise of std ``z * C / m`` gives the accounted guarantee.
DP_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Client-level differential privacy of the model updates (section ``privacy``)."""

    mode: str = "off"
    noise_multiplier: float = 1.0  # z: noise std is z * clipping-norm / sampled clients
    clipping_norm: float = 1.0  # L2 bound of one client's update (adaptive: initial bound)
    target_delta: float = 1e-5
    target_epsilon: float = 0.0  # > 0: stop before a round would spend more than this

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def __post_init__(self) -> None:
        _check(self.mode in DP_MODES, "privacy.mode",
               f"must be one of {', '.join(DP_MODES)}, got {self.mode!r}")
        _check(self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier),
               "privacy.noise-multiplier", "must be a finite number > 0")
        _check(self.clipping_norm > 0 and math.isfinite(self.clipping_norm),
               "privacy.clipping-norm", "must be a finite number > 0")
        _check(0 < self.target_delta < 1, "privacy.target-delta", "must be in (0, 1)")
        _check(self.target_epsilon >= 0 and math.isfinite(self.target_epsilon),
               "privacy.target-epsilon", "must be >= 0 (0 = no budget)")

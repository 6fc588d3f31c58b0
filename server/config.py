"""Federation settings (section ``federation``)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from common.config import (
    ModelConfig,
    PolicyConfig,
    SnapshotConfig,
    TrainConfig,
    check_key,
    from_flat,
)

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = (
    "fedavg", "fedprox", "fedadam", "fedyogi", "fedavgm", "fedtrimmedavg", "fedmedian", "krum",
)
#: ``simulation``: the ServerApp prepares the data and evaluates on pooled held-out
#: snapshots. ``deployment``: every merchant brings its own file; the server holds no
#: data: each train reply scores the incoming global model on the merchant's validation
#: and test rows (``pre-evaluate``), which selects the round kept; separate evaluate
#: messages (``fraction-evaluate`` > 0) are optional.
MODES: tuple[str, ...] = ("simulation", "deployment")
#: Whether train replies score the incoming global model before training: ``auto`` is
#: ``on`` in deployment (where it selects the round kept) and ``off`` in simulation
#: (the server scores every round on its pooled held-out data).
PRE_EVALUATE: tuple[str, ...] = ("auto", "on", "off")
#: Strategies that work with secure aggregation. SecAgg+ reveals only the weighted sum
#: of the updates: FedAvg and FedProx aggregate exactly that, and Flower's legacy
#: FedAvgM / FedAdam / FedYogi (the ones its SecAgg+ workflow drives) apply their
#: server optimizer to the FedAvg result, so they work on the sum too. FedTrimmedAvg,
#: FedMedian and Krum rank or compare the individual updates, which the server never sees.
SECAGG_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi")
#: SecAgg+ sums integers modulo 2**32 (Flower's ``modulus_range``); every client's
#: quantised update lies in [0, quantization-range], so the sum of all must stay below it.
SECAGG_MODULUS = 2**32


def _key(name: str) -> str:
    """The ``federation.`` config key of a :class:`FederationConfig` field."""
    return f"federation.{name.replace('_', '-')}"


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
    pre_evaluate: str = "auto"  # see PRE_EVALUATE
    # Evaluate the global model on the pooled held-out data every this many rounds (and
    # after the last); the model kept is the best evaluated one.
    eval_every: int = 1
    resume: bool = False
    run_dir: str = ""  # where checkpoints, metrics.jsonl and model.keras go (absolute)
    eval_data: str = ""  # simulation: pooled validation + test snapshots (.npz) for evaluate_fn
    keep_checkpoints: int = 2
    # Simulation only: merchants a virtual SuperNode hosts (one Flower message a node and
    # round names its sampled merchants; server/merchant_grid.py, client/hosted.py).
    merchants_per_node: int = 1
    # Secure aggregation (SecAgg+, Flower's legacy workflow); see server/secagg.py.
    secure_aggregation: bool = False
    # Each client's secrets are split among this many neighbours (itself included). 0: a
    # count growing like log n, 2 ceil(log2 n) + 1 of the n sampled (everyone when that is
    # not fewer; server/secagg.py:log_shares); in (0, 1]: a share of the sampled clients
    # (Flower's float); an odd whole number >= 3: a count.
    secagg_num_shares: float = 0.0
    # In (0.5, 1]: a share of secagg-num-shares; a whole number: a count. Shares needed to
    # rebuild a client's secret: more protects better, fewer tolerates more dropouts.
    secagg_reconstruction_threshold: float = 0.6
    secagg_clipping_range: float = 8.0  # weighted weights are clipped to [-range, range] ...
    secagg_quantization_range: int = 4_194_304  # ... and quantised to this many levels
    secagg_max_weight: float = 10_000.0  # largest num-examples a client may weigh in with
    # After the last round, every merchant computes per-group attributions of the kept
    # model on its own validation period and sends only those scalars (server/attribution.py).
    # Off here: in deployment each message starts a ClientApp process; the simulation
    # driver turns it on.
    attributions: bool = False
    attribution_repeats: int = 3  # permutations per feature group
    # A server-side step for the response shifts alone (server/shift_step.py): after each
    # round's aggregate, v = momentum * v + (aggregate - old) and the shifts old + lr * v;
    # lr 1 and momentum 0 = the aggregate. Momentum 0.75 was chosen on seeds 3 and 4 of
    # the default preset's capture (README, How the LSTM learns activation); it applies
    # where it was measured, FedAvg / FedProx without DP (shift_momentum below).
    shift_server_lr: float = 1.0
    shift_server_momentum: float = 0.75
    # After the last round, the kept model's activation head (its base and shift layers,
    # common.head_refit) is fitted again, every other weight fixed, on the summed
    # statistics of the merchants with enough training campaign rows to answer: the best
    # of this many heads, the rounds' one and damped Newton steps (server/head_refit.py;
    # federation.json's ``head_refit``). Not under SecAgg+, DP or a robust strategy.
    # 0 = off.
    head_refit_steps: int = 3

    def __post_init__(self) -> None:
        check_key(self.mode in MODES, "federation.mode",
               f"must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_key(not (self.mode == "deployment" and self.eval_data), "federation.eval-data",
               "must be empty in deployment (the server holds no merchant data)")
        check_key(self.strategy in STRATEGIES, "federation.strategy",
               f"must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        check_key(self.num_rounds >= 1, "federation.num-rounds", "must be >= 1")
        check_key(self.local_epochs >= 1, "federation.local-epochs", "must be >= 1")
        check_key(0 < self.fraction_train <= 1, "federation.fraction-train", "must be in (0, 1]")
        check_key(0 <= self.fraction_evaluate <= 1, "federation.fraction-evaluate",
               "must be in [0, 1]")
        check_key(self.min_train_nodes >= 1, "federation.min-train-nodes", "must be >= 1")
        check_key(self.min_available_nodes >= 1, "federation.min-available-nodes", "must be >= 1")
        check_key(self.round_timeout > 0, "federation.round-timeout", "must be > 0")
        check_key(0 <= self.trim_beta < 0.5, "federation.trim-beta", "must be in [0, 0.5)")
        check_key(self.patience_rounds >= 0, "federation.patience-rounds", "must be >= 0")
        check_key(self.eval_every >= 1, "federation.eval-every", "must be >= 1")
        # 0 or less would delete the checkpoint just written: a stopped run could not resume
        check_key(self.keep_checkpoints >= 1, "federation.keep-checkpoints",
                  f"must be >= 1 (the newest checkpoint is what --resume reads), got "
                  f"{self.keep_checkpoints}")
        check_key(math.isfinite(self.proximal_mu) and self.proximal_mu >= 0,
                  "federation.proximal-mu", f"must be a finite number >= 0, got "
                  f"{self.proximal_mu}")
        for name in ("server_learning_rate", "shift_server_lr"):
            value = getattr(self, name)
            check_key(math.isfinite(value) and value > 0, _key(name),
                      f"must be a finite number > 0, got {value}")
        for name in ("server_momentum", "shift_server_momentum"):
            value = getattr(self, name)
            check_key(0 <= value < 1, _key(name), f"must be in [0, 1), got {value}")
        check_key(self.num_malicious >= 0, "federation.num-malicious",
                  f"must be >= 0, got {self.num_malicious}")
        check_key(self.pre_evaluate in PRE_EVALUATE, "federation.pre-evaluate",
                  f"must be one of {', '.join(PRE_EVALUATE)}, got {self.pre_evaluate!r}")
        check_key(0 <= self.head_refit_steps <= 20, "federation.head-refit-steps",
                  f"must be in [0, 20] (merchants answer up to 20), got "
                  f"{self.head_refit_steps}")
        check_key(1 <= self.attribution_repeats <= 20, "federation.attribution-repeats",
                  "must be in [1, 20]")
        check_key(self.merchants_per_node >= 1, "federation.merchants-per-node",
                  f"must be >= 1, got {self.merchants_per_node}")
        if self.merchants_per_node > 1:
            check_key(self.mode == "simulation", "federation.merchants-per-node",
                      "must be 1 in deployment (each merchant runs its own SuperNode)")
            check_key(not self.secure_aggregation, "federation.merchants-per-node",
                      "must be 1 with federation.secure-aggregation: SecAgg+ needs one "
                      "protocol party (keys, shares, masks) per node")
        if self.secure_aggregation:
            self._check_secagg()

    @property
    def pre_evaluates(self) -> bool:
        """Whether train replies score the incoming global model (see ``PRE_EVALUATE``)."""
        if self.pre_evaluate == "auto":
            return self.mode == "deployment"
        return self.pre_evaluate == "on"

    def _check_secagg(self) -> None:
        check_key(self.strategy in SECAGG_STRATEGIES, "federation.strategy",
               f"{self.strategy!r} cannot run with federation.secure-aggregation: the server "
               "only learns the weighted sum of the updates, and this strategy needs each "
               f"client's own update (use one of {', '.join(SECAGG_STRATEGIES)})")
        check_key(self.secagg_num_shares >= 0, "federation.secagg-num-shares",
                  "must be 0 (a count growing like log n), a share in (0, 1] or an odd count "
                  f">= 3, got {self.secagg_num_shares}")
        shares, threshold = self.secagg_shares()
        check_key(not isinstance(shares, int) or (shares >= 3 and shares % 2 == 1),
               "federation.secagg-num-shares", "as a count must be odd and >= 3 (a client "
               f"shares with itself and as many neighbours on each side), got {shares}")
        if isinstance(threshold, int):
            check_key(threshold >= 2, "federation.secagg-reconstruction-threshold",
                   f"as a count must be >= 2, got {threshold}")
            check_key(not isinstance(shares, int) or shares / 2 < threshold < shares,
                   "federation.secagg-reconstruction-threshold",
                   f"must be more than half of federation.secagg-num-shares ({shares}) so "
                   "the server cannot rebuild both secrets of one client, and less than it "
                   f"so a client may drop out, got {threshold}")
        else:
            check_key(threshold > 0.5, "federation.secagg-reconstruction-threshold",
                   "as a share must be in (0.5, 1] so the server cannot rebuild both secrets "
                   f"of one client, got {threshold}")
        check_key(math.isfinite(self.secagg_clipping_range) and self.secagg_clipping_range > 0,
               "federation.secagg-clipping-range", "must be a finite number > 0")
        check_key(2 <= self.secagg_quantization_range < SECAGG_MODULUS,
               "federation.secagg-quantization-range", f"must be in [2, {SECAGG_MODULUS})")
        check_key(math.isfinite(self.secagg_max_weight) and self.secagg_max_weight > 0,
               "federation.secagg-max-weight", "must be a finite number > 0")

    def secagg_shares(self) -> tuple[int | float | None, int | float]:
        """``num_shares`` and ``reconstruction_threshold`` in Flower's terms: a float is a
        share (of the sampled clients, of the shares), an int a count; ``num_shares`` is
        None for the logarithmic count (``secagg-num-shares`` 0)."""
        if self.secagg_num_shares == 0:
            return None, _share_or_count(self.secagg_reconstruction_threshold,
                                         "federation.secagg-reconstruction-threshold")
        return (_share_or_count(self.secagg_num_shares, "federation.secagg-num-shares"),
                _share_or_count(self.secagg_reconstruction_threshold,
                                "federation.secagg-reconstruction-threshold"))


def _share_or_count(value: float, key: str) -> int | float:
    check_key(math.isfinite(value) and value > 0, key, f"must be a number > 0, got {value}")
    if value <= 1:
        return float(value)
    check_key(float(value).is_integer(), key,
           f"must be a share in (0, 1] or a whole count, got {value}")
    return int(value)


#: ``off``; ``server-fixed``: the server clips each update and adds Gaussian noise;
#: ``client-fixed``: the merchants clip (``fixedclipping_mod``), the server adds noise;
#: ``adaptive``: server-side clipping whose norm follows a target quantile (Andrew et al.).
DP_MODES: tuple[str, ...] = ("off", "server-fixed", "client-fixed", "adaptive")
#: Strategies whose aggregate is a plain mean of the clipped updates, the only case
#: in which noise of std ``z * C / m`` gives the accounted guarantee.
DP_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")


#: Whose contribution the guarantee bounds: ``merchant`` (the modes above: one merchant's
#: whole update) or ``customer`` (one customer of one merchant: all of that customer's
#: events there; ``server/customer_dp.py``).
DP_UNITS: tuple[str, ...] = ("merchant", "customer")
#: Where the noise of customer-level DP is added: ``central`` (the server adds it to the
#: plain sum), ``distributed`` (each merchant adds a share, SecAgg+ sums them) or
#: ``local`` (each merchant adds all of it; ``server/customer_secagg.py``).
DP_PLACEMENTS: tuple[str, ...] = ("central", "distributed", "local")
#: ``privacy.server-optimizer`` under customer-level DP (``server.customer_step``).
SERVER_OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
#: The merchant-level default of ``target-delta`` (customer level: 1 / (10 customers)).
MERCHANT_DELTA = 1e-5


@dataclasses.dataclass(frozen=True)
class DPConfig:
    """Differential privacy of the model updates (section ``privacy``)."""

    mode: str = "off"
    noise_multiplier: float = 1.0  # z: noise std is z * clipping-norm / sampled clients
    clipping_norm: float = 1.0  # L2 bound of one client's update (adaptive: initial bound)
    # 0 = the default: 1e-5 per merchant; 1 / (10 customers) per customer
    target_delta: float = 0.0
    target_epsilon: float = 0.0  # > 0: stop before a round would spend more than this
    # adaptive: std of the noise on the clipped-update count (0 = Flower's default,
    # sampled clients / 20, which needs noise-multiplier < sampled clients / 10)
    clipped_count_stddev: float = 0.0
    unit: str = "merchant"  # see DP_UNITS
    placement: str = "central"  # customer unit: see DP_PLACEMENTS
    customer_rate: float = 0.1  # customer unit: q, each customer's chance to be in a round
    # customer unit: customers in the federation, a declared public figure; 0 = estimated
    # from the merchants' counts in round 1 (see server/customer_dp.py)
    customers: int = 0
    customer_learning_rate: float = 1.0  # customer unit: eta in update = -eta * gradient
    # customer unit: how the server steps along the noised mean update (post-processing):
    # see server.customer_step; learning rate 0 = the optimizer's default
    server_optimizer: str = "adam"
    server_learning_rate: float = 0.0
    # customer unit, simulation only: each merchant seeds its customer sample from
    # experiment.seed, the round and the merchant (reproducible runs). Off: OS entropy,
    # the only way the subsampling amplification in ε holds, as the seed is in the run
    # config the server hands out.
    seeded_sampling: bool = False
    # customer unit, distributed placement: m_min, the fewest merchants whose noise shares
    # a released sum holds; each adds N(0, (z C)^2 / m_min). 0 = SecAgg+'s reconstruction
    # threshold for the merchants sampled a round (it unmasks no smaller sum).
    min_replies: int = 0

    @property
    def enabled(self) -> bool:
        """Whether a merchant-level ``mode`` (other than ``off``) is on."""
        return self.mode != "off"

    @property
    def customer_level(self) -> bool:
        """Whether the unit is the customer (``privacy.unit = customer``)."""
        return self.unit == "customer"

    def delta(self, customers: int | None = None) -> float:
        """δ: ``target-delta`` when set; else 1e-5 per merchant, or 1 / (10 ``customers``)
        per customer (None while the count is unknown)."""
        if self.target_delta > 0:
            return self.target_delta
        if not self.customer_level:
            return MERCHANT_DELTA
        if not customers:
            raise ValueError("delta: the number of customers is not known yet")
        return 1.0 / (10.0 * customers)

    def __post_init__(self) -> None:
        check_key(self.mode in DP_MODES, "privacy.mode",
               f"must be one of {', '.join(DP_MODES)}, got {self.mode!r}")
        check_key(self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier),
               "privacy.noise-multiplier", "must be a finite number > 0")
        check_key(self.clipping_norm > 0 and math.isfinite(self.clipping_norm),
               "privacy.clipping-norm", "must be a finite number > 0")
        check_key(0 <= self.target_delta < 1, "privacy.target-delta",
                  "must be in (0, 1), or 0 for the default")
        check_key(self.target_epsilon >= 0 and math.isfinite(self.target_epsilon),
               "privacy.target-epsilon", "must be >= 0 (0 = no budget)")
        check_key(self.clipped_count_stddev >= 0 and math.isfinite(self.clipped_count_stddev),
               "privacy.clipped-count-stddev", "must be a finite number >= 0 (0 = default)")
        check_key(self.unit in DP_UNITS, "privacy.unit",
                  f"must be one of {', '.join(DP_UNITS)}, got {self.unit!r}")
        self._check_customer_keys()
        if self.customer_level:
            self._check_customer_level()

    def _check_customer_keys(self) -> None:
        """The ``privacy.customer-*`` keys' ranges, whatever the unit (a typo caught now
        rather than when the unit is switched)."""
        check_key(0 < self.customer_rate <= 1, "privacy.customer-rate",
                  f"must be in (0, 1], got {self.customer_rate}")
        check_key(self.customers >= 0, "privacy.customers",
                  "must be >= 0 (0 = estimated in round 1)")
        check_key(self.min_replies >= 0, "privacy.min-replies",
                  f"must be >= 0 (0 = SecAgg+'s reconstruction threshold), got "
                  f"{self.min_replies}")
        value = self.customer_learning_rate
        check_key(value > 0 and math.isfinite(value), "privacy.customer-learning-rate",
                  f"must be a finite number > 0, got {value}")
        value = self.server_learning_rate
        check_key(value >= 0 and math.isfinite(value), "privacy.server-learning-rate",
                  f"must be a finite number >= 0 (0 = the optimizer's default), got {value}")
        check_key(self.server_optimizer in SERVER_OPTIMIZERS, "privacy.server-optimizer",
                  f"must be one of {', '.join(SERVER_OPTIMIZERS)}, got "
                  f"{self.server_optimizer!r}")

    def _check_customer_level(self) -> None:
        check_key(self.placement in DP_PLACEMENTS, "privacy.placement",
                  f"must be one of {', '.join(DP_PLACEMENTS)}, got {self.placement!r}")
        check_key(self.min_replies == 0 or self.placement == "distributed",
                  "privacy.min-replies", "applies to privacy.placement = distributed only "
                  f"(placement is {self.placement!r}): leave it at 0")
        check_key(self.mode == "off", "privacy.mode",
                  f"must be 'off' with privacy.unit = customer (got {self.mode!r}): "
                  "merchant-level and customer-level DP cannot run at once")


#: Privacy modes that work with secure aggregation: none, or the merchants clip their own
#: update (``fixedclipping_mod`` runs before the update is masked) and the server adds
#: the noise to the sum. Server-side clipping (fixed or adaptive) needs each update.
SECAGG_DP_MODES: tuple[str, ...] = ("off", "client-fixed")


def check_compatible(fed: FederationConfig, dp: DPConfig) -> None:
    """Raise ``ValueError`` for settings of two sections that cannot run together."""
    check_key(not dp.seeded_sampling or (dp.customer_level and fed.mode == "simulation"),
              "privacy.seeded-sampling",
              "is for simulations with privacy.unit = customer only: a seeded sample is one "
              "the server can recompute, so epsilon's subsampling would not hold")
    if fed.merchants_per_node > 1:
        check_key(dp.mode != "client-fixed", "federation.merchants-per-node",
                  "must be 1 with privacy.mode = client-fixed: the merchants' clipping "
                  "mod would clip a node's message, not each merchant's update")
        check_key(not dp.customer_level, "federation.merchants-per-node",
                  "must be 1 with privacy.unit = customer (not supported with several "
                  "merchants a node)")
    if dp.customer_level:
        check_key(not (fed.secure_aggregation and dp.placement == "central"),
                  "privacy.placement", "'central' cannot run with federation.secure-"
                  "aggregation: the server adds the noise to the plain sum (use "
                  "'distributed': the merchants add shares of it under SecAgg+)")
        check_key(fed.secure_aggregation or dp.placement != "distributed",
                  "privacy.placement", "'distributed' needs federation.secure-aggregation "
                  "= true: each merchant's noise share is too small to protect its sum on "
                  "its own, only SecAgg+ keeps the server from seeing it")
        check_key(fed.strategy in DP_STRATEGIES, "privacy.unit",
                  f"'customer' needs a strategy that sums the clipped updates "
                  f"({', '.join(DP_STRATEGIES)}); federation.strategy is {fed.strategy!r}")
        check_key(fed.pre_evaluate != "on", "federation.pre-evaluate",
                  "'on' cannot run with privacy.unit = customer: the pre-training losses "
                  "would leave the merchants outside epsilon (leave it at 'auto', which "
                  "is off under customer-level DP, or set 'off')")
        default_mu = FederationConfig.proximal_mu
        check_key(fed.proximal_mu == default_mu, "federation.proximal-mu",
                  f"has no effect with privacy.unit = customer (a merchant takes no local "
                  f"steps, so there is no proximal term): leave it at {default_mu}, got "
                  f"{fed.proximal_mu}")
    if not fed.secure_aggregation:
        return
    check_key(dp.mode in SECAGG_DP_MODES, "privacy.mode",
           f"{dp.mode!r} cannot run with federation.secure-aggregation: the server would "
           "clip each client's update, and under secure aggregation it only sees their sum "
           "(use 'client-fixed': the merchants clip, the server adds noise to the sum)")
    check_key(not dp.enabled or fed.strategy in DP_STRATEGIES, "privacy.mode",
           f"{dp.mode!r} needs a strategy that averages the clipped updates "
           f"({', '.join(DP_STRATEGIES)}); federation.strategy is {fed.strategy!r}")


#: Strategies whose aggregate the shifts' momentum steps on: the plain averages. FedAvgM,
#: FedAdam and FedYogi keep a server optimizer of their own (a velocity on top would
#: compound it); Krum, FedMedian and FedTrimmedAvg bound each round's pull by ranking the
#: updates, and a velocity would carry one round's pull into the next.
SHIFT_MOMENTUM_STRATEGIES: tuple[str, ...] = ("fedavg", "fedprox")


def shift_momentum(fed: FederationConfig, dp: DPConfig) -> float:
    """The momentum of the server's step on the response shifts
    (``federation.shift-server-momentum``) where it applies: FedAvg or FedProx without
    differential privacy, the setting it was chosen in. Elsewhere 0, and the run's log
    says so: with DP a velocity would add up the rounds' noise on the shifts (still
    post-processing, but not measured), and see :data:`SHIFT_MOMENTUM_STRATEGIES`.
    ``federation.shift-server-lr`` applies everywhere."""
    momentum = fed.shift_server_momentum
    if momentum and (fed.strategy not in SHIFT_MOMENTUM_STRATEGIES or dp.enabled
                     or dp.customer_level):
        reason = ("differential privacy is on" if dp.enabled or dp.customer_level
                  else f"federation.strategy is {fed.strategy!r}")
        log.info("federation.shift-server-momentum %g does not apply (%s): the response "
                 "shifts step without momentum", momentum, reason)
        return 0.0
    return momentum


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """Everything the ServerApp reads from the run config, one typed section each."""

    federation: FederationConfig
    model: ModelConfig
    snapshots: SnapshotConfig
    train: TrainConfig
    seed: int
    privacy: DPConfig = DPConfig()
    #: Written into model.json beside the model, so that scoring it uses the policy the
    #: run was judged on (a comparison's other models carry theirs).
    policy: PolicyConfig = PolicyConfig()


def settings_from_flat(flat: Mapping[str, Any]) -> ServerSettings:
    """The server's settings from a flat run config (``section.key`` names)."""
    return ServerSettings(
        federation=from_flat(FederationConfig, flat, "federation"),
        model=from_flat(ModelConfig, flat, "model"),
        snapshots=from_flat(SnapshotConfig, flat, "snapshots"),
        train=from_flat(TrainConfig, flat, "train"),
        seed=int(flat.get("experiment.seed", 0)),
        privacy=from_flat(DPConfig, flat, "privacy"),
        policy=from_flat(PolicyConfig, flat, "policy"),
    )

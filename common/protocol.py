"""The names the server and the merchants agree on: instruction config keys and the
reply metrics that select a round.

The server (``server.strategy``, ``server.rounds``, ``server.attribution``) writes these
keys and reads these metrics; the merchant (``client.work``, ``client.attribution``)
reads the keys and writes the metrics. Both import them from here, so renaming one side
cannot silently break model selection (``tests/test_selection.py`` checks the two sides
against each other).
"""

from __future__ import annotations

#: Train config key: the global round (it survives a resume; ``server-round`` restarts).
GLOBAL_ROUND_KEY = "global-round"
#: Train config key: score the incoming global model before training.
PRE_EVALUATE_KEY = "pre-evaluate"
#: Evaluate config key: add the validation loss to the reply (the last round's model).
SCORE_VALIDATION_KEY = "score-validation"

#: Evaluate config keys of the attribution round (``client.attribution``): whether to
#: compute attributions, permutations per group, the permutations' seed.
ATTRIBUTIONS_KEY = "attributions"
ATTRIBUTION_REPEATS_KEY = "attribution-repeats"
ATTRIBUTION_SEED_KEY = "attribution-seed"

#: Evaluate config key of the head refit (``client.head_refit``): sum the head's
#: statistics over the training campaign rows; the reply metrics carrying them.
HEAD_REFIT_KEY = "head-refit"
#: Evaluate config key of the head refit: the steps the server takes (a merchant's
#: least rows grow with them, ``common.head_refit.least_rows``).
HEAD_REFIT_STEPS_KEY = "head-refit-steps"
HEAD_REFIT_ROWS = "head_refit_rows"
HEAD_REFIT_LOSS = "head_refit_loss"
HEAD_REFIT_GRADIENT = "head_refit_gradient"
HEAD_REFIT_HESSIAN = "head_refit_hessian"
HEAD_REFIT_METRICS: tuple[str, ...] = (HEAD_REFIT_ROWS, HEAD_REFIT_LOSS, HEAD_REFIT_GRADIENT,
                                       HEAD_REFIT_HESSIAN)

#: What the server's federated score is called -> (the reply metric holding the incoming
#: model's loss, the reply metric counting the rows it is the mean over).
PRE_TRAINING_LOSSES: dict[str, tuple[str, str]] = {
    "val_loss": ("pre_val_loss", "val_examples"),
    "eval_loss": ("pre_eval_loss", "test_examples"),
    "decay_log_loss": ("pre_decay_log_loss", "test_examples"),
}
#: Every metric a train reply carries when asked for :data:`PRE_EVALUATE_KEY`.
PRE_TRAINING_METRICS: tuple[str, ...] = tuple(dict.fromkeys(
    k for pair in PRE_TRAINING_LOSSES.values() for k in pair))
#: What an evaluate reply adds when asked for :data:`SCORE_VALIDATION_KEY`.
VALIDATION_METRICS: tuple[str, ...] = PRE_TRAINING_LOSSES["val_loss"]

#: Train config keys of customer-level DP (``client.customer_dp``): q, each customer's
#: chance to be sampled; C, the bound of one customer's update; eta, its learning rate.
CUSTOMER_RATE_KEY = "customer-rate"
CUSTOMER_CLIP_KEY = "customer-clipping-norm"
CUSTOMER_LR_KEY = "customer-learning-rate"
#: Train config key of the distributed and local placements: the std of the Gaussian
#: noise a merchant adds to every coordinate of its clipped sum (absent: central noise).
CUSTOMER_NOISE_KEY = "customer-noise-std"
#: Train config key, simulation only (``privacy.seeded-sampling``): seed the customer
#: sample from ``experiment.seed``, the round and the merchant. Absent: OS entropy.
CUSTOMER_SEEDED_KEY = "customer-seeded-sampling"
#: Reply metrics of customer-level DP: customers in the sum, customers with training
#: snapshots at the merchant (the server may estimate the federation's count from them),
#: and sampled customers left out because their update was not finite.
CUSTOMERS_SAMPLED = "customers-sampled"
CUSTOMERS_TOTAL = "customers"
CUSTOMERS_DROPPED = "customers-dropped"
CUSTOMER_METRICS: tuple[str, ...] = (CUSTOMERS_SAMPLED, CUSTOMERS_TOTAL, CUSTOMERS_DROPPED)

"""Evaluation metrics for the decay, interest and activation heads and the policy.

Arrays in, plain Python floats and dicts out, so every result can go straight into
``metrics.jsonl``. A metric that is undefined on the data at hand (one class only, no
control rows, an empty merchant) is ``nan``; it never raises. Shape errors do raise.

One concept a module: :mod:`.decay` (binary classification), :mod:`.interest`
(regression), :mod:`.uplift` (Qini), :mod:`.policy` (IPS, SNIPS, true value, regret),
:mod:`.capture` (share of the achievable gain, value against budget),
:mod:`.merchants` (per merchant and spread) and :mod:`.arrays` (the shared checks).
"""

from common.metrics.arrays import NAN
from common.metrics.capture import budget_curve, capture, capture_values
from common.metrics.decay import (
    binary_log_loss,
    choose_threshold,
    decay_metrics,
    expected_calibration_error,
    log_losses,
    top_decile_lift,
)
from common.metrics.interest import interest_metrics
from common.metrics.merchants import per_merchant, spread
from common.metrics.policy import (
    bootstrap_off_policy,
    ips_value,
    policy_report,
    policy_value_truth,
    snips_value,
)
from common.metrics.uplift import activation_metrics, qini_coefficient

__all__ = [
    "NAN",
    "activation_metrics",
    "binary_log_loss",
    "budget_curve",
    "bootstrap_off_policy",
    "capture",
    "capture_values",
    "choose_threshold",
    "decay_metrics",
    "expected_calibration_error",
    "interest_metrics",
    "ips_value",
    "log_losses",
    "per_merchant",
    "policy_report",
    "policy_value_truth",
    "qini_coefficient",
    "snips_value",
    "spread",
    "top_decile_lift",
]

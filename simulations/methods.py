"""The comparison's methods, in the report's order: the one list the CLI checks against.

Kept free of heavy imports so the command line can validate ``--methods`` before
pandas or TensorFlow load.
"""

from __future__ import annotations

from typing import Any

METHODS: tuple[str, ...] = ("gbdt", "lr", "t-learner", "x-learner", "centralised", "local",
                            "federated")
#: The non-neural methods: they read the snapshots' aggregates; the others train the LSTM.
#: ``t-learner`` and ``x-learner`` are the GBDT with uplift learners for activation.
AGGREGATE_METHODS: tuple[str, ...] = ("gbdt", "lr", "t-learner", "x-learner")
#: ``fedecay train --mode``.
TRAIN_MODES: tuple[str, ...] = ("centralised", "local", "gbdt")

#: ``--dp-units``: the unit and placement of each DP sweep, as (run name infix, config).
DP_UNITS: dict[str, tuple[str, dict[str, Any]]] = {
    "merchant": ("dp", {"privacy.unit": "merchant"}),
    "customer": ("cdp", {"privacy.unit": "customer", "privacy.placement": "central",
                         "privacy.mode": "off"}),
    "customer-distributed": ("ddp", {"privacy.unit": "customer",
                                     "privacy.placement": "distributed",
                                     "privacy.mode": "off",
                                     "federation.secure-aggregation": True}),
    "customer-local": ("ldp", {"privacy.unit": "customer", "privacy.placement": "local",
                               "privacy.mode": "off"}),
}

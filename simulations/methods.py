"""The comparison's methods, in the report's order: the one list the CLI checks against.

Kept free of heavy imports so the command line can validate ``--methods`` before
pandas or TensorFlow load.
"""

from __future__ import annotations

METHODS: tuple[str, ...] = ("gbdt", "lr", "t-learner", "x-learner", "centralised", "local",
                            "federated")
#: The non-neural methods: they read the snapshots' aggregates; the others train the LSTM.
#: ``t-learner`` and ``x-learner`` are the GBDT with uplift learners for activation.
AGGREGATE_METHODS: tuple[str, ...] = ("gbdt", "lr", "t-learner", "x-learner")
#: ``fedecay train --mode``.
TRAIN_MODES: tuple[str, ...] = ("centralised", "local", "gbdt")

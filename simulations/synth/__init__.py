"""A synthetic federation: merchants whose customers' interest decays, revives and churns.

Merchants differ in size and category mix (:mod:`.world`); users' interest decays with
a personal half-life, is revived by their own sessions and purchases, and may churn
(:mod:`.behaviour`). Merchants run randomised re-activation campaigns whose true
response probabilities for *every* action are written down (``truth``) and agree with
the event log, so the harness can report true policy values and regret.

One concept a module: :mod:`.config` (:class:`SynthConfig`), :mod:`.world`,
:mod:`.behaviour` (the day loop), :mod:`.events` (sessions to events), :mod:`.clock`,
:mod:`.generate` (:func:`generate_federation`), :mod:`.federation` (the frames),
:mod:`.files` (Parquet) and :mod:`.presets`.
"""

from __future__ import annotations

import importlib
from typing import Any

from simulations.synth.config import KNOWN_ACTIONS, SynthConfig
from simulations.synth.presets import (
    PRESETS_DIR,
    available_presets,
    load_preset,
    synth_config_from_preset,
)

# The generator's modules take numpy and pandas: they load on first use (PEP 562), so
# checking a preset or a synthetic.* key stays light (the CLI does it before heavy work).
_LAZY = {"Federation": "federation", "read_federation": "files", "write_federation": "files",
         "benchmark": "generate", "generate_federation": "generate"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "KNOWN_ACTIONS",
    "PRESETS_DIR",
    "Federation",
    "SynthConfig",
    "available_presets",
    "benchmark",
    "generate_federation",
    "load_preset",
    "read_federation",
    "synth_config_from_preset",
    "write_federation",
]

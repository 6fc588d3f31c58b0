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

from simulations.synth.config import KNOWN_ACTIONS, SynthConfig
from simulations.synth.federation import Federation
from simulations.synth.files import read_federation, write_federation
from simulations.synth.generate import benchmark, generate_federation
from simulations.synth.presets import (
    PRESETS_DIR,
    available_presets,
    load_preset,
    synth_config_from_preset,
)

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

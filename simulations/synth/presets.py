"""Presets: named TOML files of experiment settings in ``simulations/presets/``."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.config import from_flat, load_toml
from simulations.synth.config import SynthConfig

#: The folder of the built-in presets (packaged as ``simulations/presets/*.toml``).
PRESETS_DIR = Path(__file__).parent.parent / "presets"


def available_presets() -> list[str]:
    """Names of the built-in presets, sorted (the stems of ``simulations/presets/*.toml``)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """Flat dotted keys of ``simulations/presets/<name>.toml``, or of a TOML file path.

    A name that is also a folder in the current directory still means the built-in
    preset. Raises ``ValueError`` naming the file (or listing the presets) when the
    preset is unknown, a folder or not UTF-8.
    """
    text = str(name_or_path)
    path = Path(text)
    candidate = PRESETS_DIR / f"{text}.toml"
    if path.is_dir():
        # A folder is never a preset; one that happens to share a preset's name (a
        # "quick/" in the current folder) must not hide the built-in preset.
        if path.suffix == ".toml" or len(path.parts) > 1 or not candidate.is_file():
            raise ValueError(f"preset {path.resolve()} is a folder, not a TOML file")
        return _read_preset(candidate)
    if path.suffix == ".toml" or path.exists():
        return _read_preset(path)
    if not candidate.is_file():
        raise ValueError(
            f"unknown preset {text!r}; available presets: {', '.join(available_presets())} "
            f"(in {PRESETS_DIR}), or give the path of a .toml file"
        )
    return _read_preset(candidate)


def _read_preset(path: Path) -> dict[str, Any]:
    """:func:`load_toml`, with every ordinary failure naming the preset file."""
    path = path.resolve()
    try:
        return load_toml(path)
    except UnicodeDecodeError as err:
        raise ValueError(f"preset {path}: not UTF-8 text (byte {err.object[err.start]:#04x} "
                         f"at offset {err.start}); TOML files must be UTF-8") from None
    except IsADirectoryError:
        raise ValueError(f"preset {path} is a folder, not a TOML file") from None


def synth_config_from_preset(flat: Mapping[str, Any]) -> SynthConfig:
    """The ``[synthetic]`` section of flat preset keys as a :class:`SynthConfig`."""
    return from_flat(SynthConfig, flat, "synthetic")

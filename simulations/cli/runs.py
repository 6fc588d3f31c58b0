"""Run folders as an interface: the model or federation a later command needs from them.

What ``train``, ``simulate`` and ``compare`` write (see README, *Outputs*):

- ``train --mode centralised``: ``<run>/model.keras`` (settings in ``config.json``);
- ``train --mode gbdt``: ``<run>/gbdt/model.skops`` + ``model.json``;
- ``simulate``: the federation folder itself, ``<run>/model.keras`` + ``metrics.jsonl``;
- ``compare``: ``<run>/centralised/model.keras``, ``<run>/gbdt/model.skops`` and
  ``<run>/lr/model.skops``, and one ``<run>/federated-<strategy>[-dpZ]/`` federation
  folder per federated run.

``score``, ``monitor`` and ``privacy`` take any of them (or a model file) and pick by
``--method``: ``federated`` (the default) matches the one federated model, ``centralised``
or a subfolder's name (``federated-fedprox``, ``gbdt``) match exactly. A method's own
folder (``<run>/gbdt``) is a run folder holding one model. ``<run>/previous/`` (the run
before a fresh start in a deployment's folder) is never picked: it is no method.
"""

from __future__ import annotations

import json
from pathlib import Path

MODEL_FILE = "model.keras"
#: The GBDT's and LR's model file (common.tabular.MODEL_FILE; not imported: sklearn).
TABULAR_FILE = "model.skops"
METRICS_FILE = "metrics.jsonl"
#: Where a fresh start sets an earlier run aside (server.resume.PREVIOUS, and UNFINISHED
#: beginning with it; not imported: it loads NumPy and Flower).
PREVIOUS_RUN = "previous"
#: ``--method`` when not given: the model the federation trained.
DEFAULT_METHOD = "federated"


def _own_name(folder: Path) -> str:
    """The method of a model saved at the top of a run folder (simulate or train)."""
    if (folder / TABULAR_FILE).is_file():
        return folder.name
    is_federation = (folder / METRICS_FILE).is_file() or (folder / "federation.json").is_file()
    if not is_federation:
        return "centralised"
    try:
        strategy = json.loads((folder / "config.json").read_text()).get("federation.strategy")
    except (OSError, ValueError, AttributeError):
        strategy = None
    return f"federated-{strategy}" if isinstance(strategy, str) and strategy else "federated"


def _method_folders(folder: Path) -> list[Path]:
    """The subfolders of a run folder that may be a method's (not ``previous/``,
    ``previous-unfinished/`` or a move's ``.new``/``.old`` left by a crash)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_dir() and not p.name.startswith(PREVIOUS_RUN))


def run_models(folder: Path) -> dict[str, Path]:
    """Every model in a run folder, by method name (see module doc)."""
    found = {}
    for name in (MODEL_FILE, TABULAR_FILE):
        if (folder / name).is_file():
            found[_own_name(folder)] = folder / name
    for sub in _method_folders(folder):
        for name in (MODEL_FILE, TABULAR_FILE):
            if (sub / name).is_file():
                found[sub.name] = sub / name
    return found


def run_federations(folder: Path) -> dict[str, Path]:
    """Every federation folder (one with ``metrics.jsonl``) in a run folder, by name."""
    found = {}
    if (folder / METRICS_FILE).is_file():
        found[_own_name(folder)] = folder
    for sub in _method_folders(folder):
        if (sub / METRICS_FILE).is_file():
            found[sub.name] = sub
    return found


def pick(found: dict[str, Path], method: str | None, folder: Path, what: str) -> tuple[str, Path]:
    """The entry of ``found`` that ``method`` names (None: the default, or the only one).

    Raises ``ValueError`` listing what the folder holds when the choice is not there or
    is ambiguous.
    """
    wanted = method or DEFAULT_METHOD
    available = ", ".join(found) or "none"
    if wanted in found:
        return wanted, found[wanted]
    prefixed = [name for name in found if name.startswith(f"{wanted}-")]
    if len(prefixed) == 1:
        return prefixed[0], found[prefixed[0]]
    if method is None and len(found) == 1:
        [(name, path)] = found.items()
        return name, path
    earlier = folder / PREVIOUS_RUN / MODEL_FILE
    # A fresh start set the run before aside: named, never picked in the folder's stead.
    before = (f"; the run before it left {earlier}" if what == "model" and earlier.is_file()
              else "")
    if not found and what == "model" and (folder / "checkpoints").is_dir():
        raise ValueError(f"{folder} holds no model.keras: its rounds did not finish (it has "
                         f"checkpoints/); finish them with fedecay simulate --resume "
                         f"{folder}{before}")
    if not found and what == "federation":
        lost = [p for p in (folder, *_method_folders(folder))
                if (p / "federation.json").is_file()]
        if lost:
            raise ValueError(f"{lost[0]} is a federation's folder without its {METRICS_FILE} "
                             "(the per-round record egress reads): it was moved or deleted; "
                             "restore it, or run the federation again")
    if not found:
        writers = ("simulate or compare (a centralised or GBDT run sends nothing)"
                   if what == "federation" else
                   "train --mode centralised|gbdt, simulate or compare, or the file itself")
        raise ValueError(f"{folder} holds no {what}: give a run folder written by {writers}"
                         f"{before}")
    if len(prefixed) > 1:
        raise ValueError(f"{folder} holds several {wanted} {what}s ({', '.join(prefixed)}): "
                         "choose one with --method")
    raise ValueError(f"{folder} has no {wanted} {what} (available: {available}); choose one "
                     "with --method")


def model_in(path: str | Path, method: str | None) -> tuple[str, Path]:
    """``(method, model file)`` for ``--model`` / ``--run``: a model file as it is, or
    the one ``method`` picks in a run folder."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        if method is not None:
            raise ValueError(f"--method {method}: only with a run folder, and {path} is a file")
        return path.stem, path
    return pick(run_models(path), method, path, "model")


def federation_in(path: str | Path, method: str | None) -> tuple[str, Path]:
    """``(method, federation folder)`` for ``privacy egress --run``."""
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise NotADirectoryError(f"--run {path}: expected a run folder of simulate or compare")
    if method is not None and not method.startswith(DEFAULT_METHOD):
        raise ValueError(f"--method {method}: only a federation sends anything "
                         "(federated or federated-<strategy>)")
    return pick(run_federations(path), method, path, "federation")

"""Fail fast: what a command can check before TensorFlow loads or a folder is made.

Each function raises ``ValueError`` (or an ``OSError`` naming the path) with one line
saying what is wrong; the command line prints it with exit code 2. Nothing here imports
TensorFlow or pandas: the configuration is validated by the config dataclasses themselves
(``simulations.settings``, ``common.config``, ``server.config``, ``simulations.synth.config``),
which import neither.
"""

from __future__ import annotations

import difflib
import errno
import json
import math
import os
import stat
import zipfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

# Light modules (no pandas, no TensorFlow): the choices come from where they are defined.
from common.vocabulary import BAD_ROWS as BAD_ROWS
from common.vocabulary import FORMATS as LOG_FORMATS
from server.config import STRATEGIES as STRATEGIES
from simulations.methods import DP_UNITS as _DP_UNITS
from simulations.methods import METHODS as METHODS
from simulations.methods import TRAIN_MODES as TRAIN_MODES

if TYPE_CHECKING:
    from simulations.settings import Experiment

#: ``compare --dp-units``.
DP_UNITS: tuple[str, ...] = tuple(_DP_UNITS)
#: ``--format``: the loader's formats, or ``auto`` to tell them apart by content.
FORMATS: tuple[str, ...] = ("auto", *LOG_FORMATS)
#: File names ``score --out`` writes (client.scoring.scores_path accepts the same).
SCORE_FILES: tuple[str, ...] = (".csv", ".parquet", ".pq")
#: The earliest time an event may have (common.timestamps.EARLIEST_TIME) and how far
#: past the clock (FUTURE_SLACK); checked equal by the same test.
EARLIEST = datetime(1971, 1, 1, tzinfo=UTC)
FUTURE_SLACK = timedelta(days=1)


def _items(value: str, flag: str) -> tuple[str, ...]:
    """The items of a comma-separated option; an empty one (``a,,b``, a trailing comma)
    is refused, as a slip that would otherwise pass unseen."""
    if not value.strip():
        return ()
    items = tuple(v.strip() for v in value.split(","))
    if not all(items):
        raise ValueError(f"{flag} {value!r}: an empty item between commas")
    return items


def names(value: str, known: Sequence[str], flag: str) -> tuple[str, ...]:
    """A comma-separated list of distinct names from ``known``; a typo is named with a
    guess."""
    given = _items(value, flag)
    if not given:
        raise ValueError(f"{flag}: name at least one of {', '.join(known)}")
    twice = sorted({name for name in given if given.count(name) > 1})
    if twice:
        raise ValueError(f"{flag} {value}: {', '.join(twice)} named twice (each runs once)")
    for name in given:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            guess = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(f"{flag}: unknown {name!r}{guess}; choose from {', '.join(known)}")
    return given


def numbers(value: str, flag: str, *, kind: type = float, low: float = 0) -> tuple[Any, ...]:
    """A comma-separated list of finite numbers >= ``low`` (``kind`` int or float)."""
    out = []
    for item in _items(value, flag):
        try:
            number = kind(item)
        except ValueError:
            raise ValueError(f"{flag} {value!r}: expected comma-separated "
                             f"{'whole ' if kind is int else ''}numbers") from None
        if not math.isfinite(number) or number < low:
            raise ValueError(f"{flag} {item}: expected a finite number >= {low:g}")
        if number in out:  # two runs would share one folder and one row
            raise ValueError(f"{flag} {value!r}: {item} given twice; each value once")
        out.append(number)
    return tuple(out)


def cutoff(at: str | None) -> str | None:
    """``--at``: an ISO-8601 time between 1971-01-01 and tomorrow (naive = UTC)."""
    if at is None:
        return None
    try:
        stamp = datetime.fromisoformat(at.strip())
    except ValueError:
        raise ValueError(f"--at {at!r}: expected an ISO-8601 time, e.g. "
                         "2025-03-01T00:00:00Z") from None
    stamp = stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)
    latest = datetime.now(UTC) + FUTURE_SLACK
    if not EARLIEST <= stamp <= latest:
        raise ValueError(f"--at {at}: expected a time between {EARLIEST:%Y-%m-%d} and "
                         f"{latest:%Y-%m-%d %H:%M} UTC")
    return at


def events_path(path: str | Path, flag: str, format: str) -> Path:
    """An events input for ``--format``: a readable file, or with ``auto`` or
    ``completejourney`` a folder holding the Complete Journey tables (the only format
    kept in a folder)."""
    resolved = input_path(path, flag, folder_ok=format in ("auto", "completejourney"))
    if resolved.is_dir():
        from common.io.completejourney import CJ_TRANSACTION_FILES, cj_transactions

        if cj_transactions(resolved, strict=False) is None:
            raise ValueError(f"{flag} {resolved}: is a folder without the Complete Journey "
                             f"tables ({' or '.join(CJ_TRANSACTION_FILES)}); give an events "
                             "file")
    return resolved


def node_config_files(text: str, file: Path | None, format: str, interventions: Path | None
                      ) -> tuple[Path, str, Path | None]:
    """The events file, format and interventions file a SuperNode's ``--node-config``
    string names, after the checks its ClientApp makes (``client.config.
    check_node_config``); parsed as ``flower-supernode`` parses it."""
    from flwr.common.config import parse_config_args

    from client.config import NodeConfigError, check_node_config

    try:
        parsed = parse_config_args([text])
    except Exception as err:  # click's exception for TOML it cannot read, among others
        raise ValueError(f"--node-config {text!r}: not key=value pairs as flower-supernode "
                         f"reads them ({getattr(err, 'message', err)})") from None
    try:
        check_node_config(parsed)  # a misspelt data-path included
    except NodeConfigError as err:
        raise ValueError(f"--node-config: {err}") from None
    if "data-path" not in parsed:
        raise ValueError(f"--node-config {text!r}: no data-path (the absolute path of the "
                         "merchant's events file)")
    named = Path(str(parsed["data-path"]))
    if file is not None and file.expanduser().resolve() != named.resolve():
        raise ValueError(f"FILE {file} and --node-config's data-path {named} differ: give "
                         "one of them")
    if interventions is not None and "interventions-path" in parsed:
        raise ValueError("--interventions and --node-config's interventions-path: give one")
    if "interventions-path" in parsed and parsed["interventions-path"] not in ("", None):
        interventions = Path(str(parsed["interventions-path"]))
    return named, str(parsed.get("format", format)), interventions


def input_path(path: str | Path, flag: str, *, folder_ok: bool = False) -> Path:
    """An input that exists, can be read, and is a regular file (or a folder if allowed)."""
    resolved = Path(path).expanduser().resolve()
    try:
        mode = os.stat(resolved).st_mode
    except OSError as err:
        raise type(err)(err.errno, err.strerror, str(resolved)) from None
    if stat.S_ISDIR(mode):
        if not folder_ok:
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(resolved))
        if not os.access(resolved, os.R_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(resolved))
        return resolved
    if not stat.S_ISREG(mode):
        raise ValueError(f"{flag} {resolved}: is a pipe (or a device/socket), not a regular "
                         "file: save it to a file first")
    with open(resolved, "rb"):  # a permission problem names the file
        pass
    return resolved


def output_file(path: str | Path, flag: str, suffixes: Sequence[str]) -> Path:
    """An output file name with one of ``suffixes``, not a folder, not under a file."""
    resolved = Path(path).expanduser().resolve()
    names = " or ".join(filter(None, (", ".join(suffixes[:-1]), suffixes[-1])))
    if not resolved.name.lower().endswith(tuple(suffixes)):
        raise ValueError(f"{flag} {path}: expected a {names} file name")
    if resolved.is_dir():
        raise ValueError(f"{flag} {resolved} is a folder; give a {names} file name")
    writable_parent(resolved.parent, flag)
    return resolved


def not_over_inputs(out: Path | None, folders: Sequence[str | Path], flag: str) -> None:
    """Refuse an output file that already exists inside a run folder the command reads:
    writing it would replace that run's own file (its results.json, federation.json)."""
    if out is None:
        return
    for folder in folders:
        run = Path(folder).expanduser().resolve()
        if out.is_relative_to(run) and out.exists():
            raise ValueError(f"{flag} {out}: is a file of the run {run} this command reads; "
                             "writing it would replace that file: give another name")


def not_an_input(out: Path, source: str | Path, flag: str) -> None:
    """Refuse an existing output file that is the input ``source`` or, when ``source`` is
    a folder (the Complete Journey tables), one of the files in it: the output would
    replace the data it was computed from."""
    source = Path(source).expanduser()
    if not out.exists() or not source.exists():
        return
    if source.is_dir() and out.resolve().is_relative_to(source.resolve()):
        raise ValueError(f"--out {out} is a file of the {flag} folder {source.resolve()}: "
                         "it would be replaced; choose a file outside it")
    if out.samefile(source):
        raise ValueError(f"--out {out} is the {flag} file: it would be replaced by the "
                         "output; choose another file")


def writable_parent(folder: Path, flag: str) -> None:
    """The nearest existing folder of ``folder`` is a folder we may write in."""
    for parent in (folder, *folder.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{flag}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(parent))
            return


def output_folder(path: str | Path, flag: str) -> Path:
    """An output folder: not a file, and creatable (nothing is created here). Take it
    as a ``str`` option: Typer turns an empty ``Path`` into ``.``, the working folder."""
    if not str(path).strip():
        raise ValueError(f"{flag} is empty: give a folder")
    resolved = Path(path).expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise ValueError(f"{flag} {resolved}: is a file, not a folder")
    writable_parent(resolved, flag)
    return resolved


# ----------------------------------------------------------------------- configuration


def experiment(preset: str | None, *, events: str | None = None, format: str = "auto",
               interventions: str | None = None, sets: Sequence[str] = (),
               seed: int | None = None, bad_rows: str | None = None,
               extra: dict[str, Any] | None = None) -> Experiment:
    """The experiment of train/simulate/compare/bench, every key validated, its input
    files readable and its output folder creatable; nothing is loaded or created."""
    if events:
        events_path(events, "--events", format)
    if interventions:
        input_path(interventions, "--interventions")
    from simulations.settings import experiment_from_flat, resolve

    overrides = list(sets)
    if bad_rows is not None:
        overrides.append(f"data.bad-rows={bad_rows!r}")
    exp = resolve(preset, events=events, format=format, interventions=interventions,
                  overrides=overrides, seed=seed)
    if extra:
        exp = experiment_from_flat({**exp.flat, **extra})
    writable_parent(exp.experiment.output_path(), "config key 'experiment.output-dir'")
    return exp


def synth_settings(preset: str, sets: Sequence[str]) -> dict[str, Any]:
    """A preset plus ``--set``, every key of every section checked as the training
    commands check them (``data synth``)."""
    from common.config import apply_overrides
    from simulations.settings import experiment_from_flat
    from simulations.synth import load_preset

    base = load_preset(preset)
    if not any(key.startswith("synthetic.") for key in base):  # the built-in default ran
        raise ValueError(f"--preset {preset}: has no [synthetic] section, and data synth "
                         "generates the federation it describes; use quick, default or "
                         "large, or a TOML file with one")
    flat = apply_overrides(base, list(sets))
    experiment_from_flat(flat)
    return flat


def section_settings(preset: str | None, sets: Sequence[str], sections: Sequence[str],
                     command: str) -> dict[str, Any]:
    """Flat keys of a preset and ``--set`` for a command that reads only ``sections``.

    A ``--set`` key of another section would be ignored, so it is refused by name (the
    preset's other sections are simply not used).
    """
    from common.config import apply_overrides
    from simulations.settings import SECTIONS, experiment_from_flat
    from simulations.synth import load_preset

    given = apply_overrides({}, list(sets))
    for key in given:
        section = key.split(".", 1)[0]
        if "." not in key or section not in SECTIONS:
            raise ValueError(f"unknown config key '{key}' (sections: {', '.join(SECTIONS)})")
        if section not in sections:
            raise ValueError(f"--set {key}: {command} uses only "
                             f"{' and '.join(f'{s}.*' for s in sections)} keys")
    flat = {**(load_preset(preset) if preset else {}), **given}
    experiment_from_flat({k: v for k, v in flat.items() if k.split(".", 1)[0] in sections})
    return flat


def model_sets(sets: Sequence[str]) -> None:
    """``--set`` of score/monitor: only the model's snapshots.* and policy.* keys."""
    from common.bundle import check_model_overrides

    check_model_overrides(list(sets))


# ----------------------------------------------------------------------------- models


#: The GBDT/LR file's format and kinds (common.tabular's; not imported: it takes sklearn).
TABULAR_FORMAT = "fedecay-tabular-model"
TABULAR_KINDS: tuple[str, ...] = ("gbdt", "lr", "t-learner", "x-learner")


def model_kind(path: Path) -> str:
    """``lstm`` for a ``.keras`` model, else the kind a ``.skops`` model's archive names."""
    if path.suffix != ".skops":
        return "lstm"
    with zipfile.ZipFile(path) as archive:
        content = json.loads(archive.read("schema.json"))["content"]
    return str(json.loads(content["kind"]["content"]))


def tabular_file(path: Path) -> Path:
    """A GBDT/LR model file, checked by reading its archive's ``schema.json`` (no
    scikit-learn, no TensorFlow): a skops zip holding a fedecay model of a known kind."""
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable skops model (not a zip archive: "
                         "truncated, or not a .skops file)")
    try:
        with zipfile.ZipFile(path) as archive:
            content = json.loads(archive.read("schema.json"))["content"]
        fields = {k: json.loads(content[k]["content"]) for k in ("format", "kind")}
    except (KeyError, TypeError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a fedecay skops model (no readable format and "
                         f"kind in its schema.json: {type(err).__name__})") from None
    if fields["format"] != TABULAR_FORMAT or fields["kind"] not in TABULAR_KINDS:
        raise ValueError(f"{path} is a skops file but not a fedecay model (format "
                         f"{fields['format']!r}, kind {fields['kind']!r}; expected "
                         f"{TABULAR_FORMAT!r} of kind {' or '.join(TABULAR_KINDS)})")
    return path


def model_file(path: Path) -> Path:
    """A fedecay model file, checked without TensorFlow: a ``.skops`` GBDT/LR model
    (:func:`tabular_file`), or a Keras zip whose ``config.json`` has the inputs and
    heads a scorer needs."""
    input_path(path, "--model")
    if path.suffix == ".skops":
        return tabular_file(path)
    if path.suffix == ".npz":
        raise ValueError(f"{path} is a checkpoint (a round's weights), not a model: give the "
                         "run folder or its model.keras; a run stopped before its end "
                         "finishes with fedecay simulate --resume RUN_DIR")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a readable Keras model (not a zip archive: "
                         "truncated, or not a .keras file)")
    try:
        with zipfile.ZipFile(path) as archive:
            config = json.loads(archive.read("config.json"))
    except (KeyError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ValueError(f"{path} is not a readable Keras model (no readable config.json "
                         f"in the archive: {type(err).__name__})") from None
    body = config.get("config") if isinstance(config, dict) else None
    body = body if isinstance(body, dict) else {}
    layers = {str(layer.get("name") or (layer.get("config") or {}).get("name"))
              for layer in body.get("layers") or [] if isinstance(layer, dict)}
    inputs = body.get("input_layers") or []
    input_names = (set(inputs) if isinstance(inputs, dict)
                   else {str(i[0]) for i in inputs if isinstance(i, list) and i})
    missing = [f"input '{k}'" for k in ("events",) if k not in input_names]
    missing += [f"layer '{k}'" for k in ("category_embedding", "activation") if k not in layers]
    if missing:
        raise ValueError(f"{path} is a Keras model but not a fedecay scoring model "
                         f"(no {', '.join(missing)})")
    return path


def state_folder(path: str | Path) -> Path:
    """``monitor --state``: a folder (or nothing yet) we may create and write in."""
    resolved = Path(path).expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise ValueError(f"state folder {resolved}: is a file, not a folder")
    writable_parent(resolved, f"state folder {resolved}")
    return resolved

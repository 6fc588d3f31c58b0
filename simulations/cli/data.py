"""``fedecay data synth|check``: generate a synthetic federation, check an events file."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from . import checks
from .console import current
from .errors import guarded
from .options import BadRowsOption, FormatOption, SetOption

app = typer.Typer(help="Generate or check behaviour data.", no_args_is_help=True)


@app.command("synth")
@guarded
def synth(
    out: Annotated[str, typer.Option(
        metavar="DIR", show_default=False,
        help="Output folder for the five .parquet files (created if missing).")],
    preset: Annotated[str, typer.Option(
        metavar="NAME|FILE",
        help="Preset name (quick, default, large) or a TOML file; its \\[synthetic] section "
             "is used.")] = "quick",
    seed: Annotated[int, typer.Option(metavar="N", help="Generator seed.")] = 0,
    set_: SetOption = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace the files of an earlier federation in DIR.")] = False,
) -> None:
    """Generate a synthetic federation (events, interventions, truth, users, merchants)."""
    console = current()
    flat = checks.synth_settings(preset, set_ or [])
    folder = checks.output_folder(out, "--out")
    from simulations.synth import generate_federation, synth_config_from_preset
    from simulations.synth.files import federation_files, write_federation

    existing = [path.name for path in federation_files(folder).values() if path.exists()]
    if existing and not overwrite:
        raise ValueError(f"--out {folder}: already holds {', '.join(existing)} (a federation "
                         "written earlier); use --overwrite to replace it, or another folder")

    with console.task("generating the synthetic federation") as task:
        fed = generate_federation(synth_config_from_preset(flat), seed=seed)
        task.advance(events=len(fed.events))
        paths = write_federation(fed, folder)
    print(fed.summary())
    print()
    for name, path in paths.items():
        print(f"wrote {name:<14} {path}")
    console.next(f"fedecay data check {_q(paths['events'])} --interventions "
                 f"{_q(paths['interventions'])} --preset {_q(preset)}")  # its calendar


@app.command("check")
@guarded
def check(
    file: Annotated[Path | None, typer.Argument(metavar="FILE", show_default=False)] = None,
    format: FormatOption = "auto",
    interventions: Annotated[Path | None, typer.Option(
        metavar="FILE", help="Canonical interventions file.", show_default="none")] = None,
    preset: Annotated[str | None, typer.Option(
        metavar="NAME|FILE",
        help="Take the snapshots.* and data.* settings from this preset (name or TOML file).",
        show_default="built-in defaults")] = None,
    set_: SetOption = None,
    bad_rows: BadRowsOption = "error",
    node_config: Annotated[str | None, typer.Option(
        "--node-config", metavar="'data-path=... format=...'",
        help="The --node-config string this merchant's SuperNode will get: its keys are "
             "checked as the ClientApp checks them, and the files it names are the ones "
             "read (its data-path, format and interventions-path).",
        show_default="none")] = None,
) -> int:
    """Validate an events file and show what a merchant brings to the federation.
    FILE is the events file (CSV, CSV.gz, Parquet) or the Complete Journey folder; with
    --node-config it may be left out (the file its data-path names is read). Says OK
    only when it yields what a federation needs (exit 0), else NOT OK with what is
    missing (exit 2).
    """
    console = current()
    if node_config is not None:
        file, format, interventions = checks.node_config_files(node_config, file, format,
                                                               interventions)
    if file is None:
        raise ValueError("data check: give the events FILE (or --node-config with its "
                         "data-path)")
    flat = checks.section_settings(preset, set_ or [], ("snapshots", "data"), "data check")
    checks.events_path(file, "file", format)
    if interventions is not None:
        checks.input_path(interventions, "--interventions")
    from common.config import SnapshotConfig, from_flat
    from common.io import load_events
    from common.snapshots import build_snapshots, federation_problems, stray_gap
    from simulations.settings import DataConfig

    snap_cfg = from_flat(SnapshotConfig, flat, "snapshots")
    data_cfg = from_flat(DataConfig, flat, "data")
    log = load_events(file, format, interventions_path=interventions, bad_rows=bad_rows)
    ev = log.events
    print("\n".join(log.report.summary_lines()))
    ts = ev["timestamp"]
    mix = ev["event"].value_counts(normalize=True)
    mix = mix[mix > 0]
    print(f"users       {ev['user_id'].nunique():,}")
    print(f"merchants   {ev['merchant_id'].nunique():,}")
    print(f"date range  {ts.min():%Y-%m-%d %H:%M} .. {ts.max():%Y-%m-%d %H:%M} UTC")
    print("event mix   " + "  ".join(f"{k} {v:.1%}" for k, v in mix.items()))
    print(f"interventions {len(log.interventions):,}")
    gap = None if snap_cfg.start or snap_cfg.end else stray_gap(ts)
    if gap:
        print(f"NOT OK: {gap}")
        return 2
    snaps, report = build_snapshots(ev, snap_cfg, log.interventions)
    print("snapshots (decay label: I(T+H) < rho * I(T))")
    print("\n".join(report.summary_lines()))
    problems = federation_problems(snaps, report, data_cfg.min_merchant_snapshots)
    if problems:
        print("\n".join(f"NOT OK: {p}" for p in problems))
        return 2
    print("OK: this file can join a federation")
    source = f"--events {_q(file)}" + ("" if format == "auto" else f" --format {format}")
    if interventions is not None:
        source += f" --interventions {_q(interventions)}"
    console.next(f"fedecay compare {source}" + (f" --preset {_q(preset)}" if preset else ""))
    return 0


def _q(path: object) -> str:
    return shlex.quote(str(path))

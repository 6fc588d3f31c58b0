"""Options several commands share, each with its help, default and unit in one place."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import click
import typer

from .checks import BAD_ROWS, FORMATS

SetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", show_default="none",
    help="Override a config key, e.g. --set train.epochs=3 (repeatable; unknown keys are "
         "errors).")]
FormatOption = Annotated[str, typer.Option(
    click_type=click.Choice(FORMATS), help="Events format (auto detects it from the content).")]
BadRowsOption = Annotated[str, typer.Option(
    click_type=click.Choice(BAD_ROWS),
    help="CSV rows with the wrong number of fields: stop naming their line (error) or drop "
         "and count them (skip).")]
PresetOption = Annotated[str | None, typer.Option(
    metavar="NAME|FILE", show_default="quick, or none with --events",
    help="Preset (quick, default, large, completejourney) or a TOML file; with --events only "
         "its non-synthetic settings are used.")]
EventsOption = Annotated[Path | None, typer.Option(
    metavar="FILE", show_default="the preset's synthetic federation",
    help="An events file (CSV, CSV.gz, Parquet) or the Complete Journey folder.")]
InterventionsOption = Annotated[Path | None, typer.Option(
    metavar="FILE", show_default="none", help="Canonical interventions file (with --events).")]
SeedOption = Annotated[int | None, typer.Option(
    metavar="N", show_default="the preset's experiment.seed", help="Experiment seed.")]
SourceBadRowsOption = Annotated[str | None, typer.Option(
    "--bad-rows", click_type=click.Choice(BAD_ROWS), show_default="the preset's, else error",
    help="CSV rows with the wrong number of fields: stop naming their line (error) or drop "
         "and count them (skip); data.bad-rows.")]
MethodOption = Annotated[str | None, typer.Option(
    metavar="NAME", show_default="federated, or the run's only model",
    help="Which model of a run folder: federated, centralised, or a subfolder of compare "
         "such as federated-fedprox.")]
TrackingOption = Annotated[str | None, typer.Option(
    "--tracking", click_type=click.Choice(("tensorboard", "mlflow")),
    show_default="the config's experiment.tracking (tensorboard)",
    help="Where the run's metrics go besides its folder: TensorBoard event files always; "
         "mlflow adds an MLflow file store in <run>/mlruns (experiment.tracking).")]


def tracking_keys(tracking: str | None) -> dict[str, str]:
    """The ``experiment.tracking`` override ``--tracking`` asks for (none when not given)."""
    if tracking is None:
        return {}
    return {"experiment.tracking": "tensorboard,mlflow" if tracking == "mlflow" else tracking}

"""``fedecay privacy egress|audit|tradeoff``: what left the merchants, what the model
leaks, and what privacy costs in utility across comparisons.

``--run`` takes the run folder of simulate or compare (``--method`` picks a federated
run of a comparison, or its centralised model for the audit) or, for the audit, a model
file.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from . import checks
from .console import current, quiet_flower
from .errors import guarded
from .options import MethodOption, SetOption
from .runs import federation_in, model_in

app = typer.Typer(help="Privacy of runs: what left the merchants, membership inference on "
                  "the model, utility against epsilon across comparisons.",
                  no_args_is_help=True)

JsonOption = Annotated[Path | None, typer.Option(
    "--json", metavar="FILE", show_default="none",
    help="Also write the result to this .json file.")]


def _q(path: object) -> str:
    return shlex.quote(str(path))


@app.command("egress")
@guarded
def egress(
    run: Annotated[Path, typer.Option(metavar="RUN_DIR", show_default=False,
                                      help="A run folder of simulate or compare.")],
    method: MethodOption = None,
    json_: JsonOption = None,
) -> None:
    """Bytes up/down per round and client, and the metric names clients may send."""
    console = current()
    out = checks.output_file(json_, "--json", (".json",)) if json_ is not None else None
    checks.not_over_inputs(out, [run], "--json")
    name, folder = federation_in(run, method)
    from simulations.experiment import write_json
    from simulations.privacy_audit import egress_summary, format_egress

    quiet_flower(console.verbose)  # the allowed metric names come from the ClientApp
    summary = egress_summary(folder)
    print(f"{name}: {folder}")
    print(format_egress(summary))
    if out is not None:
        write_json(out, summary)
        print(f"\nwrote {out}")
    console.next(f"fedecay privacy audit --run {_q(run)}"
                 + (f" --method {name}" if method else ""))


def _audit_data(model_dir: Path, progress: Any) -> Any:
    """The snapshots of a comparison's centralised model: its folder has no shards and
    no config.json, the comparison's config.json is one folder up."""
    if (model_dir / "shards").is_dir() or (model_dir / "config.json").is_file():
        return None
    config = model_dir.parent / "config.json"
    if not config.is_file():
        return None
    from simulations.experiment import prepare
    from simulations.settings import experiment_from_flat

    return prepare(experiment_from_flat(json.loads(config.read_text())), progress=progress)


@app.command("audit")
@guarded
def audit(
    run: Annotated[Path | None, typer.Option(
        metavar="RUN_DIR|FILE", show_default="none (--unit customer trains its own run)",
        help="A run folder of train, simulate or compare, or a model.keras beside its "
             "run's shards/ or config.json.")] = None,
    method: MethodOption = None,
    unit: Annotated[str, typer.Option(
        click_type=click.Choice(("snapshot", "customer")),
        help="Members: training snapshots of --run (snapshot), or customers a fresh run "
             "of --preset trains against customers of the same merchants it withholds "
             "(customer).")] = "snapshot",
    preset: Annotated[str | None, typer.Option(
        metavar="NAME|FILE", show_default="quick",
        help="--unit customer: the synthetic federation the fresh run trains, a preset "
             "(quick, default, large) or a TOML file.")] = None,
    set_: SetOption = None,
    held_out: Annotated[float, typer.Option(
        min=0.01, max=0.99, metavar="SHARE",
        help="--unit customer: share of each merchant's customers withheld.")] = 0.2,
    canaries: Annotated[int, typer.Option(
        min=0, metavar="K", help="--unit customer: canary pairs inserted (K train, K are "
                                 "withheld).")] = 0,
    merchants: Annotated[int, typer.Option(
        min=1, metavar="N", help="Merchants sampled (seeded).")] = 4,
    seed: Annotated[int, typer.Option(
        metavar="N", help="Seed of the merchants' sample (snapshot) or of the withheld "
                         "customers and canaries (customer), and of the bootstrap.")] = 0,
    bootstrap: Annotated[int, typer.Option(
        min=1, metavar="N", help="Bootstrap resamples of the interval.")] = 500,
    json_: JsonOption = None,
) -> None:
    """Membership-inference attacks (loss threshold, calibrated): ROC-AUC with a bootstrap
    95 % interval."""
    console = current()
    out = checks.output_file(json_, "--json", (".json",)) if json_ is not None else None
    if unit == "customer":
        if run is not None or method is not None:
            raise ValueError("--unit customer trains its own run: give --preset/--set, "
                             "not --run/--method")
        _customer_audit(preset, set_, held_out, canaries, seed, bootstrap, out)
        return
    if preset is not None or set_ or canaries:
        raise ValueError("--preset, --set and --canaries go with --unit customer")
    if run is None:
        raise ValueError("--run is required (or --unit customer)")
    checks.not_over_inputs(out, [run], "--json")
    name, model_path = model_in(run, method)
    checks.model_file(model_path)
    kind = checks.model_kind(model_path)
    if kind != "lstm":
        raise ValueError(f"--run {model_path} is a {kind} model; the membership audit "
                         "attacks the LSTM models (choose --method federated or "
                         "centralised)")
    from simulations.experiment import write_json
    from simulations.privacy_audit import format_audit, membership_audit

    quiet_flower(console.verbose)
    with console.task(f"membership audit of {name}") as task:
        result = membership_audit(model_path, merchants=merchants, seed=seed,
                                  n_boot=bootstrap, data=_audit_data(model_path.parent, console))
        task.advance(auc=result["auc"])
    print(f"{name}: {model_path}")
    print(format_audit(result))
    if out is not None:
        write_json(out, result)
        print(f"\nwrote {out}")
    console.next(f"fedecay compare --preset {_q(_preset_of(model_path.parent))} --noise "
                 "0,0.5,1,2  (utility against epsilon, every model audited)")


@app.command("tradeoff")
@guarded
def tradeoff(
    runs: Annotated[list[Path], typer.Argument(
        metavar="RUN_DIR...", show_default=False,
        help="Run folders of fedecay compare --noise ... (one per population, unit or "
             "noise range; a DP model is compared with the non-private federated model of "
             "the same population).")],
    out: Annotated[Path | None, typer.Option(
        "--out", metavar="FILE.png", show_default="none",
        help="Also draw decay AUC against epsilon, one panel per population.")] = None,
    json_: JsonOption = None,
) -> None:
    """Utility against epsilon across comparisons: one table (and figure) by population,
    privacy unit and placement."""
    plot = checks.output_file(out, "--out", (".png",)) if out is not None else None
    dest = checks.output_file(json_, "--json", (".json",)) if json_ is not None else None
    folders = [checks.input_path(run, "RUN_DIR", folder_ok=True) for run in runs]
    twice = sorted({str(f) for f in folders if folders.count(f) > 1})
    if twice:
        raise ValueError(f"RUN_DIR {twice[0]} given twice: each comparison once")
    checks.not_over_inputs(plot, folders, "--out")
    checks.not_over_inputs(dest, folders, "--json")
    from simulations.experiment import write_json
    from simulations.privacy_tradeoff import format_tradeoff, plot_tradeoff, tradeoff_rows

    rows = tradeoff_rows(folders)
    print(format_tradeoff(rows))
    if plot is not None:
        print(f"\nwrote {plot_tradeoff(rows, plot)}")
    if dest is not None:
        write_json(dest, {"rows": rows})
        print(f"wrote {dest}")
    if plot is None:
        current().next("the same with --out auc_vs_epsilon.png  (the figure)")


def _customer_audit(preset: str | None, sets: list[str] | None, held_out: float,
                    canaries: int, seed: int, bootstrap: int, out: Path | None) -> None:
    """Train ``preset`` without a withheld share of customers, then attack its model."""
    console = current()
    exp = checks.experiment(preset, events=None, format="auto", interventions=None,
                            sets=sets or [], seed=None, bad_rows=None)
    from simulations.customer_audit import customer_audit, format_customer_audit
    from simulations.experiment import run_folder, write_json

    quiet_flower(console.verbose)
    with run_folder(exp, "audit") as run_dir:
        result = customer_audit(exp, run_dir, held_out=held_out, canaries=canaries,
                                seed=seed, n_boot=bootstrap, progress=console)
    console.close()
    print(format_customer_audit(result))
    print(f"\nwrote {run_dir / 'customer_audit.json'}")
    if out is not None:
        write_json(out, result)
        print(f"wrote {out}")
    console.next(f"fedecay privacy egress --run {_q(run_dir)}")


def _preset_of(folder: Path) -> str:
    """The preset a run used (its config.json, or its comparison's), else quick."""
    for config in (folder / "config.json", folder.parent / "config.json"):
        try:
            preset = json.loads(config.read_text()).get("experiment.preset")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(preset, str) and preset:
            return preset
    return "quick"

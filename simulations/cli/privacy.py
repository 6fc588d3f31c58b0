"""``fedecay privacy egress|audit``: what left the merchants, and what the model leaks.

``--run`` takes the run folder of simulate or compare (``--method`` picks a federated
run of a comparison, or its centralised model for the audit) or, for the audit, a model
file.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Annotated, Any

import typer

from . import checks
from .console import current, quiet_flower
from .errors import guarded
from .options import MethodOption
from .runs import federation_in, model_in

app = typer.Typer(help="Privacy audits of a run: what left the merchants, and membership "
                  "inference on the model.", no_args_is_help=True)

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
    run: Annotated[Path, typer.Option(
        metavar="RUN_DIR|FILE", show_default=False,
        help="A run folder of train, simulate or compare, or a model.keras beside its "
             "run's shards/ or config.json.")],
    method: MethodOption = None,
    merchants: Annotated[int, typer.Option(
        min=1, metavar="N", help="Merchants sampled (seeded).")] = 4,
    seed: Annotated[int, typer.Option(
        metavar="N", help="Seed of the merchants' sample and the bootstrap.")] = 0,
    bootstrap: Annotated[int, typer.Option(
        min=1, metavar="N", help="Bootstrap resamples of the interval.")] = 500,
    json_: JsonOption = None,
) -> None:
    """Membership-inference attacks (loss threshold, calibrated): ROC-AUC with a bootstrap
    95 % interval."""
    console = current()
    out = checks.output_file(json_, "--json", (".json",)) if json_ is not None else None
    name, model_path = model_in(run, method)
    checks.model_file(model_path)
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

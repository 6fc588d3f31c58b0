"""``fedecay train|simulate|compare|bench``: the commands that train and compare models.

Each checks every argument and key (:mod:`.checks`) before TensorFlow loads and before
its run folder exists, and ends with the next useful command.
"""

from __future__ import annotations

import contextlib
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import click
import typer

from simulations.methods import AGGREGATE_METHODS

from . import checks
from .console import current, quiet_flower
from .errors import guarded
from .options import (
    EventsOption,
    FormatOption,
    InterventionsOption,
    PresetOption,
    SeedOption,
    SetOption,
    SourceBadRowsOption,
    TrackingOption,
    tracking_keys,
)

if TYPE_CHECKING:
    from simulations.settings import Experiment


def _q(path: object) -> str:
    return shlex.quote(str(path))


def _source(preset: str | None, events: Path | None, format: str, interventions: Path | None,
            sets: list[str] | None, seed: int | None, bad_rows: str | None,
            extra: dict[str, Any] | None = None) -> Experiment:
    return checks.experiment(preset, events=str(events) if events else None, format=format,
                             interventions=str(interventions) if interventions else None,
                             sets=sets or [], seed=seed, bad_rows=bad_rows, extra=extra)


def _score_hint(run: Path, model_name: str | None, events: str | None,
                seed: int, preset: str | None) -> list[str]:
    """``fedecay score`` on the run's model, with events the model's merchants have."""
    method = f" --method {model_name}" if model_name else ""
    if events:
        return [f"fedecay score --model {_q(run)}{method} --events {_q(events)}"]
    shard = next(iter(sorted(run.glob("**/shards/00000.parquet"))), None)
    if shard is not None:
        return [f"fedecay score --model {_q(run)}{method} --events {_q(shard)}"]
    data = run / "data"  # the same synthetic log (preset and seed) the model trained on
    return [f"fedecay data synth --preset {_q(preset or 'quick')} --seed {seed} "
            f"--out {_q(data)}",
            f"fedecay score --model {_q(run)}{method} --events {_q(data / 'events.parquet')}"]


def register(app: typer.Typer) -> None:
    """Add the commands to the root app."""
    app.command("train")(train)
    app.command("simulate")(simulate)
    app.command("compare")(compare)
    app.command("bench")(bench)


@guarded
def train(
    mode: Annotated[str, typer.Option(
        click_type=click.Choice(checks.TRAIN_MODES),
        help="Which baseline.")] = "centralised",
    preset: PresetOption = None,
    events: EventsOption = None,
    format: FormatOption = "auto",
    interventions: InterventionsOption = None,
    set_: SetOption = None,
    seed: SeedOption = None,
    bad_rows: SourceBadRowsOption = None,
    tracking: TrackingOption = None,
) -> None:
    """Train one baseline for train.epochs epochs: centralised, local-only or GBDT."""
    console = current()
    exp = _source(preset, events, format, interventions, set_, seed, bad_rows,
                  tracking_keys(tracking))
    from simulations.experiment import run_folder
    from simulations.single import train_method

    # Made only now, when everything checkable is checked; gone again on failure.
    with run_folder(exp, mode) as run_dir:
        run = train_method(exp, run_dir, mode, progress=console)
    console.close()
    print(run.table)
    print(f"\nrun folder: {run.run_dir}")
    if run.model is not None:
        console.next(*_score_hint(run.run_dir, None, exp.data.events or None, exp.seed,
                                  exp.experiment.preset or None))
    else:
        source = (f"--events {_q(exp.data.events)}" if exp.data.events
                  else f"--preset {_q(exp.experiment.preset or 'quick')}")
        console.next(f"fedecay compare {source}  (every method on the same snapshots)")


@guarded
def simulate(
    preset: PresetOption = None,
    events: EventsOption = None,
    format: FormatOption = "auto",
    interventions: InterventionsOption = None,
    set_: SetOption = None,
    seed: SeedOption = None,
    bad_rows: SourceBadRowsOption = None,
    strategy: Annotated[str | None, typer.Option(
        click_type=click.Choice(checks.STRATEGIES), show_default="the preset's (fedavg)",
        help="Federated strategy; federation.strategy.")] = None,
    ray_address: Annotated[str | None, typer.Option(
        metavar="HOST:PORT", show_default="start Ray locally",
        help="Attach to an existing Ray cluster; simulation.ray-address.")] = None,
    resume: Annotated[Path | None, typer.Option(
        metavar="RUN_DIR", show_default="none",
        help="Continue a killed run from its newest intact checkpoint; --set may change "
             "only the rounds and how they run.")] = None,
    tracking: TrackingOption = None,
) -> None:
    """Run the federation on Flower's Simulation Engine (rounds, checkpoints, metrics)."""
    console = current()
    extra = tracking_keys(tracking)
    if strategy:
        extra["federation.strategy"] = strategy
    if ray_address:
        extra["simulation.ray-address"] = ray_address
    folder: Any
    if resume is not None:
        # The run's own config.json decides the data, seeds and model.
        given = [flag for flag, value in (("--preset", preset), ("--events", events),
                                          ("--interventions", interventions),
                                          ("--seed", seed), ("--bad-rows", bad_rows))
                 if value is not None]
        if given:
            raise ValueError(f"{given[0]} cannot be used with --resume: the run's "
                             "config.json decides the data and the seed")
        from common.config import apply_overrides
        from simulations.federated import resume_experiment

        run_dir = resume.expanduser().resolve()
        exp = resume_experiment(run_dir, {**apply_overrides({}, set_ or []), **extra})
        folder = contextlib.nullcontext(run_dir)
    else:
        exp = _source(preset, events, format, interventions, set_, seed, bad_rows, extra)
        from simulations.experiment import run_folder

        folder = run_folder(exp, "simulate")
    from simulations.single import simulate_federation

    quiet_flower(console.verbose)
    with folder as run_dir:
        run = simulate_federation(exp, run_dir, progress=console, resumed=resume is not None)
    console.close()
    print(run.table)
    print(f"\nrun folder: {run.run_dir}")
    console.next(*_score_hint(run.run_dir, None, exp.data.events or None, exp.seed, None),
                 f"fedecay privacy egress --run {_q(run.run_dir)}")


@guarded
def compare(
    preset: PresetOption = None,
    events: EventsOption = None,
    format: FormatOption = "auto",
    interventions: InterventionsOption = None,
    set_: SetOption = None,
    seed: SeedOption = None,
    bad_rows: SourceBadRowsOption = None,
    strategies: Annotated[str, typer.Option(
        metavar="NAMES",
        help=f"Comma-separated federated strategies: {', '.join(checks.STRATEGIES)}.")
    ] = "fedavg",
    methods: Annotated[str, typer.Option(
        metavar="NAMES", help=f"Comma-separated subset of {', '.join(checks.METHODS)} "
                              f"({', '.join(AGGREGATE_METHODS)} read the aggregates; "
                              "the others train the LSTM)."
    )] = ",".join(checks.METHODS),
    noise: Annotated[str, typer.Option(
        metavar="Z,Z,...", show_default="none",
        help="Noise multipliers to sweep, e.g. 0,0.5,1,2: one federated run each with "
             "differential privacy (0 = without), the AUC-vs-epsilon plot and the "
             "membership audit of every model.")] = "",
    dp_units: Annotated[str, typer.Option(
        metavar="UNITS", show_default="privacy.unit as configured",
        help="With --noise: sweep each of merchant, customer (central noise), "
             "customer-distributed (merchants' noise shares under SecAgg+), customer-local; "
             "one run per unit and non-zero multiplier, one without DP for 0.")] = "",
    audit: Annotated[bool, typer.Option(
        "--audit",
        help="Membership-inference audit of the federated and centralised models "
             "(implied by --noise).")] = False,
    seeds: Annotated[str, typer.Option(
        metavar="S,S,...", show_default="none (--seed only)",
        help="Run the whole comparison once per seed (data, splits, models), each in "
             "seed-<s>/, and report capture per method over the seeds (seeds.md).")] = "",
    tracking: TrackingOption = None,
) -> None:
    """Federated vs centralised vs local-only vs GBDT and LR on the same snapshots and budget."""
    console = current()
    chosen_strategies = checks.names(strategies, checks.STRATEGIES, "--strategies")
    chosen_methods = checks.names(methods, checks.METHODS, "--methods")
    levels = checks.numbers(noise, "--noise")
    units = checks.names(dp_units, checks.DP_UNITS, "--dp-units") if dp_units else ()
    if units and not levels:
        raise ValueError("--dp-units needs --noise (the multipliers to sweep), e.g. "
                         "--noise 0,0.5,1,2")
    lstm = {"federated", "centralised"} & set(chosen_methods)
    if levels and "federated" not in chosen_methods:
        raise ValueError(f"--noise sweeps the federation's DP, and --methods "
                         f"{','.join(chosen_methods)} runs no federation: add federated")
    if audit and not lstm:
        raise ValueError(f"--audit attacks the LSTM models, and --methods "
                         f"{','.join(chosen_methods)} trains none: add federated or "
                         "centralised")
    several = checks.numbers(seeds, "--seeds", kind=int)
    from simulations.settings import SEEDS

    if any(s >= SEEDS for s in several):  # found now, not after the first seed's run
        raise ValueError(f"--seeds {seeds}: each seed must be between 0 and {SEEDS - 1}")
    if several and seed is not None:
        raise ValueError("--seed and --seeds: give one or the other")
    exp = _source(preset, events, format, interventions, set_, seed, bad_rows,
                  tracking_keys(tracking))
    from simulations.compare import run_comparison, run_seeds
    from simulations.experiment import run_folder

    if "federated" in chosen_methods:
        quiet_flower(console.verbose)
    options = {"strategies": chosen_strategies, "methods": chosen_methods, "noise": levels,
               "dp_units": units,
               "audit": audit or bool(levels), "progress": console}
    with run_folder(exp, "compare") as run_dir:
        out = (run_seeds(exp, run_dir, several, **options) if several
               else run_comparison(exp, run_dir, **options))
    console.close()
    print()
    print(out.table)
    if several:
        print(f"\nsummary: {run_dir / 'seeds.md'}")
        return
    gain = out.results.get("gain_from_joining", {})
    for name, g in gain.items():
        q1 = g["by_size_quartile"].get("q1")
        print(f"{name}: mean AUC gain over local-only {g['mean']:+.4f}; smallest quartile "
              f"{q1:+.4f}")
    print(f"\nreport: {run_dir / 'report.md'}")
    from .runs import run_models

    models = run_models(run_dir)
    federated = [name for name in models if name.startswith("federated")]
    if federated or models:
        name = None if len(federated) == 1 else (federated or list(models))[0]
        console.next(*_score_hint(run_dir, name, exp.data.events or None, exp.seed,
                                  exp.experiment.preset or None))


@guarded
def bench(
    preset: Annotated[str, typer.Option(
        metavar="NAME|FILE", help="Preset name or TOML file.")] = "default",
    set_: SetOption = None,
    seed: SeedOption = None,
    json_: Annotated[Path | None, typer.Option(
        "--json", metavar="FILE", show_default="none",
        help="Also write the figures to this .json file.")] = None,
    federation: Annotated[str, typer.Option(
        metavar="N,N,...", show_default="none",
        help="Also time federated vs centralised for these merchant counts, e.g. "
             "10,100.")] = "",
    rounds: Annotated[int, typer.Option(
        min=1, metavar="ROUNDS", help="Rounds of each --federation run.")] = 4,
    repeat: Annotated[int, typer.Option(
        min=1, metavar="TIMES",
        help="Time each throughput figure this many times and keep the best.")] = 3,
    deployment: Annotated[str, typer.Option(
        metavar="N,N,...", show_default="none",
        help="Instead: time rounds of a real TLS deployment on loopback with these merchant "
             "counts (docs/deployment.md), e.g. 1,3.")] = "",
    trainer: Annotated[str, typer.Option(
        click_type=click.Choice(("both", "warm", "cold")),
        help="With --deployment: merchants with a warm trainer, without, or both.")] = "both",
    runs: Annotated[int, typer.Option(
        min=1, metavar="TIMES", help="With --deployment: runs of each setting.")] = 2,
) -> None:
    """Throughput: generation, snapshots, training and scoring (events/s, samples/s, users/s);
    with --deployment, seconds per round of a real deployment by stage."""
    console = current()
    out = checks.output_file(json_, "--json", (".json",)) if json_ is not None else None
    if deployment:
        ignored = [flag for flag, given in (("--preset", preset != "default"),
                                            ("--set", bool(set_)), ("--seed", seed is not None),
                                            ("--federation", bool(federation)),
                                            ("--repeat", repeat != 3)) if given]
        if ignored:
            raise ValueError(f"--deployment times its own fixed setup (docs/deployment.md); "
                             f"{', '.join(ignored)} would be ignored: leave them out")
        _bench_deployment(checks.numbers(deployment, "--deployment", kind=int, low=1),
                          trainer, runs, rounds, out)
        return
    if trainer != "both" or runs != 2:
        raise ValueError("--trainer and --runs go with --deployment")
    sizes = checks.numbers(federation, "--federation", kind=int, low=1)
    exp = checks.experiment(preset, sets=set_ or [], seed=seed)
    from simulations.bench import format_bench, run_bench
    from simulations.experiment import write_json

    with console.task("throughput figures") as task:
        figures = run_bench(exp, repeat=repeat)
        task.advance()
    print(format_bench(figures))
    if sizes:
        from simulations.bench import format_rows, run_federation_bench

        quiet_flower(console.verbose)
        rows = run_federation_bench(exp, sizes, rounds=rounds)
        print()
        print(format_rows(rows))
        figures["federation"] = rows
    if out is not None:
        write_json(out, figures)
        print(f"\nwrote {out}")
    console.next(f"fedecay compare --preset {_q(preset)}  (the methods' accuracy on the "
                 "same data)")


def _bench_deployment(counts: tuple[int, ...], trainer: str, runs: int, rounds: int,
                      out: Path | None) -> None:
    """``bench --deployment``: rounds of a loopback deployment, a table of stages."""
    from simulations.deploy_bench import format_table, run_deployment_bench
    from simulations.experiment import write_json
    from simulations.loopback import missing_tools

    if missing_tools():
        raise ValueError(f"--deployment needs Flower's tools beside this Python: "
                         f"{', '.join(missing_tools())} missing")
    warm = {"both": (True, False), "warm": (True,), "cold": (False,)}[trainer]
    results = run_deployment_bench(counts, warm, runs=runs, rounds=rounds,
                                   progress=current())
    print(format_table(results))
    if out is not None:
        write_json(out, {"deployment": results})
        print(f"\nwrote {out}")

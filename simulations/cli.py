"""The ``fedecay`` command line: data, train, simulate, compare.

Only this layer prints; everything below it logs.
"""

from __future__ import annotations

import argparse
import errno
import gzip
import json
import logging
import lzma
import os
import sys
import warnings
import zipfile
import zlib
from pathlib import Path

from common.runtime import quiet_tensorflow
from common.schema import DataError


def _add_source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="preset (quick, default, large, completejourney) or a TOML "
                   "path; with --events only its non-synthetic settings are used")
    p.add_argument("--events", help="an events file (or the Complete Journey folder)")
    p.add_argument("--format", default="auto",
                   help="events format: auto, canonical, taobao, retailrocket, completejourney")
    p.add_argument("--interventions", help="optional canonical interventions file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="experiment seed (default: preset's)")
    p.add_argument("--bad-rows", choices=("error", "skip"), default=None,
                   help="CSV rows with the wrong number of fields: stop naming their line "
                   "(error, the default) or drop and count them (skip); data.bad-rows")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedecay",
        description="Federated learning of e-commerce interest decay and re-activation.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="generate or check behaviour data")
    dsub = data.add_subparsers(dest="data_command", required=True)
    synth = dsub.add_parser("synth", help="generate a synthetic federation as Parquet")
    synth.add_argument("--preset", default="quick")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    check = dsub.add_parser("check", help="validate an events file and show what a merchant "
                            "brings to the federation")
    check.add_argument("file")
    check.add_argument("--format", default="auto")
    check.add_argument("--interventions")
    check.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="snapshot settings, e.g. --set snapshots.horizon-days=7, or "
                       "data.min-merchant-snapshots=40")
    check.add_argument("--preset", help="take snapshots.* and data.* settings from this "
                       "preset (quick, default, large, completejourney) or TOML path")
    check.add_argument("--bad-rows", choices=("error", "skip"), default="error",
                       help="CSV rows with the wrong number of fields: stop with their line "
                       "number (error), or drop and count them (skip)")
    train = sub.add_parser("train", help="train one baseline: centralised, local-only or GBDT")
    train.add_argument("--mode", choices=("centralised", "local", "gbdt"), default="centralised")
    _add_source(train)

    simulate = sub.add_parser("simulate", help="run the federation on Flower's Simulation Engine")
    _add_source(simulate)
    simulate.add_argument("--strategy", help="fedavg, fedprox, fedadam, fedyogi, fedavgm, "
                          "fedtrimmedavg, fedmedian, krum (default: the preset's)")
    simulate.add_argument("--ray-address", help="attach to an existing Ray cluster")
    simulate.add_argument("--resume", metavar="RUN_DIR",
                          help="continue a killed run from its last checkpoint")

    compare = sub.add_parser("compare", help="federated vs centralised vs local-only vs GBDT")
    _add_source(compare)
    compare.add_argument("--strategies", default="fedavg",
                         help="comma-separated federated strategies (default fedavg)")
    compare.add_argument("--methods", default="gbdt,centralised,local,federated",
                         help="comma-separated subset of gbdt,centralised,local,federated")
    compare.add_argument("--noise", default="",
                         help="noise multipliers to sweep, e.g. 0,0.5,1,2: one federated run "
                         "each with differential privacy (0 = without; mode privacy.mode, "
                         "server-fixed if off), the AUC-vs-epsilon plot and the membership "
                         "audit of every model")
    compare.add_argument("--audit", action="store_true",
                         help="membership-inference audit of the federated and centralised "
                         "models (implied by --noise)")

    bench = sub.add_parser("bench", help="throughput figures: generation, snapshots, "
                           "training, scoring")
    bench.add_argument("--preset", default="default")
    bench.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bench.add_argument("--seed", type=int, default=None)
    bench.add_argument("--json", help="also write the figures to this JSON file")
    bench.add_argument("--federation", default="",
                       help="also time federated vs centralised for these merchant counts, "
                       "e.g. 10,100")
    bench.add_argument("--rounds", type=int, default=4)
    bench.add_argument("--repeat", type=int, default=3,
                       help="time each throughput figure this many times and keep the best")

    score = sub.add_parser("score", help="batch scoring: decay risk, interest forecast and "
                           "the activation action per user")
    score.add_argument("--model", required=True,
                       help="model.keras (its settings are read from model.json beside it)")
    score.add_argument("--events", required=True, help="the events file to score")
    score.add_argument("--format", default="auto",
                       help="events format: auto, canonical, taobao, retailrocket, completejourney")
    score.add_argument("--bad-rows", choices=("error", "skip"), default="error",
                       help="CSV rows with the wrong number of fields: stop naming their line "
                       "(error) or drop and count them (skip)")
    score.add_argument("--at", help="cutoff time, ISO-8601 (default: just after the last event)")
    score.add_argument("--out", help="write all scores to this .csv or .parquet file "
                       "(default: print the 20 users most at risk)")
    score.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="model settings (snapshots.*, policy.*) when the model has no "
                       "model.json, or overrides, e.g. --set policy.risk-threshold=0.3")

    monitor = sub.add_parser("monitor", help="real-time decay monitor: JSON-line events in, "
                             "alerts out (one JSON line each)")
    monitor.add_argument("--model", required=True,
                         help="model.keras (its settings are read from model.json beside it)")
    monitor.add_argument("--input", default="-", help="JSON-lines events file, or - for stdin")
    monitor.add_argument("--state", help="folder for the monitor's state (checkpoints; "
                         "a restart continues from it)")
    monitor.add_argument("--out", help="append alerts to this file (default: stdout); with "
                         "--state, a restart after a crash neither repeats nor loses one")
    monitor.add_argument("--batch", type=int, default=1000,
                         help="rescore touched users every N events (and at the end of input)")
    monitor.add_argument("--max-delay-seconds", type=float, default=0.5,
                         help="... or, for stdin, pipes and --follow, when the first unscored "
                         "event has waited this long or the input pauses")
    monitor.add_argument("--cooldown-hours", type=float, default=72.0,
                         help="no second alert for a user within this stream time")
    monitor.add_argument("--sweep-hours", type=float, default=24.0,
                         help="rescore every active user this often in stream time (0 = never)")
    monitor.add_argument("--checkpoint-every", type=int, default=100_000,
                         help="events between state checkpoints")
    monitor.add_argument("--max-line-bytes", type=int, default=1 << 20,
                         help="longer input lines are skipped and counted as malformed")
    monitor.add_argument("--follow", action="store_true",
                         help="keep reading a growing file (like tail -f)")
    monitor.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                         help="model settings (snapshots.*, policy.*), as for score")

    privacy = sub.add_parser("privacy", help="privacy audits of a run: what left the "
                             "merchants, and membership inference on the model")
    psub = privacy.add_subparsers(dest="privacy_command", required=True)
    egress = psub.add_parser("egress", help="bytes up/down per round and client, and the "
                             "metric names clients may send (from metrics.jsonl)")
    egress.add_argument("--run", required=True, help="a federated run folder")
    egress.add_argument("--json", help="also write the summary to this JSON file")
    audit = psub.add_parser("audit", help="loss-threshold membership-inference attack: "
                            "ROC-AUC with a bootstrap interval")
    audit.add_argument("--run", required=True, help="a run folder with model.keras (or the "
                       "model file itself)")
    audit.add_argument("--merchants", type=int, default=4, help="merchants sampled (seeded)")
    audit.add_argument("--seed", type=int, default=0)
    audit.add_argument("--bootstrap", type=int, default=500, help="bootstrap resamples")
    audit.add_argument("--json", help="also write the result to this JSON file")

    deploy = sub.add_parser("deploy", help="files a test deployment needs")
    dsub2 = deploy.add_subparsers(dest="deploy_command", required=True)
    certs = dsub2.add_parser("certs", help="a test CA and a server certificate (TLS)")
    certs.add_argument("dir")
    certs.add_argument("--host", action="append", default=None,
                       help="SAN host or IP (repeatable; default 127.0.0.1 and localhost)")
    certs.add_argument("--overwrite", action="store_true")
    key = dsub2.add_parser("node-key", help="an ECDSA P-384 SuperNode key pair")
    key.add_argument("dir")
    key.add_argument("--name", default="node")
    key.add_argument("--overwrite", action="store_true")
    return parser


def _experiment(args: argparse.Namespace):
    from simulations.experiment import resolve

    overrides = list(args.set)
    if args.bad_rows is not None:
        overrides.append(f"data.bad-rows={args.bad_rows!r}")
    return resolve(args.preset, events=args.events, format=args.format,
                   interventions=args.interventions, overrides=overrides, seed=args.seed)


def _say(text: str) -> None:
    print(text, flush=True)


def _cmd_train(args: argparse.Namespace) -> int:
    from common.model import save_model
    from simulations.baselines import assess, run_centralised, run_gbdt, run_local
    from simulations.compare import format_table
    from simulations.experiment import prepare, run_folder, write_json

    exp = _experiment(args)
    # Made first so a bad output-dir fails before the training; gone again on failure.
    with run_folder(exp, args.mode) as run_dir:
        data = prepare(exp)
        _say(f"data: {len(data.merchants)} merchants, {len(data.snapshots):,} snapshots")
        model = None
        if args.mode == "centralised":
            result, model = run_centralised(
                exp, data, on_epoch=lambda e, r: _say(
                    f"epoch {e}/{exp.train.epochs}: loss {r['loss']:.4f} "
                    f"val_loss {r.get('val_loss', float('nan')):.4f}"))
        elif args.mode == "local":
            result = run_local(exp, data, progress=_say)
        else:
            result = run_gbdt(exp, data)
        metrics = assess(result, data, exp)
        write_json(run_dir / "config.json", dict(exp.flat))
        write_json(run_dir / "metrics.json", metrics)
        if model is not None:
            save_model(model, run_dir / "model.keras")
    print(format_table({"methods": {result.name: metrics}}))
    print(f"\nrun folder: {run_dir}")
    return 0


def _cmd_simulate(args: argparse.Namespace) -> int:
    import contextlib

    from simulations.baselines import assess
    from simulations.compare import _round_text, format_table
    from simulations.experiment import experiment_from_flat, prepare, run_folder, write_json
    from simulations.federated import run_federated

    extra = {}
    if args.strategy:
        extra["federation.strategy"] = args.strategy
    if args.ray_address:
        extra["simulation.ray-address"] = args.ray_address
    if args.resume:
        # The run's own config.json decides the data, seeds and model; --set may extend
        # the rounds or change how they run (resume_experiment names what may change).
        given = [f"--{name}".replace("_", "-") for name in ("preset", "events",
                                                            "interventions", "seed", "bad_rows")
                 if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{given[0]} cannot be used with --resume: the run's "
                             "config.json decides the data and the seed")
        from common.config import apply_overrides
        from simulations.federated import resume_experiment

        exp = resume_experiment(Path(args.resume).resolve(),
                                {**apply_overrides({}, args.set), **extra})
        folder = contextlib.nullcontext(Path(args.resume).resolve())
    else:
        exp = _experiment(args)
        if extra:
            exp = experiment_from_flat({**exp.flat, **extra})
        folder = run_folder(exp, "simulate")
    with folder as run_dir:
        if not args.resume:
            write_json(run_dir / "config.json", dict(exp.flat))
        data = prepare(exp)
        _say(f"data: {len(data.merchants)} merchants, {len(data.snapshots):,} snapshots; "
             f"{exp.federation.strategy}, {exp.federation.num_rounds} rounds")
        result = run_federated(exp, data, run_dir, progress=lambda line: _say(
            _round_text(line, exp.federation.num_rounds)))
        metrics = assess(result, data, exp)
        write_json(run_dir / "results.json", metrics)
    print(format_table({"methods": {result.name: metrics}}))
    print(f"\nrun folder: {run_dir}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from simulations.compare import run_comparison
    from simulations.experiment import run_folder

    exp = _experiment(args)
    strategies = tuple(s.strip() for s in args.strategies.split(",") if s.strip())
    methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    known = ("gbdt", "centralised", "local", "federated")
    unknown = set(methods) - set(known)
    if unknown or not methods:
        raise ValueError(f"--methods: unknown {sorted(unknown)} (choose from {', '.join(known)})"
                         if unknown else f"--methods: name at least one of {', '.join(known)}")
    try:
        noise = tuple(float(z) for z in args.noise.split(",") if z.strip())
    except ValueError:
        raise ValueError(f"--noise {args.noise!r}: expected comma-separated numbers") from None
    with run_folder(exp, "compare") as run_dir:
        out = run_comparison(exp, run_dir, strategies=strategies, methods=methods, noise=noise,
                             audit=args.audit or bool(noise), progress=_say)
    print()
    print(out.table)
    gain = out.results.get("gain_from_joining", {})
    for name, g in gain.items():
        q1 = g["by_size_quartile"].get("q1")
        print(f"{name}: mean AUC gain over local-only {g['mean']:+.4f}; smallest quartile "
              f"{q1:+.4f}")
    print(f"\nreport: {run_dir / 'report.md'}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from simulations.bench import format_bench, run_bench
    from simulations.experiment import resolve, write_json

    exp = resolve(args.preset, overrides=args.set, seed=args.seed)
    if args.repeat < 1:
        raise ValueError(f"--repeat {args.repeat}: expected at least 1")
    figures = run_bench(exp, repeat=args.repeat)
    print(format_bench(figures))
    if args.federation:
        from simulations.bench import format_rows, run_federation_bench

        sizes = tuple(int(x) for x in args.federation.split(",") if x.strip())
        rows = run_federation_bench(exp, sizes, rounds=args.rounds)
        print()
        print(format_rows(rows))
        figures["federation"] = rows
    if args.json:
        write_json(Path(args.json), figures)
    return 0


def _err(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _cutoff(at: str | None) -> str | None:
    """``--at`` checked before anything loads: ISO-8601, in the range an event may have."""
    if at is None:
        return None
    import pandas as pd

    from common.timestamps import EARLIEST_TIME, FUTURE_SLACK

    try:
        stamp = pd.Timestamp(at)
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"--at {at!r}: expected an ISO-8601 time, e.g. "
                         "2025-03-01T00:00:00Z") from None
    stamp = stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")
    latest = pd.Timestamp.now(tz="UTC") + FUTURE_SLACK
    if not EARLIEST_TIME <= stamp <= latest:
        raise ValueError(f"--at {at}: expected a time between {EARLIEST_TIME:%Y-%m-%d} and "
                         f"{latest:%Y-%m-%d %H:%M} UTC")
    return at


def _cmd_score(args: argparse.Namespace) -> int:
    import time

    from client.scoring import score_events, score_summary, scores_path, warm_up, write_scores
    from common.bundle import load_model_bundle
    from common.io import load_events

    if args.out:
        out = scores_path(args.out)  # a bad --out fails now, not after the scoring
        if out.exists() and Path(args.events).exists() and out.samefile(args.events):
            raise ValueError(f"--out {args.out} is the --events file: scores would replace "
                             "the log; choose another file")
    at = _cutoff(args.at)
    bundle = load_model_bundle(args.model, args.set)
    _err(f"model: {Path(args.model).resolve()} (settings: {', '.join(bundle.sources)})")
    started = time.perf_counter()
    log = load_events(args.events, args.format, bad_rows=args.bad_rows)
    _err("\n".join(log.report.summary_lines()))
    loaded = time.perf_counter()

    def progress(done: int, total: int) -> None:
        print(f"\rscored {done:,}/{total:,} users", end="", file=sys.stderr, flush=True)

    warm_up(bundle.model)
    compiled = time.perf_counter()
    scores = score_events(bundle.model, log.events, at, bundle.snapshots, bundle.policy,
                          progress=progress)
    seconds = time.perf_counter() - compiled
    _err("")
    if len(scores) == 0:
        ts = log.events["timestamp"]
        raise ValueError(
            f"no user of {args.events} has events in the "
            f"{bundle.snapshots.observation_days:g} days before the cutoff "
            f"{at or 'after the last event'} (the log spans {ts.min():%Y-%m-%d} .. "
            f"{ts.max():%Y-%m-%d}): nothing to score; choose --at inside the log")
    if args.out:
        path = write_scores(scores, args.out)
        print(f"wrote {len(scores):,} scores to {path}")
    else:
        import pandas as pd

        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(scores.sort_values("decay_risk", ascending=False).head(20)
                  .to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    info = score_summary(scores, bundle.policy)
    mix = "  ".join(f"{k} {v:.1%}" for k, v in info["action_mix"].items()) or "-"
    _err(f"users scored {info['users']:,}; at risk (>= {bundle.policy.risk_threshold:g}) "
         f"{info['at_risk_share']:.1%}; actions: {mix}")
    _err(f"loading {loaded - started:.1f} s; compiling {compiled - loaded:.1f} s; "
         f"scoring {seconds:.1f} s "
         f"({info['users'] / max(seconds, 1e-9):,.0f} users/s)")
    return 0


def _cmd_monitor(args: argparse.Namespace) -> int:
    import signal

    from client.monitor import (
        AlertFile,
        Monitor,
        MonitorConfig,
        StopStream,
        has_state,
        prepare_state_dir,
        run_stream,
    )
    from common.bundle import load_model_bundle

    config = MonitorConfig(batch=args.batch, max_delay_seconds=args.max_delay_seconds,
                           cooldown_hours=args.cooldown_hours,
                           sweep_hours=args.sweep_hours, checkpoint_every=args.checkpoint_every,
                           max_line_bytes=args.max_line_bytes)
    state_dir = prepare_state_dir(args.state) if args.state else None  # errors before the model
    bundle = load_model_bundle(args.model, args.set)
    closed = []

    def sink(alert: dict) -> None:
        if closed:
            return
        try:
            sys.stdout.write(json.dumps(alert) + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            closed.append(True)  # the reader went away: stop, saving the state
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            raise StopStream from None

    monitor = Monitor(bundle.model, bundle.snapshots, bundle.policy, config, sink=sink)
    position = None
    if state_dir is not None and has_state(state_dir):
        position = monitor.load_state(state_dir)
        _err(f"state: {state_dir} ({len(monitor):,} users, {monitor.stats.events:,} events)")
    alerts = AlertFile.open(args.out, position) if args.out else None
    if alerts is not None:
        monitor.sink = alerts.write
        _err(f"alerts: {alerts.path} (from byte {alerts.size:,})")
    _err(f"model: {Path(args.model).resolve()} (settings: {', '.join(bundle.sources)}); "
         f"alert threshold {bundle.policy.risk_threshold:g}")
    monitor.warm_up()

    # Ctrl-C and SIGTERM end the stream between two events; the state is then saved.
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        out = run_stream(monitor, args.input, follow=args.follow, state_dir=state_dir,
                         position=position, report=_err, should_stop=lambda: bool(stop),
                         alerts=alerts)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if alerts is not None:
            alerts.close()
    _err(f"events {out['events']:,} in {out['seconds']:.1f} s ({out['events_per_s']:,.0f}/s); "
         f"users {out['users']:,}; alerts {out['alerts']:,} "
         f"(held back by cool-down {out['suppressed_by_cooldown']:,}); "
         + (f"alert latency p50 {out['alert_latency_p50_ms']:.1f} ms, "
            f"p99 {out['alert_latency_p99_ms']:.1f} ms"
            if out["alert_latency_p50_ms"] == out["alert_latency_p50_ms"]  # not NaN
            else "no event-triggered alerts"))
    reasons = ", ".join(f"{k} {v:,}" for k, v in out["malformed_reasons"].items())
    _err(f"malformed lines {out['malformed']:,}{f' ({reasons})' if reasons else ''}; "
         f"duplicates dropped {out['duplicates']:,}; late events {out['late']:,}")
    if state_dir is not None:
        _err(f"state saved to {state_dir}")
    return 0


def _cmd_privacy(args: argparse.Namespace) -> int:
    from simulations.experiment import write_json
    from simulations.privacy_audit import (
        egress_summary,
        format_audit,
        format_egress,
        membership_audit,
    )

    if args.privacy_command == "egress":
        out = egress_summary(args.run)
        print(format_egress(out))
    else:
        out = membership_audit(args.run, merchants=args.merchants, seed=args.seed,
                               n_boot=args.bootstrap)
        print(format_audit(out))
    if args.json:
        write_json(Path(args.json), out)
    return 0


def _cmd_deploy(args: argparse.Namespace) -> int:
    from server.certs import make_certs, make_node_key

    if args.deploy_command == "certs":
        hosts = tuple(args.host) if args.host else ("127.0.0.1", "localhost")
        paths = make_certs(Path(args.dir), hosts=hosts, overwrite=args.overwrite)
    else:
        paths = make_node_key(Path(args.dir), args.name, overwrite=args.overwrite)
    for name, path in paths.items():
        print(f"wrote {name:<12} {path}")
    return 0


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from common.config import apply_overrides
    from simulations.experiment import experiment_from_flat
    from simulations.synth import (
        generate_federation,
        load_preset,
        synth_config_from_preset,
        write_federation,
    )

    flat = apply_overrides(load_preset(args.preset), args.set)
    experiment_from_flat(flat)  # every key of every section, as the other commands check
    fed = generate_federation(synth_config_from_preset(flat), seed=args.seed)
    paths = write_federation(fed, Path(args.out))
    print(fed.summary())
    print()
    for name, path in paths.items():
        print(f"wrote {name:<14} {path}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    """Load, summarise and snapshot one file; exit 2 unless it can join a federation."""
    from common.config import SnapshotConfig, apply_overrides, from_flat
    from common.io import load_events
    from common.snapshots import build_snapshots, federation_problems, stray_gap
    from simulations.experiment import DataConfig
    from simulations.synth import load_preset

    flat = apply_overrides(load_preset(args.preset) if args.preset else {}, args.set)
    snap_cfg = from_flat(SnapshotConfig, flat, "snapshots")
    data_cfg = from_flat(DataConfig, flat, "data")
    log = load_events(args.file, args.format, interventions_path=args.interventions,
                      bad_rows=args.bad_rows)
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
    return 0


# What went wrong, as the verb of "cannot <verb> <path>: <reason>", by errno.
_OS_VERBS = {
    errno.ENOENT: "open", errno.EISDIR: "open", errno.ENOTDIR: "use", errno.EACCES: "access",
    errno.EPERM: "access", errno.ENOSPC: "write", errno.EROFS: "write", errno.EDQUOT: "write",
    errno.EEXIST: "create", errno.ENAMETOOLONG: "use", errno.EPIPE: "write",
}
_OS_HINTS = {
    errno.EISDIR: " (a folder where a file was expected)",
    errno.ENOTDIR: " (a part of the path is a file, not a folder)",
}


def os_error_text(err: OSError) -> str:
    """One line for an OSError: ``cannot <verb> <path>: <reason>``.

    An OSError raised with a message of our own (no errno) is shown as it is.
    """
    if err.strerror is None:
        return str(err)
    verb = _OS_VERBS.get(err.errno or 0, "use")
    hint = _OS_HINTS.get(err.errno or 0, "")
    if err.filename is None:
        return f"cannot {verb}: {err.strerror}{hint}"
    path = os.fsdecode(err.filename) if isinstance(err.filename, bytes) else err.filename
    if err.filename2 is not None:
        return f"cannot {verb} {path} (to {err.filename2}): {err.strerror}{hint}"
    return f"cannot {verb} {path}: {err.strerror}{hint}"


_INPUT_FLAGS = (("events", "--events"), ("file", "file"), ("model", "--model"),
                ("interventions", "--interventions"), ("input", "--input"),
                ("preset", "--preset"), ("run", "--run"))


def _inputs(args: argparse.Namespace) -> str:
    """The input files a command was given, for errors that do not carry a path."""
    given = [f"{flag} {getattr(args, attr)}" for attr, flag in _INPUT_FLAGS
             if getattr(args, attr, None) not in (None, "", "-")
             and (attr != "preset" or Path(getattr(args, attr)).exists())]
    return "; ".join(given) or "the input"


def _user_error(err: Exception, args: argparse.Namespace) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug."""
    if isinstance(err, UnicodeDecodeError):  # before ValueError: it is one
        return (f"cannot read {_inputs(args)}: not UTF-8 text (byte "
                f"{err.object[err.start:err.start + 1].hex()} at offset {err.start})")
    if isinstance(err, gzip.BadGzipFile | EOFError | zlib.error | lzma.LZMAError
                  | zipfile.BadZipFile):
        return (f"cannot read {_inputs(args)}: the compressed file is truncated or corrupt "
                f"({type(err).__name__}: {err})")
    if isinstance(err, DataError | ValueError):  # so is TOMLDecodeError
        return str(err)
    if isinstance(err, OSError):
        return os_error_text(err)
    return None


def main(argv: list[str] | None = None) -> int:
    quiet_tensorflow()  # before any command imports TensorFlow
    args = _parser().parse_args(argv)
    # Progress is printed by the commands; logs show warnings unless -v.
    level = logging.DEBUG if args.verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    for handler in logging.root.handlers:
        handler.setLevel(level)  # Flower's logger sends DEBUG records up to the root
    if not args.verbose:
        from flwr.supercore.logger import console_handler

        console_handler.setLevel(logging.ERROR)
        logging.getLogger("flwr").propagate = False
    handlers = {
        ("data", "synth"): _cmd_data_synth,
        ("data", "check"): _cmd_data_check,
        ("train", None): _cmd_train,
        ("simulate", None): _cmd_simulate,
        ("compare", None): _cmd_compare,
        ("deploy", None): _cmd_deploy,
        ("bench", None): _cmd_bench,
        ("score", None): _cmd_score,
        ("monitor", None): _cmd_monitor,
        ("privacy", None): _cmd_privacy,
    }
    key = (args.command, getattr(args, "data_command", None))
    try:
        return handlers[key](args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        text = _user_error(err, args)
        if text is None:  # not the user's input nor the machine: a bug, so show where
            print(f"error: internal error ({type(err).__name__}), a bug in fedecay; "
                  "please report it with the traceback below", file=sys.stderr, flush=True)
            raise
        print(f"error: {text}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""``fedecay score|monitor|merchant serve``: what a merchant runs.

``score`` and ``monitor`` use a trained model; ``merchant serve`` is the warm trainer
beside the merchant's SuperNode (:mod:`client.trainer`).

``--model`` takes a model file or a run folder of train/simulate/compare (``--method``
picks among its models). Everything about the arguments, the model file's kind and the
input files is checked before TensorFlow loads; the CLI draws the scoring progress and
the monitor's throughput.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from . import checks
from .console import current
from .errors import guarded
from .options import BadRowsOption, FormatOption, MethodOption
from .runs import model_in

ModelOption = Annotated[Path, typer.Option(
    metavar="RUN_DIR|FILE", show_default=False,
    help="A run folder of train, simulate or compare, or a model.keras or model.skops "
         "(GBDT/LR; its settings come from model.json or config.json beside it).")]
ModelSetOption = Annotated[list[str] | None, typer.Option(
    "--set", metavar="KEY=VALUE", show_default="the model's own settings",
    help="Model settings (snapshots.*, policy.*), e.g. --set policy.risk-threshold=0.3 "
         "(repeatable).")]


def _q(path: object) -> str:
    return shlex.quote(str(path))


def _err(text: str) -> None:
    """A result line that belongs on stderr (stdout holds the scores or alerts)."""
    print(text, file=sys.stderr, flush=True)


def _model(model: Path, method: str | None) -> tuple[str, Path]:
    """The model ``--model``/``--method`` name, its kind checked without TensorFlow."""
    name, path = model_in(model, method)
    checks.model_file(path)
    return name, path


@contextlib.contextmanager
def _request_log(show: bool) -> Iterator[None]:
    """A service's log while the block runs: the trainer's line per request (INFO) on
    stderr with the time, as a SuperNode shows its messages. Taken off afterwards, so a
    caller running commands in one process keeps its own logging (and no handler is
    left writing to a stderr that is gone)."""
    import logging

    if not show:
        yield
        return
    logger = logging.getLogger("client")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


#: The longest path a unix socket may have on Linux (``sun_path`` is 108 bytes with its
#: terminating NUL).
SOCKET_PATH_MAX = 107

serve_app = typer.Typer(help="The merchant's side of a deployment (the warm trainer).",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    app.command("score")(score)
    app.command("monitor")(monitor)
    app.add_typer(serve_app, name="merchant")


@serve_app.command("serve")
@guarded
def serve(
    data_path: Annotated[Path, typer.Option(
        metavar="FILE", show_default=False,
        help="The merchant's events file: the same data-path as the SuperNode's "
             "--node-config.")],
    format: FormatOption = "auto",
    interventions_path: Annotated[Path | None, typer.Option(
        metavar="FILE", show_default="none",
        help="Canonical interventions file (the node config's interventions-path).")] = None,
    socket: Annotated[Path | None, typer.Option(
        metavar="PATH", show_default="derived from --data-path (see docs/deployment.md)",
        help="Where to listen; give the SuperNode the same path as node config "
             "trainer-socket.")] = None,
) -> None:
    """Warm trainer beside flower-supernode: reads the file once, keeps TensorFlow, the
    snapshots and the model, and serves this merchant's train and evaluate messages."""
    console = current()
    path = checks.events_path(data_path, "--data-path", format)
    inter = checks.input_path(interventions_path, "--interventions-path") \
        if interventions_path is not None else None
    from client.channel import default_socket, private_dir
    from client.trainer import MerchantFile
    from client.trainer import serve as serve_trainer

    sock = socket.expanduser().absolute() if socket is not None else default_socket(path)
    size = len(os.fsencode(sock))
    if size > SOCKET_PATH_MAX:  # bind() would fail after the file is read
        raise ValueError(f"--socket {sock}: {size} bytes, longer than the {SOCKET_PATH_MAX} a "
                         "unix socket's path may have; choose a shorter path")
    private_dir(sock.parent)  # a folder others can enter is refused before the file is read
    with _request_log(not console.quiet):
        # Paths as the node config gives them: the ClientApp compares them resolved.
        data = MerchantFile(str(path), format, str(inter) if inter is not None else None)
        served = serve_trainer(data, sock, report=console.say)
    console.close()
    print(f"trainer stopped after {served:,} requests; {sock} removed")


@guarded
def score(
    model: ModelOption,
    events: Annotated[Path, typer.Option(metavar="FILE", show_default=False,
                                         help="The events file to score.")],
    method: MethodOption = None,
    format: FormatOption = "auto",
    bad_rows: BadRowsOption = "error",
    at: Annotated[str | None, typer.Option(
        metavar="TIME", show_default="just after the last event",
        help="Cutoff time, ISO-8601 (naive = UTC), e.g. 2025-03-01T00:00:00Z.")] = None,
    out: Annotated[Path | None, typer.Option(
        metavar="FILE", show_default="print the 20 users most at risk",
        help="Write every user's scores to this .csv or .parquet file.")] = None,
    set_: ModelSetOption = None,
    reasons: Annotated[str, typer.Option(
        click_type=click.Choice(("targeted", "at-risk", "none")),
        help="Whose reasons to give (reasons, reason_codes, fading_categories): the "
             "users the policy targets (an action other than none), every user at risk, "
             "or nobody.")] = "targeted",
    reasons_points: Annotated[str, typer.Option(
        click_type=click.Choice(("1", "2", "4", "8")), metavar="1|2|4|8",
        help="Quadrature points of the reasons' integrated gradients (an LSTM's only): "
             "fewer is faster, further from the exact attributions (docs/performance.md).",
    )] = "1",
) -> None:
    """Batch scoring: decay risk, interest forecast and the activation action per user."""
    console = current()
    sets = set_ or []
    if sets:
        checks.model_sets(sets)
    if out is not None:  # a bad --out fails now, not after the scoring
        out = checks.output_file(out, "--out", checks.SCORE_FILES)
        checks.not_an_input(out, events, "--events")
    cutoff = checks.cutoff(at)
    name, model_path = _model(model, method)
    checks.events_path(events, "--events", format)
    from client.scoring import score_events, score_summary, scores_path, warm_up, write_scores

    if out is not None:
        scores_path(out)  # the writer's own rule, in case it is stricter than the check
    from common.bundle import load_model_bundle
    from common.io import load_events

    started = time.perf_counter()
    with console.task("loading the model") as task:
        bundle = load_model_bundle(model_path, sets)
        task.advance()
    console.say(f"model: {model_path} ({name}, {bundle.kind}; settings: "
                f"{', '.join(bundle.sources)})")
    log = load_events(events, format, bad_rows=bad_rows)
    console.say("\n".join(log.report.summary_lines()))
    loaded = time.perf_counter()
    if bundle.kind == "lstm":  # GBDT/LR models compile nothing
        warm_up(bundle.model)  # the reasons' attributions compile when first needed
    compiled = time.perf_counter()
    scores = score_events(bundle.model, log.events, cutoff, bundle.snapshots, bundle.policy,
                          progress=console, reasons=reasons,
                          reason_points=int(reasons_points))
    console.close()
    seconds = time.perf_counter() - compiled
    if len(scores) == 0:
        ts = log.events["timestamp"]
        raise ValueError(
            f"no user of {events} has events in the "
            f"{bundle.snapshots.observation_days:g} days before the cutoff "
            f"{cutoff or 'after the last event'} (the log spans {ts.min():%Y-%m-%d} .. "
            f"{ts.max():%Y-%m-%d}): nothing to score; choose --at inside the log")
    if out is not None:
        path = write_scores(scores, out)
        print(f"wrote {len(scores):,} scores to {path}")
    else:
        import pandas as pd

        from client.monitor.events import escape_controls

        top = scores.sort_values("decay_risk", ascending=False).head(20)
        # Ids and reasons come from the merchant's file: escape control characters (a
        # terminal would run them) and cut long ones (a 100k-character id padded each row).
        for column in top.select_dtypes(exclude="number").columns:
            cut = 40 if column.endswith("_id") or column == "category" else 10_000
            top[column] = top[column].map(lambda v, cut=cut: escape_controls(
                v if len(v) <= cut else v[:cut - 1] + "…") if isinstance(v, str) else v)
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(top.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    info = score_summary(scores, bundle.policy)
    mix = "  ".join(f"{k} {v:.1%}" for k, v in info["action_mix"].items()) or "-"
    _err(f"users scored {info['users']:,}; at risk (>= {bundle.policy.risk_threshold:g}) "
         f"{info['at_risk_share']:.1%}; actions: {mix}")
    explained, why_s = scores.attrs.get("explained", 0), scores.attrs.get("explain_seconds", 0.0)
    _err(f"loading {loaded - started:.1f} s; compiling {compiled - loaded:.1f} s; "
         f"scoring {seconds:.1f} s ({info['users'] / max(seconds, 1e-9):,.0f} users/s), of "
         f"which reasons for {explained:,} {reasons} users {why_s:.1f} s"
         + (" (their first call compiles)" if explained and bundle.kind == "lstm" else ""))
    choice = f" --method {method}" if method else ""
    if bundle.kind != "lstm":  # the monitor runs the LSTM models only
        console.next(f"fedecay score --model {_q(model)}{choice} --events {_q(events)} "
                     "--out scores.csv  (every user's scores in a file)")
        return
    console.next(f"fedecay monitor --model {_q(model)}{choice} --input EVENTS.jsonl "
                 "--state monitor-state  (the same model on a live stream of JSON lines)")


@guarded
def monitor(
    model: ModelOption,
    method: MethodOption = None,
    input: Annotated[str, typer.Option(
        metavar="FILE|-", help="JSON-lines events file, or - for stdin.")] = "-",
    state: Annotated[Path | None, typer.Option(
        metavar="DIR", show_default="none: a restart starts afresh",
        help="Folder for the monitor's state; a restart continues from it.")] = None,
    out: Annotated[Path | None, typer.Option(
        metavar="FILE", show_default="stdout",
        help="Append alerts to this file; with --state a restart after a crash neither "
             "repeats nor loses one.")] = None,
    batch: Annotated[int, typer.Option(
        min=1, metavar="EVENTS",
        help="Rescore touched users every N events (and at the end of input).")] = 1000,
    max_delay_seconds: Annotated[float, typer.Option(
        click_type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
        help="... or, for stdin, pipes and --follow, when the first unscored event has "
             "waited this long (seconds).")] = 0.5,
    cooldown_hours: Annotated[float, typer.Option(
        min=0, metavar="HOURS",
        help="No second alert for a user within this much stream time (hours).")] = 72.0,
    sweep_hours: Annotated[float, typer.Option(
        min=0, metavar="HOURS",
        help="Rescore every active user this often in stream time (hours; 0 = never)."
    )] = 24.0,
    checkpoint_every: Annotated[int, typer.Option(
        min=1, metavar="EVENTS", help="Events between state checkpoints.")] = 100_000,
    max_line_bytes: Annotated[int, typer.Option(
        min=1, metavar="BYTES",
        help="Longer input lines are skipped and counted as malformed (bytes).")] = 1 << 20,
    follow: Annotated[bool, typer.Option(
        "--follow", help="Keep reading a growing file (like tail -f).")] = False,
    set_: ModelSetOption = None,
) -> None:
    """Real-time decay monitor: JSON-line events in, alerts out (one JSON line each)."""
    import signal

    console = current()
    sets = set_ or []
    state_dir = checks.state_folder(state) if state is not None else None
    if sets:
        checks.model_sets(sets)
    name, model_path = _model(model, method)
    kind = checks.model_kind(model_path)
    if kind != "lstm":
        raise ValueError(f"monitor: --model {model_path} is a {kind} model; the monitor runs "
                         "the LSTM models only (choose --method federated or centralised); "
                         "fedecay score takes it")
    if input != "-":
        checks.input_path(input, "--input")
    if out is not None:
        out = out.expanduser().resolve()
        if out.is_dir():
            raise ValueError(f"--out {out}: is a folder")
        checks.writable_parent(out.parent, "--out")
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

    config = MonitorConfig(batch=batch, max_delay_seconds=max_delay_seconds,
                           cooldown_hours=cooldown_hours, sweep_hours=sweep_hours,
                           checkpoint_every=checkpoint_every, max_line_bytes=max_line_bytes)
    if state_dir is not None:
        state_dir = prepare_state_dir(state_dir)  # made now that every argument is checked
    with console.task("loading the model") as task:
        bundle = load_model_bundle(model_path, sets)
        task.advance()
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

    engine = Monitor(bundle.model, bundle.snapshots, bundle.policy, config, sink=sink)
    position = None
    if state_dir is not None and has_state(state_dir):
        position = engine.load_state(state_dir)
        console.say(f"state: {state_dir} ({len(engine):,} users, "
                    f"{engine.stats.events:,} events)")
    alerts = AlertFile.open(out, position) if out is not None else None
    if alerts is not None:
        engine.sink = alerts.write
        console.say(f"alerts: {alerts.path} (from byte {alerts.size:,})")
    console.say(f"model: {model_path} ({name}; settings: {', '.join(bundle.sources)}); "
                f"alert threshold {bundle.policy.risk_threshold:g}")
    with console.task("compiling the scorer and the reasons (once)") as task:
        engine.warm_up()
        task.advance()

    def figures() -> dict[str, Any]:
        return {"events": engine.stats.events, "users": len(engine),
                "alerts": engine.stats.alerts, "malformed": engine.stats.malformed}

    # Ctrl-C and SIGTERM end the stream between two events; the state is then saved.
    stop: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with console.watch("monitor", figures):
            result = run_stream(engine, input, follow=follow, state_dir=state_dir,
                                position=position, report=console.say,
                                should_stop=lambda: bool(stop), alerts=alerts)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if alerts is not None:
            alerts.close()
    _err(f"events {result['events']:,} in {result['seconds']:.1f} s "
         f"({result['events_per_s']:,.0f}/s); users {result['users']:,}; alerts "
         f"{result['alerts']:,} (held back by cool-down {result['suppressed_by_cooldown']:,}); "
         + (f"alert latency p50 {result['alert_latency_p50_ms']:.1f} ms, "
            f"p99 {result['alert_latency_p99_ms']:.1f} ms"
            if result["alert_latency_p50_ms"] == result["alert_latency_p50_ms"]  # not NaN
            else "no event-triggered alerts"))
    reasons = ", ".join(f"{k} {v:,}" for k, v in result["malformed_reasons"].items())
    _err(f"malformed lines {result['malformed']:,}{f' ({reasons})' if reasons else ''}; "
         f"duplicates dropped {result['duplicates']:,}; late events {result['late']:,}")
    if state_dir is not None:
        _err(f"state saved to {state_dir}")
        console.next("the same command again continues from the saved state")
    else:
        console.next("add --state DIR so that a restart continues where this run stopped")

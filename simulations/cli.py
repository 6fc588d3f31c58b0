"""The ``fedecay`` command line: data, train, simulate, compare.

Only this layer prints; everything below it logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

from common.schema import DataError  # noqa: E402


def _add_source(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", help="synthetic federation preset (quick, default, large) "
                     "or a TOML path")
    src.add_argument("--events", help="an events file (or the Complete Journey folder)")
    p.add_argument("--format", default="auto",
                   help="events format: auto, canonical, taobao, retailrocket, completejourney")
    p.add_argument("--interventions", help="optional canonical interventions file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set train.epochs=3 (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="experiment seed (default: preset's)")


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
                       help="snapshot settings, e.g. --set snapshots.horizon-days=7")
    return parser


def _cmd_data_synth(args: argparse.Namespace) -> int:
    from common.config import apply_overrides
    from simulations.synth import (
        generate_federation,
        load_preset,
        synth_config_from_preset,
        write_federation,
    )

    flat = apply_overrides(load_preset(args.preset), args.set)
    fed = generate_federation(synth_config_from_preset(flat), seed=args.seed)
    paths = write_federation(fed, Path(args.out))
    print(fed.summary())
    print()
    for name, path in paths.items():
        print(f"wrote {name:<14} {path}")
    return 0


def _cmd_data_check(args: argparse.Namespace) -> int:
    from common.config import SnapshotConfig, apply_overrides, from_flat
    from common.io import load_events
    from common.snapshots import build_snapshots

    snap_cfg = from_flat(SnapshotConfig, apply_overrides({}, args.set), "snapshots")
    log = load_events(args.file, args.format, interventions_path=args.interventions)
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
    _, report = build_snapshots(ev, snap_cfg, log.interventions)
    print("snapshots (decay label: I(T+H) < rho * I(T))")
    print("\n".join(report.summary_lines()))
    print("OK: this file can join a federation")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    quiet = args.command == "data"
    level = logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers = {
        ("data", "synth"): _cmd_data_synth,
        ("data", "check"): _cmd_data_check,
    }
    key = (args.command, getattr(args, "data_command", None))
    try:
        return handlers[key](args)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

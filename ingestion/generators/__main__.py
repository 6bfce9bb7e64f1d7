"""Command line for the source generators: `python -m ingestion.generators {cdr,crm,forex} --help`.

Defaults come from the environment (pydantic-settings: `WTC_GEN_*` for the generator knobs, and
`WTC_PROD_DSN`, `STREAM_URL`, `SFTP_URL`, `CDR_DIR` from `common.settings.Connections`); flags win.
A one-line JSON summary goes to stdout, logs to stderr, a progress bar to a terminal.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic_settings import SettingsConfigDict
from tqdm import tqdm

from common.logs import setup_logging
from common.settings import Connections
from ingestion.generators.cdr import STARTER_CDR_START, CdrConfig, upload_cdr_files, write_cdr_files
from ingestion.generators.common import STARTER_START, Pace, Profile
from ingestion.generators.crm import CrmConfig, run_crm
from ingestion.generators.forex import TOPIC, ForexConfig, publish_ticks

log = logging.getLogger("ingestion.generators")


class GeneratorSettings(Connections):
    """Generator knobs from the environment (`WTC_GEN_PROFILE`, `WTC_GEN_SEED`, ...), and the
    shared connections (`WTC_PROD_DSN`, `STREAM_URL`, `SFTP_URL`, `CDR_DIR`)."""

    model_config = SettingsConfigDict(env_prefix="WTC_GEN_", extra="ignore", populate_by_name=True)

    profile: Profile = Profile.STARTER
    seed: int = 0
    subscribers: int = 50_000
    pace: Pace = Pace.FAST
    speed: float = 1.0
    malformed_rate: float = 0.0


def _timestamp(text: str) -> datetime:
    try:
        return datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"not a timestamp (YYYY-mm-dd HH:MM:SS): {text!r}"
        ) from exc


def _rate(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError("a rate must be within 0..1")
    return value


def _common(parser: argparse.ArgumentParser, settings: GeneratorSettings, start: datetime) -> None:
    parser.add_argument(
        "--profile",
        choices=[p.value for p in Profile],
        default=settings.profile.value,
        help="starter: the starter's distributions; realistic: tower locality, daily rhythm, "
        "late rows, deletes (default: %(default)s)",
    )
    parser.add_argument("--seed", type=int, default=settings.seed, help="(default: %(default)s)")
    parser.add_argument(
        "--start",
        type=_timestamp,
        default=start,
        help="simulated start time, naive UTC (default: %(default)s)",
    )
    parser.add_argument(
        "--pace",
        choices=[p.value for p in Pace],
        default=settings.pace.value,
        help="fast: as fast as possible; realtime: follow the simulated clock (default: "
        "%(default)s)",
    )
    parser.add_argument(
        "--speed",
        type=float,
        default=settings.speed,
        help="realtime pace only: simulated seconds per wall second (default: %(default)s)",
    )


def _span(parser: argparse.ArgumentParser) -> None:
    span = parser.add_mutually_exclusive_group()
    span.add_argument("--days", type=float, help="simulated span in days (default: 2)")
    span.add_argument("--hours", type=float, help="simulated span in hours")


def _duration(args: argparse.Namespace) -> timedelta:
    if args.hours is not None:
        return timedelta(hours=args.hours)
    return timedelta(days=2 if args.days is None else args.days)


def build_parser(settings: GeneratorSettings | None = None) -> argparse.ArgumentParser:
    settings = settings or GeneratorSettings()
    parser = argparse.ArgumentParser(
        prog="python -m ingestion.generators",
        description="Stand-ins for the starter's three sources, deterministic by seed.",
    )
    sub = parser.add_subparsers(dest="source", required=True)

    cdr = sub.add_parser(
        "cdr",
        help="CDR CSV file pairs into a directory or over SFTP",
        description="Write cdr_data_*/cdr_voice_* CSV pairs, one pair per window, in place under "
        "their final names: into --out DIR, or uploaded to --sftp-url (the default).",
    )
    _common(cdr, settings, STARTER_CDR_START)
    _span(cdr)
    cdr.add_argument("--subscribers", type=int, default=settings.subscribers)
    cdr.add_argument("--rows-per-file", type=int, default=1000, help="(default: %(default)s)")
    cdr.add_argument("--window-seconds", type=int, default=200, help="(default: %(default)s)")
    cdr.add_argument(
        "--malformed-rate",
        type=_rate,
        default=settings.malformed_rate,
        help="share of rows broken on purpose, for fault tests (default: %(default)s)",
    )
    cdr.add_argument(
        "--late-rate",
        type=_rate,
        default=None,
        help="share of rows delivered in a later file (default: 0 starter, 0.015 realistic)",
    )
    target = cdr.add_mutually_exclusive_group()
    target.add_argument("--out", type=Path, help="write into this local directory instead")
    target.add_argument(
        "--sftp-url",
        default=settings.sftp_url,
        help="upload to sftp://user:password@host:port/ (default: $SFTP_URL or the local stack)",
    )
    cdr.add_argument(
        "--remote-dir",
        default=settings.cdr_dir,
        help="upload directory, relative to the SFTP start directory (default: %(default)s)",
    )

    crm = sub.add_parser(
        "crm",
        help="CRM transactions against wtc_prod.crm_system",
        description="Commit CRM transactions (three upserts each; deletes in the realistic "
        "profile) to wtc_prod.crm_system.",
    )
    _common(crm, settings, STARTER_START)
    crm.add_argument("--subscribers", type=int, default=settings.subscribers)
    crm.add_argument("--transactions", type=int, default=50_000, help="(default: %(default)s)")
    crm.add_argument(
        "--delete-rate",
        type=_rate,
        default=None,
        help="share of delete transactions (default: 0 starter, 0.05 realistic)",
    )
    crm.add_argument(
        "--dsn", default=settings.prod_dsn, help="wtc_prod DSN (default: $WTC_PROD_DSN)"
    )

    forex = sub.add_parser(
        "forex",
        help="forex ticks to the tick-data topic",
        description="Publish MRVZAR and WAKMRV ticks (a step every 500 +/- 100 ms) through the "
        "stream interface.",
    )
    _common(forex, settings, STARTER_START)
    _span(forex)
    forex.add_argument(
        "--malformed-rate",
        type=_rate,
        default=settings.malformed_rate,
        help="share of messages broken on purpose (default: %(default)s)",
    )
    forex.add_argument(
        "--stream-url",
        default=settings.stream_url,
        help="redis://... or kafka://... (default: $STREAM_URL or the local stack)",
    )
    forex.add_argument("--topic", default=TOPIC, help="(default: %(default)s)")
    return parser


def _bar(total: float, unit: str) -> tuple[Callable[[int], None], Callable[[], None]]:
    bar = tqdm(total=total, unit=unit, disable=not sys.stderr.isatty(), dynamic_ncols=True)
    return bar.update, bar.close


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the chosen generator; return a summary."""
    common = {
        "profile": args.profile,
        "seed": args.seed,
        "start": args.start,
        "pace": args.pace,
        "speed": args.speed,
    }
    if args.source == "cdr":
        config = CdrConfig(
            subscribers=args.subscribers,
            duration=_duration(args),
            rows_per_file=args.rows_per_file,
            window_seconds=args.window_seconds,
            malformed_rate=args.malformed_rate,
            late_rate=args.late_rate,
            **common,
        )
        update, close = _bar(2 * config.windows, "file")
        try:
            if args.out is not None:
                files = [str(p) for p in write_cdr_files(config, args.out, update)]
                where = str(args.out)
            else:
                files = upload_cdr_files(config, args.sftp_url, args.remote_dir, update)
                where = f"sftp:{args.remote_dir}"
        finally:
            close()
        return {"source": "cdr", "files": len(files), "windows": config.windows, "to": where}
    if args.source == "crm":
        crm_config = CrmConfig(
            subscribers=args.subscribers,
            transactions=args.transactions,
            delete_rate=args.delete_rate,
            **common,
        )
        update, close = _bar(crm_config.transactions, "tx")
        try:
            stats = run_crm(crm_config, args.dsn, update)
        finally:
            close()
        return {
            "source": "crm",
            "transactions": stats.transactions,
            "kinds": stats.kinds,
            "last_ts": str(stats.last_ts),
        }
    fx_config = ForexConfig(duration=_duration(args), malformed_rate=args.malformed_rate, **common)
    update, close = _bar(round(2 * fx_config.duration / timedelta(milliseconds=500)), "msg")
    try:
        published = publish_ticks(fx_config, args.stream_url, args.topic, update)
    finally:
        close()
    return {"source": "forex", "messages": published, "topic": args.topic}


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging()
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except KeyboardInterrupt:
        log.warning("interrupted")
        return 130
    except ValueError as exc:
        log.error("bad settings: %s", exc)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

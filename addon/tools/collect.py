"""`python -m addon collect`: rows every proxy published to Redis, into one central SQLite."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from addon.store import redis_rows


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "collect",
        help="write the rows proxies publish to Redis into one central database",
        description="Read the Redis Stream every proxy started with --set usage_redis=URL publishes its rows to "
        f"({redis_rows.STREAM}, consumer group {redis_rows.GROUP!r}) and insert them into --db. Entries are "
        "acknowledged after their rows are committed and rows are unique by uid: a collector killed and "
        "restarted inserts nothing twice and loses nothing.",
    )
    parser.add_argument("--db", default="usage.db", help="central SQLite database (default: usage.db)")
    parser.add_argument("--redis", required=True, metavar="URL",
                        help=f"redis://host:port/db or rediss://...; password in the URL or ${redis_rows.PASSWORD_ENV}")
    parser.add_argument("--once", action="store_true", help="drain what the stream holds now, then exit")
    parser.add_argument("--consumer", default=None,
                        help="consumer name in the group (default: this host's name); one per collector process")
    parser.set_defaults(func=_cmd_collect)


def _cmd_collect(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.once:
        stats = redis_rows.collect(args.db, args.redis, consumer=args.consumer, once=True)
        print(f"collected {stats.inserted} new rows ({stats.duplicates} already present, "
              f"{stats.malformed} malformed entries skipped) into {args.db}")
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"collecting rows from {redis_rows.redacted(args.redis)} into {args.db}; Ctrl-C stops", flush=True)
    redis_rows.ping(args.redis).close()  # a clear error at start, not a retry loop
    try:
        redis_rows.collect_forever(args.db, args.redis, consumer=args.consumer, stop=stop)
    except KeyboardInterrupt:
        stop.set()
    return 0

"""`python -m addon collect`: rows every proxy published to Redis, into one central SQLite."""

from __future__ import annotations

import logging
import signal
import threading

from addon.store import redis_rows


def run_collect(db_path: str, redis_url: str, *, once: bool = False, consumer: str | None = None) -> int:
    """`collect`: drain the stream once, or follow it until Ctrl-C / SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if once:
        stats = redis_rows.collect(db_path, redis_url, consumer=consumer, once=True)
        print(f"collected {stats.inserted} new rows ({stats.duplicates} already present, "
              f"{stats.malformed} malformed entries skipped) into {db_path}")
        return 0
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"collecting rows from {redis_rows.redacted(redis_url)} into {db_path}; Ctrl-C stops", flush=True)
    redis_rows.ping(redis_url).close()  # a clear error at start, not a retry loop
    try:
        redis_rows.collect_forever(db_path, redis_url, consumer=consumer, stop=stop)
    except KeyboardInterrupt:
        stop.set()
    return 0

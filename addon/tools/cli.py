"""`python -m addon ...` and `openai-usage-meter ...`: the command line, one click group.

Every command here only parses its options and calls a plain function of its module
(`addon.tools.run`, `status`, `reprice`, `top`, `reconcile`, `keys`, `collect`) that does the
work and returns the exit code, so it can be called (and tested) without click. A command that
returns non-zero exits with that code; expected failures (a bad config, a missing file, an
unreachable Redis) print `error: ...` and exit 1; Ctrl-C exits 130.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from addon.config import ConfigError
from addon.store import redis_rows
from addon.tools import collect, keys, reconcile, reprice, run, status, top

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 120}
# Failures an operator causes and can fix: one line on stderr, exit 1, no traceback.
EXPECTED = (ConfigError, FileNotFoundError, PermissionError, ConnectionError)


class Failure(click.ClickException):
    """An expected failure, shown as `error: ...` (as every command prints its own errors)."""

    def show(self, file: Any = None) -> None:
        click.echo(f"error: {self.format_message()}", file=file or sys.stderr)


def _expected(exc: BaseException) -> bool:
    if isinstance(exc, EXPECTED):
        return True
    # The database file cannot be opened or read (a directory, not a database, locked, disk trouble);
    # other sqlite3 errors (integrity, programming) are bugs and keep their traceback.
    if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
        return True
    redis = sys.modules.get("redis")  # a Redis error can only come from a command that imported redis
    return redis is not None and isinstance(exc, redis.RedisError)


class Group(click.Group):
    """A group whose commands return their exit code; expected failures exit 1, Ctrl-C 130."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            code = super().invoke(ctx)
        except KeyboardInterrupt:
            raise click.exceptions.Exit(130) from None
        except Exception as exc:
            if _expected(exc):
                raise Failure(f"database: {exc}" if isinstance(exc, sqlite3.Error) else str(exc)) from None
            raise
        if isinstance(code, int) and code and ctx.parent is None:
            ctx.exit(code)
        return code

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # in the order declared here (run first), not sorted


def _help_without_command(ctx: click.Context) -> None:
    """A group called without a command prints its help on stdout and exits 2 (as a usage error)."""
    if ctx.invoked_subcommand is None:
        click.echo(ctx.get_help())
        ctx.exit(2)


def common_options(*, config: bool = True, db_help: str = "SQLite database (default: usage.db)") -> Callable[[F], F]:
    """--db and --config, the same for every command."""

    def decorate(func: F) -> F:
        if config:
            func = click.option("--config", default=None, metavar="CONFIG",
                                help="TOML config file (default: the bundled one)")(func)
        return click.option("--db", default="usage.db", metavar="DB", help=db_help)(func)

    return decorate


class Duration(click.ParamType):
    """`30s`, `5m`, `1h`, `1d` or plain seconds, as float seconds."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return reconcile.parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.group("openai-usage-meter", cls=Group, context_settings=CONTEXT, invoke_without_command=True,
             help="Meter OpenAI API traffic through mitmproxy.")
@click.pass_context
def cli(ctx: click.Context) -> None:
    _help_without_command(ctx)


# Options end at `--` or at the first other argument: from there on everything is mitmdump's (as with argparse).
@cli.command("run", context_settings={"allow_interspersed_args": False},
             short_help="run the proxy (127.0.0.1:8080) and Datasette (127.0.0.1:8001) over one database",
             help="Run `mitmdump -s addon/usage.py` and `datasette serve` over the same SQLite database. Arguments "
             "after `--` go to mitmdump, e.g. `-- --set usage_block=kill`.")
@common_options()
@click.option("--proxy-host", default="127.0.0.1", metavar="HOST", help="proxy listen address (default 127.0.0.1)")
@click.option("--proxy-port", type=int, default=8080, metavar="PORT", help="proxy port (default 8080)")
@click.option("--mode", default=None, metavar="MODE", help="mitmproxy mode, e.g. reverse:https://api.openai.com")
@click.option("--datasette-host", default="127.0.0.1", metavar="HOST",
              help="Datasette listen address (default 127.0.0.1; see README before exposing it)")
@click.option("--datasette-port", type=int, default=8001, metavar="PORT", help="Datasette port (default 8001)")
@click.option("--datasette-arg", "datasette_args", multiple=True, metavar="ARG",
              help="extra argument for `datasette serve` (repeatable), e.g. --datasette-arg=--setting=...")
@click.option("--collect", default=None, metavar="REDIS_URL",
              help="also run `collect` from this Redis into the database (the central host of a team; see README: "
              "Several hosts)")
@click.option("--verbose", is_flag=True,
              help="print a line per request (mitmdump flow_detail=1, Datasette's access log)")
@click.argument("mitmdump_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- MITMDUMP_ARGS...]")
def run_command(db: str, config: str | None, proxy_host: str, proxy_port: int, mode: str | None,
                datasette_host: str, datasette_port: int, datasette_args: tuple[str, ...], collect: str | None,
                verbose: bool, mitmdump_args: tuple[str, ...]) -> int:
    return run.run(run.RunOptions(
        db=db, config=config, proxy_host=proxy_host, proxy_port=proxy_port, mode=mode,
        datasette_host=datasette_host, datasette_port=datasette_port, datasette_args=list(datasette_args),
        collect=collect, verbose=verbose, mitmdump_args=list(mitmdump_args)))


@cli.command("status", short_help="each pool's used / limit / remaining / reset time",
             help="Print each pool's (and each limited key's) usage in its current window, as the proxy counts it "
             "(rows of the window; reserved: requests in flight; held: the proxies' spare lease tokens), and when it "
             "runs out at the pace of the last hour. Reads the pools the proxy published to the database; --config "
             "overrides them.")
@common_options()
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@click.option("--redis", default=None, metavar="URL",
              help="read used and reserved from the Redis the proxies share (usage_redis) instead of this database's "
              "rows")
def status_command(db: str, config: str | None, as_json: bool, redis: str | None) -> int:
    return status.run_status(db, config, as_json=as_json, redis=redis)


@cli.command("reset",
             short_help="reset a pool: usage before now no longer counts in its window",
             help="Record a reset anchor: usage before it no longer counts in the current window of POOL (the pool "
             "name as the proxy published it, or from --config; for one key with --key). Running proxies pick it up "
             "at their next request.")
@common_options()
@click.argument("pool")
@click.option("--key", "key_id", default=None, metavar="KEY_ID", help="reset only this key_id's count in the pool")
@click.option("--note", default=None, help="why (kept in the resets table)")
@click.option("--redis", default=None, metavar="URL",
              help="also reset the pool in the Redis the proxies share (usage_redis): every proxy counts anew")
def reset_command(db: str, config: str | None, pool: str, key_id: str | None, note: str | None,
                  redis: str | None) -> int:
    return status.run_reset(db, config, pool, key_id=key_id, note=note, redis=redis)


@cli.command("reprice", short_help="recompute cost_usd of every recorded call",
             help="Recompute cost_usd and cost_status of every row in `requests` from the bundled genai-prices data, "
             "the package's price table and the config's [prices] overrides, e.g. after changing an override or "
             "upgrading genai-prices.")
@common_options()
def reprice_command(db: str, config: str | None) -> int:
    return reprice.run_reprice(db, config)


@cli.command("top", short_help="live terminal view of usage, pools and the latest requests",
             help="Live view (read-only): totals, pool gauges and the latest requests. Keys: q quit, arrows / j k / "
             "PgUp PgDn scroll, g newest.")
@common_options()
@click.option("--interval", type=float, default=1.0, metavar="SECONDS",
              help="seconds between redraws (default: 1)")
@click.option("--once", is_flag=True, help="print one screen and exit (default when not a terminal)")
def top_command(db: str, config: str | None, interval: float, once: bool) -> int:
    return top.run_top(db, config, interval=interval, once=once)


@cli.command("reconcile",
             short_help="compare OpenAI's Usage/Costs API with what the proxy recorded",
             help="Read the organization Usage and Costs APIs (admin key), store the buckets in openai_usage and "
             "openai_costs, and show per UTC day and model what OpenAI counted against what the proxy saw.")
@common_options()
@click.option("--admin-key", default=None, metavar="KEY", help="OpenAI admin key (default: $OPENAI_ADMIN_KEY)")
@click.option("--base-url", default=reconcile.DEFAULT_BASE_URL, envvar="OPENAI_ADMIN_BASE_URL", metavar="URL",
              help=f"API base URL (default: $OPENAI_ADMIN_BASE_URL, else {reconcile.DEFAULT_BASE_URL})")
@click.option("--days", type=int, default=7, metavar="N", help="UTC days back from today, 1 to 366 (default: 7)")
@click.option("--bucket", type=click.Choice(["1d", "1h"]), default="1d", help="bucket width to fetch (default: 1d)")
@click.option("--every", type=Duration(), default=None, help="keep polling, e.g. 5m (default: once)")
@click.option("--alerts", is_flag=True, help="fire the pools' alert thresholds on OpenAI's figures as well")
@click.option("--json", "as_json", is_flag=True, help="print the comparison as JSON")
def reconcile_command(db: str, config: str | None, admin_key: str | None, base_url: str, days: int, bucket: str,
                      every: float | None, alerts: bool, as_json: bool) -> int:
    return reconcile.run_reconcile(db, config, admin_key=admin_key, base_url=base_url, days=days, bucket=bucket,
                                   every=every, alerts=alerts, as_json=as_json)


@cli.group("keys", cls=Group, invoke_without_command=True,
           short_help="issue, list and revoke per-user keys",
           help="Per-user keys: the proxy forwards them with the shared upstream key.")
@click.pass_context
def keys_group(ctx: click.Context) -> None:
    _help_without_command(ctx)


@keys_group.command("create", short_help="issue a new key for LABEL (shown once)",
                    help="Issue a new key for LABEL; the key is printed only this once.")
@click.argument("label")
@click.option("--prefix", default=None, help="key prefix (default: [issued_keys] prefix or sk-usr-)")
@common_options()
def keys_create_command(label: str, prefix: str | None, db: str, config: str | None) -> int:
    return keys.create_key(db, config, label, prefix=prefix)


@keys_group.command("list", short_help="issued keys with today's usage",
                    help="List the issued keys with today's requests and tokens (UTC day).")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of a table")
@common_options(config=False)
def keys_list_command(as_json: bool, db: str) -> int:
    return keys.list_keys(db, as_json=as_json)


@keys_group.command("revoke",
                    short_help="revoke by key id, label or the key itself (takes effect within ~1 s)",
                    help="Revoke the active keys WHICH names (a key id, a label or the key itself); running proxies "
                    "refuse them within about a second.")
@click.argument("which")
@common_options(config=False)
def keys_revoke_command(which: str, db: str) -> int:
    return keys.revoke_key(db, which)


@cli.command("collect",
             short_help="write the rows proxies publish to Redis into one central database",
             help="Read the Redis Stream every proxy started with --set usage_redis=URL publishes its rows to "
             f"({redis_rows.STREAM}, consumer group {redis_rows.GROUP!r}) and insert them into --db. Entries are "
             "acknowledged after their rows are committed and rows are unique by uid: a collector killed and "
             "restarted inserts nothing twice and loses nothing.")
@common_options(config=False, db_help="central SQLite database (default: usage.db)")
@click.option("--redis", required=True, metavar="URL",
              help=f"redis://host:port/db or rediss://...; password in the URL or ${redis_rows.PASSWORD_ENV}")
@click.option("--once", is_flag=True, help="drain what the stream holds now, then exit")
@click.option("--consumer", default=None,
              help="consumer name in the group (default: this host's name); one per collector process")
def collect_command(db: str, redis: str, once: bool, consumer: str | None) -> int:
    return collect.run_collect(db, redis, once=once, consumer=consumer)


def main(argv: list[str] | None = None) -> int:
    """The entry point of `python -m addon` and of the console script: the exit code."""
    try:
        return int(cli.main(args=argv, standalone_mode=False) or 0)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.Abort:  # Ctrl-C while click itself was parsing
        return 130

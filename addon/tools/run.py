"""`python -m addon run` (what `make run` calls): the proxy and Datasette together.

The schema is migrated first so Datasette has tables to show from the first
second; then `mitmdump -s addon/usage.py` and `datasette serve` run side by
side over the same SQLite file (WAL: Datasette reads while the proxy
writes). Ctrl-C stops both; if either dies, the other is stopped too.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from addon.datasette import metadata

SCRIPT = Path(__file__).resolve().parent.parent / "usage.py"
STOP_TIMEOUT = 15.0


@dataclass
class RunOptions:
    """What `run` was asked for (the command line's options)."""

    db: str = "usage.db"
    config: str | None = None
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    mode: str | None = None
    datasette_host: str = "127.0.0.1"
    datasette_port: int = 8001
    datasette_args: list[str] = field(default_factory=list)
    collect: str | None = None  # a Redis URL: also run `collect` from it into the database
    verbose: bool = False
    mitmdump_args: list[str] = field(default_factory=list)  # passed to mitmdump as is


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (.venv/bin), else from PATH."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def prepare_database(db_path: Path, config_path: str | None) -> None:
    """Validate the config, create the tables and publish the pools before anything reads them."""
    from addon import config as config_mod
    from addon.ledger.published import write_pools
    from addon.store import schema

    config = config_mod.load(config_path)  # a bad config stops here, before anything starts
    db = schema.connect(db_path)
    try:
        schema.migrate(db)
        write_pools(db, config)
    finally:
        db.conn.close()


def metadata_for(db_path: Path, directory: Path) -> Path:
    """The metadata for this database, built by the package (nothing read from a checkout), in DIRECTORY."""
    path = directory / "datasette-metadata.json"
    path.write_text(json.dumps(metadata.for_database(db_path.stem), indent=2), encoding="utf-8")
    return path


def proxy_command(args: RunOptions) -> list[str]:
    cmd = [_bin("mitmdump"), "--listen-host", args.proxy_host, "--listen-port", str(args.proxy_port),
           "-s", str(SCRIPT), "--set", f"usage_db={Path(args.db).resolve()}"]
    if args.config:
        cmd += ["--set", f"usage_config={Path(args.config).resolve()}"]
    if args.mode:
        cmd += ["--mode", args.mode]
    if not args.verbose:
        # Quiet console: no line per request (flow_detail=1 would also print query-string credentials) nor
        # per connection (info); warnings (alerts, database trouble) still show. Asked-for settings win.
        for name, value in (("flow_detail", "0"), ("termlog_verbosity", "warn")):
            if not any(name in arg for arg in args.mitmdump_args):
                cmd += ["--set", f"{name}={value}"]
    return cmd + list(args.mitmdump_args)


def datasette_env(args: RunOptions) -> dict[str, str]:
    """The environment of Datasette: the plugin reads the config and the console setting from it."""
    from addon.datasette.http_api import CONFIG_ENV, REDIS_ENV
    from addon.datasette.plugin import ACCESS_LOG_ENV

    env = dict(os.environ)
    if args.config:
        env[CONFIG_ENV] = str(Path(args.config).resolve())
    if args.collect:
        env[REDIS_ENV] = args.collect  # resets over HTTP reset the shared pools too
    if not args.verbose:
        env[ACCESS_LOG_ENV] = "0"
    return env


def datasette_command(args: RunOptions, metadata: Path) -> list[str]:
    return [_bin("datasette"), "serve", str(Path(args.db).resolve()), "--metadata", str(metadata),
            "--host", args.datasette_host, "--port", str(args.datasette_port)] + list(args.datasette_args)


def banner(args: RunOptions) -> str:
    proxy = f"http://{args.proxy_host}:{args.proxy_port}"
    ui = f"http://{args.datasette_host}:{args.datasette_port}"
    name = Path(args.db).stem
    confdir = _confdir(args.mitmdump_args)
    ca = confdir / "mitmproxy-ca-cert.pem"
    lines = [f"Metering OpenAI traffic into {args.db}", ""]
    if args.mode and args.mode.startswith("reverse"):
        lines += ["Point clients at the proxy (reverse mode, no certificate needed):",
                  f"  export OPENAI_BASE_URL={proxy}/v1"]
    else:
        lines += [
            "Point clients at the proxy:",
            f"  export HTTPS_PROXY={proxy}",
            f"  export SSL_CERT_FILE={ca}        # Python SDK: trust the mitmproxy CA",
            f"  export CURL_CA_BUNDLE={ca}       # curl",
            f"  export NODE_EXTRA_CA_CERTS={ca}   # Node: plus undici's EnvHttpProxyAgent on Node 20 (README)",
            f"  export CODEX_CA_CERTIFICATE={ca}   # Codex CLI",
            f"Or without a certificate: python -m addon run --mode reverse:https://api.openai.com, "
            f"then OPENAI_BASE_URL={proxy}/v1",
        ]
    lines += [
        "",
        f"Dashboard:  {ui}/-/dashboards/{name}",
        f"JSON API:   {ui}/{name}/status.json?_shape=array  (also history, alerts, by_model, by_key, recent, blocked)",
        f"Requests:   {ui}/{name}/requests",
        f"HTTP API:   {ui}/api/usage  (also /health, /api/history, /api/alerts, POST /api/poll)",
        "Admin API:  " + (f"{ui}/admin/keys, /api/reset/POOL (token: $USAGE_ADMIN_TOKEN)"
                          if os.environ.get("USAGE_ADMIN_TOKEN") else "off (set USAGE_ADMIN_TOKEN to turn it on)"),
        "",
        "Ctrl-C stops both.",
    ]
    return "\n".join(lines)


def _confdir(mitm_args: list[str]) -> Path:
    for i, arg in enumerate(mitm_args):
        value = arg.split("=", 1)[1] if arg.startswith("confdir=") else None
        if arg == "--set" and i + 1 < len(mitm_args) and mitm_args[i + 1].startswith("confdir="):
            value = mitm_args[i + 1].split("=", 1)[1]
        if value:
            return Path(value).expanduser()
    return Path("~/.mitmproxy").expanduser()


def _stop(procs: list[subprocess.Popen], grace: float = 0.0) -> None:
    """SIGINT (a graceful stop: the proxy writes its last rows), then kill after STOP_TIMEOUT."""
    deadline = time.monotonic() + grace
    while grace and time.monotonic() < deadline and any(p.poll() is None for p in procs):
        time.sleep(0.05)  # a terminal Ctrl-C reached them already: let them finish on their own
    for proc in procs:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGINT)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + STOP_TIMEOUT
    for proc in procs:
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # `kill` (SIGTERM) stops both as gracefully as Ctrl-C


def run(args: RunOptions) -> int:
    db_path = Path(args.db)
    prepare_database(db_path, args.config)
    signal.signal(signal.SIGTERM, _terminated)
    # Ctrl-C (or SIGINT to the group) stops both even when started from a script in the background,
    # where SIGINT comes ignored and the children (which handle it themselves) would outlive the wait.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with tempfile.TemporaryDirectory(prefix="usage-datasette-") as tmp:
        metadata = metadata_for(db_path, Path(tmp))
        procs: list[subprocess.Popen] = []
        # Ctrl-C reaches the children from the terminal too; here it only means "stop and wait".
        names = ["mitmdump", "datasette"]
        try:
            procs.append(subprocess.Popen(proxy_command(args), cwd=os.getcwd()))
            procs.append(subprocess.Popen(datasette_command(args, metadata), cwd=os.getcwd(),
                                          env=datasette_env(args)))
            if args.collect:  # the central host: the team's rows into this database
                procs.append(subprocess.Popen([sys.executable, "-m", "addon", "collect", "--redis", args.collect,
                                               "--db", str(db_path)], cwd=os.getcwd()))
                names.append("collect")
            print(banner(args), flush=True)
            while True:
                for proc, name in zip(procs, names, strict=True):
                    code = proc.poll()
                    if code is not None:
                        print(f"{name} exited with {code}; stopping", file=sys.stderr, flush=True)
                        _stop(procs)
                        return code or 1
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("\nstopping proxy and Datasette ...", flush=True)
            _stop(procs, grace=1.0)
            return 0
        finally:
            _stop(procs)

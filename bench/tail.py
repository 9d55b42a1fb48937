"""Tail latency of admission: many streamed calls at once, far from and near a limit.

200 streamed chat completions (by default) arrive spread evenly over 2 s,
each on its own connection, and stream for about 2 s (20 events, 100 ms
apart), so that up to 200 are in flight together. Measured: the time from
sending a request to its first streamed chunk; its 95th percentile through

- `plain-str`: plain mitmdump with the 4-line script that streams SSE;
- `addon`: addon/usage.py with the bundled pools (far from their limits:
  admitted from the lease, in memory);
- `addon-near`: addon/usage.py with the calls' pool at 90.8 % of its limit
  when each round starts (a reset and a row re-anchor it): with up to 200
  requests of ~530 estimated tokens in flight the pool's room runs out,
  spare tokens shrink to none, and admissions go to the database (the
  ledger thread).

Also measured: mitmdump's CPU time (user + system, from /proc) over each
round, divided by the calls: the proxy CPU per streamed call.

The upstream is the fake server over plain HTTP (reverse mode to
http://api.openai.com, routed to it), so that 200 TLS handshakes a round do
not saturate the proxy's core and drown what admission costs; the clients
talk plain HTTP to the proxies too. Rounds alternate between the proxies. Run alone with
`.venv/bin/python bench/tail.py [--rounds 3] [--calls 200]`; `make bench`
runs it after the throughput benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from conftest import free_port, wait_port  # noqa: E402

from bench import BIN, STREAM_SSE, Connection, pin, request_bytes, stop_process  # noqa: E402

NEAR_LIMIT = 1_200_000
NEAR_USED = 1_090_000  # 90.8 %: 110,000 left, room for 200 calls of ~530 estimated tokens in flight
NEAR_CONFIG = f"""
timezone = "UTC"
default_pool = "tail"
[pools.tail]
limit = {NEAR_LIMIT}
window = "day"
models = ["gpt-4o-mini"]
"""
VARIANTS = ("plain-str", "addon", "addon-near")


def call_bytes(port: int, chunks: int, delay: float) -> bytes:
    # max_tokens 500, far more than the answer: every call holds ~530 tokens while in flight.
    body = {"model": "gpt-4o-mini", "stream": True, "max_tokens": 500,
            "messages": [{"role": "user", "content": "Write a haiku about proxies."}]}
    return request_bytes(port, "/v1/chat/completions", json.dumps(body).encode(),
                         {"x-fake-chunks": str(chunks), "x-fake-delay": str(delay)})


async def burst(port: int, calls: int, spread: float, chunks: int, delay: float) -> tuple[list[float], dict[int, int]]:
    """`calls` streamed calls arriving evenly over `spread` seconds; seconds to the first chunk of each."""
    raw = call_bytes(port, chunks, delay)
    firsts: list[float] = []
    statuses: dict[int, int] = {}

    async def one(index: int) -> None:
        await asyncio.sleep(index * spread / calls)
        conn = Connection(port)
        try:
            status, first, _ = await asyncio.wait_for(conn.request(raw), 60)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            statuses[0] = statuses.get(0, 0) + 1
            return
        finally:
            conn.close()
        statuses[status] = statuses.get(status, 0) + 1
        if status == 200:
            firsts.append(first)

    await asyncio.gather(*(one(i) for i in range(calls)))
    return firsts, statuses


def start(name: str, workdir: Path, confdir: Path, fake_port: int,
          cpus: set[int] | None) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", str(port),
            "--mode", "reverse:http://api.openai.com", "--set", f"confdir={confdir}",
            "--set", "ssl_insecure=true", "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
            "-s", str(ROOT / "tests" / "route.py")]
    if name == "plain-str":
        (workdir / "stream_sse.py").write_text(STREAM_SSE)
        args += ["-s", str(workdir / "stream_sse.py")]
    else:
        db = workdir / f"tail-{name}.db"
        # (a plain-HTTP upstream is refused unless asked for: see usage_plain_http)
        args += ["-s", str(ROOT / "addon" / "usage.py"), "--set", f"usage_db={db}", "--set", "usage_plain_http=true"]
        if name == "addon-near":
            config = workdir / "near.toml"
            config.write_text(NEAR_CONFIG)
            args += ["--set", f"usage_config={config}"]
            prefill(db)
    env = {**os.environ, "FAKE_OPENAI_ADDR": f"127.0.0.1:{fake_port}", "PYTHONUNBUFFERED": "1"}
    log = open(workdir / f"tail-{name}.log", "wb")
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, preexec_fn=pin(cpus))
    wait_port(port, timeout=30, proc=proc)
    return proc, port


def _cpu(proc: subprocess.Popen) -> float:
    """mitmdump's CPU time so far (user + system, from /proc), seconds."""
    times = psutil.Process(proc.pid).cpu_times()
    return times.user + times.system


def prefill(db: Path) -> None:
    """A reset and one row that put the pool at NEAR_USED of its limit, now (running proxies pick it up)."""
    from addon.store import inserts, schema
    from addon.windows import iso_utc, utc_now

    database = schema.connect(db)
    schema.migrate(database)
    now = utc_now()
    with database.conn:
        database.conn.execute("INSERT INTO resets (ts, pool, note) VALUES (?, 'tail', 'bench')", (iso_utc(now),))
        inserts.insert_rows(database, [{"ts": iso_utc(now), "day": now.date().isoformat(), "pool": "tail",
                                      "model": "gpt-4o-mini", "endpoint": "chat.completions", "outcome": "ok",
                                      "input_tokens": NEAR_USED, "output_tokens": 0, "total_tokens": NEAR_USED}])
    database.conn.close()


def used_percent(db: Path) -> float:
    with sqlite3.connect(db) as conn:
        (used,) = conn.execute("select coalesce(sum(total_tokens), 0) from requests where pool = 'tail' and ts >= "
                               "(select max(ts) from resets where pool = 'tail')").fetchone()
    return 100.0 * used / NEAR_LIMIT


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20)[-1] if len(values) >= 20 else float("nan")


def run_tail(workdir: Path, confdir: Path, cpus: set[int] | None, client_cpus: set[int] | None, rounds: int,
             calls: int, spread: float = 2.0, chunks: int = 20, delay: float = 0.1) -> dict:
    """Start a plain-HTTP fake upstream and the three proxies, run the rounds, stop everything."""
    procs: dict[str, tuple[subprocess.Popen, int]] = {}
    results: dict = {name: {"first_ms": [], "round_p95_ms": [], "statuses": {}, "cpu_ms_per_call": []}
                     for name in VARIANTS}
    fake_port = free_port()
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", str(fake_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=pin(client_cpus))
    try:
        wait_port(fake_port, timeout=30, proc=fake)
        for name in VARIANTS:
            procs[name] = start(name, workdir, confdir, fake_port, cpus)
        for name in VARIANTS:  # warm up: upstream TLS, imports, the first ledger transaction
            asyncio.run(burst(procs[name][1], 10, 0.5, 2, 0.01))
        results["near_used_percent_before"] = used_percent(workdir / "tail-addon-near.db")
        for round_no in range(rounds):
            shift = round_no % len(VARIANTS)
            for name in VARIANTS[shift:] + VARIANTS[:shift]:
                if name == "addon-near":
                    prefill(workdir / "tail-addon-near.db")
                    time.sleep(1.1)  # the proxy's next tick takes the reset in
                cpu_before = _cpu(procs[name][0])
                firsts, statuses = asyncio.run(burst(procs[name][1], calls, spread, chunks, delay))
                time.sleep(0.5)  # the writer's last batch is part of the round's cost
                cpu_ms = (_cpu(procs[name][0]) - cpu_before) * 1000 / calls
                results[name]["cpu_ms_per_call"].append(cpu_ms)
                ms = [f * 1000 for f in firsts]
                results[name]["first_ms"] += ms
                results[name]["round_p95_ms"].append(p95(ms))
                for status, count in statuses.items():
                    results[name]["statuses"][status] = results[name]["statuses"].get(status, 0) + count
                print(f"  tail round {round_no + 1}: {name:10} first chunk p50 {statistics.median(ms):6.1f} ms, "
                      f"p95 {p95(ms):6.1f} ms, max {max(ms):6.1f} ms; {cpu_ms:5.2f} ms proxy CPU per call; "
                      f"statuses {statuses}", flush=True)
        time.sleep(1.0)
        results["near_used_percent_after"] = used_percent(workdir / "tail-addon-near.db")
    finally:
        for proc, _ in procs.values():
            stop_process(proc)
        fake.terminate()
        fake.wait(10)
    return results


def report_tail(results: dict, calls: int, rounds: int) -> None:
    base = results["plain-str"]
    print()
    print(f"tail latency: {calls} streamed calls per round arriving over 2 s, ~2 s each, one connection each, "
          f"{rounds} rounds per proxy, plain HTTP upstream; pool of addon-near at "
          f"{results['near_used_percent_before']:.1f} % of its limit at the start of each round, "
          f"{results['near_used_percent_after']:.1f} % after the last one")
    print()
    print(f"| {'first streamed chunk, ms':28} | {'plain-str':>9} | {'addon':>9} | {'addon-near':>10} | "
          f"{'addon vs p-str':>14} | {'near vs p-str':>13} |")
    print(f"|{'-' * 30}|{'-' * 11}|{'-' * 11}|{'-' * 12}|{'-' * 16}|{'-' * 15}|")
    rows = [
        ("median", [statistics.median(results[n]["first_ms"]) for n in VARIANTS]),
        ("p95 (all rounds)", [p95(results[n]["first_ms"]) for n in VARIANTS]),
        ("p95, median of the rounds", [statistics.median(results[n]["round_p95_ms"]) for n in VARIANTS]),
    ]
    for label, values in rows:
        print(f"| {label:28} | {values[0]:9.1f} | {values[1]:9.1f} | {values[2]:10.1f} | "
              f"{values[1] - values[0]:+14.1f} | {values[2] - values[0]:+13.1f} |")
    cpu = [statistics.median(results[n]["cpu_ms_per_call"]) for n in VARIANTS]
    print(f"| {'proxy CPU per call, ms':28} | {cpu[0]:9.2f} | {cpu[1]:9.2f} | {cpu[2]:10.2f} | "
          f"{cpu[1] / cpu[0]:13.3f}x | {cpu[2] / cpu[0]:12.3f}x |")
    print("statuses: " + "; ".join(f"{n} {results[n]['statuses']}" for n in VARIANTS))
    limit = p95(base["first_ms"]) + 10
    met = all(p95(results[n]["first_ms"]) <= limit for n in ("addon", "addon-near"))
    print(f"goal: p95 of the first chunk within +10 ms of plain mitmdump that streams SSE: "
          f"{'met' if met else 'MISSED'} (addon {p95(results['addon']['first_ms']) - p95(base['first_ms']):+.1f} ms, "
          f"addon-near {p95(results['addon-near']['first_ms']) - p95(base['first_ms']):+.1f} ms)")
    ratio = cpu[1] / cpu[0]
    print(f"goal: CPU per streamed call at most 1.15x plain-str: {'met' if ratio <= 1.15 else 'MISSED'} "
          f"(addon {ratio:.3f}x, addon-near {cpu[2] / cpu[0]:.3f}x; median of the rounds)")
    results["summary"] = {n: {"p50_ms": statistics.median(results[n]["first_ms"]),
                              "p95_ms": p95(results[n]["first_ms"]),
                              "cpu_ms_per_call": statistics.median(results[n]["cpu_ms_per_call"])} for n in VARIANTS}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="rounds per proxy (default 3)")
    parser.add_argument("--calls", type=int, default=200, help="streamed calls per round (default 200)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin mitmdump and the client to separate cores")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="usage-tail-"))
    cores = sorted(os.sched_getaffinity(0))
    proxy_cpus = client_cpus = None
    if len(cores) >= 2 and not args.no_pin:
        proxy_cpus, client_cpus = {cores[-1]}, set(cores[:-1])
        os.sched_setaffinity(0, client_cpus)
    results = run_tail(workdir, workdir / "conf", proxy_cpus, client_cpus, args.rounds, args.calls)
    report_tail(results, args.calls, args.rounds)
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: pools shared through Redis against the SQLite ledger, on one host.

    .venv/bin/python bench/redis_scenario.py [--duration 4] [--rounds 3]

Needs Debian's redis-server (started here on a loopback port, no persistence).
Measured:
- admission latency in the process: the SQLite ledger deciding from its lease
  (memory) and in a transaction, against one Lua script in Redis (one round trip);
- proxy throughput and CPU per request, the same mix as bench.py, with
  `usage_redis` set and without (a pool limited far above what the run uses,
  so every request goes through admission and settlement);
- Redis commands per proxied request (INFO commandstats) and the CPU Redis
  spends on one, which give the capacity estimate in the README.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import bench  # noqa: E402
from bench import VARIANTS, Mitmdump, free_port, load, wait_port  # noqa: E402

CONFIG = """
[pools.premium]
limit = 1_000_000_000
models = ["gpt-4o", "gpt-4o-mini", "text-embedding-3-small"]
"""


def admission_latency(workdir: Path, url: str, samples: int) -> dict[str, list[float]]:
    from addon import config as config_mod
    from addon.ledger.policy import checks_for
    from addon.ledger.redis_ledger import RedisLedger
    from addon.ledger.sqlite_ledger import Ledger

    config = config_mod.parse(CONFIG)
    checks = checks_for(config, "premium", None, None)
    sqlite = Ledger(workdir / "latency.db", config)
    shared = RedisLedger(url, workdir / "latency-redis.db", config)
    times: dict[str, list[float]] = {"sqlite lease (memory)": [], "sqlite transaction": [], "redis script": []}
    sqlite.admit(checks, 100)  # creates the lease
    for _ in range(samples):
        start = time.perf_counter()
        decision = sqlite.admit_local(checks, 100)
        times["sqlite lease (memory)"].append(time.perf_counter() - start)
        if decision is None:
            sqlite.admit(checks, 100)
        start = time.perf_counter()
        sqlite.admit_many([(checks, 10**7)])  # more than any lease holds: decided in the database
        times["sqlite transaction"].append(time.perf_counter() - start)
        start = time.perf_counter()
        decision = shared.admit(checks, 100)
        times["redis script"].append(time.perf_counter() - start)
        shared.give_back(None, 100, decision.owner or "")
    shared.flush()
    sqlite.close()
    shared.close()
    return times


def commands(client) -> tuple[int, int]:
    """(scripts run, commands executed in all, the scripts' own included) so far."""
    stats = client.info("commandstats")
    scripts = sum(stats.get(k, {}).get("calls", 0) for k in ("cmdstat_evalsha", "cmdstat_eval"))
    return scripts, sum(v["calls"] for k, v in stats.items() if k not in ("cmdstat_info", "cmdstat_ping"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per load round (default 4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per proxy (default 3)")
    parser.add_argument("--concurrency", type=int, default=16, help="connections (default 16)")
    parser.add_argument("--samples", type=int, default=2000, help="admissions timed in the process (default 2000)")
    args = parser.parse_args()
    server = shutil.which("redis-server")
    if server is None:
        print("redis scenario skipped: redis-server is not installed")
        return 0
    import redis

    workdir = Path(tempfile.mkdtemp(prefix="usage-bench-redis-"))
    redis_port, fake_port = free_port(), free_port()
    url = f"redis://127.0.0.1:{redis_port}/0"
    redis_proc = subprocess.Popen([server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    fake = subprocess.Popen([sys.executable, str(bench.ROOT / "tests" / "fake_openai.py"), "--port", str(fake_port),
                             "--tls"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    proxies: dict[str, Mitmdump] = {}
    try:
        wait_port(redis_port, timeout=20, proc=redis_proc)
        wait_port(fake_port, timeout=30, proc=fake)
        client = redis.Redis(port=redis_port, decode_responses=True)
        print("Redis: admission latency in the process", flush=True)
        latency = admission_latency(workdir, url, args.samples)
        config = workdir / "pools.toml"
        config.write_text(CONFIG)
        base = VARIANTS["addon"][1] + ["--set", f"usage_config={config}"]
        VARIANTS["addon-sqlite"] = ("addon, SQLite ledger", base)
        VARIANTS["addon-redis"] = ("addon, pools in Redis", base + ["--set", f"usage_redis={url}"])
        confdir = workdir / "conf"
        for name in ("addon-sqlite", "addon-redis"):
            proxies[name] = Mitmdump(name, workdir, confdir, fake_port)
        results: dict[str, dict[str, list[float]]] = {n: {"rps": [], "cpu": []} for n in proxies}
        for name in proxies:  # warm-up
            asyncio.run(load(proxies[name].port, 1.0, args.concurrency))
        redis_ps = psutil.Process(redis_proc.pid)
        per_request: list[tuple[float, float]] = []
        redis_cpu_per_request: list[float] = []
        for round_no in range(args.rounds):
            for name in (list(proxies) if round_no % 2 == 0 else list(reversed(proxies))):
                proxy = proxies[name]
                before, calls = proxy.cpu(), commands(client)
                redis_before = sum(redis_ps.cpu_times()[:2])
                res = asyncio.run(load(proxy.port, args.duration, args.concurrency))
                cpu = proxy.cpu() - before
                results[name]["rps"].append(res.rps)
                results[name]["cpu"].append(cpu * 1000 / max(res.requests, 1))
                if name == "addon-redis":
                    time.sleep(0.5)  # settlements on their way
                    after = commands(client)
                    per_request.append(((after[0] - calls[0]) / max(res.requests, 1),
                                        (after[1] - calls[1]) / max(res.requests, 1)))
                    redis_cpu_per_request.append((sum(redis_ps.cpu_times()[:2]) - redis_before) * 1e6
                                                 / max(res.requests, 1))
                errors = res.errors + sum(v for k, v in res.statuses.items() if k != 200)
                print(f"  round {round_no + 1}: {name:12} {res.rps:7.1f} req/s  "
                      f"{cpu * 1000 / max(res.requests, 1):5.2f} ms CPU/request  errors {errors}", flush=True)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        fake.terminate()
        redis_proc.terminate()
        fake.wait(10)
        redis_proc.wait(10)

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(int(q * len(ordered)), len(ordered) - 1)]

    print("\nAdmission latency (in the process, ms): median / p99")
    for name, values in latency.items():
        print(f"  {name:24} {ms(values, 0.5):7.3f} / {ms(values, 0.99):7.3f}")
    print("\nThroughput, same mix as bench.py (median of the rounds)")
    sqlite_rps = statistics.median(results["addon-sqlite"]["rps"])
    for name, figures in results.items():
        rps, cpu = statistics.median(figures["rps"]), statistics.median(figures["cpu"])
        print(f"  {name:12} {rps:7.1f} req/s ({rps / sqlite_rps:.3f}x of SQLite)  {cpu:5.2f} ms CPU/request")
    scripts = statistics.median(p[0] for p in per_request)
    ops = statistics.median(p[1] for p in per_request)
    redis_us = statistics.median(redis_cpu_per_request)
    print(f"\nPer proxied request: {scripts:.2f} scripts (round trips, pipelined), {ops:.1f} Redis commands executed "
          f"(the scripts' own included); Redis CPU {redis_us:.0f} us")
    ceiling = 1e6 / redis_us if redis_us else float("inf")
    print(f"One Redis core saturates at about {ceiling:,.0f} proxied requests/s "
          f"(10 proxies at 50 req/s use {100 * 500 / ceiling:.1f}% of it, 100 proxies {100 * 5000 / ceiling:.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

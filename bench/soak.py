"""Soak run: many requests through the proxy; memory, file descriptors and throughput must stay flat.

    python bench/soak.py [--requests 20000] [--concurrency 8]

The fake OpenAI server runs as its own process, mitmdump with the addon as
another (reverse mode); clients alternate streaming and plain chat
completions. Checks: RSS growth of mitmdump under 10 MB after warm-up, no
file-descriptor growth, throughput of the last thousand requests within 5 %
of the first thousand, one row per request.
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import FAKE_KEY, free_port, wait_port  # noqa: E402

BIN = Path(sys.executable).parent
TRACK_ONLY = 'timezone = "UTC"\ndefault_pool = "all"\n[pools.all]\nwindow = "day"\nmodels = ["*"]\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--block", type=int, default=1000, help="requests per measured block")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    (work / "track.toml").write_text(TRACK_ONLY)
    fake_port, proxy_port = free_port(), free_port()
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", str(fake_port), "--tls"],
                            stdout=subprocess.DEVNULL)
    wait_port(fake_port, proc=fake)
    db = work / "usage.db"
    env = {**os.environ, "FAKE_OPENAI_ADDR": f"127.0.0.1:{fake_port}"}
    proxy = subprocess.Popen(
        [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", str(proxy_port),
         "--mode", "reverse:https://api.openai.com", "--set", f"confdir={work}", "--set", "ssl_insecure=true",
         "--set", "flow_detail=0", "-s", str(ROOT / "tests" / "route.py"), "-s", str(ROOT / "addon" / "usage.py"),
         "--set", f"usage_db={db}", "--set", f"usage_config={work / 'track.toml'}"],
        stdout=open(work / "mitmdump.log", "wb"), stderr=subprocess.STDOUT, env=env, cwd=work)
    wait_port(proxy_port, proc=proxy)
    process = psutil.Process(proxy.pid)
    url = f"http://127.0.0.1:{proxy_port}/v1/chat/completions"
    lock = threading.Lock()
    counter = iter(range(args.requests))
    done_at: list[float] = []
    failures = [0]

    def worker() -> None:
        # One keep-alive client per worker: the proxy, not client set-up, is measured.
        client = httpx.Client(headers={"authorization": f"Bearer {FAKE_KEY}"}, timeout=30)
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                client.close()
                return
            body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"hello {i}"}],
                    "stream": i % 2 == 0}
            try:
                r = client.post(url, json=body)
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            with lock:
                done_at.append(time.monotonic())
                if not ok:
                    failures[0] += 1

    samples: list[tuple[int, int, int]] = []  # (requests done, rss, fds)

    def sampler(stop: threading.Event) -> None:
        while not stop.wait(0.5):
            samples.append((len(done_at), process.memory_info().rss, process.num_fds()))

    stop = threading.Event()
    started = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    watcher = threading.Thread(target=sampler, args=(stop,))
    watcher.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    watcher.join()
    elapsed = time.monotonic() - started
    time.sleep(1.0)
    end_rss, end_fds = process.memory_info().rss, process.num_fds()
    proxy.send_signal(signal.SIGINT)
    proxy.wait(60)
    fake.terminate()
    fake.wait()
    conn = sqlite3.connect(db)
    rows = conn.execute("select count(*) from requests").fetchone()[0]
    conn.close()

    done_at.sort()
    block = args.block
    first = block / (done_at[block - 1] - started) if len(done_at) >= block else float("nan")
    last = block / (done_at[-1] - done_at[-block - 1]) if len(done_at) > block else float("nan")
    warm = next(((rss, fds) for n, rss, fds in samples if n >= block), (samples[0][1], samples[0][2]))
    rss_growth = (end_rss - warm[0]) / 1e6
    fd_growth = end_fds - warm[1]
    change = (last - first) / first * 100
    checks = [
        ("requests", f"{len(done_at)} in {elapsed:.0f} s ({len(done_at) / elapsed:.0f}/s), {failures[0]} failed",
         failures[0] == 0),
        ("rows", f"{rows} (one per request)", rows == args.requests),
        ("RSS after warm-up", f"{warm[0] / 1e6:.1f} MB -> {end_rss / 1e6:.1f} MB ({rss_growth:+.1f} MB)",
         rss_growth < 10),
        ("file descriptors", f"{warm[1]} -> {end_fds} ({fd_growth:+d})", fd_growth <= 0),
        (f"throughput, first {block}", f"{first:.0f} req/s", True),
        (f"throughput, last {block}", f"{last:.0f} req/s ({change:+.1f} %)", change > -5),
    ]
    width = max(len(name) for name, _, _ in checks)
    print(f"\nSoak: {args.requests} requests, {args.concurrency} clients, half streamed (mitmdump + addon)")
    print(f"{'measure'.ljust(width)}  {'value':50}  ok")
    for name, value, ok in checks:
        print(f"{name.ljust(width)}  {value:50}  {'yes' if ok else 'NO'}")
    return 0 if all(ok for _, _, ok in checks) else 1


if __name__ == "__main__":
    sys.exit(main())

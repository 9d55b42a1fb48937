"""Benchmark: mitmdump with the usage addon against plain mitmdump.

Both proxies run in reverse mode in front of the same fake OpenAI server
(tests/fake_openai.py, TLS, its own process); tests/route.py sends
api.openai.com to it in both. The same light asyncio HTTP/1.1 client sends
the same mix of streaming and non-streaming calls through each, in
alternating rounds so drift on the machine hits both alike.

Measured:
- throughput at saturation: requests/second with N keep-alive connections
  and an upstream that answers at once, so the proxy's CPU is the limit;
  and the CPU time mitmdump spends per request;
- non-streamed saturation: the same at saturation with a rotation that never
  streams (chat completions, Responses and embeddings, all answered in one body);
- throughput with upstream latency: the same mix from more connections to an
  upstream that takes its time like a model does (x-fake-latency before the
  answer, x-fake-delay between stream events): what a proxy in front of the
  real API sees;
- time to first streamed chunk: sequential streamed chat completions, time
  from sending the request to the first body byte, median and p90;
- memory: RSS of each mitmdump before and after the load.

    .venv/bin/python bench/bench.py [--duration 5] [--rounds 5] [--concurrency 16]

On a machine with two cores or more, every mitmdump runs on the last core
and the client and the fake upstream on the others (--no-pin to let the
scheduler decide): the figures move much less. CPU time per request
(mitmdump's own, from /proc) is the steadiest figure of the addon's cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, wait_port  # noqa: E402  (the test suite's helpers)

BIN = Path(sys.executable).parent
KEY = "sk-bench-0000000000000000000000000000BNCH"


# ---------------------------------------------------------------------------
# Traffic


def _chat(stream: bool, chunks: int = 8) -> tuple[str, bytes, dict[str, str]]:
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Write a haiku about proxies."}]}
    if stream:
        body["stream"] = True
    return "/v1/chat/completions", json.dumps(body).encode(), {"x-fake-chunks": str(chunks)}


def _responses_stream(stream: bool = True) -> tuple[str, bytes, dict[str, str]]:
    body: dict = {"model": "gpt-5", "input": "Summarise the plot of Hamlet."}
    if stream:
        body["stream"] = True
    return "/v1/responses", json.dumps(body).encode(), {"x-fake-chunks": "8"}


def _embeddings() -> tuple[str, bytes, dict[str, str]]:
    body = {"model": "text-embedding-3-small", "input": ["one", "two", "three"]}
    return "/v1/embeddings", json.dumps(body).encode(), {}


# Half streamed, half not: what a coding agent plus some batch jobs send.
MIX = [_chat(False), _chat(True), _responses_stream(), _chat(False), _chat(True), _embeddings()]
# The same rotation without streams: what batch jobs and agents that do not stream send.
MIX_UNSTREAMED = [_chat(False), _chat(False), _responses_stream(False), _chat(False), _chat(False), _embeddings()]


def request_bytes(port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", f"Authorization: Bearer {KEY}",
             "Content-Type: application/json", "Accept-Encoding: gzip", "User-Agent: bench/1",
             f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection:
    """One keep-alive HTTP/1.1 connection; just enough protocol for this."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> tuple[int, float, float]:
        """Send a request; return (status, seconds to first body byte, seconds to the end)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        reader = self.reader
        assert reader is not None
        start = time.perf_counter()
        self.writer.write(raw)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = {}
        for line in head.split(b"\r\n")[1:]:
            if b":" in line:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
        first = None
        if b"content-length" in headers:
            length = int(headers[b"content-length"])
            if length:
                await reader.readexactly(length)
            first = time.perf_counter()
        else:
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    await reader.readline()
                    break
                await reader.readexactly(size + 2)
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        if headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return status, (first or end) - start, end - start

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class LoadResult:
    requests: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


# A model takes its time: 200 ms before the answer, 20 ms between events.
UPSTREAM_LATENCY = {"x-fake-latency": "0.2", "x-fake-delay": "0.02"}


async def load(port: int, duration: float, concurrency: int, extra: dict[str, str] | None = None,
               mix: list[tuple[str, bytes, dict[str, str]]] = MIX) -> LoadResult:
    result = LoadResult()
    requests = [request_bytes(port, path, body, {**headers, **(extra or {})}) for path, body, headers in mix]
    stop_at = time.perf_counter() + duration

    async def worker(index: int) -> None:
        conn = Connection(port)
        n = index
        while time.perf_counter() < stop_at:
            try:
                status, _, _ = await asyncio.wait_for(conn.request(requests[n % len(requests)]), 30)
            except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
                result.errors += 1
                conn.close()
                continue
            result.statuses[status] = result.statuses.get(status, 0) + 1
            result.requests += 1
            n += 1
        conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    result.seconds = time.perf_counter() - started
    return result


async def first_chunk_times(port: int, samples: int) -> list[float]:
    """Sequential streamed chat completions; seconds to the first body byte."""
    path, body, headers = _chat(True, chunks=3)
    raw = request_bytes(port, path, body, {**headers, "x-fake-delay": "0.02"})
    conn = Connection(port)
    times = []
    for _ in range(samples):
        try:
            status, first, _ = await asyncio.wait_for(conn.request(raw), 30)
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            conn.close()
            continue
        if status == 200:
            times.append(first)
    conn.close()
    return times


# ---------------------------------------------------------------------------
# Processes


# The capture addon alone, without pricing, limits, issued keys, body log:
# tells how the overhead splits between metering and the rest.
METER_ONLY = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from addon.proxy.meter import UsageMeter
addons = [UsageMeter()]
"""

# Plain mitmdump buffers SSE (mitmproxy warns and suggests streaming): any
# proxy that must pass OpenAI streams on as they come needs this much.
STREAM_SSE = """
def responseheaders(flow):
    if "text/event-stream" in flow.response.headers.get("content-type", ""):
        flow.response.stream = True
"""

# name -> (description, extra mitmdump arguments); {db} and {workdir} are filled in.
VARIANTS = {
    "plain": ("plain mitmdump", []),
    "plain-stream": ("plain mitmdump + 4-line script streaming SSE", ["-s", "{workdir}/stream_sse.py"]),
    "meter": ("capture addon only", ["-s", "{workdir}/meter_only.py", "--set", "usage_db={db}"]),
    "addon": ("addon/usage.py (everything)", ["-s", str(ROOT / "addon" / "usage.py"), "--set", "usage_db={db}"]),
}


def pin(cpus: set[int] | None):
    """preexec_fn that runs a process on the given CPUs (None: anywhere)."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


class Mitmdump:
    def __init__(self, name: str, workdir: Path, confdir: Path, fake_port: int, cpus: set[int] | None = None) -> None:
        self.name = name
        self.port = free_port()
        self.db = workdir / f"{name}.db"
        args = [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", str(self.port),
                "--mode", "reverse:https://api.openai.com", "--set", f"confdir={confdir}",
                "--set", "ssl_insecure=true", "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
                "-s", str(ROOT / "tests" / "route.py")]
        args += [a.format(db=self.db, workdir=workdir) for a in VARIANTS[name][1]]
        env = {**os.environ, "FAKE_OPENAI_ADDR": f"127.0.0.1:{fake_port}", "PYTHONUNBUFFERED": "1"}
        self.log = open(workdir / f"{name}.log", "wb")
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=workdir,
                                     preexec_fn=pin(cpus))
        wait_port(self.port, timeout=30, proc=self.proc)
        self.ps = psutil.Process(self.proc.pid)

    def rss_mb(self) -> float:
        return self.ps.memory_info().rss / 1e6

    def cpu(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()


def stop_process(proc: subprocess.Popen) -> None:
    """SIGINT (mitmdump writes its last rows), then kill after 20 s."""
    if proc.poll() is None:
        proc.send_signal(2)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rows_in(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(db) as conn:
            return conn.execute("select count(*) from requests").fetchone()[0]
    except sqlite3.Error:
        return -1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per throughput round (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per proxy (default 5)")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections (default 16)")
    parser.add_argument("--latency-concurrency", type=int, default=64,
                        help="connections for the run with upstream latency (default 64)")
    parser.add_argument("--no-pin", action="store_true", help="do not pin mitmdump and the client to separate cores")
    parser.add_argument("--ttfb-samples", type=int, default=60, help="streamed requests for TTFB (default 60)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--scenario", choices=("all", "http", "unstreamed", "websocket", "tail"), default="all",
                        help="http: throughput and TTFB; unstreamed: only the non-streamed saturation "
                             "(plain and addon); websocket: Responses WebSocket mode; "
                             "tail: 200 concurrent streams (bench/tail.py) (default: all)")
    parser.add_argument("--ws-sockets", type=int, default=8, help="WebSocket scenario: sockets (default 8)")
    parser.add_argument("--ws-turns", type=int, default=20, help="WebSocket scenario: turns per socket (default 20)")
    parser.add_argument("--ws-chunks", type=int, default=30, help="WebSocket scenario: deltas per response")
    parser.add_argument("--tail-rounds", type=int, default=3,
                        help="rounds of the tail-latency scenario (bench/tail.py) per proxy; 0 skips it (default 3)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    workdir = Path(tempfile.mkdtemp(prefix="usage-bench-"))
    confdir = workdir / "conf"
    cores = sorted(os.sched_getaffinity(0))
    proxy_cpus = client_cpus = None
    if len(cores) >= 2 and not args.no_pin:
        proxy_cpus, client_cpus = {cores[-1]}, set(cores[:-1])
        os.sched_setaffinity(0, client_cpus)
    args.pinned = proxy_cpus is not None
    fake_port = free_port()
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", str(fake_port),
                             "--tls"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, preexec_fn=pin(client_cpus))
    proxies: dict[str, Mitmdump] = {}
    try:
        wait_port(fake_port, timeout=30, proc=fake)
        (workdir / "meter_only.py").write_text(METER_ONLY)
        (workdir / "stream_sse.py").write_text(STREAM_SSE)
        for name in VARIANTS:
            if args.scenario == "unstreamed" and name not in ("plain", "addon"):
                continue
            if args.scenario == "tail":
                break
            proxies[name] = Mitmdump(name, workdir, confdir, fake_port, proxy_cpus)
        results: dict = {}
        if args.scenario in ("all", "http"):
            results = run(proxies, psutil.Process(fake.pid), args)
        if args.scenario == "unstreamed":
            results = new_results(proxies)
            for name in ("plain", "addon"):  # warm up
                asyncio.run(load(proxies[name].port, 1.5, args.concurrency, mix=MIX_UNSTREAMED))
            unstreamed_rounds({n: proxies[n] for n in ("plain", "addon")}, args, results)
        if args.scenario in ("all", "websocket"):
            from ws_scenario import run_websocket

            results["websocket"] = run_websocket({n: proxies[n] for n in ("plain", "addon")}, args)
        if args.scenario in ("all", "http"):
            results["rows_written"] = {name: rows_in(proxies[name].db) for name in ("meter", "addon")}
        for proxy in proxies.values():
            proxy.stop()
        if args.tail_rounds and args.scenario in ("all", "tail"):
            from tail import run_tail

            results["tail"] = run_tail(workdir, confdir, proxy_cpus, client_cpus, args.tail_rounds, 200)
    finally:
        for proxy in proxies.values():
            proxy.stop()
        fake.terminate()
        fake.wait(10)
    if args.scenario in ("all", "http"):
        report(results, args)
    if args.scenario == "unstreamed":
        report_unstreamed(results)
    if "websocket" in results:
        from ws_scenario import report_websocket

        report_websocket(results["websocket"], args)
    if "tail" in results:
        from tail import report_tail

        report_tail(results["tail"], 200, args.tail_rounds)
    cores = os.cpu_count() or 1
    load_after = os.getloadavg()[0]
    print(f"machine: {cores} cores, load average {load_before:.1f} before, {load_after:.1f} after")
    if load_before > cores * 0.75:
        print("warning: the machine was busy before the run started; throughput figures are unreliable")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


THROUGHPUT = ("plain", "plain-stream", "meter", "addon")
TTFB = ("plain-stream", "meter", "addon", "plain")


def latency_rounds(args) -> int:
    # As many as at saturation: this is the figure closest to real use.
    return args.rounds


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def new_results(proxies: dict[str, Mitmdump]) -> dict:
    return {name: {"rps": [], "cpu_ms_per_request": [], "cpu_percent": [], "errors": 0, "requests": 0,
                            "ttfb_ms": [], "latency_rps": [], "latency_cpu_percent": [],
                            "unstreamed_rps": [], "unstreamed_cpu_ms_per_request": []} for name in proxies}


def run(proxies: dict[str, Mitmdump], fake: psutil.Process, args) -> dict:
    results = new_results(proxies)
    # Warm up (TLS to upstream, imports, first DB writes), then take the baseline RSS.
    for name in THROUGHPUT:
        asyncio.run(load(proxies[name].port, 1.5, args.concurrency))
    for name, proxy in proxies.items():
        results[name]["rss_before_mb"] = proxy.rss_mb()
    for round_no in range(args.rounds):
        # Rotate the order so that no variant always runs first or last.
        shift = round_no % len(THROUGHPUT)
        order = THROUGHPUT[shift:] + THROUGHPUT[:shift]
        for name in order:
            proxy = proxies[name]
            cpu_before, fake_before, client_before = proxy.cpu(), _cpu(fake), time.process_time()
            res = asyncio.run(load(proxy.port, args.duration, args.concurrency))
            cpu = proxy.cpu() - cpu_before
            others = f"fake {100 * (_cpu(fake) - fake_before) / res.seconds:3.0f}%, client " \
                     f"{100 * (time.process_time() - client_before) / res.seconds:3.0f}%"
            per_request = cpu * 1000 / max(res.requests, 1)
            results[name]["rps"].append(res.rps)
            results[name]["cpu_ms_per_request"].append(per_request)
            results[name]["cpu_percent"].append(100 * cpu / res.seconds)
            results[name]["errors"] += res.errors + sum(v for k, v in res.statuses.items() if k != 200)
            results[name]["requests"] += res.requests
            print(f"  round {round_no + 1}: {name:12} {res.rps:7.1f} req/s  {per_request:5.2f} ms CPU/request  "
                  f"CPU: mitmdump {100 * cpu / res.seconds:3.0f}%, {others}  errors {res.errors}", flush=True)
    time.sleep(1.0)  # let the writer threads finish their last batch
    for name, proxy in proxies.items():
        results[name]["rss_after_mb"] = proxy.rss_mb()
    unstreamed_rounds(proxies, args, results)
    # The same mix in front of an upstream that takes its time.
    for round_no in range(latency_rounds(args)):
        shift = round_no % len(THROUGHPUT)
        for name in THROUGHPUT[shift:] + THROUGHPUT[:shift]:
            proxy = proxies[name]
            cpu_before = proxy.cpu()
            res = asyncio.run(load(proxy.port, args.duration, args.latency_concurrency, UPSTREAM_LATENCY))
            cpu_percent = 100 * (proxy.cpu() - cpu_before) / res.seconds
            results[name]["latency_rps"].append(res.rps)
            results[name]["latency_cpu_percent"].append(cpu_percent)
            results[name]["errors"] += res.errors + sum(v for k, v in res.statuses.items() if k != 200)
            print(f"  with upstream latency, round {round_no + 1}: {name:12} {res.rps:7.1f} req/s  "
                  f"CPU: mitmdump {cpu_percent:3.0f}%  errors {res.errors}", flush=True)
    # Time to first chunk on idle proxies, interleaved in blocks of ten.
    for _ in range(max(args.ttfb_samples // 10, 1)):
        for name in TTFB:
            results[name]["ttfb_ms"] += [t * 1000 for t in asyncio.run(first_chunk_times(proxies[name].port, 10))]
    return results


def unstreamed_rounds(proxies: dict[str, Mitmdump], args, results: dict) -> None:
    """Saturation with the rotation that never streams (MIX_UNSTREAMED)."""
    names = [n for n in THROUGHPUT if n in proxies]
    for round_no in range(args.rounds):
        shift = round_no % len(names)
        for name in names[shift:] + names[:shift]:
            proxy = proxies[name]
            cpu_before = proxy.cpu()
            res = asyncio.run(load(proxy.port, args.duration, args.concurrency, mix=MIX_UNSTREAMED))
            per_request = (proxy.cpu() - cpu_before) * 1000 / max(res.requests, 1)
            results[name]["unstreamed_rps"].append(res.rps)
            results[name]["unstreamed_cpu_ms_per_request"].append(per_request)
            results[name]["errors"] += res.errors + sum(v for k, v in res.statuses.items() if k != 200)
            results[name]["requests"] += res.requests
            print(f"  not streamed, round {round_no + 1}: {name:12} {res.rps:7.1f} req/s  "
                  f"{per_request:5.2f} ms CPU/request  errors {res.errors}", flush=True)


def report_unstreamed(results: dict) -> None:
    plain, addon = results["plain"], results["addon"]
    rps = med(addon["unstreamed_rps"]) / med(plain["unstreamed_rps"])
    cpu = med(addon["unstreamed_cpu_ms_per_request"]) / med(plain["unstreamed_cpu_ms_per_request"])
    print(f"not streamed, saturation: plain {med(plain['unstreamed_rps']):.1f} req/s, "
          f"{med(plain['unstreamed_cpu_ms_per_request']):.3f} ms CPU/request; addon {med(addon['unstreamed_rps']):.1f} "
          f"req/s, {med(addon['unstreamed_cpu_ms_per_request']):.3f} ms CPU/request")
    print(f"goal: non-streamed saturation at least 0.90x plain: {'met' if rps >= 0.90 else 'MISSED'} "
          f"({rps:.3f}x; CPU per request {cpu:.3f}x plain)")


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10)[-1] if len(values) >= 10 else float("nan")


def report(results: dict, args) -> None:
    names = ("plain", "plain-stream", "meter", "addon")
    plain, stream, addon = results["plain"], results["plain-stream"], results["addon"]

    def row(label: str, values: list[float], kind: str) -> str:
        a, s, c = values[0], values[1], values[3]
        if kind == "ratio":
            versus = [f"{c / a:.3f}x" if a else "-", f"{c / s:.3f}x" if s else "-"]
        elif kind == "first-chunk":  # plain mitmdump buffers SSE: no fair comparison
            versus = ["-", f"{c - s:+.2f}"]
        else:
            versus = [f"{c - a:+.2f}", f"{c - s:+.2f}"]
        cells = " | ".join(f"{v:9.2f}" if v == v else f"{'-':>9}" for v in values)
        return f"| {label:34} | {cells} | {versus[0]:>8} | {versus[1]:>8} |"

    def figures(key: str, fn) -> list[float]:
        return [fn(results[n][key]) if results[n][key] else float("nan") for n in names]

    print()
    print(f"traffic: {len(MIX)} request kinds in rotation (chat, chat stream, responses stream, embeddings; "
          f"half streamed), reverse mode, fake upstream over TLS in its own process; saturation: "
          f"{args.concurrency} keep-alive connections, {args.rounds} rounds x {args.duration:g} s per proxy; "
          f"with upstream latency ({UPSTREAM_LATENCY['x-fake-latency']} s before each answer, "
          f"{UPSTREAM_LATENCY['x-fake-delay']} s between stream events): {args.latency_concurrency} connections, "
          f"{latency_rounds(args)} rounds; mitmdump "
          + ("pinned to its own core" if args.pinned else "not pinned"))
    print("requests: " + ", ".join(f"{n} {results[n]['requests']} ({results[n]['errors']} errors)"
                                    for n in THROUGHPUT) + f"; rows written: {results.get('rows_written')}")
    print()
    print(f"| {'metric':34} | {'plain':>9} | {'plain-str':>9} | {'meter':>9} | {'addon':>9} | "
          f"{'vs plain':>8} | {'vs p-str':>8} |")
    print(f"|{'-' * 36}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    print(row("saturation: throughput, req/s", figures("rps", med), "ratio"))
    print(row("saturation: CPU per request, ms", figures("cpu_ms_per_request", med), "ratio"))
    print(row("not streamed: throughput, req/s", figures("unstreamed_rps", med), "ratio"))
    print(row("not streamed: CPU per request, ms", figures("unstreamed_cpu_ms_per_request", med), "ratio"))
    print(row("upstream latency: throughput, req/s", figures("latency_rps", med), "ratio"))
    print(row("upstream latency: mitmdump CPU, %", figures("latency_cpu_percent", med), "diff"))
    print(row("first streamed chunk, median ms", figures("ttfb_ms", med), "first-chunk"))
    print(row("first streamed chunk, p90 ms", figures("ttfb_ms", p90), "first-chunk"))
    print(row("RSS after warm-up, MB", [results[n]["rss_before_mb"] for n in names], "diff"))
    print(row("RSS growth during the load, MB",
              [results[n]["rss_after_mb"] - results[n]["rss_before_mb"] for n in names], "diff"))
    print()
    print("plain = plain mitmdump, which buffers SSE: its first chunk only comes with the last, so the first-chunk")
    print("rows compare against plain-str = plain mitmdump plus a 4-line script that streams SSE responses.")
    print("meter = the capture addon alone (addon.proxy.meter.UsageMeter); addon = addon/usage.py, every addon.")
    throughput = med(addon["rps"]) / med(plain["rps"]) if med(plain["rps"]) else 0.0
    streaming_floor = med(stream["rps"]) / med(plain["rps"]) if med(plain["rps"]) else 0.0
    latency = med(addon["latency_rps"]) / med(plain["latency_rps"]) if med(plain["latency_rps"]) else 0.0
    first = med(addon["ttfb_ms"]) - med(stream["ttfb_ms"])
    unstreamed = med(addon["unstreamed_rps"]) / med(plain["unstreamed_rps"]) if med(plain["unstreamed_rps"]) else 0.0
    print()
    print(f"goals: throughput >= 0.95 of plain, with upstream latency: {'met' if latency >= 0.95 else 'MISSED'} "
          f"({latency:.3f}); at saturation: {'met' if throughput >= 0.95 else 'MISSED'} ({throughput:.3f}; "
          f"plain mitmdump that streams SSE: {streaming_floor:.3f}); "
          f"first chunk within 5 ms of plain: {'met' if first <= 5 else 'MISSED'} ({first:+.2f} ms)")
    print(f"goal: non-streamed saturation at least 0.90x plain: {'met' if unstreamed >= 0.90 else 'MISSED'} "
          f"({unstreamed:.3f}x; CPU per request "
          f"{med(addon['unstreamed_cpu_ms_per_request']) / med(plain['unstreamed_cpu_ms_per_request']):.3f}x plain)")
    results["summary"] = {"throughput_ratio": throughput, "latency_throughput_ratio": latency,
                          "unstreamed_throughput_ratio": unstreamed,
                          "streaming_floor": streaming_floor, "ttfb_diff_ms": first,
                          "cpu_ratio": med(addon["cpu_ms_per_request"]) / med(plain["cpu_ms_per_request"])}


if __name__ == "__main__":
    sys.exit(main())

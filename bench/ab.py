"""A/B of the addon's cost: plain mitmdump, the addon from checkout A and from checkout B, in alternating rounds.

    .venv/bin/python bench/ab.py /path/to/checkout-A /path/to/checkout-B [--load unstreamed|mixed|tail]
                                 [--rounds 6] [--duration 3]

Prints mitmdump's CPU time (user + system, from /proc) per call for each, per
round and the medians, with the ratios to plain: the figure each change of
the hot path was judged by (README, Benchmarks). `unstreamed` and `mixed` are
bench.py's saturation rotations (16 keep-alive connections, upstream over
TLS); `tail` is bench/tail.py's burst (200 streamed calls over 2 s, ~2 s
each, plain HTTP upstream; plain mitmdump then streams SSE, as plain-str).
Checkout B provides the benchmark code and the fake upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from conftest import free_port, wait_port  # noqa: E402

from bench import BIN, MIX, MIX_UNSTREAMED, STREAM_SSE, load, pin, stop_process  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", type=Path, help="checkout A (e.g. a git worktree of the commit before a change)")
    parser.add_argument("b", type=Path, help="checkout B")
    parser.add_argument("--load", choices=("unstreamed", "mixed", "tail"), default="unstreamed")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--duration", type=float, default=3.0, help="seconds per saturation round")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="usage-ab-"))
    (workdir / "stream_sse.py").write_text(STREAM_SSE)
    cores = sorted(os.sched_getaffinity(0))
    proxy_cpus = client_cpus = None
    if len(cores) >= 2:
        proxy_cpus, client_cpus = {cores[-1]}, set(cores[:-1])
        os.sched_setaffinity(0, client_cpus)
    tls = args.load != "tail"
    fake_port = free_port()
    fake = subprocess.Popen([sys.executable, str(ROOT / "tests" / "fake_openai.py"), "--port", str(fake_port)]
                            + (["--tls"] if tls else []), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            preexec_fn=pin(client_cpus))
    procs: dict[str, tuple[subprocess.Popen, int]] = {}

    def start(name: str, checkout: Path | None) -> tuple[subprocess.Popen, int]:
        port = free_port()
        cmd = [str(BIN / "mitmdump"), "--listen-host", "127.0.0.1", "--listen-port", str(port),
               "--mode", f"reverse:{'https' if tls else 'http'}://api.openai.com", "--set", f"confdir={workdir}/conf",
               "--set", "ssl_insecure=true", "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
               "-s", str(ROOT / "tests" / "route.py")]
        if checkout is None:
            if not tls:
                cmd += ["-s", str(workdir / "stream_sse.py")]
        else:
            cmd += ["-s", str(checkout.resolve() / "addon" / "usage.py"), "--set", f"usage_db={workdir}/{name}.db",
                    "--set", "usage_plain_http=true"]
        env = {**os.environ, "FAKE_OPENAI_ADDR": f"127.0.0.1:{fake_port}"}
        proc = subprocess.Popen(cmd, stdout=open(workdir / f"{name}.log", "wb"), stderr=subprocess.STDOUT, env=env,
                                cwd=workdir, preexec_fn=pin(proxy_cpus))
        wait_port(port, timeout=30, proc=proc)
        return proc, port

    def cpu(proc: subprocess.Popen) -> float:
        times = psutil.Process(proc.pid).cpu_times()
        return times.user + times.system

    def one_round(port: int, warm_up: bool = False) -> int:
        if args.load == "tail":
            from tail import burst

            calls = 10 if warm_up else 200
            asyncio.run(burst(port, calls, 0.5 if warm_up else 2.0, 2 if warm_up else 20, 0.01 if warm_up else 0.1))
            time.sleep(0.5)  # the writer's last batch belongs to the round
            return calls
        mix = MIX_UNSTREAMED if args.load == "unstreamed" else MIX
        return asyncio.run(load(port, 1.5 if warm_up else args.duration, 16, mix=mix)).requests

    per_call: dict[str, list[float]] = {"plain": [], "A": [], "B": []}
    try:
        wait_port(fake_port, timeout=30, proc=fake)
        procs = {"plain": start("plain", None), "A": start("A", args.a), "B": start("B", args.b)}
        for _, port in procs.values():
            one_round(port, warm_up=True)
        names = list(procs)
        for round_no in range(args.rounds):
            for name in names[round_no % 3:] + names[: round_no % 3]:
                proc, port = procs[name]
                before = cpu(proc)
                calls = one_round(port)
                per_call[name].append((cpu(proc) - before) * 1000 / max(calls, 1))
            print(f"round {round_no + 1}: " + "  ".join(f"{n} {per_call[n][-1]:.3f} ms" for n in names)
                  + f"  (load average {os.getloadavg()[0]:.1f})", flush=True)
    finally:
        for proc, _ in procs.values():
            stop_process(proc)
        fake.terminate()
        fake.wait(10)
    median = {n: statistics.median(v) for n, v in per_call.items()}
    print(f"{args.load}: mitmdump CPU per call, median of {args.rounds} rounds: plain {median['plain']:.3f} ms, "
          f"A {median['A']:.3f} ms ({median['A'] / median['plain']:.3f}x), "
          f"B {median['B']:.3f} ms ({median['B'] / median['plain']:.3f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

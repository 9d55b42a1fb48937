"""WebSocket scenario of `make bench`: sockets x turns of Responses WebSocket mode.

Each socket sends `response.create`, reads the response's events up to
`response.completed`, and sends the next turn. Per proxy (plain mitmdump,
addon/usage.py): proxy CPU per turn and the turn's latency (create sent ->
response.completed received), against the same fake upstream. Run alone with
`python bench/bench.py --scenario websocket`.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from typing import Any

FAKE_KEY = "sk-proj-bench0123456789abcdefWXYZ"


async def _socket(port: int, turns: int, chunks: int, latencies: list[float]) -> None:
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}/v1/responses", max_size=None,
                       additional_headers={"Authorization": f"Bearer {FAKE_KEY}"}) as ws:
        for turn in range(turns):
            create = {"type": "response.create", "model": "gpt-5", "input": f"turn {turn} " + "context " * 200,
                      "metadata": {"fake_chunks": str(chunks)}}
            started = time.perf_counter()
            await ws.send(json.dumps(create))
            while True:
                frame = await ws.recv()
                if frame.startswith('{"type":"response.completed"'):
                    break
            latencies.append(time.perf_counter() - started)


async def _load(port: int, sockets: int, turns: int, chunks: int) -> list[float]:
    latencies: list[float] = []
    await asyncio.gather(*(_socket(port, turns, chunks, latencies) for _ in range(sockets)))
    return latencies


def run_websocket(proxies: dict[str, Any], args) -> dict:
    """Alternating rounds on each proxy; returns per proxy: cpu_ms_per_turn and latency figures (ms)."""
    results: dict[str, dict[str, list[float]]] = {name: {"cpu_ms_per_turn": [], "latency_ms": []} for name in proxies}
    asyncio.run(_load(next(iter(proxies.values())).port, 2, 2, args.ws_chunks))  # warm-up (imports, TLS to upstream)
    for _ in range(args.rounds):
        for name, proxy in proxies.items():
            before = proxy.cpu()
            latencies = asyncio.run(_load(proxy.port, args.ws_sockets, args.ws_turns, args.ws_chunks))
            used = proxy.cpu() - before
            turns = args.ws_sockets * args.ws_turns
            results[name]["cpu_ms_per_turn"].append(used * 1000 / turns)
            results[name]["latency_ms"] += [x * 1000 for x in latencies]
    return results


def report_websocket(results: dict, args) -> None:
    print(f"\nWebSocket (Responses WebSocket mode): {args.ws_sockets} sockets x {args.ws_turns} turns, "
          f"{args.ws_chunks} deltas per response, {args.rounds} rounds per proxy")
    base = results.get("plain")
    for name, figures in results.items():
        cpu = statistics.median(figures["cpu_ms_per_turn"])
        lat = figures["latency_ms"]
        med = statistics.median(lat)
        p90 = statistics.quantiles(lat, n=10)[-1] if len(lat) >= 10 else max(lat)
        line = f"  {name:<8} CPU {cpu:6.2f} ms/turn   turn latency median {med:6.2f} ms, p90 {p90:6.2f} ms"
        if base is not None and name != "plain":
            added = med - statistics.median(base["latency_ms"])
            extra_cpu = cpu - statistics.median(base["cpu_ms_per_turn"])
            line += f"   (+{extra_cpu:.2f} ms CPU, {added:+.2f} ms latency vs plain)"
        print(line)

"""Limits against every request shape (issue 13), end to end: real mitmdump,
the openai SDK, the fake server. Each test prints what it measured."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import ROOT
from test_enforce_e2e import Receiver, wait_for, webhook  # noqa: F401 (fixture)

from addon.metering.wire import key_id

POOLS = """
timezone = "UTC"
default_pool = "premium"
[pools.premium]
limit = {premium}
window = "day"
models = ["gpt-4o", "gpt-5"]
[pools.mini]
limit = 1000000
window = "day"
models = ["gpt-4o-mini"]
[alerts]
thresholds = [50, 80, 100]
"""

PROMPT = [{"role": "user", "content": "x" * 400}]


def config(tmp_path: Path, premium: int, extra: str = "") -> str:
    path = tmp_path / f"pools-{premium}-{abs(hash(extra)) % 10_000}.toml"
    path.write_text(POOLS.format(premium=premium) + extra)
    return str(path)


def used(db: Path, pool: str = "premium") -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("select coalesce(sum(total_tokens), 0) from requests where pool = ?",
                            (pool,)).fetchone()[0]
    finally:
        conn.close()


def report(capsys, text: str) -> None:
    with capsys.disabled():
        print(f"\n  {text}")


def test_n_answers_are_estimated_and_a_request_larger_than_the_limit_never_fits(make_proxy, fake_server, tmp_path,
                                                                                 capsys):
    proxy = make_proxy(options={"usage_config": config(tmp_path, 2000)})
    client = proxy.client()
    before = len(fake_server.state.calls("/chat/completions"))
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="gpt-4o", messages=PROMPT, n=100, max_tokens=100,
                                       extra_headers={"x-fake-chunks": "100"})
    headers = refused.value.response.headers
    assert headers["x-should-retry"] == "false" and "retry-after" not in headers
    message = refused.value.body["message"]
    assert "needs about 10,1" in message
    assert "more than the whole daily limit of pool 'premium' (2,000 tokens)" in message
    assert "resets" not in message
    # n that fits the limit but not what is left: an ordinary refusal.
    answer = client.chat.completions.create(model="gpt-4o", messages=PROMPT, n=10, max_tokens=100,
                                            extra_headers={"x-fake-chunks": "100"})
    assert answer.usage.completion_tokens == 1000
    with pytest.raises(openai.RateLimitError) as again:
        client.chat.completions.create(model="gpt-4o", messages=PROMPT, n=10, max_tokens=100,
                                       extra_headers={"x-fake-chunks": "100"})
    assert "retry-after" in again.value.response.headers
    assert len(fake_server.state.calls("/chat/completions")) == before + 1
    proxy.wait_rows(3)
    total = used(proxy.db)
    report(capsys, f"n=100 x 100 then n=10 x 100 into 2,000: used {total}, overshoot {total - 2000}")
    assert total <= 2000


def test_back_to_back_answers_longer_than_estimated_overshoot_at_most_one_request(make_proxy, tmp_path, capsys):
    limit = 3000
    proxy = make_proxy(options={"usage_config": config(tmp_path, limit)})
    client = proxy.client(max_retries=0)
    admitted = 0
    with pytest.raises(openai.RateLimitError):
        for _ in range(50):
            # Asks for 20 tokens of output, gets 200: the estimate is 180 short.
            answer = client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=20,
                                                    extra_headers={"x-fake-chunks": "200"})
            size = answer.usage.total_tokens
            admitted += 1
    proxy.wait_rows(admitted + 1)
    total = used(proxy.db)
    report(capsys, f"back-to-back, each ~{size} tokens against an estimate of ~{size - 180}, limit {limit}: "
                   f"{admitted} admitted, used {total}, overshoot {total - limit}")
    assert total <= limit + size


def chain(client, turns: int, proxies=None, wait=None) -> tuple[int, str | None]:
    """Continue one conversation turn after turn until refused; (turns admitted, last response id)."""
    previous = None
    for turn in range(turns):
        target = client if proxies is None else proxies[turn % len(proxies)]
        try:
            response = target.responses.create(model="gpt-5", input="go on", previous_response_id=previous,
                                               max_output_tokens=30, extra_headers={"x-fake-chunks": "20"})
        except openai.RateLimitError:
            return turn, previous
        previous = response.id
        if wait is not None:
            wait(turn + 1)
    raise AssertionError("the limit was never reached")


def test_a_continuation_chain_never_crosses_a_limit_it_could_foresee(make_proxy, fake_server, tmp_path, capsys):
    limit = 3000
    proxy = make_proxy(options={"usage_config": config(tmp_path, limit)})
    turns, _ = chain(proxy.client(max_retries=0), 100)
    proxy.wait_rows(turns + 1)
    one = used(proxy.db)
    # Two proxies taking turns: each continues a response only the other one
    # saw (and recorded); the previous usage comes from the database.
    db = tmp_path / "shared.db"
    options = {"usage_config": config(tmp_path, limit, "\n# two\n")}
    first, second = make_proxy(options=options, db=db), make_proxy(options=options, db=db)
    shared_turns, _ = chain(None, 100, proxies=[first.client(max_retries=0), second.client(max_retries=0)],
                            wait=lambda n: first.wait_rows(n, "outcome = 'ok'"))
    first.wait_rows(shared_turns + 1)
    two = used(db)
    report(capsys, f"continuation chain, limit {limit}: one proxy {turns} turns, used {one}, overshoot {one - limit}; "
                   f"two proxies {shared_turns} turns, used {two}, overshoot {two - limit}")
    assert one <= limit and two <= limit
    assert turns >= 4 and shared_turns >= 4
    assert "needs about" in proxy.rows("outcome = 'blocked'")[0]["error"]


def test_nothing_is_admitted_while_a_pool_is_over_its_limit(make_proxy, tmp_path, capsys):
    limit = 100_000
    proxy = make_proxy(options={"usage_config": config(tmp_path, limit)})
    client = proxy.client(max_retries=0)
    statuses = []
    for chunks in (20, 150_000, 20, 20, 20, 20):  # the second answer is far longer than its estimate
        try:
            client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=20,
                                           extra_headers={"x-fake-chunks": str(chunks)})
            statuses.append(200)
        except openai.RateLimitError:
            statuses.append(429)
    proxy.wait_rows(6)
    total = used(proxy.db)
    report(capsys, f"one answer of 150,000 tokens into {limit:,} (lease with spare): statuses {statuses}, "
                   f"used {total:,} ({100 * total // limit} %)")
    assert statuses == [200, 200, 429, 429, 429, 429]


def test_batches_count_once_in_their_own_pool(make_proxy, fake_server, tmp_path, capsys):
    extra = "\n[pools.batch]\nlimit = 1000\nwindow = \"day\"\n"
    proxy = make_proxy(options={"usage_config": config(tmp_path, 1000, extra)})
    client = proxy.client(max_retries=0)
    batch = client.batches.create(input_file_id="file-abc", endpoint="/v1/chat/completions",
                                  completion_window="24h")
    for _ in range(2):  # read back twice: finished, with the usage of the whole batch
        assert client.batches.retrieve(batch.id).usage.total_tokens == 2_000_000
    rows = proxy.wait_rows(3)
    assert [(r["method"], r["pool"], r["total_tokens"], r["processing"]) for r in rows] == [
        ("POST", "batch", None, "batch"), ("GET", "batch", 2_000_000, "batch"), ("GET", "batch", None, "batch")]
    # The batch pool is spent: no new batch; the live pool never saw the batch.
    before = len(fake_server.state.calls("/v1/batches"))
    with pytest.raises(openai.RateLimitError) as refused:
        client.batches.create(input_file_id="file-abc", endpoint="/v1/chat/completions", completion_window="24h")
    assert "pool 'batch'" in refused.value.body["message"]
    assert len(fake_server.state.calls("/v1/batches")) == before
    assert client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=20).usage.total_tokens > 0
    report(capsys, f"batch: 2,000,000 tokens recorded once in pool 'batch'; premium used {used(proxy.db)}")


def test_batches_default_to_a_track_only_pool(make_proxy, tmp_path):
    proxy = make_proxy(options={"usage_config": config(tmp_path, 1000)})
    client = proxy.client(max_retries=0)
    batch = client.batches.create(input_file_id="file-abc", endpoint="/v1/chat/completions",
                                  completion_window="24h")
    client.batches.retrieve(batch.id)
    assert client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=20).usage.total_tokens > 0
    assert used(proxy.wait_rows(3) and proxy.db, "batch") == 2_000_000


def test_realtime_client_secrets_need_a_pool_that_is_not_spent(make_proxy, fake_server, tmp_path):
    proxy = make_proxy(options={"usage_config": config(tmp_path, 500)})
    client = proxy.client(max_retries=0)
    secret = client.realtime.client_secrets.create(session={"type": "realtime", "model": "gpt-4o"})
    assert secret.value.startswith("ek_")
    # Spend the pool (an answer longer than its estimate).
    client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=20,
                                   extra_headers={"x-fake-chunks": "600"})
    before = len(fake_server.state.calls("/v1/realtime/"))
    with pytest.raises(openai.RateLimitError):
        client.realtime.client_secrets.create(session={"type": "realtime", "model": "gpt-4o"})
    with pytest.raises(openai.RateLimitError):
        client.post("/realtime/sessions", body={"model": "gpt-4o"}, cast_to=object)
    assert len(fake_server.state.calls("/v1/realtime/")) == before
    # Mini is not spent: a transcription session for its model is opened.
    client.post("/realtime/transcription_sessions", body={"input_audio_transcription": {"model": "gpt-4o-mini"}},
                cast_to=object)
    rows = proxy.wait_rows(5)
    doors = [(r["endpoint"], r["pool"], r["outcome"], r["total_tokens"]) for r in rows if "realtime" in r["path"]]
    assert doors == [("realtime.client_secrets", "premium", "ok", None),
                     ("realtime.client_secrets", "premium", "blocked", None),
                     ("realtime.sessions", "premium", "blocked", None),
                     ("realtime.transcription_sessions", "mini", "ok", None)]


def test_a_background_response_counts_once_across_proxies_and_restarts(make_proxy, tmp_path, capsys):
    db = tmp_path / "shared.db"
    options = {"usage_config": config(tmp_path, 1_000_000)}
    first, second = make_proxy(options=options, db=db), make_proxy(options=options, db=db)
    created = first.client().responses.create(model="gpt-5", input="hi", background=True,
                                              extra_headers={"x-fake-polls": "1"})
    assert created.status == "queued"
    reads = [first.client().responses.retrieve(created.id).status for _ in range(2)]
    reads.append(second.client().responses.retrieve(created.id).status)
    first.stop()
    again = make_proxy(options=options, db=db)
    reads.append(again.client().responses.retrieve(created.id).status)
    assert reads == ["in_progress", "completed", "completed", "completed"]
    # A stored chat completion read back is no new call either.
    stored = again.client().chat.completions.retrieve("chatcmpl-stored123456")
    assert stored.usage.total_tokens == 50
    rows = again.wait_rows(6)
    counted = [r for r in rows if r["total_tokens"]]
    report(capsys, f"background response read 3 times through 2 proxies and a restart: counted "
                   f"{len(counted)} time(s); stored completion read back: {rows[-1]['total_tokens']} tokens")
    assert [(r["method"], r["response_id"]) for r in counted] == [("GET", created.id)]
    assert rows[-1]["total_tokens"] is None and rows[-1]["outcome"] == "ok"


def test_a_script_reload_keeps_metering_streams_in_flight(make_proxy, tmp_path):
    script = tmp_path / "usage_reloadable.py"
    script.write_text((ROOT / "addon" / "usage.py").read_text().replace(
        "Path(__file__).resolve().parent.parent", repr(str(ROOT))))
    proxy = make_proxy(options={"usage_config": config(tmp_path, 1_000_000)}, script=script)
    client = proxy.client()
    result: dict = {}

    def stream() -> None:
        chunks = client.chat.completions.create(
            model="gpt-4o", messages=PROMPT, max_tokens=20, stream=True,
            extra_headers={"x-fake-chunks": "12", "x-fake-delay": "0.25"})
        result["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    worker = threading.Thread(target=stream)
    worker.start()
    time.sleep(1.0)
    later = time.time() + 5
    os.utime(script, (later, later))  # mitmproxy reloads the script within a second
    assert wait_for(lambda: proxy.log().count("Loading script") >= 2, timeout=10)
    worker.join(30)
    assert result["text"].count("tok") == 12
    rows = proxy.wait_rows(1, "outcome != 'aborted'")
    assert [(r["outcome"], r["total_tokens"] is not None) for r in rows] == [("ok", True)]
    conn = sqlite3.connect(proxy.db)
    try:  # the stream's reservation held on through the reload; its row took it off
        leases = conn.execute("select tokens from reservations order by id").fetchall()
    finally:
        conn.close()
    assert leases == [(0,)]
    assert client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=20).usage.total_tokens
    rows = proxy.wait_rows(2)
    assert [r["outcome"] for r in rows] == ["ok", "ok"]
    assert "aborted" not in proxy.log()


def test_per_key_refusals_and_alerts_state_true_numbers(make_proxy, tmp_path, webhook, capsys):  # noqa: F811
    url, received = webhook
    alice = "sk-alice-0123456789abcdef"
    extra = f'\n[keys.{key_id(alice)}]\nlabel = "alice"\nlimits = {{ premium = 300 }}\n'
    proxy = make_proxy(options={"usage_config": config(tmp_path, 100_000, extra), "usage_alert_webhook": url})
    client = proxy.client(api_key=alice, max_retries=0)
    sizes = []
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(5):
            sizes.append(client.chat.completions.create(model="gpt-4o", messages=PROMPT, max_tokens=20,
                                                        extra_headers={"x-fake-chunks": "20"}).usage.total_tokens)
    message = refused.value.body["message"]
    spent = sum(sizes)
    report(capsys, f"key limit 300: refusal says {message!r}")
    assert f"{spent:,} of its daily 300 tokens used; this request needs about" in message
    assert "reserved" not in message  # nothing is in flight
    assert wait_for(lambda: len(received) >= 2)
    time.sleep(2)  # later ticks add nothing: 100 % was never crossed
    alerts = sorted((p["threshold"], p["used"]) for p in received if p["key_id"])
    assert [a[0] for a in alerts] == [t for t in (50, 80, 100) if spent >= t * 3]
    for threshold, alert_used in alerts:
        assert alert_used >= threshold * 3
    assert all(f"{p['used']:,} of 300 tokens used" in p["text"] for p in received if p["key_id"])

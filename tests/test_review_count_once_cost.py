"""Review: a row whose usage was counted before (a finished batch read again, a background response polled
by another proxy) keeps no tokens and no cost; its cost_status must not say `priced`."""

from __future__ import annotations


def test_second_read_of_a_batch_is_not_priced(make_proxy, fake_server):
    proxy = make_proxy(mode="reverse")
    client = proxy.client(max_retries=0)
    batch = client.batches.create(input_file_id="file-abc123def456", endpoint="/v1/chat/completions",
                                  completion_window="24h")
    client.batches.retrieve(batch.id)
    client.batches.retrieve(batch.id)
    rows = proxy.wait_rows(3, "endpoint = 'batches'")
    reads = [r for r in rows if r["method"] == "GET"]
    assert len(reads) == 2
    first, again = sorted(reads, key=lambda r: r["id"])
    assert first["total_tokens"] == 2_000_000 and first["cost_usd"] and first["cost_status"] == "priced"
    assert again["total_tokens"] is None and again["cost_usd"] is None
    assert again["cost_status"] != "priced", again

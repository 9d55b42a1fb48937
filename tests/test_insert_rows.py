"""store/inserts.insert_rows: the prepared-statement path writes what sqlite-utils' insert_all wrote."""

from __future__ import annotations

import sqlite3

import pytest

from addon.store import inserts, schema

ROW = {"ts": "2026-11-30T00:00:00.000Z", "day": "2026-11-30", "host": "api.openai.com", "method": "POST",
       "path": "/v1/chat/completions", "endpoint": "chat.completions", "model": "gpt-4o-mini", "pool": "mini",
       "status": 200, "outcome": "ok", "streamed": 0, "input_tokens": 11, "output_tokens": 7, "total_tokens": 18,
       "cost_usd": 1.5e-06, "latency_ms": 12.5, "ttfb_ms": None, "key_hint": "sk-…abcd", "error": None}


def _db(path):
    db = schema.connect(path)
    schema.migrate(db)
    return db


def _insert(db, rows):
    with db.conn:
        inserts.insert_rows(db, rows)


def _stored(db) -> list[dict]:
    db.conn.row_factory = sqlite3.Row
    try:
        return [{k: r[k] for k in r.keys() if k not in ("id", "uid")} for r in db.conn.execute(
            "select * from requests order by id")]
    finally:
        db.conn.row_factory = None


def test_rows_are_the_same_through_the_fast_path_and_insert_all(tmp_path):
    fast, slow = _db(tmp_path / "fast.db"), _db(tmp_path / "slow.db")
    rows = [dict(ROW), {**ROW, "outcome": "no_usage", "input_tokens": None, "label": "team-a"}, {"ts": ROW["ts"]}]
    _insert(fast, [dict(r) for r in rows])
    with slow.conn:  # what insert_rows did before: insert_all
        slow.table("requests").insert_all([{**r, "uid": f"u{i}"} for i, r in enumerate(rows)],
                                          columns=schema.REQUEST_COLUMNS, ignore=True)
    assert _stored(fast) == _stored(slow) and len(_stored(fast)) == 3


def test_a_row_kept_for_a_retry_is_written_once(tmp_path):
    db = _db(tmp_path / "usage.db")
    row = dict(ROW)
    _insert(db, [row])
    _insert(db, [row])  # the same uid again (a spooled batch retried after its commit)
    assert len(_stored(db)) == 1


def test_values_sqlite_utils_converts_still_go_through_it(tmp_path):
    db = _db(tmp_path / "usage.db")
    _insert(db, [{**ROW, "streamed": True, "tool_calls": {"web_search": 2}}])
    [stored] = _stored(db)
    assert stored["streamed"] == 1 and stored["tool_calls"] == '{"web_search": 2}'


def test_an_unknown_column_fails_as_before(tmp_path):
    db = _db(tmp_path / "usage.db")
    with pytest.raises(sqlite3.OperationalError, match="no column named"):
        _insert(db, [{**ROW, "no_such_column": 1}])


def test_a_column_added_by_another_process_is_seen(tmp_path):
    db = _db(tmp_path / "usage.db")
    _insert(db, [dict(ROW)])  # the columns are now known for this connection
    other = sqlite3.connect(tmp_path / "usage.db")
    other.execute("alter table requests add column later_column text")
    other.commit()
    other.close()
    _insert(db, [{**ROW, "later_column": "x"}])
    assert [r["later_column"] for r in _stored(db)] == [None, "x"]

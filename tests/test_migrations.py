"""Recorded migrations (addon/store/schema.py) against real SQLite files."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

from addon.store import schema

FIXTURE = Path(__file__).parent / "fixtures" / "schema-before-migrations.sql"
NAMES = ["m001_tables", "m002_alerts_dedupe"]


def objects(path: Path) -> dict[str, str]:
    """Every table and index of a database with its SQL, but the migrations' own table."""
    conn = sqlite3.connect(path)
    try:
        return {name: sql for name, sql in conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE sql IS NOT NULL AND tbl_name != '_sqlite_migrations'"
            " AND name != 'sqlite_sequence'")}
    finally:
        conn.close()


def recorded(path: Path) -> list[str]:
    conn = sqlite3.connect(path)
    try:
        return [r[0] for r in conn.execute(
            "SELECT name FROM _sqlite_migrations WHERE migration_set = 'openai-usage-meter' ORDER BY id")]
    finally:
        conn.close()


def migrated(path: Path) -> None:
    db = schema.connect(path)
    try:
        schema.migrate(db)
    finally:
        db.conn.close()


def test_fresh_database_gets_every_table_and_records_the_migrations(tmp_path):
    path = tmp_path / "fresh.db"
    migrated(path)
    made = objects(path)
    assert set(schema.TABLES) <= set(made)
    assert {"idx_requests_uid", "alerts_dedupe", "idx_requests_ts"} <= set(made)
    assert recorded(path) == NAMES == [m.name for m in schema.MIGRATIONS._migrations]
    conn = sqlite3.connect(path)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(requests)")]
    conn.close()
    assert columns == list(schema.REQUEST_COLUMNS)  # the writer inserts exactly these


def test_running_twice_is_a_no_op(tmp_path):
    path = tmp_path / "usage.db"
    migrated(path)
    before = objects(path)
    conn = sqlite3.connect(path)
    applied = conn.execute("SELECT name, applied_at FROM _sqlite_migrations ORDER BY id").fetchall()
    version = conn.execute("PRAGMA schema_version").fetchone()[0]
    conn.close()
    migrated(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT name, applied_at FROM _sqlite_migrations ORDER BY id").fetchall() == applied
    assert conn.execute("PRAGMA schema_version").fetchone()[0] == version  # nothing was even touched
    conn.close()
    assert objects(path) == before


def test_database_of_the_schema_before_migrations_upgrades_in_place_keeping_rows(tmp_path):
    path = tmp_path / "today.db"
    conn = sqlite3.connect(path)
    conn.executescript(FIXTURE.read_text())
    conn.execute("INSERT INTO requests (ts, pool, total_tokens, uid) VALUES ('2026-11-29T10:00:00.000Z', 'p', 42,"
                 " 'u1')")
    conn.execute("INSERT INTO alerts (ts, pool, dedupe, message) VALUES ('2026-11-29T10:00:00.000Z', 'p', 'p||w|80',"
                 " 'm')")
    conn.execute("INSERT INTO issued_keys (key_hash, key_id, label) VALUES ('h', 'k', 'alice')")
    conn.commit()
    conn.close()
    before = objects(path)
    migrated(path)
    assert objects(path) == before  # made by that code: left as it was
    assert recorded(path) == NAMES
    fresh = tmp_path / "fresh.db"
    migrated(fresh)
    assert objects(fresh) == before  # and the same as a new database
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT pool, total_tokens, uid FROM requests").fetchall() == [("p", 42, "u1")]
    assert conn.execute("SELECT dedupe FROM alerts").fetchall() == [("p||w|80",)]
    assert conn.execute("SELECT label FROM issued_keys").fetchall() == [("alice",)]
    conn.close()


def test_an_older_database_comes_up_without_losing_rows(tmp_path):
    """A first version's database: `requests` with a few columns, no other table, an alert twice."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute('CREATE TABLE "requests" ("id" INTEGER PRIMARY KEY, "ts" TEXT, "model" TEXT, "total_tokens" INTEGER)')
    conn.execute('CREATE TABLE "alerts" ("id" INTEGER PRIMARY KEY, "ts" TEXT, "pool" TEXT, "dedupe" TEXT)')
    conn.executemany("INSERT INTO requests (ts, model, total_tokens) VALUES (?, ?, ?)",
                     [("2026-01-01T00:00:00.000Z", "gpt-4o", 10), ("2026-01-02T00:00:00.000Z", "gpt-4o-mini", 20)])
    conn.executemany("INSERT INTO alerts (ts, pool, dedupe) VALUES (?, ?, ?)",
                     [("t1", "p", "p||w|80"), ("t2", "p", "p||w|80"), ("t3", "p", "p||w|90")])
    conn.commit()
    conn.close()
    migrated(path)
    fresh = tmp_path / "fresh.db"
    migrated(fresh)
    assert set(objects(path)) == set(objects(fresh))
    conn = sqlite3.connect(path)
    assert {r[1] for r in conn.execute("PRAGMA table_info(requests)")} == set(schema.REQUEST_COLUMNS)
    assert conn.execute("SELECT ts, model, total_tokens FROM requests ORDER BY id").fetchall() == [
        ("2026-01-01T00:00:00.000Z", "gpt-4o", 10), ("2026-01-02T00:00:00.000Z", "gpt-4o-mini", 20)]
    assert conn.execute("SELECT ts FROM alerts ORDER BY id").fetchall() == [("t1",), ("t3",)]  # the first one stays
    conn.close()
    assert recorded(path) == NAMES


def _migrate_in_a_process(path: str, start, results) -> None:
    start.wait(30)
    try:
        for _ in range(3):  # the first at once with the other process, then opening it again
            db = schema.connect(path)
            schema.migrate(db)
            db.conn.close()
        results.put("ok")
    except Exception as exc:  # reported to the test, which fails with it
        results.put(f"{type(exc).__name__}: {exc}")


def test_processes_migrating_one_file_at_once_all_succeed(tmp_path):
    context = multiprocessing.get_context("spawn")
    for round_ in range(3):
        path = str(tmp_path / f"race-{round_}.db")
        start = context.Event()
        results = context.Queue()
        processes = [context.Process(target=_migrate_in_a_process, args=(path, start, results)) for _ in range(4)]
        for process in processes:
            process.start()
        start.set()
        outcomes = [results.get(timeout=120) for _ in processes]
        for process in processes:
            process.join(30)
        assert outcomes == ["ok"] * 4
        assert recorded(Path(path)) == NAMES  # once each


def test_a_migration_that_fails_leaves_nothing_half_done(tmp_path):
    path = tmp_path / "usage.db"
    migrated(path)
    extra = schema.Migrations("openai-usage-meter")
    for migration in schema.MIGRATIONS._migrations:
        extra(name=migration.name)(migration.fn)

    @extra()
    def m999_broken(db) -> None:
        db.execute("CREATE TABLE half_done (x)")
        raise sqlite3.OperationalError("no such column: nope")

    saved = schema.MIGRATIONS
    schema.MIGRATIONS = extra
    try:
        db = schema.connect(path)
        try:
            schema.migrate(db)
        except sqlite3.OperationalError as exc:
            assert "nope" in str(exc)
        else:
            raise AssertionError("the broken migration did not raise")
        finally:
            db.conn.close()
    finally:
        schema.MIGRATIONS = saved
    assert "half_done" not in objects(path) and recorded(path) == NAMES

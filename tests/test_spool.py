"""The spool (addon/store/spool.py): rows waiting for the database, in memory and in files."""

from __future__ import annotations

import json
import stat

from addon.store.spool import Spool


def rows(*numbers: int) -> list[dict]:
    return [{"input_tokens": n, "uid": f"u{n}"} for n in numbers]


def test_bounded_oldest_first(tmp_path):
    spool = Spool(tmp_path / "usage.db", limit=3)
    assert spool.add(rows(1, 2)) == []
    assert spool.add(rows(3, 4, 5)) == rows(1, 2)  # the oldest make room
    part = spool.take(2)
    assert part == rows(3, 4) and len(spool) == 1
    spool.put_back(part)  # not committed: first in line again
    assert spool.take_all() == rows(3, 4, 5) and len(spool) == 0


def test_saved_at_shutdown_and_imported_first_by_the_next_writer(tmp_path):
    db = tmp_path / "usage.db"
    first = Spool(db, limit=10)
    first.add([{**row, "_reservation": object()} for row in rows(1, 2)])
    first.save()
    assert len(first) == 0
    [saved] = tmp_path.glob("usage.db.spool-*.jsonl")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert [json.loads(line) for line in saved.read_text().splitlines()] == rows(1, 2)  # no private keys
    with saved.open("a") as handle:
        handle.write('{"input_tokens": 3, "ui')  # a line cut short by a crash
    nxt = Spool(db, limit=10)
    nxt.add(rows(9))  # this run's row
    assert nxt.import_files() == 2
    assert not saved.exists() and len(list(tmp_path.glob("usage.db.spool-*.importing-*"))) == 1  # claimed
    assert nxt.take_all() == rows(1, 2, 9)  # written before this run's rows
    nxt.committed()
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_save_writes_no_file(tmp_path):
    Spool(tmp_path / "usage.db", limit=1).save()
    assert list(tmp_path.iterdir()) == []

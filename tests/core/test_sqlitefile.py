"""SQLiteFile: the one way Iros opens its SQLite files."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from iros.core.sqlitefile import IncompatibleFile, SQLiteFile

SCHEMA = "CREATE TABLE things (id INTEGER PRIMARY KEY); CREATE INDEX things_id ON things(id)"


def _file(path: Path) -> SQLiteFile:
    return SQLiteFile(path, schema=SCHEMA, version=1, label="test store", thread_name="iros-test")


def test_workers_creating_the_schema_at_once_agree(tmp_path: Path) -> None:
    """A worker that saw no schema but gets the write lock after another created it does not fail."""
    path = tmp_path / "shared.db"
    late = sqlite3.connect(path, isolation_level=None)
    assert late.execute("PRAGMA user_version").fetchone()[0] == 0  # what the late worker saw
    _file(path).connect()  # the first worker creates the schema meanwhile
    _file(path)._create(late)  # the late one now creates it too
    assert late.execute("PRAGMA user_version").fetchone()[0] == 1
    assert late.execute("SELECT count(*) FROM things").fetchone()[0] == 0
    late.close()


def test_workers_opening_a_new_file_at_once_all_open_it(tmp_path: Path) -> None:
    """Two workers of one host switching a new file to WAL together: SQLite may answer one of them
    'database is locked' at once, without waiting out busy_timeout. Each open still succeeds."""
    failures: list[BaseException] = []
    for round_ in range(100):
        path = tmp_path / f"new-{round_}.db"
        together = threading.Barrier(4)

        def open_it(path: Path = path, together: threading.Barrier = together) -> None:
            store = _file(path)
            together.wait()
            try:
                store.connect().execute("SELECT count(*) FROM things")
            except BaseException as exc:
                failures.append(exc)
            finally:
                store._disconnect()

        threads = [threading.Thread(target=open_it) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert failures == []


def test_a_file_with_an_older_layout_under_the_same_version_is_refused(tmp_path: Path) -> None:
    """A pre-release file that says version 1 but lacks a column is refused at open, naming what it
    lacks and what to do: retrying its writes could never succeed."""
    path = tmp_path / "stale.db"
    stale = sqlite3.connect(path)
    stale.execute("CREATE TABLE things (other TEXT)")
    stale.execute("PRAGMA user_version = 1")
    stale.commit()
    stale.close()
    with pytest.raises(IncompatibleFile, match="table things lacks id") as refused:
        _file(path).connect()
    assert "Move the file aside" in str(refused.value)
    assert str(path) in str(refused.value)


def test_a_file_from_a_newer_iros_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "newer.db"
    newer = sqlite3.connect(path)
    newer.execute("PRAGMA user_version = 2")
    newer.close()
    with pytest.raises(IncompatibleFile, match="schema version 2 is newer"):
        _file(path).connect()


def test_a_file_of_this_version_opens_again(tmp_path: Path) -> None:
    path = tmp_path / "mine.db"
    first = _file(path)
    first.connect().execute("INSERT INTO things VALUES (1)")
    first._disconnect()
    assert _file(path).connect().execute("SELECT id FROM things").fetchall() == [(1,)]

"""SQLiteFile: the one way Iros opens its SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from iros.sqlitefile import SQLiteFile

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

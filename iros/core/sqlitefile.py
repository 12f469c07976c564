"""One SQLite file in WAL mode, worked on by one dedicated thread so the event loop never waits on disk.

db = SQLiteFile("iros-data/cache.db", schema=SCHEMA, version=1, label="cache store",
                thread_name="iros-cachedb")
rows = await db.run(read_rows, since)     # read_rows(since) runs on the database thread
conn = db.connect()                       # on that thread only: opens the file on first use
await db.close()                          # closes the file, ends the thread; run() then raises

connect() applies busy_timeout, the caller's pragmas (page_size and auto_vacuum take effect only on a
new file, before WAL), journal_mode=WAL and synchronous=NORMAL: a crash, kill -9 included, loses at
most the last transaction and never corrupts the file. Workers opening one new file together may be told
'database is locked' at once; the open is retried until busy_timeout's deadline. It creates the schema
in one transaction when PRAGMA user_version is below `version`. It refuses, with IncompatibleFile, a
file written by a newer Iros and one whose tables lack columns of the schema its version names (a
pre-release layout): no retry would make those writable, so the process stops at start and says what
to do.

Writes fail (disk full, read-only directory) with sqlite3.Error or OSError; the store keeps its changes
and retries. report() logs such a failure once per outage, not once per retry:

    db = SQLiteFile(..., meanwhile="samples stay queued and writes are retried every 1s")
    db.report(exc)          # logs an error the first time; db.last_error holds the message (for status)
    db.recovered()          # logs that writes work again; last_error back to None

The store's periodic work (flush, sweep, retention) runs in one background task:

    db.start_background(work, every=1.0)   # await work() every second; a failure is logged, not fatal
    await db.close(final=flush)            # stops the task (never mid-write), awaits final(), closes
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from iros.core.errors import StoreUnavailable

__all__ = ["IncompatibleFile", "SQLiteFile", "open_wal"]

log = logging.getLogger(__name__)

T = TypeVar("T")


BUSY_TIMEOUT_SECONDS = 10.0


def _busy(exc: sqlite3.OperationalError) -> bool:
    """The file is locked by another connection (SQLITE_BUSY or SQLITE_LOCKED, extended codes included)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc)


def open_wal(
    path: Path,
    *,
    pragmas: Sequence[str] = (),
    setup: Callable[[sqlite3.Connection], object] | None = None,
    check_same_thread: bool = True,
) -> sqlite3.Connection:
    """A connection to `path` (created with its directory) in autocommit, with busy_timeout, `pragmas`,
    journal_mode=WAL and synchronous=NORMAL, after `setup(conn)` (the schema).

    Workers opening one new file together: switching it to WAL can answer SQLITE_BUSY at once, without
    waiting out busy_timeout (SQLite's own deadlock avoidance), so the whole open is retried here until
    the same deadline.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + BUSY_TIMEOUT_SECONDS
    pause = 0.005
    while True:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=check_same_thread)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            for pragma in pragmas:
                conn.execute(f"PRAGMA {pragma}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            if setup is not None:
                setup(conn)
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if not _busy(exc) or time.monotonic() + pause > deadline:
                raise
        except BaseException:
            conn.close()
            raise
        time.sleep(pause * random.uniform(0.5, 1.5))
        pause = min(pause * 2, 0.2)


class IncompatibleFile(Exception):
    """A database file this Iros cannot use as it is; the message names the file and what to do."""


def _layout(conn: sqlite3.Connection) -> dict[str, set[str]]:
    """Each table's column names."""
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {t: {r[1] for r in conn.execute(f"PRAGMA table_info({t!r})")} for t in tables}


class SQLiteFile:
    def __init__(
        self,
        path: str | Path,
        *,
        schema: str,
        version: int,
        label: str,
        thread_name: str,
        pragmas: Sequence[str] = (),
        meanwhile: str = "writes are retried",
        logger: logging.Logger | None = None,
    ) -> None:
        self.path = Path(path)
        self.schema = schema
        self.version = version
        self.label = label
        self.pragmas = tuple(pragmas)
        self.thread_name = thread_name
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self._conn: sqlite3.Connection | None = None  # only touched on the executor's thread
        self.meanwhile = meanwhile
        self.log = logger or log  # the store's own logger, so its messages carry its name
        self.last_error: str | None = None  # why the file cannot be written now
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closing = False
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args) on the database thread."""
        if self._closed:
            raise StoreUnavailable(f"{self.label} {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def connect(self) -> sqlite3.Connection:
        """The open connection (opened, and the schema created, on first use). Database thread only."""
        if self._conn is None:
            self._conn = open_wal(self.path, pragmas=self.pragmas, setup=self._setup)
        return self._conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if found > self.version:
            raise self._incompatible(
                f"its schema version {found} is newer than this Iros understands ({self.version})"
            )
        if found < self.version:
            self._create(conn)
        else:
            self._check_layout(conn)

    def _create(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Workers starting together all saw an old version; the first to get the write lock creates
            # the schema, the others find it done once they have the lock.
            if conn.execute("PRAGMA user_version").fetchone()[0] >= self.version:
                conn.execute("COMMIT")
                return
            for statement in self.schema.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {self.version}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def _check_layout(self, conn: sqlite3.Connection) -> None:
        expected = sqlite3.connect(":memory:")
        try:
            expected.executescript(self.schema)
            wanted = _layout(expected)
        finally:
            expected.close()
        have = _layout(conn)
        missing = [
            f"table {table} lacks {', '.join(sorted(columns - have[table]))}"
            if table in have
            else f"table {table} is missing"
            for table, columns in sorted(wanted.items())
            if table not in have or columns - have[table]
        ]
        if missing:
            raise self._incompatible(
                f"it says schema version {self.version} but {'; '.join(missing)} (a pre-release layout)"
            )

    def _incompatible(self, why: str) -> IncompatibleFile:
        return IncompatibleFile(
            f"{self.label} {self.path} cannot be used: {why}. Move the file aside (Iros creates a new "
            "one) or set server.data_dir to another directory"
        )

    def _disconnect(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.execute("PRAGMA optimize")
            self._conn.close()
            self._conn = None

    def report(self, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        if self.last_error is None:  # once per outage, not once per retry
            self.log.error("%s %s cannot be written (%s); %s", self.label, self.path, message, self.meanwhile)
        self.last_error = message

    def recovered(self) -> None:
        if self.last_error is not None:
            self.log.warning("%s %s: writing again", self.label, self.path)
            self.last_error = None

    def start_background(self, work: Callable[[], Awaitable[None]], every: float) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._background(work, every), name=self.thread_name)

    async def _background(self, work: Callable[[], Awaitable[None]], every: float) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), every)
            try:
                await work()
            except Exception:  # the loop must outlive any one failure
                self.log.exception("%s %s: background work failed", self.label, self.path)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    async def close(self, final: Callable[[], Awaitable[None]] | None = None) -> None:
        """Stop the background task, await final() (the last flush), close the file and the thread."""
        if self._closing:
            return
        self._closing = True
        if self._task is not None:
            # Not cancelled: a flush cut off mid-way could neither finish nor put its changes back.
            self._stop.set()
            await asyncio.wait([self._task])  # does not raise if the task was cancelled elsewhere
            self._task = None
        if final is not None:
            await final()
        await self.run(self._disconnect)
        self._closed = True
        self._executor.shutdown(wait=True)

"""SQLite membership store: the embedded default (``sqlite:///path``).

One database file, shared safely by threads and by processes on one host:

  - WAL journal, so readers (verify) never wait for a writer (policy_sync);
  - one connection per thread (a ``sqlite3.Connection`` must not be used by two
    threads at once), created lazily and closed when its thread has ended;
  - every mutating call is one ``BEGIN IMMEDIATE`` transaction: the write lock is
    taken up front, so two writers queue on ``busy_timeout`` instead of failing
    half-way with SQLITE_BUSY on a read-to-write upgrade
    (https://www.sqlite.org/lang_transaction.html);
  - ``generation()`` reads one row of ``meta``, bumped inside the transaction of
    every membership change: a primary-key lookup of a few microseconds.

Times are stored as integer microseconds since the epoch (UTC), so they sort,
index and round-trip exactly. Any ``sqlite3.Error`` is raised as ``Unavailable``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping

from ..errors import Unavailable
from .base import UTC, ChangeEntry, GroupUpdate, IamWrite, Store, SyncState, generation_after, utcnow
from .rules import check_expected_sync, check_update, diff_iam, iam_entries, member_entries, monotonic_at

BUSY_TIMEOUT_S = 5.0
# Below SQLite's historical limit of 999 host parameters per statement.
CHUNK = 500
SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('generation', 0);
CREATE TABLE IF NOT EXISTS memberships (
    tenant TEXT NOT NULL, grp TEXT NOT NULL, usr TEXT NOT NULL,
    since INTEGER NOT NULL, source TEXT NOT NULL, message_id TEXT,
    PRIMARY KEY (tenant, grp, usr)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS groups (
    tenant TEXT NOT NULL, grp TEXT NOT NULL, delta_link TEXT, synced_at INTEGER NOT NULL,
    PRIMARY KEY (tenant, grp)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS processed (
    id TEXT PRIMARY KEY, expires_at INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS processed_expiry ON processed (expires_at);
CREATE TABLE IF NOT EXISTS managed (
    service TEXT NOT NULL, role TEXT NOT NULL, member TEXT NOT NULL,
    PRIMARY KEY (service, role, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, at INTEGER NOT NULL,
    tenant TEXT, grp TEXT, usr TEXT, service TEXT, role TEXT, member TEXT,
    source TEXT NOT NULL, why TEXT NOT NULL, message_id TEXT);
CREATE INDEX IF NOT EXISTS changes_at ON changes (at);
CREATE TABLE IF NOT EXISTS leases (
    name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_at INTEGER NOT NULL) WITHOUT ROWID;
"""

CHANGE_COLUMNS = "seq, kind, at, tenant, grp, usr, service, role, member, source, why, message_id"


def _use_wal(conn: sqlite3.Connection, patience: float) -> None:
    """Switch the file to WAL (persistent, so usually already done). Switching
    needs a moment alone with the file and, unlike writes, does not wait on the
    busy timeout: processes opening a new database together retry here."""
    deadline = time.monotonic() + patience
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal":
                return
            conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _us(t: dt.datetime) -> int:
    """Microseconds since the epoch; a naive datetime is taken as UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    delta = t - dt.datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds


def _dt(us: int) -> dt.datetime:
    return dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=us)


def _entry(r) -> ChangeEntry:
    """A change-log row (CHANGE_COLUMNS order) as a ChangeEntry."""
    return ChangeEntry(kind=r[1], at=_dt(r[2]), tenant=r[3], group=r[4], user=r[5], service=r[6], role=r[7],
                       member=r[8], source=r[9], why=r[10], message_id=r[11], seq=r[0])


def _chunks(items: list[str]) -> Iterator[list[str]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def _marks(n: int) -> str:
    return ",".join("?" * n)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Turn any SQLite failure (locked past busy_timeout, I/O, missing file) into
    ``Unavailable`` so callers fail closed with 503 (CONTRACT.md §4)."""
    try:
        yield
    except sqlite3.Error as e:
        raise Unavailable(f"sqlite store: {e}") from e


class SqliteStore(Store):
    """The membership store in one SQLite file. Safe to share between threads."""

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT_S):
        self.path = os.path.abspath(path)
        self.busy_timeout = busy_timeout
        self._local = threading.local()
        self._lock = threading.Lock()
        self._conns: dict[threading.Thread, sqlite3.Connection] = {}
        self._closed = False
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
        except OSError as e:
            raise Unavailable(f"sqlite store: cannot create the folder of {self.path}: {e}") from e
        with _translated(), self._write() as conn:
            if conn.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    # -- connections -------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        # timeout= is SQLite's busy_timeout: wait that long for another writer.
        # isolation_level=None: no implicit transactions; we issue BEGIN ourselves.
        # check_same_thread=False only so close() may close connections of other
        # threads; each connection is otherwise used by its own thread alone.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None,
                               check_same_thread=False)
        try:
            # WAL: readers see the last commit while a writer works
            # (https://www.sqlite.org/wal.html). NORMAL is durable across process
            # crashes; a power cut may lose the last commits, which the next delta
            # resync restores from Graph.
            _use_wal(conn, self.busy_timeout)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise Unavailable("sqlite store: closed")
        # Opening may wait out another process's lock for the busy timeout: not while
        # holding the store-wide lock, or every new thread would queue behind that wait.
        conn = self._connect()
        with self._lock:
            if self._closed:
                conn.close()
                raise Unavailable("sqlite store: closed")
            # Threads come and go (tests, thread pools): close what the dead left.
            for thread in [t for t in self._conns if not t.is_alive()]:
                self._conns.pop(thread).close()
            self._conns[threading.current_thread()] = conn
        self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction: all effects commit together or none do."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            # Also after a failed COMMIT: never leave this thread's connection
            # inside a transaction (its next BEGIN would fail).
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for conn in self._conns.values():
                conn.close()
            self._conns.clear()

    # -- reads -------------------------------------------------------------

    def ping(self) -> None:
        self.generation()

    def generation(self) -> int:
        with _translated():
            return self._conn().execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0]

    def membership(self, tenant: str, user: str, groups: Iterable[str]) -> dict[str, bool | None]:
        wanted = list(dict.fromkeys(groups))
        out: dict[str, bool | None] = dict.fromkeys(wanted)
        with _translated():
            conn = self._conn()
            for part in _chunks(wanted):
                # A group row exists once the group was synced; the membership row
                # may exist before that (incremental notification) but does not count.
                rows = conn.execute(
                    "SELECT g.grp, EXISTS (SELECT 1 FROM memberships m"
                    " WHERE m.tenant = g.tenant AND m.grp = g.grp AND m.usr = ?)"
                    f" FROM groups g WHERE g.tenant = ? AND g.grp IN ({_marks(len(part))})",
                    (user, tenant, *part))
                for group, member in rows:
                    out[group] = bool(member)
        return out

    def group_members(self, tenant: str, group: str) -> set[str] | None:
        with _translated():
            rows = self._conn().execute(
                "SELECT m.usr FROM groups g LEFT JOIN memberships m"
                " ON m.tenant = g.tenant AND m.grp = g.grp"
                " WHERE g.tenant = ? AND g.grp = ?", (tenant, group)).fetchall()
        if not rows:
            return None
        return {user for (user,) in rows if user is not None}

    def sync_state(self, tenant: str, group: str) -> SyncState | None:
        with _translated():
            row = self._conn().execute(
                "SELECT delta_link, synced_at FROM groups WHERE tenant = ? AND grp = ?",
                (tenant, group)).fetchone()
        return None if row is None else SyncState(row[0], _dt(row[1]))

    def synced_groups(self) -> set[tuple[str, str]]:
        with _translated():
            return set(self._conn().execute("SELECT tenant, grp FROM groups"))

    def unsync_group(self, tenant: str, group: str) -> bool:
        with _translated(), self._write() as conn:
            if not conn.execute("DELETE FROM groups WHERE tenant = ? AND grp = ?", (tenant, group)).rowcount:
                return False
            _raise_generation(conn)
            return True

    def processed(self, message_ids: Iterable[str]) -> set[str]:
        ids = list(dict.fromkeys(message_ids))
        now = _us(utcnow())
        found: set[str] = set()
        with _translated():
            conn = self._conn()
            for part in _chunks(ids):
                rows = conn.execute(
                    f"SELECT id FROM processed WHERE id IN ({_marks(len(part))}) AND expires_at > ?",
                    (*part, now))
                found.update(r[0] for r in rows)
        return found

    def managed_members(self, service: str) -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        with _translated():
            rows = self._conn().execute(
                "SELECT role, member FROM managed WHERE service = ?", (service,)).fetchall()
        for role, member in rows:
            out.setdefault(role, set()).add(member)
        return out

    def managed_targets(self) -> set[str]:
        with _translated():
            return {r[0] for r in self._conn().execute("SELECT DISTINCT service FROM managed")}

    def adopt_managed(self, legacy: str, cloud_run: str) -> bool:
        with _translated(), self._write() as conn:
            conn.execute("INSERT OR IGNORE INTO managed SELECT ?, role, member FROM managed WHERE service = ?",
                         (cloud_run, legacy))
            return conn.execute("DELETE FROM managed WHERE service = ?", (legacy,)).rowcount > 0

    def last_seq(self) -> int:
        with _translated():
            return self._conn().execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]

    def changes_after(self, seq: int) -> list[ChangeEntry]:
        with _translated():
            rows = self._conn().execute(f"SELECT {CHANGE_COLUMNS} FROM changes WHERE seq > ? ORDER BY seq",
                                        (seq,)).fetchall()
        return [_entry(r) for r in rows]

    def changes(self, since: dt.datetime | None = None, limit: int | None = None) -> list[ChangeEntry]:
        sql = f"SELECT {CHANGE_COLUMNS} FROM changes"
        args: list[object] = []
        if since is not None:
            sql += " WHERE at >= ?"
            args.append(_us(since))
        sql += " ORDER BY seq"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with _translated():
            rows = self._conn().execute(sql, args).fetchall()
        return [_entry(r) for r in rows]

    # -- writes ------------------------------------------------------------

    def apply(self, update: GroupUpdate, processed_ttl: float = 7 * 86400) -> list[ChangeEntry]:
        check_update(update)
        now = utcnow()
        message_id = ",".join(update.message_ids) or None
        with _translated(), self._write() as conn:
            to_add, to_remove = self._apply_members(conn, update, now, message_id)
            row = conn.execute("SELECT delta_link, synced_at FROM groups WHERE tenant = ? AND grp = ?",
                               (update.tenant, update.group)).fetchone()
            # Raised inside the transaction: the rows written above roll back.
            check_expected_sync(update, None if row is None else SyncState(row[0], _dt(row[1])),
                                bool(to_add or to_remove))
            first_sync = update.sync is not None and row is None
            if update.drop_link:
                conn.execute("UPDATE groups SET delta_link = NULL WHERE tenant = ? AND grp = ?",
                             (update.tenant, update.group))
            if update.sync is not None:
                conn.execute("INSERT INTO groups VALUES (?, ?, ?, ?) ON CONFLICT (tenant, grp)"
                             " DO UPDATE SET delta_link = excluded.delta_link, synced_at = excluded.synced_at",
                             (update.tenant, update.group, update.sync.delta_link,
                              _us(update.sync.synced_at)))
            self._mark_processed(conn, update.message_ids, now, processed_ttl)
            entries = member_entries(update, to_add, to_remove, self._next_at(conn, now), message_id)
            entries = self._log(conn, entries)
            # A first sync turns "unknown" into "not a member": readers must see it too.
            if to_add or to_remove or first_sync:
                _raise_generation(conn)
        return entries

    @staticmethod
    def _apply_members(conn: sqlite3.Connection, update: GroupUpdate, now: dt.datetime,
                       message_id: str | None) -> tuple[list[str], list[str]]:
        """Write the membership rows; return the users really added and removed."""
        key = (update.tenant, update.group)
        insert = "INSERT OR IGNORE INTO memberships VALUES (?, ?, ?, ?, ?, ?)"
        delete = "DELETE FROM memberships WHERE tenant = ? AND grp = ? AND usr = ?"
        row = (_us(now), update.source, message_id)
        if update.replace is not None:
            current = {u for (u,) in conn.execute(
                "SELECT usr FROM memberships WHERE tenant = ? AND grp = ?", key)}
            target = update.replace - update.removed
            to_add, to_remove = sorted(target - current), sorted(current - target)
            conn.executemany(insert, [(*key, u, *row) for u in to_add])
            conn.executemany(delete, [(*key, u) for u in to_remove])
            return to_add, to_remove
        # rowcount tells whether the row was really there (or not): no full read
        # of a large group for an incremental change.
        to_add = [u for u in sorted(update.added - update.removed)
                  if conn.execute(insert, (*key, u, *row)).rowcount]
        to_remove = [u for u in sorted(update.removed) if conn.execute(delete, (*key, u)).rowcount]
        return to_add, to_remove

    def record_iam(self, service: str, desired: Mapping[str, set[str]], *, source: str, why: str,
                   message_id: str | None = None, claim: bool = False, written: IamWrite | None = None,
                   lease: tuple[str, str] | None = None) -> list[ChangeEntry]:
        with _translated(), self._write() as conn:
            if lease is not None:
                row = conn.execute("SELECT holder FROM leases WHERE name = ?", (lease[0],)).fetchone()
                if row is None or row[0] != lease[1]:
                    raise Unavailable(f"lease {lease[0]} was lost")
            current: dict[str, set[str]] = {}
            for role, member in conn.execute("SELECT role, member FROM managed WHERE service = ?",
                                             (service,)):
                current.setdefault(role, set()).add(member)
            added, removed = diff_iam(current, desired)
            conn.executemany("INSERT INTO managed VALUES (?, ?, ?)", [(service, r, m) for r, m in added])
            conn.executemany("DELETE FROM managed WHERE service = ? AND role = ? AND member = ?",
                             [(service, r, m) for r, m in removed])
            at = self._next_at(conn, utcnow())
            return self._log(conn, iam_entries(service, added, removed, at, source, why, message_id,
                                               claim=claim, written=written))

    def acquire_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        now = utcnow()
        with _translated(), self._write() as conn:
            row = conn.execute("SELECT holder, expires_at FROM leases WHERE name = ?", (name,)).fetchone()
            if row is not None and row[0] != holder and row[1] > _us(now):
                return False
            conn.execute("INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE"
                         " SET holder = excluded.holder, expires_at = excluded.expires_at",
                         (name, holder, _us(now + dt.timedelta(seconds=ttl_seconds))))
            return True

    def renew_lease(self, name: str, holder: str, ttl_seconds: float) -> bool:
        expires = _us(utcnow() + dt.timedelta(seconds=ttl_seconds))
        with _translated(), self._write() as conn:
            return conn.execute("UPDATE leases SET expires_at = ? WHERE name = ? AND holder = ?",
                                (expires, name, holder)).rowcount > 0

    def release_lease(self, name: str, holder: str) -> None:
        with _translated(), self._write() as conn:
            conn.execute("DELETE FROM leases WHERE name = ? AND holder = ?", (name, holder))

    def lease_holder(self, name: str) -> str | None:
        with _translated():
            row = self._conn().execute("SELECT holder FROM leases WHERE name = ? AND expires_at > ?",
                                       (name, _us(utcnow()))).fetchone()
        return row[0] if row else None

    # -- helpers (inside a write transaction) -------------------------------

    @staticmethod
    def _mark_processed(conn: sqlite3.Connection, ids: Iterable[str], now: dt.datetime,
                        ttl: float) -> None:
        # Expired ids are purged here, lazily: an indexed range delete, usually empty.
        conn.execute("DELETE FROM processed WHERE expires_at <= ?", (_us(now),))
        expires = _us(now + dt.timedelta(seconds=ttl))
        conn.executemany("INSERT INTO processed VALUES (?, ?) ON CONFLICT (id)"
                         " DO UPDATE SET expires_at = excluded.expires_at",
                         [(i, expires) for i in ids])

    @staticmethod
    def _next_at(conn: sqlite3.Connection, now: dt.datetime) -> dt.datetime:
        last = conn.execute("SELECT MAX(at) FROM changes").fetchone()[0]
        return monotonic_at(now, None if last is None else _dt(last))

    @staticmethod
    def _log(conn: sqlite3.Connection, entries: list[ChangeEntry]) -> list[ChangeEntry]:
        out = []
        for e in entries:
            cur = conn.execute(
                "INSERT INTO changes (kind, at, tenant, grp, usr, service, role, member, source, why,"
                " message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (e.kind, _us(e.at), e.tenant, e.group, e.user, e.service, e.role, e.member, e.source,
                 e.why, e.message_id))
            out.append(dataclasses.replace(e, seq=cur.lastrowid))
        return out


def _raise_generation(conn: sqlite3.Connection) -> None:
    # Inside the write transaction (BEGIN IMMEDIATE): nobody changes it in between.
    (current,) = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
    conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'", (generation_after(current),))

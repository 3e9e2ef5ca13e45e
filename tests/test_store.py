"""The membership store contract (store/base.py), run against both backends.

Every test takes the ``store`` fixture, once per backend: SQLite in a temporary
folder, and Firestore in the real emulator, each test in a project of its own so
no state leaks between tests. Backend-specific tests (outages, URL parsing) are
at the end.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import sqlite3
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from google.api_core import exceptions as gexc

from aadrun.coalesce import StoreLease
from aadrun.errors import ConfigError, Unavailable
from aadrun.store import ChangeEntry, GroupUpdate, IamWrite, Store, SyncConflict, SyncState, open_store, utcnow
from aadrun.store.firestore import FirestoreStore, doc_id
from aadrun.store.sqlite import SqliteStore
from aadrun.verify import MembershipView
from tests.support.emulators import free_port
from tests.support.flaky_grpc import FlakyMethod

T = "11111111-1111-1111-1111-111111111111"
G = "aaaaaaaa-0000-0000-0000-000000000001"
G2 = "aaaaaaaa-0000-0000-0000-000000000002"


def synced(link: str = "https://graph.example/delta?token=1") -> SyncState:
    return SyncState(link, utcnow())


def users(*names: str) -> frozenset[str]:
    return frozenset(names)


# Short expiries (processed ids, leases): long enough for a slow machine to make
# the calls that must happen before it, waited out exactly.
TTL = 0.5


def sleep_past(deadline: float) -> None:
    time.sleep(max(0.0, deadline - time.monotonic()) + 0.05)


@pytest.fixture(params=["sqlite", "firestore"])
def backend(request):
    """A factory of stores on one backing database: call it twice to get two
    instances (two processes, in effect) that share state."""
    if request.param == "sqlite":
        path = str(request.getfixturevalue("tmp_path") / "state" / "aadrun.db")
        factory = lambda: SqliteStore(path)  # noqa: E731
    else:
        request.getfixturevalue("firestore_emulator")
        project = f"aadrun-test-{uuid.uuid4().hex[:12]}"
        factory = lambda: FirestoreStore(project=project)  # noqa: E731
    opened: list[Store] = []

    def make() -> Store:
        opened.append(factory())
        return opened[-1]

    make.backing = path if request.param == "sqlite" else project
    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(backend) -> Store:
    return backend()


# -- membership and sync state ----------------------------------------------


def test_never_synced_group_is_unknown(store):
    assert store.membership(T, "u1", [G, G2]) == {G: None, G2: None}
    assert store.group_members(T, G) is None
    assert store.sync_state(T, G) is None
    assert store.membership(T, "u1", []) == {}


def test_apply_with_sync_marks_the_group_synced(store):
    sync = synced()
    store.apply(GroupUpdate(T, G, added=users("u1", "u2"), sync=sync))
    assert store.membership(T, "u1", [G, G2]) == {G: True, G2: None}
    assert store.membership(T, "u3", [G]) == {G: False}
    assert store.group_members(T, G) == {"u1", "u2"}
    assert store.sync_state(T, G) == sync
    newer = SyncState("https://graph.example/delta?token=2", sync.synced_at + dt.timedelta(minutes=5))
    store.apply(GroupUpdate(T, G, sync=newer))
    assert store.sync_state(T, G) == newer


def test_synced_empty_group_answers_false_not_unknown(store):
    store.apply(GroupUpdate(T, G, replace=frozenset(), sync=synced()))
    assert store.group_members(T, G) == set()
    assert store.membership(T, "u1", [G]) == {G: False}


def test_members_added_before_the_first_sync_stay_unknown(store):
    # An incremental notification may arrive before the first full read.
    store.apply(GroupUpdate(T, G, added=users("u1")))
    assert store.membership(T, "u1", [G]) == {G: None}
    assert store.group_members(T, G) is None
    store.apply(GroupUpdate(T, G, sync=synced()))
    assert store.membership(T, "u1", [G]) == {G: True}


def test_a_forgotten_group_is_never_synced_and_its_members_are_logged_removed(store):
    store.apply(GroupUpdate(T, G, added=users("u1", "u2"), sync=synced()))
    store.apply(GroupUpdate(T, G2, added=users("u1"), sync=synced()))
    assert store.synced_groups() == {(T, G), (T, G2)}
    generation = store.generation()
    entries = store.forget_group(T, G, source="maintenance", why="no policy names the group")
    assert sorted((e.kind, e.user, e.source) for e in entries) == [
        ("member_removed", "u1", "maintenance"), ("member_removed", "u2", "maintenance")]
    assert store.membership(T, "u1", [G, G2]) == {G: None, G2: True}
    assert store.group_members(T, G) is None and store.sync_state(T, G) is None
    assert store.synced_groups() == {(T, G2)}
    assert store.generation() != generation   # verify instances see it at once
    assert store.forget_group(T, G, source="maintenance", why="again") == []


def test_forgetting_an_empty_group_makes_it_unknown_to_verify_at_once(store):
    store.apply(GroupUpdate(T, G, replace=frozenset(), sync=synced()))
    generation = store.generation()
    assert store.forget_group(T, G, source="maintenance", why="no policy names the group") == []
    assert store.membership(T, "u1", [G]) == {G: None}
    assert store.generation() != generation   # cached "not a member" answers are dropped


def test_a_group_read_again_while_being_forgotten_keeps_its_members(store):
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    looked = store.sync_state

    def read_lands_meanwhile(tenant, group):   # a read by an instance whose policy names it
        state = looked(tenant, group)
        store.apply(GroupUpdate(T, G, replace=users("u1", "u2"), sync=synced(), expect_synced_at=state.synced_at))
        return state

    store.sync_state = read_lands_meanwhile
    assert store.forget_group(T, G, source="maintenance", why="no policy names the group") == []
    del store.sync_state
    assert store.group_members(T, G) == {"u1", "u2"} and store.sync_state(T, G).delta_link


def test_a_read_that_began_before_a_forget_cannot_sync_the_group_again(backend):
    reader, forgetter = backend(), backend()   # two instances on one store
    reader.apply(GroupUpdate(T, G, replace=users("u1", "u2"), sync=synced("L1"), source="graph-delta"))
    seen = reader.sync_state(T, G)             # an incremental read begins
    forgetter.forget_group(T, G, source="maintenance", why="no policy names the group")
    with pytest.raises(SyncConflict):          # Graph: no change since L1, yet the store lost u1, u2
        reader.apply(GroupUpdate(T, G, sync=synced("L2"), expect_synced_at=seen.synced_at, source="graph-delta"))
    assert reader.sync_state(T, G) is None and reader.membership(T, "u1", [G]) == {G: None}


def test_a_forget_cut_short_leaves_the_group_empty_without_a_link_and_is_finished_later(store):
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    store.unsync_group = lambda tenant, group: (_ for _ in ()).throw(Unavailable("store: gone"))
    with pytest.raises(Unavailable) as failed:
        store.forget_group(T, G, source="maintenance", why="no policy names the group")
    # The removals committed: the error carries them, for the audit log.
    assert [(e.kind, e.user) for e in failed.value.committed] == [("member_removed", "u1")]
    del store.unsync_group
    assert store.group_members(T, G) == set() and store.sync_state(T, G).delta_link is None
    assert store.synced_groups() == {(T, G)}   # so the next forget finds it
    assert store.forget_group(T, G, source="maintenance", why="no policy names the group") == []
    assert store.sync_state(T, G) is None


def test_removed(store):
    store.apply(GroupUpdate(T, G, added=users("u1", "u2"), sync=synced()))
    entries = store.apply(GroupUpdate(T, G, removed=users("u1", "never-member")))
    assert [(e.kind, e.user) for e in entries] == [("member_removed", "u1")]
    assert store.group_members(T, G) == {"u2"}
    assert store.membership(T, "u1", [G]) == {G: False}


def test_replace_writes_the_difference(store):
    store.apply(GroupUpdate(T, G, added=users("u1", "u2"), sync=synced()))
    entries = store.apply(GroupUpdate(T, G, replace=users("u2", "u3", "u4"), removed=users("u4"),
                                      sync=synced(), source="graph-delta", why="full read"))
    assert sorted((e.kind, e.user) for e in entries) == [("member_added", "u3"), ("member_removed", "u1")]
    assert store.group_members(T, G) == {"u2", "u3"}


def test_removal_wins_over_addition_in_one_update(store):
    # Fail closed: an add and a remove of one user in one update cannot be ordered.
    store.apply(GroupUpdate(T, G, added=users("u1"), removed=users("u1"), sync=synced()))
    assert store.membership(T, "u1", [G]) == {G: False}


def test_replace_and_added_are_exclusive(store):
    with pytest.raises(ValueError):
        store.apply(GroupUpdate(T, G, added=users("u1"), replace=users("u2")))
    assert store.group_members(T, G) is None


def test_an_update_expecting_an_older_sync_state_changes_no_member(backend):
    """A Graph answer applied over another instance's read committed meanwhile: nothing
    written (the ids not marked either) when it would change members."""
    store, other = backend(), backend()
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced("link-1")))
    before = store.sync_state(T, G)
    other.apply(GroupUpdate(T, G, added=users("u2"), sync=synced("link-2")))   # the newer read
    generation = store.generation()
    older = GroupUpdate(T, G, replace=users("u1"), sync=synced("link-old"), message_ids=("m1",),
                        expect_synced_at=before.synced_at)
    with pytest.raises(SyncConflict):
        store.apply(older)
    assert store.group_members(T, G) == {"u1", "u2"} and store.sync_state(T, G).delta_link == "link-2"
    assert store.processed(["m1"]) == set() and store.generation() == generation
    assert [e.user for e in store.changes()] == ["u1", "u2"]
    with pytest.raises(SyncConflict):   # nor an incremental answer
        store.apply(GroupUpdate(T, G, removed=users("u2"), expect_synced_at=before.synced_at))
    # An answer that changes no member is applied; so is one that expects the current state.
    store.apply(GroupUpdate(T, G, replace=users("u1", "u2"), sync=synced("link-3"), expect_synced_at=before.synced_at))
    assert store.sync_state(T, G).delta_link == "link-3"
    store.apply(GroupUpdate(T, G, replace=users("u1"), sync=synced("link-4"), expect_synced_at=store.sync_state(T, G).synced_at))
    assert store.group_members(T, G) == {"u1"}
    # A removal that dropped the link meanwhile is no other read: no conflict.
    before = store.sync_state(T, G)
    other.apply(GroupUpdate(T, G, removed=users("u9"), drop_link=True))
    store.apply(GroupUpdate(T, G, added=users("u3"), sync=synced("link-5"), expect_synced_at=before.synced_at))
    assert store.group_members(T, G) == {"u1", "u3"}


def test_drop_link_forgets_the_link_in_the_commit_and_keeps_the_sync_time(store):
    store.apply(GroupUpdate(T, G2, removed=users("u1"), drop_link=True))   # never synced: stays so
    assert store.sync_state(T, G2) is None
    sync = synced("link-1")
    store.apply(GroupUpdate(T, G, added=users("u1", "u2"), sync=sync))
    store.apply(GroupUpdate(T, G, removed=users("u1"), drop_link=True))
    assert store.sync_state(T, G) == SyncState(None, sync.synced_at) and store.group_members(T, G) == {"u2"}
    with pytest.raises(ValueError):
        store.apply(GroupUpdate(T, G, drop_link=True, sync=sync))


def test_an_update_expecting_a_never_synced_group_conflicts_with_a_first_read(backend):
    store, other = backend(), backend()
    other.apply(GroupUpdate(T, G, replace=users("u1", "u2"), sync=synced()))
    with pytest.raises(SyncConflict):
        store.apply(GroupUpdate(T, G, replace=users("u1"), sync=synced(), expect_synced_at=None))
    assert store.group_members(T, G) == {"u1", "u2"}


def test_groups_of_tenants_are_separate(store):
    other = "22222222-2222-2222-2222-222222222222"
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    assert store.membership(other, "u1", [G]) == {G: None}


@pytest.mark.parametrize("group, user, other_group, other_user", [
    ("a~b", "c", "a", "b~c"),                    # the id separator inside a value
    ("a/b", "c", "a", "b/c"),                    # '/' is a path separator in Firestore
    ("__x__", "..", "__x", "_.."),               # reserved document ids
    ("g", "x" * 2000, "g", "x" * 1999),          # past the 1,500-byte id limit
])
def test_awkward_ids_round_trip_without_collisions(store, group, user, other_group, other_user):
    store.apply(GroupUpdate(T, group, added=users(user), sync=synced()))
    store.apply(GroupUpdate(T, other_group, sync=synced()))
    assert store.group_members(T, group) == {user}
    assert store.membership(T, user, [group]) == {group: True}
    assert store.membership(T, other_user, [other_group]) == {other_group: False}


def test_awkward_names_of_messages_leases_and_services(store):
    ids = ("..", "__m__", "a/b", "a~b")
    store.apply(GroupUpdate(T, G, message_ids=ids))
    assert store.processed([*ids, ".", "a"]) == set(ids)
    assert store.acquire_lease("__lease__", "h/1", 30)
    assert not store.acquire_lease("__lease__", "h/2", 30)
    store.record_iam("..", {"roles/run.invoker": {"p/1"}}, source="s", why="w")
    store.record_iam("a/b", {"roles/run.invoker": {"p/2"}}, source="s", why="w")
    assert store.managed_members("..") == {"roles/run.invoker": {"p/1"}}
    assert store.managed_members("a/b") == {"roles/run.invoker": {"p/2"}}


def test_doc_ids_are_valid_and_distinct():
    ids = [doc_id("a~b", "c"), doc_id("a", "b~c"), doc_id("a/b"), doc_id("."), doc_id(".."),
           doc_id("__x__"), doc_id("x" * 2000), doc_id("x" * 1999)]
    assert len(set(ids)) == len(ids)
    for i in ids:
        assert "/" not in i and i not in (".", "..") and len(i.encode()) <= 1500
        assert not (i.startswith("__") and i.endswith("__"))


# -- change log and generation ------------------------------------------------


def test_change_log_holds_only_real_differences(store):
    before = utcnow()
    first = store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced(), message_ids=("m1",),
                                    source="notification", why="members@delta"))
    assert len(first) == 1
    e = first[0]
    assert (e.kind, e.tenant, e.group, e.user) == ("member_added", T, G, "u1")
    assert (e.source, e.why, e.message_id) == ("notification", "members@delta", "m1")
    assert before <= e.at <= utcnow() and e.seq is not None
    assert store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced(), message_ids=("m2",))) == []
    assert store.apply(GroupUpdate(T, G, replace=users("u1"))) == []
    assert store.changes() == first


def test_seq_increases_and_since_filters(store):
    written = []
    for i in range(3):
        written += store.apply(GroupUpdate(T, G, added=users(f"a{i}", f"b{i}"), sync=synced()))
        time.sleep(0.01)
    log = store.changes()
    assert log == written
    seqs = [e.seq for e in log]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert [e.at for e in log] == sorted(e.at for e in log)
    assert store.changes(since=log[2].at) == log[2:]
    assert store.changes(since=log[2].at, limit=3) == log[2:5]
    assert store.changes(limit=1) == log[:1]
    assert store.changes(since=utcnow() + dt.timedelta(seconds=1)) == []


def test_generation_changes_on_membership_change_only(store):
    g0 = store.generation()
    store.apply(GroupUpdate(T, G, sync=synced()))
    g1 = store.generation()
    assert g1 != g0, "a first sync turns unknown into not-a-member"
    store.apply(GroupUpdate(T, G, added=users("u1")))
    g2 = store.generation()
    assert g2 != g1
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced(), message_ids=("m1",)))
    store.apply(GroupUpdate(T, G, removed=users("nobody")))
    store.record_iam("billing-api", {"roles/run.invoker": {"principal://x/u1"}}, source="t", why="t")
    store.acquire_lease("maintenance", "h1", 30)
    assert store.generation() == g2
    store.apply(GroupUpdate(T, G, removed=users("u1")))
    assert store.generation() not in (g0, g1, g2)


def _restore_point(backend):
    """A function that takes the backing database back to what it holds now: a SQLite
    backup copied back; for Firestore, an empty database (what an emulator restart
    leaves, and what an import of an export taken before the first write restores)."""
    if isinstance(backend.backing, str) and os.path.isabs(backend.backing):
        snapshot = sqlite3.connect(":memory:")
        with contextlib.closing(sqlite3.connect(backend.backing)) as live:
            live.backup(snapshot)

        def restore() -> None:
            with contextlib.closing(sqlite3.connect(backend.backing)) as live:
                snapshot.backup(live)
        return restore

    def wipe() -> None:
        url = (f"http://{os.environ['FIRESTORE_EMULATOR_HOST']}/emulator/v1/projects/{backend.backing}"
               "/databases/(default)/documents")
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10).close()
    return wipe


def test_a_restored_store_never_comes_back_to_a_generation_a_reader_cached(backend):
    # verify caches "bob is a member" at some generation. The store is restored from a
    # backup, then as many changes as it lost bring a plain counter back to that same
    # number, the last one leaving bob out: verify must see a change, not its old view.
    store = backend()
    restore = _restore_point(backend)
    store.apply(GroupUpdate(T, G, replace=users("bob"), sync=synced()))
    clock = [0.0]
    view = MembershipView(lambda: store, 0.2, clock=lambda: clock[0])
    assert view.lookup(T, "bob", (G,)) == {G: True}
    restore()
    store.apply(GroupUpdate(T, G, sync=synced()))    # G synced again, without bob
    assert store.membership(T, "bob", [G]) == {G: False}
    clock[0] += 0.3                                  # the next generation poll
    assert view.lookup(T, "bob", (G,)) == {G: False}


def test_generation_is_shared_between_instances(backend):
    a, b = backend(), backend()
    g = b.generation()
    a.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    assert b.generation() != g
    assert b.membership(T, "u1", [G]) == {G: True}


# -- updates larger than one commit ----------------------------------------------

BIG = frozenset(f"0b000000-0000-0000-0000-{n:012d}" for n in range(25))


def test_an_update_larger_than_one_commit_is_applied_whole(backend):
    store = backend()
    store.max_changes_per_commit = 10   # Firestore commits it in parts (SQLite ignores it)
    added = store.apply(GroupUpdate(T, G, replace=BIG, sync=synced(), message_ids=("full-read",), source="t"))
    assert store.group_members(T, G) == set(BIG) and store.processed(["full-read"]) == {"full-read"}
    assert sorted(e.user for e in added) == sorted(BIG) and {e.message_id for e in added} == {"full-read"}
    assert [e.seq for e in store.changes()] == list(range(1, 26))
    # The group deleted: every member goes, removals before anything else.
    gone = store.apply(GroupUpdate(T, G, replace=frozenset(), sync=synced(), message_ids=("deleted",), source="t"))
    assert store.group_members(T, G) == set() and {e.kind for e in gone} == {"member_removed"} and len(gone) == 25
    # A large incremental page: removals first, then additions, the sync state last.
    half = frozenset(sorted(BIG)[:12])
    store.apply(GroupUpdate(T, G, added=BIG, sync=synced(), source="t"))
    page = store.apply(GroupUpdate(T, G, added=users("new-1"), removed=half, sync=synced("link-2"),
                                   message_ids=("page",), source="t"))
    assert store.group_members(T, G) == (set(BIG) - half) | {"new-1"} and store.sync_state(T, G).delta_link == "link-2"
    assert sorted(e.kind for e in page) == ["member_added"] + ["member_removed"] * 12


class _FailingAfter(FirestoreStore):
    """Commits ``parts`` transactions, then fails like an outage (a crash between parts)."""

    parts = 0

    def _apply(self, txn, update, *args):
        if self.parts == 0:
            raise Unavailable("outage")
        self.parts -= 1
        return super()._apply(txn, update, *args)


class _ContendedReads(FirestoreStore):
    """Its transactions' reads meet ``aborts`` Aborted errors first (lock contention
    the client library retries only at commit)."""

    aborts = 0

    def _apply(self, txn, update, *args):
        if self.aborts:
            self.aborts -= 1
            raise gexc.Aborted("Transaction lock timeout.")
        return super()._apply(txn, update, *args)


def test_an_update_whose_reads_meet_contention_is_retried_and_applied_once(firestore_emulator):
    store = _ContendedReads(project=f"aadrun-test-{uuid.uuid4().hex[:12]}")
    store.apply(GroupUpdate(T, G, replace=users("ann"), sync=synced(), source="t"))
    store.aborts = 3
    entries = store.apply(GroupUpdate(T, G, added=users("bob"), message_ids=("m1",), source="t"))
    assert [(e.kind, e.user) for e in entries] == [("member_added", "bob")] and store.aborts == 0
    assert store.group_members(T, G) == {"ann", "bob"} and store.processed(["m1"]) == {"m1"}
    assert [e.user for e in store.changes()] == ["ann", "bob"]                 # logged once
    # Contention that outlasts every attempt fails closed, and writes nothing.
    store.aborts = 10**6
    with pytest.raises(Unavailable):
        store.apply(GroupUpdate(T, G, removed=users("ann"), message_ids=("m2",), source="t"))
    assert store.group_members(T, G) == {"ann", "bob"} and store.processed(["m2"]) == set()
    store.close()


def test_full_reads_of_different_groups_at_once_do_not_hold_each_other_up(firestore_emulator):
    # policy_sync reads up to 8 groups at once, and every removal makes its group's
    # next read a full one. A query inside a transaction held every other group's
    # writes on the emulator: most of these commits failed after 2 s lock timeouts.
    store = FirestoreStore(project=f"aadrun-test-{uuid.uuid4().hex[:12]}")
    failures: list[Exception] = []

    def reads(k: int) -> None:
        for i in range(8):
            try:
                store.apply(GroupUpdate(T, f"{G[:-1]}{k}", replace=users(f"u{i}", f"v{i}"), sync=synced()))
            except Exception as e:  # noqa: BLE001 - collected for the assertion
                failures.append(e)
    threads = [threading.Thread(target=reads, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []
    assert all(store.group_members(T, f"{G[:-1]}{k}") == {"u7", "v7"} for k in range(4))
    store.close()


class _ChangedDuringRead(FirestoreStore):
    """Commits ``sneak`` (an incremental update) right after a full read's query."""

    sneak: GroupUpdate | None = None

    def _members_at(self, tenant, group, version):
        answer = super()._members_at(tenant, group, version)
        if self.sneak is not None:
            sneak, self.sneak = self.sneak, None
            FirestoreStore.apply(self, sneak)
        return answer


def test_a_full_read_meeting_a_member_change_after_its_query_reads_again(firestore_emulator):
    # The members are queried outside the transaction: one added in between must still
    # be seen, and removed, by the full read that commits after it.
    store = _ChangedDuringRead(project=f"aadrun-test-{uuid.uuid4().hex[:12]}")
    store.apply(GroupUpdate(T, G, replace=users("ann", "bob"), sync=synced()))
    store.sneak = GroupUpdate(T, G, added=users("eve"), source="notification")
    entries = store.apply(GroupUpdate(T, G, replace=users("ann"), sync=synced()))
    assert store.group_members(T, G) == {"ann"}
    assert sorted((e.kind, e.user) for e in entries) == [("member_removed", "bob"), ("member_removed", "eve")]
    store.close()


def test_a_first_read_cut_between_its_parts_stays_unknown_until_its_redelivery_finishes_it(firestore_emulator):
    project = f"aadrun-test-{uuid.uuid4().hex[:12]}"
    store = _FailingAfter(project=project)
    store.max_changes_per_commit, store.parts = 10, 2
    update = GroupUpdate(T, G, replace=BIG, sync=synced(), message_ids=("full-read",), source="t")
    with pytest.raises(Unavailable) as cut:
        store.apply(update)
    assert len(cut.value.committed) == 20                            # two parts: for the audit log
    assert store.membership(T, sorted(BIG)[0], [G]) == {G: None}     # not synced: verify says unknown
    # Marked with the first part: its redelivery is seen as one (policy_sync re-checks IAM).
    assert store.processed(["full-read"]) == {"full-read"}
    store.parts = 10**6
    store.apply(update)
    assert store.group_members(T, G) == set(BIG) and store.processed(["full-read"]) == {"full-read"}
    assert sorted(e.user for e in store.changes()) == sorted(BIG)   # each member logged once
    # Cut after its first part, a page that adds and removes has removed, not added.
    newcomers = frozenset(f"0d000000-0000-0000-0000-{n:012d}" for n in range(15))
    store.parts = 1
    with pytest.raises(Unavailable):
        store.apply(GroupUpdate(T, G, added=newcomers, removed=BIG, sync=synced(), source="t"))
    assert len(store.group_members(T, G)) == 15 and not store.group_members(T, G) & newcomers
    store.close()


def test_a_first_read_of_a_large_group_fits_firestore_commits(firestore_emulator):
    # 6,000 members are about 4.6 MB of writes: more than one emulator commit takes (4 MiB;
    # production takes 10 MiB, about 13,000 members).
    store = FirestoreStore(project=f"aadrun-test-{uuid.uuid4().hex[:12]}", timeout=30)   # size, not speed
    members = frozenset(f"0c000000-0000-0000-0000-{n:012d}" for n in range(6000))
    store.apply(GroupUpdate(T, G, replace=members, sync=synced(), source="t"))
    assert len(store.group_members(T, G)) == 6000
    store.close()


# -- processed message ids ---------------------------------------------------


def test_processed_ids(store):
    assert store.processed(["m1", "m2"]) == set()
    store.apply(GroupUpdate(T, G, added=users("u1"), message_ids=("m1", "m2")))
    assert store.processed(["m1", "m2", "m3"]) == {"m1", "m2"}
    assert store.processed([]) == set()


def test_processed_ids_expire_and_are_purged(store):
    if isinstance(store, FirestoreStore):
        store.purge_interval = 0  # purge on every apply, to observe it here
    store.apply(GroupUpdate(T, G, message_ids=("kept",)))
    expiry = time.monotonic() + TTL
    store.apply(GroupUpdate(T, G, message_ids=("old",)), processed_ttl=TTL)
    assert store.processed(["old", "kept"]) == {"old", "kept"}
    sleep_past(expiry)
    assert store.processed(["old", "kept"]) == {"kept"}
    store.apply(GroupUpdate(T, G, message_ids=("new",)))
    assert stored_processed_ids(store) == {"kept", "new"}


def stored_processed_ids(store) -> set[str]:
    """What is physically kept, expired or not (to see the lazy purge)."""
    if isinstance(store, SqliteStore):
        with sqlite3.connect(store.path) as conn:
            return {r[0] for r in conn.execute("SELECT id FROM processed")}
    return {snap.get("id") for snap in store._client.collection("processed").stream()}


# -- managed IAM members -----------------------------------------------------


def test_record_iam_logs_what_the_set_call_did_and_claims_as_such(store):
    invoker = "roles/run.invoker"
    store.record_iam("billing-api", {invoker: {"p/u1", "p/u2"}}, source="s", why="w")
    # A claim before the set call: no access changes yet.
    claimed = store.record_iam("billing-api", {invoker: {"p/u1", "p/u2", "p/u3"}}, source="s", why="w", claim=True)
    assert [(e.kind, e.member) for e in claimed] == [("iam_claimed", "p/u3")]
    # The set call added u3 and put u1 back (drift repair), revoked u2; u4's claim went unwritten.
    store.record_iam("billing-api", {invoker: {"p/u1", "p/u2", "p/u3", "p/u4"}}, source="s", why="w", claim=True)
    written = IamWrite(added={invoker: frozenset({"p/u1", "p/u3"})}, removed={invoker: frozenset({"p/u2"})},
                       restored={invoker: frozenset({"p/u1", "p/u9"})})
    entries = store.record_iam("billing-api", {invoker: {"p/u1", "p/u3"}}, source="maintenance",
                               why="IAM drift repaired", written=written)
    assert sorted((e.kind, e.member, e.source) for e in entries) == [
        ("iam_added", "p/u3", "maintenance"), ("iam_removed", "p/u2", "maintenance"),
        ("iam_restored", "p/u1", "maintenance"), ("iam_unclaimed", "p/u4", "maintenance")]
    assert store.managed_members("billing-api") == {invoker: {"p/u1", "p/u3"}}
    # A set call that changed nothing, over a managed set that did not change either: no entry.
    assert store.record_iam("billing-api", {invoker: {"p/u1", "p/u3"}}, source="s", why="w",
                            written=IamWrite({}, {})) == []


def test_record_iam_logs_each_difference(store):
    invoker, viewer = "roles/run.invoker", "roles/run.viewer"
    assert store.managed_members("billing-api") == {}
    first = store.record_iam("billing-api", {invoker: {"p/u1", "p/u2"}}, source="policy_sync",
                             why="group change", message_id="m1")
    assert sorted((e.kind, e.role, e.member) for e in first) == [
        ("iam_added", invoker, "p/u1"), ("iam_added", invoker, "p/u2")]
    assert all(e.service == "billing-api" and e.message_id == "m1" and e.source == "policy_sync"
               for e in first)
    second = store.record_iam("billing-api", {invoker: {"p/u2"}, viewer: {"p/u3"}}, source="s", why="w")
    assert sorted((e.kind, e.role, e.member) for e in second) == [
        ("iam_added", viewer, "p/u3"), ("iam_removed", invoker, "p/u1")]
    assert store.managed_members("billing-api") == {invoker: {"p/u2"}, viewer: {"p/u3"}}
    assert store.record_iam("billing-api", {invoker: {"p/u2"}, viewer: {"p/u3"}}, source="s", why="w") == []
    assert store.managed_members("other-api") == {}
    third = store.record_iam("billing-api", {invoker: set()}, source="s", why="w")
    assert sorted(e.kind for e in third) == ["iam_removed", "iam_removed"]
    assert store.managed_members("billing-api") == {}
    assert store.changes() == first + second + third


def test_members_kept_under_a_service_name_are_adopted_by_its_resource_without_a_log_entry(store):
    run, invoker = "projects/p/locations/europe-west1/services/billing", "roles/run.invoker"
    store.record_iam("billing", {invoker: {"p/u1", "p/u2"}}, source="s", why="an earlier version")
    store.record_iam(run, {invoker: {"p/u2", "p/u3"}}, source="s", why="w")
    logged = len(store.changes())
    assert store.adopt_managed("billing", run) is True
    assert store.managed_members(run) == {invoker: {"p/u1", "p/u2", "p/u3"}}
    assert store.managed_members("billing") == {} and store.managed_targets() == {run}
    assert len(store.changes()) == logged
    assert store.adopt_managed("billing", run) is False


def test_changes_after_a_position_follow_commit_order(store):
    assert store.last_seq() == 0 and store.changes_after(0) == []
    first = store.apply(GroupUpdate(T, G, added=frozenset({"u1", "u2"}), source="s"))
    position = store.last_seq()
    assert position == first[-1].seq
    later = store.apply(GroupUpdate(T, G, removed=frozenset({"u1"}), source="s"))
    later += store.record_iam("projects/p/locations/l/services/s", {"roles/run.invoker": {"p/u2"}},
                              source="s", why="w")
    assert store.changes_after(position) == later and store.last_seq() == later[-1].seq
    assert store.changes_after(store.last_seq()) == []


def test_managed_targets_are_the_resources_with_a_managed_member(store):
    run = "projects/p/locations/europe-west1/services/"
    assert store.managed_targets() == set()
    store.record_iam(run + "a", {"roles/run.invoker": {"p/u1"}}, source="s", why="w")
    store.record_iam(run + "b", {"roles/run.invoker": {"p/u2"}}, source="s", why="w")
    assert store.managed_targets() == {run + "a", run + "b"}
    store.record_iam(run + "a", {"roles/run.invoker": set()}, source="s", why="w")
    assert store.managed_targets() == {run + "b"}


# -- leases ------------------------------------------------------------------


def test_leases(backend):
    a, b = backend(), backend()
    assert b.lease_holder("maintenance") is None
    assert a.acquire_lease("maintenance", "h1", 30)
    assert b.lease_holder("maintenance") == "h1"
    assert not b.acquire_lease("maintenance", "h2", 30)
    assert a.acquire_lease("maintenance", "h1", 30), "the holder extends its lease"
    assert b.acquire_lease("other", "h2", 30), "leases are independent"
    b.release_lease("maintenance", "h2")  # not the holder: no effect
    assert not b.acquire_lease("maintenance", "h2", 30)
    a.release_lease("maintenance", "h1")
    assert b.acquire_lease("maintenance", "h2", TTL)
    # Firestore stamps the lease when it commits, before the call returns: its ttl
    # runs out by TTL after the return, not after the call began.
    expiry = time.monotonic() + TTL
    assert not a.acquire_lease("maintenance", "h1", 30)
    sleep_past(expiry)
    assert a.lease_holder("maintenance") is None, "an expired lease is nobody's"
    assert a.acquire_lease("maintenance", "h1", 30), "an expired lease can be taken"


def test_a_firestore_lease_lapses_on_firestore_s_clock_not_on_its_holder_s(firestore_emulator, monkeypatch):
    # A holder whose clock runs 45 s behind took a 30 s lease: by its clock the lease
    # ends 15 s in the past. Another instance must still see it held (and it must lapse).
    import aadrun.store.firestore as backend_module

    project = f"aadrun-test-{uuid.uuid4().hex[:12]}"
    behind, other = FirestoreStore(project=project), FirestoreStore(project=project)
    monkeypatch.setattr(backend_module, "utcnow", lambda: utcnow() - dt.timedelta(seconds=45))
    assert behind.acquire_lease("iam/x", "slow clock", 30)
    assert behind.acquire_lease("iam/y", "slow clock", TTL)
    monkeypatch.undo()
    assert not other.acquire_lease("iam/x", "h2", 30) and other.lease_holder("iam/x") == "slow clock"
    sleep_past(time.monotonic() + TTL)
    assert other.acquire_lease("iam/y", "h2", 30)                     # lapsed after its ttl all the same
    behind.close()
    other.close()


def test_a_firestore_lease_written_by_the_earlier_version_is_judged_by_its_expires_at(firestore_emulator):
    # During a deploy, instances of the earlier version write leases without ttl_s.
    project = f"aadrun-test-{uuid.uuid4().hex[:12]}"
    store = FirestoreStore(project=project)
    leases = store._client.collection("leases")
    for name, expires_in in (("held", 30), ("lapsed", -1)):
        leases.document(doc_id(name)).set({"name": name, "holder": "earlier version",
                                           "expires_at": utcnow() + dt.timedelta(seconds=expires_in)})
    assert store.lease_holder("held") == "earlier version" and not store.acquire_lease("held", "h2", 30)
    assert store.lease_holder("lapsed") is None and store.acquire_lease("lapsed", "h2", 30)
    store.close()


def test_a_lapsed_lease_many_want_at_once_goes_to_one_of_them_at_once(backend):
    # Writers of one Cloud Run service's IAM poll its lease: when it lapses, they all
    # try to take it in the same moment. One gets it; the others hear so, without delay.
    contenders = 12
    for round_ in range(3):
        name = f"iam/contended-{round_}"
        assert backend().acquire_lease(name, "gone", TTL)
        sleep_past(time.monotonic() + TTL)
        stores = [backend() for _ in range(contenders)]
        start = threading.Barrier(contenders)

        def take(i: int) -> bool:
            start.wait()
            return stores[i].acquire_lease(name, f"h{i}", 30)

        began = time.monotonic()
        with ThreadPoolExecutor(contenders) as pool:
            taken = list(pool.map(take, range(contenders)))
        assert taken.count(True) == 1 and stores[0].lease_holder(name) == f"h{taken.index(True)}"
        assert time.monotonic() - began < 5


def test_a_lease_is_renewed_only_by_a_holder_nobody_replaced(backend):
    a, b = backend(), backend()
    assert a.acquire_lease("iam/x", "h1", TTL) and a.renew_lease("iam/x", "h1", TTL)
    assert not b.renew_lease("iam/x", "h2", 30), "renewing is not taking"
    expiry = time.monotonic() + TTL
    sleep_past(expiry)
    assert a.renew_lease("iam/x", "h1", TTL), "expired, but nobody took it: nothing happened meanwhile"
    sleep_past(time.monotonic() + TTL)
    assert b.acquire_lease("iam/x", "h2", 30)
    b.release_lease("iam/x", "h2")
    assert not a.renew_lease("iam/x", "h1", 30), "someone held it meanwhile, even if given back"


def test_record_iam_under_a_lease_writes_nothing_once_the_lease_is_lost(backend):
    a, b = backend(), backend()
    run, invoker = "projects/p/locations/l/services/z", "roles/run.invoker"
    assert a.acquire_lease(f"iam/{run}", "h1", TTL)
    assert a.record_iam(run, {invoker: {"p/u1"}}, source="s", why="w", lease=(f"iam/{run}", "h1"))
    sleep_past(time.monotonic() + TTL)
    assert b.acquire_lease(f"iam/{run}", "h2", 30)
    b.record_iam(run, {invoker: {"p/u2"}}, source="s", why="w", lease=(f"iam/{run}", "h2"))
    b.release_lease(f"iam/{run}", "h2")
    logged = len(a.changes())
    with pytest.raises(Unavailable, match="lost"):
        a.record_iam(run, {invoker: {"p/u1"}}, source="s", why="w", lease=(f"iam/{run}", "h1"))
    assert a.managed_members(run) == {invoker: {"p/u2"}} and len(a.changes()) == logged


def test_store_lease_renew_keeps_it_past_its_first_expiry(backend):
    a, b = backend(), backend()
    taken = time.monotonic()
    with StoreLease(a, "iam/z", "h1", ttl=1.5) as lease:
        time.sleep(0.6)                     # past a third of its ttl: renewed until about 2.1 s
        lease.renew()
        sleep_past(taken + 1.5)             # past the expiry it had when taken
        assert not b.acquire_lease("iam/z", "h2", 30)
        lease.confirm()


def test_a_user_both_added_and_removed_in_one_update_is_neither(store):
    store.apply(GroupUpdate(T, G, sync=synced()))
    entries = store.apply(GroupUpdate(T, G, added=users("u1"), removed=users("u1")))
    assert store.group_members(T, G) == set() and [e.kind for e in entries if e.user == "u1"] == []


def test_store_lease_confirm_raises_once_another_holder_had_the_lease(backend):
    a, b = backend(), backend()
    with StoreLease(a, "iam/y", "h1", ttl=TTL) as lease:
        lease.confirm()
        sleep_past(time.monotonic() + TTL)
        assert b.acquire_lease("iam/y", "h2", 30)
        b.release_lease("iam/y", "h2")
        with pytest.raises(Unavailable, match="lost"):
            lease.confirm()


# -- concurrency -------------------------------------------------------------


def test_concurrent_updates_of_one_group_lose_nothing(store):
    store.apply(GroupUpdate(T, G, sync=synced()))
    g0 = store.generation()
    per_thread, threads = 4, 4
    start = threading.Barrier(threads)

    def worker(i: int) -> None:
        start.wait()
        for k in range(per_thread):
            store.apply(GroupUpdate(T, G, added=users(f"u{i}-{k}"), message_ids=(f"m{i}-{k}",)))
        store.apply(GroupUpdate(T, G, removed=users(f"u{i}-0")))

    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(worker, i) for i in range(threads)]:
            f.result()
    assert store.group_members(T, G) == {f"u{i}-{k}" for i in range(threads) for k in range(1, per_thread)}
    log = store.changes()
    assert len(log) == threads * (per_thread + 1)
    assert [e.seq for e in log] == sorted({e.seq for e in log})
    # At least one more per changing call (the seqs above show no counter update was lost).
    assert store.generation() >= g0 + threads * (per_thread + 1)
    ids = [f"m{i}-{k}" for i in range(threads) for k in range(per_thread)]
    assert store.processed(ids) == set(ids)


def test_concurrent_removals_that_drop_the_link_all_commit(store):
    # Offboarding many members of one group at once: a delivery per notification, all
    # at the same moment. None may wait on another's hold of the group's record.
    threads = 12
    store.apply(GroupUpdate(T, G, replace=users(*(f"u{i}" for i in range(threads))), sync=synced("link")))
    start = threading.Barrier(threads)

    def remove(i: int) -> list:
        start.wait()
        return store.apply(GroupUpdate(T, G, removed=users(f"u{i}"), drop_link=True, message_ids=(f"m{i}",)))

    with ThreadPoolExecutor(threads) as pool:
        done = list(pool.map(remove, range(threads)))
    assert [len(entries) for entries in done] == [1] * threads
    assert store.group_members(T, G) == set() and store.sync_state(T, G).delta_link is None


# -- outages -----------------------------------------------------------------


def test_sqlite_path_that_cannot_be_created_is_unavailable(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(Unavailable):
        SqliteStore(str(tmp_path / "a-file" / "state.db"))


def test_sqlite_removed_folder_is_unavailable(tmp_path):
    store = SqliteStore(str(tmp_path / "state" / "aadrun.db"))
    shutil.rmtree(tmp_path / "state")
    errors: list[BaseException] = []

    def call() -> None:  # a thread with no open connection yet, as a new request has
        try:
            store.membership(T, "u1", [G])
        except BaseException as e:  # noqa: BLE001 - handed to the main thread
            errors.append(e)

    t = threading.Thread(target=call)
    t.start()
    t.join()
    assert len(errors) == 1 and isinstance(errors[0], Unavailable)
    store.close()


def test_sqlite_writer_locked_out_past_busy_timeout_is_unavailable(tmp_path):
    store = SqliteStore(str(tmp_path / "aadrun.db"), busy_timeout=0.2)
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(Unavailable):
            store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
        assert store.generation() == 0, "readers still answer in WAL mode"
    finally:
        other.execute("ROLLBACK")
        other.close()
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    assert store.membership(T, "u1", [G]) == {G: True}
    store.close()


def test_firestore_unreachable_fails_fast(firestore_emulator, monkeypatch):
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens
    store = FirestoreStore(project="aadrun-unreachable", timeout=0.5)
    calls = [
        store.ping,
        lambda: store.membership(T, "u1", [G]),
        lambda: store.group_members(T, G),
        lambda: store.changes(),
        lambda: store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced())),
        lambda: store.acquire_lease("maintenance", "h1", 30),
    ]
    for call in calls:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            call()
        assert time.monotonic() - started < 5
    store.close()


def test_a_firestore_call_ends_within_its_budget_when_the_service_fails_then_hangs(monkeypatch):
    # After a second of fast failures, google-api-core would give a float timeout's next
    # attempt the whole timeout again: verify's fail-closed answer would come late.
    from google.cloud.firestore_v1.types import BatchGetDocumentsRequest

    firestore_api = FlakyMethod("google.firestore.v1.Firestore", "BatchGetDocuments", BatchGetDocumentsRequest,
                                streaming=True, failing=0.6)
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_api.host)
    store = FirestoreStore(project="aadrun-flaky", timeout=1.5)
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable):
            store.membership(T, "u1", [G])
        assert len(firestore_api.deadlines) > 2                         # it failed fast, retried, then hung
        assert max(firestore_api.deadlines) <= started + 1.5 + firestore_api.TRANSIT_SLACK    # every attempt ends by the budget
    finally:
        store.close()
        firestore_api.stop()


# -- open_store --------------------------------------------------------------


def test_open_store_sqlite_relative(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = open_store("sqlite:///.aadrun/state.db")
    assert isinstance(store, SqliteStore)
    assert store.path == str(tmp_path / ".aadrun" / "state.db")
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    assert os.path.isfile(tmp_path / ".aadrun" / "state.db")
    store.close()


def test_open_store_sqlite_absolute(tmp_path):
    path = tmp_path / "abs" / "state.db"
    url = f"sqlite:///{path}"
    assert url.startswith("sqlite:////")
    store = open_store(url)
    assert isinstance(store, SqliteStore) and store.path == str(path)
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    assert SqliteStore(str(path)).membership(T, "u1", [G]) == {G: True}
    store.close()


def test_open_store_firestore(firestore_emulator, monkeypatch):
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", f"aadrun-test-{uuid.uuid4().hex[:12]}")
    store = open_store("firestore://")
    assert isinstance(store, FirestoreStore)
    store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    named = open_store("firestore://audit-db")
    assert named.membership(T, "u1", [G]) == {G: None}, "another database holds other data"
    assert open_store("firestore://").membership(T, "u1", [G]) == {G: True}
    store.close()
    named.close()


def test_the_apps_firestore_store_is_in_the_project_its_settings_name(firestore_emulator, monkeypatch):
    # The project the bus's topics are in, not whatever the environment says besides.
    from aadrun.app import App
    from aadrun.config import Settings

    project = f"aadrun-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", f"aadrun-other-{uuid.uuid4().hex[:12]}")
    app = App(Settings(store_url="firestore://", project=project))
    app.store.apply(GroupUpdate(T, G, added=users("u1"), sync=synced()))
    assert FirestoreStore(project=project).membership(T, "u1", [G]) == {G: True}
    assert open_store("firestore://").membership(T, "u1", [G]) == {G: None}
    # A blank GOOGLE_CLOUD_PROJECT is unset, as Settings takes it: the emulator's project.
    monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", "  ")
    assert App(Settings.from_env({"AADRUN_STORE": "firestore://"})).store.acquire_lease("probe", "me", 1.0)


def test_open_store_rejects_other_urls():
    with pytest.raises(ConfigError):
        open_store("postgres://db/aadrun")


def test_change_times_have_one_width_whatever_their_fraction():
    # Audit exports sort and align by this text: "...:05Z" beside "...:05.000007Z" would not.
    at = dt.datetime(2026, 5, 1, 12, 0, 5, tzinfo=dt.timezone.utc)
    texts = [ChangeEntry("member_added", moment, tenant="t", group="g", user="u").to_json()["at"]
             for moment in (at, at + dt.timedelta(microseconds=7))]
    assert texts == ["2026-05-01T12:00:05.000000Z", "2026-05-01T12:00:05.000007Z"]

"""policy_sync's core under concurrency, duplicates and reordering: several threads
and several instances at once, against the local Graph and Cloud Run IAM servers
(the world of tests/support/sync_world.py)."""
from __future__ import annotations

import random
import sqlite3
import threading
import time
import uuid

import pytest

from aadrun.coalesce import Combiner
from aadrun.errors import Unavailable, UpstreamError
from aadrun.messages import MembershipChange
from aadrun.store import GroupUpdate, SyncConflict
from aadrun.sync import Contested
from tests.support.graph_fixtures import *  # noqa: F401,F403 - graph_server, graph_pki, loopback_only
from tests.support.sync_world import *  # noqa: F401,F403 - world, app, store_url, no_adc
from tests.support.sync_world import (ALICE, BILLING, BOB, CAROL, G_ENG, G_OPS, INVOKER, MALLORY, REPORTS,
                                     SHARED, SHARED_RUN, TENANT, change, deliver, slow_delta, user)


def test_storm_of_duplicated_and_reordered_notifications_converges_to_graph(world, app):
    """Graph changes while three threads apply duplicated, shuffled notifications
    (old ones included) in random batches; once all are in, the store and IAM hold
    exactly Graph's members."""
    rng = random.Random(7)
    people = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(12)]
    pending: list[MembershipChange] = []
    lock = threading.Lock()

    def graph_changes(rounds: int) -> None:
        for step in range(rounds):
            group, who = rng.choice([G_ENG, G_OPS]), rng.sample(people, 2)
            add = rng.random() < 0.5
            (world.graph.add_members if add else world.graph.remove_members)(TENANT, group, who)
            message = change(group, **{"added" if add else "removed": who}, salt=str(step))
            with lock:
                pending.extend([message] * rng.randint(1, 3))
            time.sleep(0.002)

    def consume(seed: int, until: threading.Event) -> None:
        mine = random.Random(seed)
        while not (until.is_set() and not pending):
            with lock:
                mine.shuffle(pending)
                size = mine.randint(1, 6)
                batch, pending[:] = pending[:size], pending[size:]
            if batch:
                deliver(app, batch + [mine.choice(batch)])   # and a duplicate in the batch
            time.sleep(0.001)

    done = threading.Event()
    threads = [threading.Thread(target=consume, args=(k, done)) for k in range(3)]
    for t in threads:
        t.start()
    graph_changes(80)
    with lock:
        pending.append(change(G_OPS))                                   # "group changed": re-read it
    done.set()
    for t in threads:
        t.join()
    for group in (G_ENG, G_OPS):
        assert app.store.group_members(TENANT, group) == world.graph.members(TENANT, group)
    truth = world.graph.members(TENANT, G_ENG) | world.graph.members(TENANT, G_OPS)
    assert world.members(REPORTS) == {user(u) for u in truth}
    assert app.store.managed_members(REPORTS) == {INVOKER: {user(u) for u in truth}}


def test_a_stale_removal_delivered_after_the_re_add_converges_to_graph(world, app):
    world.graph.add_members(TENANT, G_ENG, [ALICE])
    app.sync.handle_messages([change(G_ENG, added=[ALICE])])
    world.graph.remove_members(TENANT, G_ENG, [ALICE])
    removal = change(G_ENG, removed=[ALICE])
    world.graph.add_members(TENANT, G_ENG, [ALICE])
    app.sync.handle_messages([change(G_ENG, added=[ALICE], salt="again")])   # the re-add first
    with pytest.raises(Unavailable):   # then the stale removal: kept until Graph is read again
        app.sync.handle_messages([removal])
    assert app.store.group_members(TENANT, G_ENG) == set()
    app.sync.handle_messages([removal])                                       # its redelivery
    assert app.store.group_members(TENANT, G_ENG) == {ALICE}
    assert user(ALICE) in world.members(REPORTS)


def test_a_read_in_flight_never_undoes_a_removal_committed_meanwhile(world, app):
    """Another instance commits a removal while this one's Graph answer (taken
    before the removal) is on its way: the answer must not grant the user again,
    and the reader reads once more (that read, started after the removal, is
    Graph's truth) instead of leaving the group to the next reconcile."""
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    other = world.app()
    slow_delta(world.graph, 0.4)
    granted = []
    record = lambda: granted.append(BOB in (app.store.group_members(TENANT, G_ENG) or set()))  # noqa: E731
    reader = threading.Thread(target=app.sync.handle_messages, args=([change(G_ENG)],))   # full re-read
    reader.start()
    time.sleep(0.1)                                       # its answer (with BOB) is in flight
    world.graph.remove_members(TENANT, G_ENG, [BOB])
    remover = threading.Thread(target=other.sync.handle_messages, args=([change(G_ENG, removed=[BOB])],))
    remover.start()
    while reader.is_alive():
        record()
        time.sleep(0.02)
    reader.join()
    assert not any(granted[5:]), "the in-flight answer granted BOB again after his removal"
    assert app.store.group_members(TENANT, G_ENG) == {ALICE}
    assert app.store.sync_state(TENANT, G_ENG).delta_link            # the re-read left a current link
    remover.join()
    assert app.store.group_members(TENANT, G_ENG) == {ALICE}
    assert user(BOB) not in world.members(REPORTS)
    assert [e.kind for e in app.store.changes() if e.user == BOB] == ["member_added", "member_removed"]


def test_a_removal_stamped_before_a_read_but_committed_during_it_is_not_undone(world, app, store_url):
    """The removal takes its time, then waits for the store's write lock (another
    writer holds it); the read starts, and the removal commits while Graph's answer,
    taken before it, is on its way. What counts is commit order, not the stamps."""
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    other = world.app()
    other.store.generation()                             # opened before the lock is taken
    blocker = sqlite3.connect(store_url[len("sqlite:///"):], isolation_level=None, check_same_thread=False)
    blocker.execute("BEGIN IMMEDIATE")                   # another writer holds the lock
    remover = threading.Thread(target=other.sync.handle_messages, args=([change(G_ENG, removed=[BOB])],))
    remover.start()
    time.sleep(0.2)                                      # the removal is stamped, and waits
    real, first = world.graph.handle, threading.Event()

    def handle(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)  # the first one still with BOB
        if path == "/v1.0/groups/delta" and not first.is_set():
            first.set()
            world.graph.remove_members(TENANT, G_ENG, [BOB])
            blocker.execute("COMMIT")                    # the removal commits during the read
            while BOB in app.store.group_members(TENANT, G_ENG):
                time.sleep(0.01)
        return answer

    world.graph.handle = handle
    app.sync.handle_messages([change(G_ENG)])           # a full re-read
    remover.join()
    assert app.store.group_members(TENANT, G_ENG) == {ALICE}
    assert [e.kind for e in app.store.changes() if e.user == BOB] == ["member_added", "member_removed"]


def test_a_removal_committed_between_the_stale_check_and_the_apply_is_not_undone(world, app):
    """The narrowest window: the read has checked for removals, and another instance's
    removal commits just before the read's answer is applied."""
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    other = world.app()
    real_apply, injected = app.store.apply, []

    def apply(update, *args, **kwargs):
        if update.source == "graph-delta" and not injected:   # the read's answer, still with BOB
            injected.append(True)
            world.graph.remove_members(TENANT, G_ENG, [BOB])
            other.sync.handle_messages([change(G_ENG, removed=[BOB])])
        return real_apply(update, *args, **kwargs)

    app.store.apply = apply
    app.sync.handle_messages([change(G_ENG)])           # a full re-read
    assert injected and app.store.group_members(TENANT, G_ENG) == {ALICE}
    assert app.store.sync_state(TENANT, G_ENG).delta_link              # read again: current
    assert user(BOB) not in world.members(REPORTS)


def test_a_stale_removal_during_an_incremental_read_is_settled_by_a_full_read(world, app):
    """Another instance commits a removal Graph never made (stale or reordered) and dies
    before reading; meanwhile this instance's incremental read, which cannot speak of
    that user, lands. It must not store a current link over the hole: it reads in full,
    and a redelivery of the removal is then not mistaken for an already-reflected one."""
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    world.graph.add_members(TENANT, G_ENG, [CAROL])
    slow_delta(world.graph, 0.4)
    reader = threading.Thread(target=app.sync.handle_messages, args=([change(G_ENG, added=[CAROL])],))
    reader.start()
    time.sleep(0.1)                                        # the incremental read is in flight
    app.store.apply(GroupUpdate(TENANT, G_ENG, removed=frozenset({BOB}), source="notification",
                                why="stale removal committed by an instance that then died"))
    reader.join()
    assert app.store.group_members(TENANT, G_ENG) == {ALICE, BOB, CAROL}
    assert deliver(app, [change(G_ENG, removed=[BOB])]).reflected == 0
    assert app.store.group_members(TENANT, G_ENG) == {ALICE, BOB, CAROL}


def test_a_burst_makes_one_graph_read_and_one_iam_write_per_group_and_service(world, app):
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB, CAROL])
    world.graph.add_members(TENANT, G_OPS, [MALLORY])
    burst = [change(G_ENG, added=[who], salt=str(i)) for i, who in enumerate([ALICE, BOB, CAROL] * 5)]
    burst += [change(G_OPS, added=[MALLORY], salt=str(i)) for i in range(5)]
    summary = app.sync.handle_messages(burst)
    assert len(world.graph.calls("GET", "/v1.0/groups/delta")) == 2
    assert world.cloudrun.sets(REPORTS) == 1 and world.cloudrun.sets(BILLING) == 1
    assert summary.reads == {"full": 2, "incremental": 0} and len(app.events) == 1


def test_redelivery_is_idempotent_and_republishes_the_event(world, app):
    world.graph.add_members(TENANT, G_ENG, [ALICE])
    message = change(G_ENG, added=[ALICE])
    app.sync.handle_messages([message])
    before = app.store.changes()
    summary = app.sync.handle_messages([message])
    assert summary.duplicates == 1 and summary.reflected == 1
    assert summary.reads == {"full": 0, "incremental": 0}   # the store already holds what it claims
    assert app.store.changes() == before
    assert world.cloudrun.sets(REPORTS) == 1
    assert len(app.events) == 2 and app.events[1]["groups"][0]["added"] == []


def test_a_re_add_whose_notification_repeats_an_earlier_id_is_granted(world, app):
    """Added, removed, added again: the third notification has the first one's content,
    hence its id (messages.py). It still leads to a read, so Graph's answer grants."""
    added = change(G_ENG, added=[ALICE])
    world.graph.add_members(TENANT, G_ENG, [ALICE])
    app.sync.handle_messages([added])
    world.graph.remove_members(TENANT, G_ENG, [ALICE])
    app.sync.handle_messages([change(G_ENG, removed=[ALICE])])
    world.graph.add_members(TENANT, G_ENG, [ALICE])
    app.sync.handle_messages([added])
    assert app.store.group_members(TENANT, G_ENG) == {ALICE}
    assert user(ALICE) in world.members(REPORTS)


def test_concurrent_workers_writing_one_service_lose_no_update(world):
    """Four policy_sync instances (own store objects, clients, caches) write one
    service at once, round after round, while another party's writes cause 409s."""
    world.cloudrun.set_policy(SHARED_RUN, {"bindings": [{"role": INVOKER, "members": ["user:x@example.com"]}]})
    workers = [world.app() for _ in range(4)]
    kept: dict[str, list[str]] = {g: [] for g in SHARED}
    world.cloudrun.inject_conflicts(SHARED_RUN, 6)
    real_handle = world.cloudrun.handle

    def slow_handle(*args):
        time.sleep(0.005)   # a wider window between each worker's read and its write
        return real_handle(*args)

    world.cloudrun.handle = slow_handle

    def work(app, group):
        for round_ in range(4):
            new = [str(uuid.uuid4()) for _ in range(3)]
            world.graph.add_members(TENANT, group, new)
            app.sync.handle_messages([change(group, added=new)])
            gone, kept[group] = kept[group][:2], kept[group][2:] + new
            world.graph.remove_members(TENANT, group, gone)
            app.sync.handle_messages([change(group, removed=gone, salt=str(round_))])

    threads = [threading.Thread(target=work, args=(a, g)) for a, g in zip(workers, SHARED)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = {user(u) for people in kept.values() for u in people}
    assert world.members(SHARED_RUN) == expected | {"user:x@example.com"}
    assert workers[0].store.managed_members(SHARED_RUN) == {INVOKER: expected}


def test_iam_writes_of_a_service_wait_for_its_lease(world, app):
    """The lease ``iam/{resource}`` makes every aadrun writer of a Cloud Run resource take turns
    (maintenance's drift repair takes the same one)."""
    world.graph.add_members(TENANT, G_OPS, [ALICE])
    assert app.store.acquire_lease(f"iam/{REPORTS}", "another-worker", 30)
    worker = threading.Thread(target=app.sync.handle_messages, args=([change(G_OPS, added=[ALICE])],))
    worker.start()
    time.sleep(0.3)
    assert app.store.group_members(TENANT, G_OPS) == {ALICE}       # the store does not wait
    assert world.cloudrun.sets(REPORTS) == 0                        # IAM does
    app.store.release_lease(f"iam/{REPORTS}", "another-worker")
    worker.join()
    assert world.members(REPORTS) == {user(ALICE)}
    assert app.store.acquire_lease(f"iam/{REPORTS}", "another-worker", 30)   # given back


# -- a read in flight carries an older answer than what was committed meanwhile -----------

def slow_first_delta(server, seconds: float) -> None:
    """Only the next delta answer (taken when asked) arrives ``seconds`` late."""
    real, first = server.handle, threading.Event()

    def handle(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)
        if path == "/v1.0/groups/delta" and not first.is_set():
            first.set()
            time.sleep(seconds)
        return answer

    server.handle = handle


def _alice_synced(world, app) -> None:
    world.graph.add_members(TENANT, G_ENG, [ALICE])
    app.sync.handle_messages([change(G_ENG, added=[ALICE])])   # synced, delta link stored


def _while_a_read_is_in_flight(world, app, message, meanwhile) -> None:
    """``app`` handles ``message``, whose Graph answer is taken at once but arrives
    late; ``meanwhile`` runs before it does."""
    slow_first_delta(world.graph, 0.6)
    reader = threading.Thread(target=deliver, args=(app, [message]))
    reader.start()
    time.sleep(0.15)   # its answer is taken, and on its way
    meanwhile()
    reader.join()


def _remove_bob(world, instance):
    """Graph removes BOB and ``instance`` handles the notification (BOB is not in the store yet)."""
    def meanwhile():
        world.graph.remove_members(TENANT, G_ENG, [BOB])
        instance.sync.handle_messages([change(G_ENG, removed=[BOB])])
    return meanwhile


def test_a_removal_arriving_while_a_read_is_in_flight_is_not_undone_by_it(world, app):
    _alice_synced(world, app)
    world.graph.add_members(TENANT, G_ENG, [BOB])
    # The read's answer lists BOB; the removal changes nothing in the store, but still gets a read.
    _while_a_read_is_in_flight(world, app, change(G_ENG, added=[BOB]), _remove_bob(world, app))
    assert app.store.group_members(TENANT, G_ENG) == {ALICE}
    assert world.members(REPORTS) == {user(ALICE)}


def test_another_instances_newer_read_outranks_a_read_in_flight(world, app):
    _alice_synced(world, app)
    other = world.app()
    world.graph.add_members(TENANT, G_ENG, [BOB])
    # A full read whose answer lists BOB; another instance's no-op removal, then its newer read.
    _while_a_read_is_in_flight(world, app, change(G_ENG), _remove_bob(world, other))
    assert app.store.group_members(TENANT, G_ENG) == {ALICE}
    assert world.members(REPORTS) == {user(ALICE)}


def test_an_older_full_read_does_not_drop_a_member_another_instance_confirmed(world, app):
    _alice_synced(world, app)
    other = world.app()

    def carol_confirmed_by_another_instance():
        world.graph.add_members(TENANT, G_ENG, [CAROL])
        other.sync.handle_messages([change(G_ENG, added=[CAROL])])

    # A full read whose answer lacks CAROL.
    _while_a_read_is_in_flight(world, app, change(G_ENG), carol_confirmed_by_another_instance)
    assert app.store.group_members(TENANT, G_ENG) == {ALICE, CAROL}
    assert world.members(REPORTS) == {user(ALICE), user(CAROL)}
    assert not any(e.kind == "member_removed" for e in app.store.changes())


def test_a_member_confirmed_between_an_older_reads_check_and_its_apply_is_kept(world, app):
    """The narrowest window of the case above: another instance confirms CAROL after the
    older read checked that nobody had read meanwhile, just before its answer is applied."""
    _alice_synced(world, app)
    other = world.app()
    real_apply, injected = app.store.apply, []

    def apply(update, *args, **kwargs):
        if update.source == "graph-delta" and not injected:   # the older answer, without CAROL
            injected.append(True)
            world.graph.add_members(TENANT, G_ENG, [CAROL])
            other.sync.handle_messages([change(G_ENG, added=[CAROL])])
        return real_apply(update, *args, **kwargs)

    app.store.apply = apply
    deliver(app, [change(G_ENG)])                       # a full re-read
    assert injected and app.store.group_members(TENANT, G_ENG) == {ALICE, CAROL}
    assert not any(e.kind == "member_removed" for e in app.store.changes())
    assert world.members(REPORTS) == {user(ALICE), user(CAROL)}


@pytest.mark.parametrize("store_url", ["sqlite", "firestore"], indirect=True)
def test_a_read_contested_to_the_last_try_fails_rather_than_grant_a_user_removed_meanwhile(world, app):
    """Other instances' reads land during each of this read's tries. Before the third,
    MALLORY is added in Graph; during it she is removed and another instance handles
    that (she was never in the store: no removal of hers is in the change log). The
    third answer, which lists her, is not applied: the batch fails, to be read again."""
    _alice_synced(world, app)
    other = world.app()
    real_apply, tries = app.store.apply, []

    def apply(update, *args, **kwargs):
        if update.source == "graph-delta" and len(tries) < 3:
            tries.append(1)
            if len(tries) < 3:   # a newer read confirms someone
                newcomer = str(uuid.uuid4())
                world.graph.add_members(TENANT, G_ENG, [newcomer])
                other.sync.handle_messages([change(G_ENG, added=[newcomer])])
                if len(tries) == 2:
                    world.graph.add_members(TENANT, G_ENG, [MALLORY])   # listed by the third read
            else:
                world.graph.remove_members(TENANT, G_ENG, [MALLORY])
                other.sync.handle_messages([change(G_ENG, removed=[MALLORY])])
        return real_apply(update, *args, **kwargs)

    app.store.apply = apply
    with pytest.raises(SyncConflict):
        app.sync.handle_messages([change(G_ENG)])
    assert MALLORY not in app.store.group_members(TENANT, G_ENG)
    assert user(MALLORY) not in world.members(REPORTS)
    app.store.apply = real_apply
    app.sync.handle_messages([change(G_ENG)])   # the redelivery
    assert app.store.group_members(TENANT, G_ENG) == world.graph.members(TENANT, G_ENG)


DAVE = "0da0e000-0000-0000-0000-000000000004"


@pytest.mark.parametrize("store_url", ["sqlite", "firestore"], indirect=True)
def test_a_removal_committed_late_does_not_make_an_older_read_look_current(world, app):
    """A removal that read the group's sync state before another removal dropped its
    link, and commits after a newer read stored a new one, must not write back the
    state an older read in flight expects (which would let that read undo CAROL)."""
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB, DAVE])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB, DAVE])])
    late, confirmer = world.app(), world.app()
    go, waiting = threading.Event(), threading.Event()
    real_late_apply = late.store.apply

    def late_apply(update, *args, **kwargs):
        if update.source == "notification":
            waiting.set()
            go.wait(10)
        return real_late_apply(update, *args, **kwargs)

    late.store.apply = late_apply
    world.graph.remove_members(TENANT, G_ENG, [BOB, DAVE])
    remover = threading.Thread(target=deliver, args=(late, [change(G_ENG, removed=[DAVE])]))
    remover.start()
    waiting.wait(10)
    real, hooked = world.graph.handle, []

    def handle(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)   # this instance's answer, taken before CAROL
        if path == "/v1.0/groups/delta" and not hooked:
            hooked.append(1)
            world.graph.add_members(TENANT, G_ENG, [CAROL])
            confirmer.sync.handle_messages([change(G_ENG, added=[CAROL])])
            go.set()                                        # the late removal commits now
            while DAVE in app.store.group_members(TENANT, G_ENG):
                time.sleep(0.01)
        return answer

    world.graph.handle = handle
    deliver(app, [change(G_ENG, removed=[BOB])])            # its removal, then a full read
    remover.join()
    assert not [e for e in app.store.changes() if e.user == CAROL and e.kind == "member_removed"]
    assert user(CAROL) in world.members(REPORTS)


@pytest.mark.parametrize("store_url", ["firestore"], indirect=True)
def test_an_older_read_cannot_undo_an_update_firestore_commits_in_parts(world, app):
    """Firestore commits a large update in parts. An older full read in flight, applied
    between them, must not undo the parts already committed, nor must the last part
    then store a delta link that hides the gap from every later incremental read."""
    newcomers = [f"0e0e0000-0000-0000-0000-00000000000{i}" for i in range(1, 4)]
    _alice_synced(world, app)
    other = world.app()
    app.store.max_changes_per_commit = 2
    real, hooked, release = world.graph.handle, [], threading.Event()

    def handle(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)
        if path == "/v1.0/groups/delta" and not hooked:   # the other instance's answer: ALICE only
            hooked.append(1)
            release.wait(10)
        return answer

    world.graph.handle = handle
    older = threading.Thread(target=deliver, args=(other, [change(G_ENG)]))
    older.start()
    while not hooked:
        time.sleep(0.01)
    world.graph.add_members(TENANT, G_ENG, newcomers)
    real_run = app.store._run

    def run(fn, *args):
        part = args[0] if args else None
        if getattr(part, "source", "") == "graph-delta" and part.sync is not None and \
                part.sync.delta_link and not release.is_set():
            release.set()                                   # before the last part: the older read lands
            older.join(15)
        return real_run(fn, *args)

    app.store._run = run
    deliver(app, [change(G_ENG, added=newcomers)])          # an incremental read: three additions
    older.join()
    world.graph.handle, app.store._run = real, real_run
    # The parts committed were never undone: no newcomer was denied on the way.
    assert not [e for e in app.store.changes() if e.user in newcomers and e.kind == "member_removed"]
    app.sync.resync(TENANT, G_ENG)                          # the scheduled reconcile (incremental)
    assert app.store.group_members(TENANT, G_ENG) == world.graph.members(TENANT, G_ENG)
    assert world.members(REPORTS) == {user(u) for u in world.graph.members(TENANT, G_ENG)}


def _last_try_regrants_bob(world, app, also=None, took_back: threading.Event | None = None):
    """Wrap ``app.store.apply`` so that ``app``'s full read is overtaken on every try: on
    the first two by another instance's read; on the last, its answer (listing BOB)
    re-grants BOB just after a removal of his committed, and before the grant is taken
    back Graph adds him again and a third instance's read confirms him. ``also()`` runs
    then, last; ``took_back`` is set once the grant is taken back. Returns the original
    apply."""
    other, remover, confirmer = world.app(), world.app(), world.app()
    real_apply, tries = app.store.apply, []
    removed, go = threading.Event(), threading.Event()
    real_remover_apply = remover.store.apply

    def remover_apply(update, *args, **kwargs):   # the remover pauses between its removal and its read
        out = real_remover_apply(update, *args, **kwargs)
        if update.source == "notification" and not removed.is_set():
            removed.set()
            go.wait(10)
        return out

    remover.store.apply = remover_apply

    def apply(update, *args, **kwargs):
        if update.why == "removal committed during a read" and took_back is not None:
            out = real_apply(update, *args, **kwargs)
            took_back.set()
            return out
        if update.source != "graph-delta" or len(tries) >= 3:
            return real_apply(update, *args, **kwargs)
        tries.append(1)
        if len(tries) < 3:
            newcomer = str(uuid.uuid4())
            world.graph.add_members(TENANT, G_ENG, [newcomer])
            other.sync.handle_messages([change(G_ENG, added=[newcomer])])
            return real_apply(update, *args, **kwargs)
        world.graph.remove_members(TENANT, G_ENG, [BOB])
        thread = threading.Thread(target=deliver, args=(remover, [change(G_ENG, removed=[BOB])]))
        thread.start()
        removed.wait(10)
        out = real_apply(update, *args, **kwargs)            # re-grants BOB
        go.set()
        thread.join(20)                                      # the remover's read: BOB removed
        world.graph.add_members(TENANT, G_ENG, [BOB])
        confirmer.sync.handle_messages([change(G_ENG, added=[BOB], salt="back")])
        assert BOB in app.store.group_members(TENANT, G_ENG)  # confirmed by a read
        if also:
            also()
        return out

    app.store.apply = apply
    return real_apply


@pytest.mark.parametrize("store_url", ["sqlite", "firestore"], indirect=True)
def test_a_grant_taken_back_on_the_last_try_fails_the_batch_so_a_read_settles_it(world, app):
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    real_apply = _last_try_regrants_bob(world, app)
    with pytest.raises(Contested):   # the take-back dropped a member a newer read confirmed
        app.sync.handle_messages([change(G_ENG)])
    app.store.apply = real_apply
    app.sync.handle_messages([change(G_ENG)])               # its redelivery
    assert BOB in app.store.group_members(TENANT, G_ENG) and user(BOB) in world.members(REPORTS)


@pytest.mark.parametrize("store_url", ["sqlite", "firestore"], indirect=True)
def test_a_read_that_overlaps_a_take_back_never_stores_a_link_over_it(world, app):
    """A fourth instance's incremental read (for DAVE) begins just as the take-back
    commits: it must not store a current delta link while BOB is missing, or the
    scheduled (incremental) reconcile would never restore him."""
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    reader = world.app()
    waiting, took_back, threads = threading.Event(), threading.Event(), []
    real_reader_seq = reader.store.last_seq

    def reader_last_seq():
        if not waiting.is_set():
            waiting.set()
            took_back.wait(10)
        return real_reader_seq()

    reader.store.last_seq = reader_last_seq

    def fourth_read():
        world.graph.add_members(TENANT, G_ENG, [DAVE])
        threads.append(threading.Thread(target=deliver, args=(reader, [change(G_ENG, added=[DAVE])])))
        threads[0].start()
        waiting.wait(10)

    real_apply = _last_try_regrants_bob(world, app, also=fourth_read, took_back=took_back)
    with pytest.raises(Contested):
        app.sync.handle_messages([change(G_ENG)])
    threads[0].join(20)
    app.store.apply = real_apply
    app.sync.resync(TENANT, G_ENG)                          # the scheduled reconcile, not the redelivery
    assert BOB in app.store.group_members(TENANT, G_ENG) and user(BOB) in world.members(REPORTS)


@pytest.mark.parametrize("store_url", ["sqlite", "firestore"], indirect=True)
def test_an_older_answer_committed_in_parts_is_checked_from_its_first_part(world, app):
    """A first part that changes nothing (removals of users never stored) must still be
    checked: it marks the group, and every later part would pass against that mark."""
    y1, y2 = "0e0e0000-0000-0000-0000-000000000001", "0e0e0000-0000-0000-0000-000000000002"
    _alice_synced(world, app)
    other = world.app()
    if hasattr(app.store, "max_changes_per_commit"):
        app.store.max_changes_per_commit = 2
    world.graph.add_members(TENANT, G_ENG, [y1, y2])
    world.graph.remove_members(TENANT, G_ENG, [y1, y2])
    world.graph.add_members(TENANT, G_ENG, [MALLORY])
    real, first = world.graph.handle, threading.Event()

    def handle(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)   # removed: y1, y2; added: MALLORY
        if path == "/v1.0/groups/delta" and not first.is_set():
            first.set()   # while it is on its way, MALLORY is removed and another instance reads
            world.graph.remove_members(TENANT, G_ENG, [MALLORY])
            other.sync.handle_messages([change(G_ENG, removed=[MALLORY])])
        return answer

    world.graph.handle = handle
    deliver(app, [change(G_ENG, added=[MALLORY])])          # an incremental read, redelivered as needed
    assert app.store.group_members(TENANT, G_ENG) == world.graph.members(TENANT, G_ENG) == {ALICE}
    assert user(MALLORY) not in world.members(REPORTS)
    assert not [e for e in app.store.changes() if e.user == MALLORY and e.kind == "member_added"]


@pytest.mark.parametrize("store_url", ["sqlite", "firestore"], indirect=True)
def test_a_read_applied_just_after_a_take_back_drops_its_link_so_the_redelivery_reads_in_full(world, app):
    """Another instance's read checks for removals, then its apply lands just after a
    take-back (which keeps the sync time): it must not leave its link over the member
    taken back, or the redelivery and every incremental reconcile would miss him."""
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    reader = world.app()
    at_apply, took_back, threads, acked = threading.Event(), threading.Event(), [], []
    real_reader_apply = reader.store.apply

    def reader_apply(update, *args, **kwargs):
        # The reader has read its position and link and checked the change log for
        # removals (none yet); its commit lands just after the take-back.
        if update.source == "graph-delta" and not at_apply.is_set():
            at_apply.set()
            took_back.wait(10)
        return real_reader_apply(update, *args, **kwargs)

    reader.store.apply = reader_apply

    def fourth_read():                    # after the confirmer's read, before the take-back
        world.graph.add_members(TENANT, G_ENG, [DAVE])
        threads.append(threading.Thread(target=lambda: acked.append(deliver(reader, [change(G_ENG, added=[DAVE])]))))
        threads[0].start()
        at_apply.wait(10)

    real_apply = _last_try_regrants_bob(world, app, also=fourth_read, took_back=took_back)
    messages = [change(G_ENG)]
    with pytest.raises(Unavailable):      # Contested: Pub/Sub redelivers the batch
        app.sync.handle_messages(messages)
    threads[0].join(20)
    app.store.apply = real_apply
    deliver(app, messages)                # the redelivery, acknowledged
    assert BOB in world.graph.members(TENANT, G_ENG)
    assert BOB in app.store.group_members(TENANT, G_ENG), "confirmed member missing under a current link"
    assert user(BOB) in world.members(REPORTS)


@pytest.mark.parametrize("store_url", ["sqlite", "firestore"], indirect=True)
def test_a_take_back_then_a_failed_try_leaves_no_link_over_the_taken_back_member(world, app):
    """The take-back on the first try, then Graph answers 500 to the second: the batch
    raises and its redelivery (incremental for a redelivered "group changed") must find
    no link stored over the member taken back."""
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    remover, confirmer, reader = world.app(), world.app(), world.app()
    removed, go, at_apply, took_back = (threading.Event() for _ in range(4))
    real_remover_apply, real_reader_apply, real_apply = remover.store.apply, reader.store.apply, app.store.apply
    threads = []

    def remover_apply(update, *a, **k):          # pauses between its step 1 and its read
        out = real_remover_apply(update, *a, **k)
        if update.source == "notification" and not removed.is_set():
            removed.set()
            go.wait(10)
        return out

    def reader_apply(update, *a, **k):           # position, link, removal check done: commits late
        if update.source == "graph-delta" and not at_apply.is_set():
            at_apply.set()
            took_back.wait(10)
        return real_reader_apply(update, *a, **k)

    def apply(update, *a, **k):
        if update.why == "removal committed during a read":
            out = real_apply(update, *a, **k)
            took_back.set()
            threads[0].join(20)   # the reader's commit lands, and it finishes
            world.graph.fail_next(1, status=500, retry_after=None, code="InternalServerError")   # try 2's read
            return out
        if update.source != "graph-delta" or removed.is_set():
            return real_apply(update, *a, **k)
        world.graph.remove_members(TENANT, G_ENG, [BOB])
        t = threading.Thread(target=remover.sync.handle_messages, args=([change(G_ENG, removed=[BOB])],))
        t.start()
        removed.wait(10)
        out = real_apply(update, *a, **k)        # this older answer re-grants BOB
        go.set()
        t.join(20)                               # the remover's read removes BOB
        world.graph.add_members(TENANT, G_ENG, [BOB])
        confirmer.sync.handle_messages([change(G_ENG, added=[BOB], salt="back")])   # confirmed again
        world.graph.add_members(TENANT, G_ENG, [DAVE])
        threads.append(threading.Thread(target=reader.sync.handle_messages, args=([change(G_ENG, added=[DAVE])],)))
        threads[0].start()
        at_apply.wait(10)
        return out

    remover.store.apply, reader.store.apply, app.store.apply = remover_apply, reader_apply, apply
    messages = [change(G_ENG)]                   # "group changed": full read; its redelivery is incremental
    with pytest.raises(UpstreamError):
        app.sync.handle_messages(messages)
    threads[0].join(20)
    app.store.apply = real_apply
    app.sync.handle_messages(messages)           # Pub/Sub's redelivery: succeeds, acknowledged
    assert BOB in app.store.group_members(TENANT, G_ENG), "confirmed member missing under a current link"


def test_changes_committed_before_a_later_read_of_the_loop_fails_are_audited(world, app, audit_lines):
    world.graph.add_members(TENANT, G_ENG, [ALICE, BOB])
    app.sync.handle_messages([change(G_ENG, added=[ALICE, BOB])])
    world.graph.add_members(TENANT, G_ENG, [CAROL])
    real, first = world.graph.handle, []

    def handle(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)   # still lists BOB
        if path == "/v1.0/groups/delta" and not first:
            first.append(1)
            world.graph.remove_members(TENANT, G_ENG, [BOB])
            # another instance commits BOB's removal while this answer is on its way, so the
            # read goes round again; that second read fails
            app.store.apply(GroupUpdate(TENANT, G_ENG, removed=frozenset({BOB}), source="notification"))
            world.graph.fail_next(1, status=500, retry_after=None, code="InternalServerError")
        return answer

    world.graph.handle = handle
    with pytest.raises(UpstreamError):
        app.sync.handle_messages([change(G_ENG, added=[CAROL])])
    assert CAROL in app.store.group_members(TENANT, G_ENG)   # committed by the first apply
    assert [a["user"] for a in audit_lines if a.get("event") == "membership_change"
            and a.get("kind") == "member_added" and a.get("user") == CAROL] == [CAROL]


def test_a_read_overlapping_another_that_changed_nothing_is_applied_as_is(world, app):
    world.graph.add_members(TENANT, G_ENG, [ALICE])
    app.sync.handle_messages([change(G_ENG, added=[ALICE])])          # synced, delta link stored
    other = world.app()
    world.graph.add_members(TENANT, G_ENG, [BOB])
    real, hooked = world.graph.handle, []

    def handle(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)
        if path == "/v1.0/groups/delta" and not hooked:
            hooked.append(1)   # another instance reads the group while this answer is on its way
            other.sync.resync(TENANT, G_ENG)
        return answer

    world.graph.handle = handle
    summary = app.sync.handle_messages([change(G_ENG, added=[BOB])])
    # The other read already applied BOB: this answer changes nothing, so it is applied
    # (link included) rather than read again in full.
    assert summary.reads == {"full": 0, "incremental": 1}
    assert app.store.group_members(TENANT, G_ENG) == {ALICE, BOB}
    assert app.store.sync_state(TENANT, G_ENG).delta_link


def test_every_caller_of_a_combined_run_gets_its_result():
    combiner, started, release = Combiner(), threading.Event(), threading.Event()
    results = {}

    def work(requests):
        started.set()
        release.wait(2)
        return sorted(requests)

    def call(name):
        results[name] = combiner.run("k", name, work)

    first = threading.Thread(target=call, args=("a",))
    first.start()
    started.wait(2)
    followers = [threading.Thread(target=call, args=(n,)) for n in ("b", "c")]
    for t in followers:
        t.start()
    time.sleep(0.1)   # both join the run waiting behind the first
    release.set()
    for t in [first, *followers]:
        t.join(5)
    assert results == {"a": ["a"], "b": ["b", "c"], "c": ["b", "c"]}

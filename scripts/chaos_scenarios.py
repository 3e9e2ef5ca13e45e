"""Fault scenarios of ``scripts/chaos``: each builds its lab, does harm, and returns a
``Row`` (scenario, messages, lost, wrong, seconds to converge).

    notifications     1,000 notifications: 20% duplicates, reordered, 5% forged additions
    sync_killed       policy_sync SIGKILLed mid-batch 10 times, restarted on its port
    pubsub_restart    the Pub/Sub emulator stopped mid-stream, then started again
    firestore_restart the Firestore emulator frozen mid-stream (verify must fail closed)
    graph_429         a storm of Graph 429s with Retry-After
    iam_writers       4 policy_sync processes writing the same services' IAM, plus conflicts

``quick`` shrinks every count and duration for the test suite. The identity
provider and clock scenarios are in ``chaos_tokens``.
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import os
import signal
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path

from chaos_lab import (GROUPS, PRINCIPAL, SERVICES, TENANT, Lab, Row, batches, group_id, lost, run_resource,
                       send_all, user_id)
from tests.support.emulators import Emulator


def stream(lab: Lab, n: int, dup: float = 0.20, forged: float = 0.05, chunk: int = 100) -> list[list[dict]]:
    """``n`` notifications in chunks: each chunk's genuine changes are made in Graph as
    it is built; duplicates repeat earlier notifications (of any chunk), forged ones
    claim additions Graph never made; each chunk is shuffled (reordering)."""
    chunks, sent = [], []
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        n_dup, n_forged = round(size * dup), round(size * forged)
        items = [lab.change() for _ in range(size - n_dup - n_forged)]
        pool = sent + items
        items += [lab.rng.choice(pool) for _ in range(n_dup)] + [lab.forged() for _ in range(n_forged)]
        lab.rng.shuffle(items)
        sent.extend(items)
        chunks.append(items)
    return chunks


def _play(lab: Lab, chunks: list[list[dict]]) -> tuple[list[dict], int, float]:
    """Send every chunk (its Graph changes are already made): accepted, refused, end time."""
    accepted, refused = [], 0
    for items in chunks:
        got, bad = send_all(lab, batches(lab.rng, items))
        accepted += got
        refused += bad
    return accepted, refused, time.monotonic()


def duplicate_log_entries(lab: Lab) -> int:
    """Change-log entries that repeat the previous entry of their key (a member added
    twice without a removal in between): a change applied twice."""
    last: dict[tuple, str] = {}
    dups = 0
    for e in lab.store.changes():
        key = (e.tenant, e.group, e.user) if e.kind.startswith("member_") else (e.service, e.role, e.member)
        dups += last.get(key) == e.kind
        last[key] = e.kind
    return dups


def _finish(lab: Lab, name: str, messages: int, accepted: list, ended: float, timeout: float,
            wrong: int = 0, note: str = "") -> Row:
    # Converged = Graph's truth held once every redelivery has drained: a late
    # redelivered removal revokes at once and the read that follows restores, so a
    # state seen between the two is re-checked (the emulator redelivers a failed
    # push after 1 s, hence 3 s of quiet).
    deadline, converge = time.monotonic() + timeout, None
    while converge is None and time.monotonic() < deadline:
        if lab.converge(deadline - time.monotonic(), also=lambda: lost(lab, accepted) == 0) is None:
            break
        reached = time.monotonic() - ended
        lab.settle(quiet=3.0)
        if lab.wrong_state() == 0 and lost(lab, accepted) == 0:
            converge = reached
    wrong += lab.wrong_state() + lab.wrong_decisions()
    return Row(name, messages, lost(lab, accepted), wrong, converge, note)


def notifications(folder: Path, pubsub: str, quick: bool = False) -> tuple[Row, Lab]:
    lab = Lab(folder, pubsub=pubsub)
    lab.serve()
    chunks = stream(lab, 200 if quick else 1000)
    accepted, refused, ended = _play(lab, chunks)
    n = sum(map(len, chunks))
    return _finish(lab, "notifications: 20% dup, reordered, 5% forged", n, accepted, ended, 60,
                   note=f"{refused} non-202"), lab


def sync_killed(folder: Path, pubsub: str, quick: bool = False) -> tuple[Row, Lab]:
    lab = Lab(folder, pubsub=pubsub)
    lab.serve()
    lab.graph.delays["/v1.0/groups/delta"] = 0.05   # batches in flight when the kill comes
    kills = 3 if quick else 10
    chunks = stream(lab, 150 if quick else 500, chunk=50)
    result: list = []
    player = threading.Thread(target=lambda: result.append(_play(lab, chunks)), daemon=True)
    player.start()
    for _ in range(kills):
        time.sleep(lab.rng.uniform(0.5, 1.5))
        port = lab.sync.port
        lab.sync.kill()
        lab.sync = lab.function("policy_sync", port=port)
    player.join()
    lab.graph.delays.clear()
    accepted, _, ended = result[0]
    name = f"policy_sync SIGKILL x{kills} mid-batch"
    row = _finish(lab, name, sum(map(len, chunks)), accepted, ended, 60)
    reconciled = ""
    if row.converge_s is None:
        # A message whose every delivery was cut after its removal commit leaves its
        # group short of a member (access denied, never granted) until a Graph read:
        # the scheduled reconcile is that read. Run it, as maintenance would, and say so.
        resync(lab)
        row = _finish(lab, name, sum(map(len, chunks)), accepted, ended, 30)
        reconciled = "; converged only after a reconcile"
    dups = duplicate_log_entries(lab)
    row.wrong += dups
    row.note = f"{dups} duplicate change-log entries{reconciled}"
    return row, lab


def resync(lab: Lab) -> None:
    """The maintenance reconcile, through the operator CLI (same path as notifications)."""
    cli = Path(__file__).resolve().parent / "aadrun"
    subprocess.run([str(cli), "resync", "--json", "--no-progress"], env={**os.environ, **lab.env},
                   capture_output=True, timeout=120, check=False)


def pubsub_restart(folder: Path, quick: bool = False) -> tuple[Row, Lab]:
    emulator = Emulator("pubsub").start()
    lab = Lab(folder, pubsub=emulator.host)
    lab._keep(emulator)
    lab.serve()
    first, second = stream(lab, 100 if quick else 300), stream(lab, 100 if quick else 300)
    accepted, _, _ = _play(lab, first)
    lab.converge(30)   # the emulator keeps nothing across a restart: stop it with its queue drained
    result: list = []
    player = threading.Thread(target=lambda: result.append(_play(lab, second)), daemon=True)
    emulator.stop()
    down = time.monotonic()
    player.start()
    time.sleep(2 if quick else 5)
    emulator.start()
    lab.provision()
    up = time.monotonic()
    player.join()
    more, refused, ended = result[0]
    n = sum(map(len, first + second))
    return _finish(lab, "Pub/Sub emulator restarted mid-stream", n, accepted + more, ended, 60,
                   note=f"down {up - down:.1f} s, {refused} POSTs got 503 and were retried"), lab


def firestore_restart(folder: Path, pubsub: str, quick: bool = False) -> tuple[Row, Lab]:
    # The emulator keeps its data in memory only (its --export-on-exit did not run on
    # SIGTERM here), so a restart would wipe the store, which Firestore never does: the
    # outage is the emulator frozen (SIGSTOP) and then thawed, unreachable but intact.
    firestore = Emulator("firestore").start()
    lab = Lab(folder, store="firestore", pubsub=pubsub, firestore=firestore.host)
    lab._keep(firestore)
    lab.serve()
    chunks = stream(lab, 100 if quick else 300, chunk=50)
    accepted, _, _ = _play(lab, chunks[:1])
    lab.converge(30)
    member = next(u for g in sorted(lab.truth) for u in sorted(lab.truth[g]))
    service = next(s for s in range(SERVICES) if any(member in lab.truth[group_id(g)]
                                                     for g in range(GROUPS) if g % SERVICES == s))
    result, probes, stop = [], defaultdict(int), threading.Event()
    player = threading.Thread(target=lambda: result.append(_play(lab, chunks[1:])), daemon=True)

    def probe(since: float) -> None:   # while the store is down: never 200
        while not stop.is_set():
            status = lab.verify_status(member, service)
            probes[status if time.monotonic() - since > 0.3 else "grace"] += 1
    os.killpg(firestore.proc.pid, signal.SIGSTOP)
    prober = threading.Thread(target=probe, args=(time.monotonic(),), daemon=True)
    player.start()
    prober.start()
    time.sleep(3 if quick else 8)
    stop.set()
    prober.join()
    os.killpg(firestore.proc.pid, signal.SIGCONT)
    player.join()
    more, _, ended = result[0]
    n = sum(map(len, chunks))
    note = "verify while down: " + ", ".join(f"{k}x{v}" for k, v in sorted(probes.items(), key=str))
    return _finish(lab, "Firestore emulator down mid-stream (frozen)", n, accepted + more, ended, 90,
                   wrong=probes.get(200, 0), note=note), lab


def graph_429(folder: Path, pubsub: str, quick: bool = False) -> tuple[Row, Lab]:
    lab = Lab(folder, pubsub=pubsub)
    lab.serve()
    chunks = stream(lab, 60 if quick else 200, chunk=50)
    lab.graph.fail_next(20 if quick else 60, status=429, retry_after=1)
    accepted, _, ended = _play(lab, chunks)
    row = _finish(lab, "Graph 429 storm, Retry-After 1 s", sum(map(len, chunks)), accepted, ended, 90)
    row.note = f"{sum(1 for c in lab.graph.calls() if c.status == 429)} answers were 429"
    return row, lab


def push_body(item: dict, message_id: str) -> dict:
    """A Pub/Sub push of the message graph_webhook makes of ``item``."""
    from aadrun.messages import membership_from_graph, rfc3339

    message = membership_from_graph(item, TENANT, rfc3339(dt.datetime.now(dt.timezone.utc)))
    return {"message": {"data": base64.b64encode(message.to_json()).decode(), "messageId": message_id,
                        "attributes": message.attributes, "orderingKey": message.ordering_key},
            "subscription": "projects/aadrun-chaos/subscriptions/policy-sync"}


def iam_writers(folder: Path, quick: bool = False) -> tuple[Row, Lab]:
    lab = Lab(folder)
    lab.webhook = None
    lab.verify = lab.function("verify", AADRUN_AUTHORITY_URL=lab.idp.url)
    writers = [lab.function("policy_sync") for _ in range(4)]
    foreign = {"role": "roles/run.viewer", "members": ["user:ops@example.com"]}
    for s in range(SERVICES):
        lab.cloudrun.set_policy(run_resource(s), {"version": 1, "bindings": [foreign]})
    items = [lab.change() for _ in range(80 if quick else 300)]
    queue, lock, redelivered = [(i, it) for i, it in enumerate(items)], threading.Lock(), [0]

    def writer(fn) -> None:
        while True:
            with lock:
                if not queue:
                    return
                i, item = queue.pop(0)
            if i % 10 == 0:
                lab.cloudrun.inject_conflicts(run_resource(i % SERVICES), 2)   # another writer got there first
            body = json.dumps(push_body(item, str(i))).encode()
            while lab.call(fn.port, "/", body, {"ce-id": str(i)})[0] != 200:
                with lock:
                    redelivered[0] += 1   # Pub/Sub would redeliver
                time.sleep(0.1)
    threads = [threading.Thread(target=writer, args=(fn,), daemon=True) for fn in writers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ended = time.monotonic()
    row = _finish(lab, "4 concurrent IAM writers + 409s", len(items), items, ended, 60)
    kept = sum(foreign in lab.cloudrun.policy(run_resource(s)).get("bindings", []) for s in range(SERVICES))
    dups = duplicate_log_entries(lab)
    row.wrong += (SERVICES - kept) + dups
    row.note = f"foreign bindings kept {kept}/{SERVICES}, {redelivered[0]} redeliveries, {dups} duplicate log entries"
    return row, lab


__all__ = ["notifications", "sync_killed", "pubsub_restart", "firestore_restart", "graph_429", "iam_writers",
           "duplicate_log_entries", "stream", "PRINCIPAL", "user_id"]

"""Load and long fuzzing for ``scripts/chaos``.

    load(quick)     verify at its HTTP ceiling (wrk, else a Python keep-alive generator)
                    for 60 s: no error, resident memory of the serving worker growing
                    under 10% (sampled from /proc); graph_webhook under 50 concurrent
                    senders POSTing Graph-sized batches (1-100 items), each sent again
                    after a 503 as Graph does: every item accepted at last and then on
                    the changes topic; in the full run every answer also a 202 within
                    Graph's 3 s deadline, a target the quick form (a test) only reports
    fuzz(examples)  the Hypothesis suites of tests/test_fuzz.py (verify requests, the
                    policy loader) and of tests/test_webhook.py (bodies, forged and
                    authentic items), with ``examples`` examples each and no deadline
"""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import chaos_lab
from chaos_lab import ROOT, TENANT, Lab, Row, group_id, user_id
from chaos_tokens import _seed

RSS_LIMIT, DEADLINE = 0.10, 3.0
RESEND_FOR = 60.0   # how long a refused batch is sent again


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker_pid(pid: int) -> int:
    """The serving process: gunicorn's worker (the master's child), else the process itself."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    return int(children[0]) if children else pid


def _generate(port: int, path: str, headers: dict, seconds: float) -> tuple[int, int]:
    """(requests, errors) from 16 keep-alive connections (when wrk is absent)."""
    import http.client

    counts, errors, stop = [0] * 16, [0] * 16, time.monotonic() + seconds

    def run(i: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        while time.monotonic() < stop:
            try:
                conn.request("GET", path, headers=headers)
                response = conn.getresponse()
                response.read()
                counts[i] += 1
                errors[i] += response.status != 200
            except (OSError, http.client.HTTPException):
                errors[i] += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts), sum(errors)


def verify_ceiling(folder: Path, seconds: float) -> tuple[Row, Lab]:
    lab = Lab(folder)
    member = _seed(lab)
    lab.verify = lab.function("verify", AADRUN_AUTHORITY_URL=lab.idp.url)
    token = lab.idp.mint(TENANT, oid=member, aud="api://svc-0", lifetime=7200)
    lab.secrets.add(token)
    headers, path = {"Authorization": f"Bearer {token}"}, "/verify?service=svc-0"   # forward-auth mode
    pid = worker_pid(lab.verify.proc.pid)
    _generate(lab.verify.port, path, headers, 2.0)                 # warm-up: caches, allocator, log queue
    samples: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            samples.append(rss_kib(pid))
    sampler = threading.Thread(target=sample, daemon=True)
    samples.append(rss_kib(pid))
    sampler.start()
    if shutil.which("wrk"):
        args = ["wrk", "-t2", "-c16", f"-d{max(1, round(seconds))}s", "-H", f"Authorization: Bearer {token}",
                f"{lab.verify.url}{path}"]
        out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
        total = int(re.search(r"(\d+) requests in", out).group(1))
        errors = sum(int(n) for n in re.findall(r"(?:Non-2xx or 3xx responses|connect|read|write|timeout) (\d+)",
                                                 out))
        tool = "wrk -t2 -c16"
    else:
        total, errors = _generate(lab.verify.port, path, headers, seconds)
        tool = "Python, 16 connections"
    done.set()
    sampler.join()
    samples.append(rss_kib(pid))
    growth = (samples[-1] - samples[0]) / samples[0]
    wrong = errors + (growth >= RSS_LIMIT)
    note = (f"{total / seconds:.0f} req/s ({tool}), {errors} errors, RSS {samples[0] / 1024:.1f} -> "
            f"{samples[-1] / 1024:.1f} MiB ({growth:+.1%}, peak {max(samples) / 1024:.1f})")
    return Row(f"verify at its HTTP ceiling, {seconds:.0f} s", total, 0, wrong, 0.0, note), lab


def webhook_senders(folder: Path, pubsub: str, seconds: float, senders: int = 50,
                    deadline_counts: bool = True) -> tuple[Row, Lab]:
    lab = Lab(folder, pubsub=pubsub)
    lab.webhook = lab.function("graph_webhook")
    lab.provision()
    published = _Tap(pubsub, lab.topics[0])
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    accepted: collections.Counter = collections.Counter()
    items_sent, unaccepted, lock, stop = [0], [0], threading.Lock(), time.monotonic() + seconds

    def sender(seed: int) -> None:
        import random

        rng = random.Random(seed)
        while time.monotonic() < stop:
            n = rng.randint(1, 100)
            batch = [lab.item(group_id(rng.randrange(6)), user_id(rng.randrange(24)), rng.random() < 0.3)
                     for _ in range(n)]
            with lock:
                items_sent[0] += n
            # A 503 is sent again, as Graph does (backing off), until a 202 or RESEND_FOR.
            delay, give_up = 0.05, time.monotonic() + RESEND_FOR
            while True:
                started = time.monotonic()
                status = lab.notify(batch)
                took = time.monotonic() - started
                done = status != 503 or time.monotonic() > give_up   # once: a batch given up is counted
                with lock:
                    latencies.append(took)
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 202:
                        accepted.update(_claim(item) for item in batch)
                    elif done:
                        unaccepted[0] += n
                if done:
                    break
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
    threads = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # An item answered 202 must be on the topic; one of a 503 may be too (Graph sends
    # it again, and policy_sync drops the duplicate). Every item must get its 202.
    lost = sum((accepted - published.claims()).values())
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    late = sum(1 for t in latencies if t > DEADLINE)
    wrong = unaccepted[0] + (late + statuses.get(503, 0) if deadline_counts else 0)
    note = (f"{len(latencies)} POSTs, answers {statuses}, p50 {ordered[len(ordered) // 2]:.3f} s, "
            f"p99 {p99:.3f} s, max {ordered[-1]:.3f} s, {late} over 3 s; {unaccepted[0]} items never "
            f"accepted, {sum(accepted.values())} accepted, {lost} of them not published")
    return Row(f"graph_webhook, {senders} senders x 1-100 items", items_sent[0], lost, wrong, 0.0, note), lab


def _claim(item: dict) -> tuple[str, str, bool]:
    """What one notification item claims: (group, user, removed)."""
    member = item["resourceData"]["members@delta"][0]
    return item["resourceData"]["id"], member["id"], "@removed" in member


class _Tap:
    """A pull subscription on a topic, made before anything is published to it."""

    def __init__(self, pubsub: str, topic: str):
        from google.cloud import pubsub_v1

        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub
        self.subscriber = pubsub_v1.SubscriberClient()
        self.name = self.subscriber.subscription_path(chaos_lab.PROJECT, f"tap-{topic}")
        self.subscriber.create_subscription(request={
            "name": self.name, "topic": f"projects/{chaos_lab.PROJECT}/topics/{topic}"})

    def claims(self) -> collections.Counter:
        """The (group, user, removed) claims of every distinct message published so far."""
        from aadrun.messages import from_json

        messages: dict[str, object] = {}
        empty = 0
        while empty < 3:   # the emulator may answer a pull empty while messages remain
            # At once when nothing is there: a waiting pull would wait out its whole timeout.
            answer = self.subscriber.pull(request={"subscription": self.name, "max_messages": 1000,
                                                   "return_immediately": True}, timeout=30)
            empty = 0 if answer.received_messages else empty + 1
            if not answer.received_messages:
                time.sleep(0.2)
            for received in answer.received_messages:
                message = from_json(received.message.data)
                messages[message.id] = message   # a message published twice counts once
            if answer.received_messages:
                self.subscriber.acknowledge(request={"subscription": self.name,
                                                     "ack_ids": [r.ack_id for r in answer.received_messages]})
        self.subscriber.delete_subscription(request={"subscription": self.name})
        self.subscriber.close()
        return collections.Counter((m.group, u, removed) for m in messages.values()
                                   for removed, users in ((False, m.added), (True, m.removed)) for u in users)


def load(quick: bool) -> list[Row]:
    from tests.support.emulators import Emulator

    rows, own = [], None
    pubsub = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not pubsub:
        own = Emulator("pubsub").start()
        pubsub = own.host
    try:
        for build in (lambda f: verify_ceiling(f, 5 if quick else 60),
                      lambda f: webhook_senders(f, pubsub, 3 if quick else 20,
                                                deadline_counts=not quick)):
            folder = Path(tempfile.mkdtemp(prefix="aadrun-load-"))
            lab = None
            try:
                row, lab = build(folder)
            finally:
                if lab:
                    lab.stop()
                shutil.rmtree(folder, ignore_errors=True)
            print(f"{row.scenario}: {row.messages} messages, {row.wrong} wrong; {row.note}", flush=True)
            rows.append(row)
    finally:
        if own:
            own.stop()
    return rows


def fuzz(examples: int) -> int:
    """The fuzz suites with ``examples`` examples each (exit status of pytest)."""
    env = {**os.environ, "AADRUN_FUZZ_EXAMPLES": str(examples)}
    tests = ["tests/test_fuzz.py", "scripts/chaos_fuzz_webhook.py"]
    print("fuzz: Hypothesis only (atheris is not among the requirements)", file=sys.stderr)
    return subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests], cwd=ROOT, env=env)


__all__ = ["load", "fuzz", "verify_ceiling", "webhook_senders", "json"]

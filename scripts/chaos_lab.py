"""The lab the resilience scenarios of ``scripts/chaos`` run in: every part on 127.0.0.1.

    Lab(folder, store="sqlite"|"firestore", pubsub=host|None)
      graph       the local Microsoft Graph + Entra token endpoint (TLS, tests/support)
      cloudrun    the local Cloud Run IAM server
      idp         the dev identity provider that signs users' tokens (verify trusts it)
      serve()     graph_webhook, policy_sync (push subscription) and verify as real
                  functions-framework processes
      truth       Graph's members per group; ``check()`` compares store, IAM and verify
      logs()      every log line the lab's processes wrote (for the secrets test)

The world: one tenant, ``GROUPS`` groups, ``SERVICES`` Cloud Run services each
binding two of them, a pool of ``USERS`` users and ``MALLORY`` users Graph never
puts in any group (the targets of forged additions).
"""
from __future__ import annotations

import dataclasses
import http.client
import json
import os
import random
import secrets
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(p) for p in (ROOT, ROOT / "functions") if str(p) not in sys.path]

from tests.support.devidp import DevIdentityProvider  # noqa: E402
from tests.support.cloudrun_server import CloudRunIamServer  # noqa: E402
from tests.support.graph_fixtures import CLIENT_ID, CLIENT_SECRET, make_pki  # noqa: E402
from tests.support.graph_server import GraphServer  # noqa: E402
from tests.support.parts import Parts
from tests.support.serve import FunctionServer  # noqa: E402

PROJECT = "aadrun-chaos"
TENANT = "11111111-1111-1111-1111-111111111111"
SUBSCRIPTION = "5ab5c000-0000-0000-0000-000000000001"
PRINCIPAL = "principal://iam.googleapis.com/locations/global/workforcePools/entra/subject/{}"
GROUPS, SERVICES, USERS, MALLORY = 6, 3, 24, 4
TOPICS = ("aadrun-membership-changes", "aadrun-policy-updates")


def group_id(i: int) -> str:
    return f"c0000000-0000-0000-0000-{i:012d}"


def user_id(i: int) -> str:
    return str(uuid.UUID(int=0x0a000000_0000_0000_0000_000000000000 + i))


def mallory_id(i: int) -> str:
    return str(uuid.UUID(int=0x0bad0000_0000_0000_0000_000000000000 + i))


def run_resource(s: int) -> str:
    return f"projects/chaos/locations/europe-west1/services/svc-{s}"


def service_groups(s: int) -> list[str]:
    return [group_id(g) for g in range(GROUPS) if g % SERVICES == s]


def policy_yaml() -> str:
    lines = [f"tenants:\n  - id: {TENANT}\n    audiences: [\"api://chaos\"]",
             f"principal: \"{PRINCIPAL.format('{oid}')}\"", "services:"]
    for s in range(SERVICES):
        lines.append(f"  - name: svc-{s}\n    tenant: {TENANT}\n    cloud_run: {run_resource(s)}\n"
                     f"    audience: api://svc-{s}\n    access:\n      - groups: [{', '.join(service_groups(s))}]")
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Row:
    """One line of the figures table; ``ok`` when nothing was lost and nothing was wrong."""

    scenario: str
    messages: int
    lost: int
    wrong: int
    converge_s: float | None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.wrong == 0 and self.converge_s is not None


class Lab:
    """Starts the parts a scenario asks for; ``stop`` ends all of them (safe twice)."""

    def __init__(self, folder: Path, *, store: str = "sqlite", pubsub: str | None = None,
                 firestore: str | None = None, extra_env: dict | None = None):
        self.folder, self.rng = folder, random.Random(7)
        self.parts = Parts()
        self.servers: list[FunctionServer] = []
        self.client_state = "cs-" + secrets.token_urlsafe(18)
        self.canary = "canary-" + secrets.token_hex(8)   # put in every body: must never reach a log
        self.secrets: set[str] = {self.client_state, self.canary}
        pki = make_pki(folder)
        os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = pki.ca_file
        self.graph = self._keep(GraphServer(pki).start())
        self.graph.add_app(TENANT, CLIENT_ID, secret=CLIENT_SECRET)
        self.cloudrun = self._keep(CloudRunIamServer().start())
        self.idp = self._keep(DevIdentityProvider().start())
        (folder / "policy.yaml").write_text(policy_yaml())
        if store == "firestore":
            os.environ["FIRESTORE_EMULATOR_HOST"] = firestore
            self.store_url = f"firestore://chaos-{uuid.uuid4().hex[:8]}"
        else:
            self.store_url = f"sqlite:///{folder}/state.db"
        self.pubsub = pubsub
        # Topics and subscription of this lab only: an emulator shared by several labs
        # must not push this lab's messages to another lab's (stopped) policy_sync.
        self.id = uuid.uuid4().hex[:8]
        self.topics = tuple(f"{t}-{self.id}" for t in TOPICS)
        self.env = {"AADRUN_POLICY_PATH": str(folder / "policy.yaml"), "AADRUN_STORE": self.store_url,
                    "AADRUN_IAM": "cloudrun", "AADRUN_CLOUDRUN_ENDPOINT": self.cloudrun.url,
                    "AADRUN_GRAPH_URL": self.graph.graph_url, "AADRUN_AUTHORITY_URL": self.graph.authority_url,
                    "AADRUN_CLIENT_ID": CLIENT_ID, "AADRUN_CLIENT_SECRET": CLIENT_SECRET,
                    "AADRUN_CLIENT_STATE": self.client_state, "GOOGLE_CLOUD_PROJECT": PROJECT,
                    "GOOGLE_APPLICATION_CREDENTIALS": "", "NO_GCE_CHECK": "true",
                    "CLOUDSDK_CONFIG": str(folder / "gcloud"), "REQUESTS_CA_BUNDLE": pki.ca_file,
                    "SSL_CERT_FILE": pki.ca_file, "AADRUN_TOPIC_CHANGES": self.topics[0],
                    "AADRUN_TOPIC_POLICY": self.topics[1], **(extra_env or {})}
        if firestore:
            self.env["FIRESTORE_EMULATOR_HOST"] = firestore
        if pubsub:
            self.env.update({"AADRUN_BUS": "pubsub", "PUBSUB_EMULATOR_HOST": pubsub})
        from aadrun.store import open_store

        # The lab reads the functions' store: same Firestore project as theirs.
        os.environ["GOOGLE_CLOUD_PROJECT"] = PROJECT
        self.store = open_store(self.store_url)
        self.truth = {group_id(g): set() for g in range(GROUPS)}
        self._conns = threading.local()

    def _keep(self, part):
        return self.parts.keep(part)

    # -- processes ------------------------------------------------------------------

    def function(self, target: str, port: int | None = None, **env: str) -> FunctionServer:
        signature = "cloudevent" if target == "policy_sync" else None
        server = FunctionServer(target, {**self.env, **env}, port=port, signature=signature).start()
        self.servers.append(server)
        return self._keep(server)

    def serve(self, sync: bool = True) -> None:
        """graph_webhook and verify; with ``sync``, policy_sync behind a push subscription."""
        self.webhook = self.function("graph_webhook")
        self.verify = self.function("verify", AADRUN_AUTHORITY_URL=self.idp.url)
        if sync:
            self.sync = self.function("policy_sync")
        self.provision()

    def provision(self) -> None:
        """Topics and the push subscription into policy_sync (again after an emulator restart)."""
        os.environ["PUBSUB_EMULATOR_HOST"] = self.pubsub
        from google.api_core import exceptions
        from google.cloud import pubsub_v1

        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        for topic in self.topics:
            try:
                publisher.create_topic(name=publisher.topic_path(PROJECT, topic))
            except exceptions.AlreadyExists:
                pass
        sync = getattr(self, "sync", None)
        if sync is not None:
            # No retry_policy: with one, the emulator (0.8.20) stops redelivering push
            # messages once several were nacked together (refused or non-2xx), so a
            # message cut by a kill may never come back. Without one it redelivers a
            # failed push after 1 s (its PUSH_RETRY_AFTER_FAIL_DELAY_MS), every time.
            try:
                subscriber.create_subscription(request={
                    "name": subscriber.subscription_path(PROJECT, f"policy-sync-{self.id}"),
                    "topic": publisher.topic_path(PROJECT, self.topics[0]), "ack_deadline_seconds": 30,
                    "push_config": {"push_endpoint": sync.url + "/"}})
            except exceptions.AlreadyExists:
                pass
        publisher.stop()
        subscriber.close()

    def logs(self) -> str:
        """What every function process of the lab wrote (stdout and stderr)."""
        return "\n".join(s.output() for s in self.servers)

    def stop(self) -> None:
        # The push subscription goes first: the emulator is shared by later scenarios,
        # and without a retry policy it would push this lab's unacked messages to a
        # dead endpoint every second for good, taking push slots from the others.
        if getattr(self, "sync", None) is not None:
            os.environ["PUBSUB_EMULATOR_HOST"] = self.pubsub
            from google.api_core import exceptions
            from google.cloud import pubsub_v1

            subscriber = pubsub_v1.SubscriberClient()
            try:
                subscriber.delete_subscription(
                    subscription=subscriber.subscription_path(PROJECT, f"policy-sync-{self.id}"),
                    retry=None, timeout=5)
            except exceptions.GoogleAPIError:
                pass   # already gone, or the emulator is (a scenario stops it)
            finally:
                subscriber.close()
        self.parts.stop()

    # -- HTTP -----------------------------------------------------------------------

    def call(self, port: int, path: str, body: bytes, headers: dict | None = None,
             method: str = "POST", timeout: float = 30) -> tuple[int, bytes]:
        """One request on this thread's keep-alive connection (a fresh one after an error)."""
        conns = self._conns.__dict__.setdefault("by_port", {})
        for attempt in (1, 2):
            conn = conns.get(port) or conns.setdefault(port, http.client.HTTPConnection("127.0.0.1", port,
                                                                                      timeout=timeout))
            try:
                conn.request(method, path, body, {"Content-Type": "application/json", **(headers or {})})
                response = conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, OSError):
                conn.close()
                conns.pop(port, None)
                if attempt == 2:
                    return 0, b""
        return 0, b""

    def notify(self, items: list[dict]) -> int:
        body = json.dumps({"value": items}).encode()
        return self.call(self.webhook.port, "/", body, timeout=10)[0]

    def verify_status(self, user: str, service: int, **mint) -> int:
        token = self.idp.mint(TENANT, oid=user, aud=f"api://svc-{service}", **mint)
        self.secrets.add(token)
        body = json.dumps({"service": f"svc-{service}", "canary": self.canary}).encode()
        return self.call(self.verify.port, "/verify", body, {"Authorization": f"Bearer {token}"})[0]

    # -- notifications and truth ----------------------------------------------------

    def item(self, group: str, user: str, removed: bool, *, state: str | None = None) -> dict:
        """One change notification as Graph POSTs it (a unique Graph ``id`` each)."""
        member = {"@odata.type": "#microsoft.graph.user", "id": user, **({"@removed": "deleted"} if removed else {})}
        return {"id": str(uuid.uuid4()), "changeType": "updated", "clientState": state or self.client_state,
                "resource": f"Groups/{group}", "tenantId": TENANT, "subscriptionId": SUBSCRIPTION,
                "subscriptionExpirationDateTime": "2030-01-01T00:00:00Z", "chaosCanary": self.canary,
                "resourceData": {"@odata.type": "#Microsoft.Graph.Group", "@odata.id": f"Groups/{group}",
                                 "id": group, "organizationId": TENANT, "members@delta": [member]}}

    def change(self) -> dict:
        """A real change in Graph (a random user toggled in a random group) and its notification."""
        group, user = self.rng.choice(sorted(self.truth)), user_id(self.rng.randrange(USERS))
        removed = user in self.truth[group]
        (self.truth[group].discard if removed else self.truth[group].add)(user)
        (self.graph.remove_members if removed else self.graph.add_members)(TENANT, group, [user])
        return self.item(group, user, removed)

    def forged(self) -> dict:
        """'Mallory was added': a valid client state, a claim Graph never confirms."""
        return self.item(self.rng.choice(sorted(self.truth)), mallory_id(self.rng.randrange(MALLORY)), False)

    def wrong_state(self) -> int:
        """Store memberships and Cloud Run IAM that differ from Graph (0 once converged)."""
        wrong = sum(1 for g, want in self.truth.items() if (self.store.group_members(TENANT, g) or set()) != want)
        for s in range(SERVICES):
            want = {PRINCIPAL.format(u) for g in service_groups(s) for u in self.truth[g]}
            live = {m for b in self.cloudrun.policy(run_resource(s)).get("bindings", [])
                    if b["role"] == "roles/run.invoker" for m in b["members"]}
            wrong += len(want ^ live)
        return wrong

    def wrong_decisions(self) -> int:
        """verify decisions (every user and Mallory, every service) that differ from Graph."""
        wrong = 0
        for user in [user_id(i) for i in range(USERS)] + [mallory_id(i) for i in range(MALLORY)]:
            for s in range(SERVICES):
                member = any(user in self.truth[g] for g in service_groups(s))
                wrong += (self.verify_status(user, s) == 200) != member
        return wrong

    def converge(self, timeout: float, also=lambda: True) -> float | None:
        """Seconds until store and IAM hold Graph's truth (and ``also()``), or None after ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            try:
                if self.wrong_state() == 0 and also():
                    return time.monotonic() - started
            except Exception:  # a store still recovering: try again
                pass
            time.sleep(0.1)
        return None

    def settle(self, quiet: float = 1.0, timeout: float = 30.0) -> None:
        """Wait until the change log has been still for ``quiet`` seconds: late
        duplicates drained (a stale removal revokes at once, a read restores)."""
        last, since, until = None, time.monotonic(), time.monotonic() + timeout
        while time.monotonic() < until:
            count = len(self.store.changes())
            if count != last:
                last, since = count, time.monotonic()
            elif time.monotonic() - since >= quiet:
                return
            time.sleep(0.1)


def lost(lab: Lab, accepted: list[dict]) -> int:
    """Accepted genuine notifications whose claim Graph still holds but the store does not show."""
    missing = 0
    for item in accepted:
        group = item["resourceData"]["id"]
        entry = item["resourceData"]["members@delta"][0]
        user, removed = entry["id"], "@removed" in entry
        if user.startswith("0bad") or (user in lab.truth[group]) == removed:
            continue   # forged, or a claim a later change superseded
        present = bool(lab.store.membership(TENANT, user, [group]).get(group))
        missing += present == removed
    return missing


def batches(rng: random.Random, items: list[dict], largest: int = 20) -> list[list[dict]]:
    """Items cut into Graph-sized POSTs of 1..``largest`` items."""
    out, i = [], 0
    while i < len(items):
        n = rng.randint(1, largest)
        out.append(items[i:i + n])
        i += n
    return out


def send_all(lab: Lab, posts: list[list[dict]], senders: int = 4, deadline: float = 60.0) -> tuple[list, int]:
    """POST every batch from ``senders`` threads; a non-202 is retried as Graph retries
    (backoff, up to ``deadline`` seconds). Returns (accepted items, non-202 answers)."""
    queue, accepted, refused, lock = list(posts), [], [0], threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not queue:
                    return
                batch = queue.pop(0)
            delay, until = 0.05, time.monotonic() + deadline
            while time.monotonic() < until:
                if lab.notify(batch) == 202:
                    with lock:
                        accepted.extend(batch)
                    break
                with lock:
                    refused[0] += 1
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted, refused[0]

"""The world policy_sync's tests run in: a policy, a local Microsoft Graph over TLS
(real MSAL and requests), a local Cloud Run IAM server (real google-cloud-run
client), the dev identity provider, and ``RecordingApp`` instances of the real App
on one store (SQLite, or the Firestore emulator through ``store_url``).

Use with ``from tests.support.sync_world import *`` next to
``from tests.support.graph_fixtures import *``:

    world       servers, settings and the App instances of a test (``world.app()`` adds one)
    app         the first App instance
    store_url   SQLite in the test's folder; parametrize indirectly with "firestore"
    audit_lines audit entries written during the test, as dicts
    change(), lifecycle()   changes-topic messages; slow_delta(), synced() helpers
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import textwrap
import time
import uuid

import pytest

from aadrun.app import App
from aadrun.bus import LocalBus
from tests.support.devidp import DevIdentityProvider
from aadrun.errors import Unavailable
from aadrun.keys import KeyCache
from aadrun.messages import LifecycleEvent, MembershipChange
from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from aadrun.verify import Verifier
from tests.support.cloudrun_server import CloudRunIamServer
from tests.support.graph_fixtures import TENANT, graph_settings

__all__ = ["no_adc", "store_url", "world", "app", "audit_lines"]   # fixtures; import the rest by name

G_ENG = "aaaaaaaa-0000-0000-0000-000000000001"
G_STAFF = "aaaaaaaa-0000-0000-0000-000000000002"
G_OPS = "aaaaaaaa-0000-0000-0000-000000000003"
G_BIG = "aaaaaaaa-0000-0000-0000-000000000004"
G_OTHER = "aaaaaaaa-0000-0000-0000-0000000000ff"     # named by no policy
SHARED = [f"cccccccc-0000-0000-0000-00000000000{i}" for i in range(1, 5)]
ALICE = "0a11ce00-0000-0000-0000-000000000001"
BOB = "0b0b0000-0000-0000-0000-000000000002"
CAROL = "0ca401a0-0000-0000-0000-000000000003"
MALLORY = "0bad0000-0000-0000-0000-00000000000d"
SUBSCRIPTION = "5ab5c000-0000-0000-0000-000000000001"
INVOKER = "roles/run.invoker"
RUN = "projects/p/locations/europe-west1/services/"
BILLING, REPORTS, BIG, SHARED_RUN = RUN + "billing", RUN + "reports", RUN + "big", RUN + "shared"
PRINCIPAL = "principal://iam.googleapis.com/locations/global/workforcePools/entra/subject/{}"
GROUP_PRINCIPAL = "principalSet://iam.googleapis.com/locations/global/workforcePools/entra/group/{}"

POLICY = textwrap.dedent(f"""\
    tenants:
      - id: {TENANT}
        audiences: ["api://aadrun-test"]
    principal: "{PRINCIPAL.format('{oid}')}"
    group_principal: "{GROUP_PRINCIPAL.format('{group_id}')}"
    services:
      - name: billing
        tenant: {TENANT}
        cloud_run: {BILLING}
        audience: api://billing
        access:
          - groups: [{G_ENG}]
          - groups: [{G_STAFF}]
            bind: group
      - name: reports
        tenant: {TENANT}
        cloud_run: {REPORTS}
        access:
          - groups: [{G_ENG}, {G_OPS}]
      - name: big
        tenant: {TENANT}
        cloud_run: {BIG}
        access:
          - groups: [{G_BIG}]
      - name: shared
        tenant: {TENANT}
        cloud_run: {SHARED_RUN}
        access:
          - groups: [{", ".join(SHARED)}]
    """)


def user(oid: str) -> str:
    return PRINCIPAL.format(oid)


def change(group: str, added=(), removed=(), salt: str = "") -> MembershipChange:
    """A changes-topic message as graph_webhook publishes it (id from its content)."""
    content = json.dumps([group, sorted(added), sorted(removed), salt]).encode()
    return MembershipChange(hashlib.sha256(content).hexdigest(), TENANT, group, tuple(sorted(added)),
                            tuple(sorted(removed)), SUBSCRIPTION, "2024-05-01T12:00:00.000Z")


def lifecycle(event: str, group: str | None = None) -> LifecycleEvent:
    return LifecycleEvent(hashlib.sha256(f"{event}{group}".encode()).hexdigest(), TENANT, group, SUBSCRIPTION,
                          event, "2024-05-01T12:00:00.000Z")


class RecordingApp(App):
    """The real App, with a local bus that records policy-update events."""

    def __init__(self, settings):
        super().__init__(settings)
        self.events: list[dict] = []
        self._test_bus = LocalBus(lambda messages: self.sync.handle_messages(messages),
                                  policy_handler=self.events.append)

    @property
    def bus(self):
        return self._test_bus


@dataclasses.dataclass
class World:
    graph: object
    cloudrun: CloudRunIamServer
    idp: DevIdentityProvider
    tmp: object
    settings: object
    apps: list

    def app(self) -> RecordingApp:
        """Another policy_sync instance (its own store object, clients and caches)."""
        self.apps.append(RecordingApp(self.settings))
        return self.apps[-1]

    def verifier(self) -> Verifier:
        """verify's core on its own store object (another process, in effect); G_STAFF
        (billing's other group) is synced empty so a non-member is ``not_member``."""
        synced(self.apps[0], G_STAFF, [])
        settings = dataclasses.replace(self.settings, authority_url=self.idp.url)
        policy = self.apps[0].policy
        store = open_store(self.settings.store_url)
        return Verifier(settings, lambda: policy, KeyCache(settings), lambda: store)

    def token(self, oid: str) -> str:
        return self.idp.mint(TENANT, oid=oid, aud="api://billing")

    def members(self, resource: str, role: str = INVOKER) -> set[str]:
        return {m for b in self.cloudrun.policy(resource).get("bindings", [])
                if b["role"] == role and "condition" not in b for m in b["members"]}


@pytest.fixture(autouse=True)
def no_adc(offline_google):
    """Google clients of these tests stay offline (see conftest)."""


@pytest.fixture
def store_url(request, tmp_path, monkeypatch):
    """SQLite in the test's folder, or (parametrized indirectly) the Firestore emulator
    in a project of the test's own."""
    if getattr(request, "param", "sqlite") == "firestore":
        request.getfixturevalue("firestore_emulator")
        monkeypatch.setenv("GOOGLE_CLOUD_PROJECT", f"aadrun-sync-{uuid.uuid4().hex[:12]}")
        return "firestore://"
    return f"sqlite:///{tmp_path}/state/aadrun.db"


@pytest.fixture
def world(graph_server, store_url, tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    with CloudRunIamServer() as cloudrun, DevIdentityProvider() as idp:
        settings = graph_settings(graph_server, policy_path=str(tmp_path / "policy.yaml"), store_url=store_url,
                                  iam_mode="cloudrun", cloudrun_endpoint=cloudrun.url)
        w = World(graph_server, cloudrun, idp, tmp_path, settings, [])
        w.app().store   # create the store before any test thread opens it
        yield w
        for app in w.apps:
            app.sync.close()
            app.store.close()


@pytest.fixture
def app(world) -> RecordingApp:
    return world.apps[0]


@pytest.fixture
def audit_lines():
    """Audit entries written through the aadrun logger, as dicts."""
    records: list[dict] = []

    class Capture(logging.Handler):
        def emit(self, record):
            records.append({"message": record.getMessage(), "severity": record.levelname,
                            **getattr(record, "json_fields", {})})

    log = logging.getLogger("aadrun")
    handler = Capture()
    log.addHandler(handler)
    yield records
    log.removeHandler(handler)


def slow_delta(server, seconds: float) -> list[float]:
    """Graph's delta answers reflect the directory as it is when asked, and arrive
    ``seconds`` later (the server's own lock is not held meanwhile). Returns the list
    of times (``time.time()``) at which each delayed answer was released."""
    real = server.handle
    released: list[float] = []

    def handle(method, path, query, headers, raw):
        answer = real(method, path, query, headers, raw)
        if path == "/v1.0/groups/delta":
            time.sleep(seconds)
            released.append(time.time())
        return answer

    server.handle = handle
    return released


def synced(app, group: str, members) -> None:
    """The store as a previous full read left it (members, no delta link)."""
    app.store.apply(GroupUpdate(TENANT, group, replace=frozenset(members), sync=SyncState(None, utcnow()),
                                source="test"))


def deliver(app, messages, attempts: int = 3):
    """``messages`` as Pub/Sub delivers them: a batch that failed (policy_sync raised)
    is delivered again, the same messages, up to ``attempts`` times in all."""
    for attempt in range(1, attempts + 1):
        try:
            return app.sync.handle_messages(messages)
        except Unavailable:
            if attempt == attempts:
                raise

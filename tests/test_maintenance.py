"""maintenance (aadrun.maintenance, aadrun.subscriptions) against the local Microsoft
Graph over TLS (real MSAL and requests), the local Cloud Run IAM server (real
google-cloud-run client) and a real SQLite store; graph_webhook and maintenance
itself run through the real functions-framework where the wiring matters."""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import textwrap
import threading
import time
import urllib.request
import uuid

import pytest

from aadrun.app import App
from aadrun.errors import Unavailable
from aadrun.graph import GraphClient, max_expiration
from aadrun.http import HttpRequest
from aadrun.maintenance import Maintenance
from aadrun.messages import MembershipChange
from aadrun.subscriptions import Subscriptions
from aadrun.store import GroupUpdate, SyncState, utcnow
from tests.support.cloudrun_server import CloudRunIamServer
from tests.support.emulators import free_port
from tests.support.graph_fixtures import *  # noqa: F401,F403 - graph_server, graph_pki, loopback_only
from tests.support.graph_fixtures import CLIENT_ID, CLIENT_SECRET, TENANT, graph_settings
from tests.support.serve import FunctionServer
from tests.support.sync_world import audit_lines  # noqa: F401 - fixture

G_ENG = "aaaaaaaa-0000-0000-0000-000000000001"
G_STAFF = "aaaaaaaa-0000-0000-0000-000000000002"
G_OTHER = "aaaaaaaa-0000-0000-0000-0000000000ff"     # named by no policy
ALICE = "0a11ce00-0000-0000-0000-000000000001"
BOB = "0b0b0000-0000-0000-0000-000000000002"
CAROL = "0ca401a0-0000-0000-0000-000000000003"
STATE = "client-state-for-tests"
NOTIFY = "https://aadrun-webhook.test/graph"
INVOKER = "roles/run.invoker"
BILLING = "projects/p/locations/europe-west1/services/billing"
PRINCIPAL = "principal://iam.googleapis.com/locations/global/workforcePools/entra/subject/{}"

POLICY = textwrap.dedent(f"""\
    tenants:
      - id: {TENANT}
        audiences: ["a0d1e2c3-0000-0000-0000-000000000001"]   # an API client id, as v2 tokens carry
    principal: "{PRINCIPAL.format('{oid}')}"
    services:
      - name: billing
        tenant: {TENANT}
        cloud_run: {BILLING}
        access:
          - groups: [{G_ENG}]
      - name: wiki
        tenant: {TENANT}
        access:
          - groups: [{G_STAFF}]
    """)


def user(oid: str) -> str:
    return PRINCIPAL.format(oid)


@pytest.fixture(autouse=True)
def no_adc(offline_google):
    """Google clients of these tests stay offline (see conftest)."""


@dataclasses.dataclass
class World:
    graph: object
    cloudrun: CloudRunIamServer
    settings: object
    apps: list

    def app(self, **overrides) -> App:
        self.apps.append(App(dataclasses.replace(self.settings, **overrides)))
        return self.apps[-1]

    def subs(self) -> dict[str, dict]:
        """Resource -> subscription, as the server holds them."""
        return {s["resource"]: s for s in self.graph.subscriptions(TENANT, CLIENT_ID).values()}

    def members(self, role: str = INVOKER) -> set[str]:
        return {m for b in self.cloudrun.policy(BILLING).get("bindings", [])
                if b["role"] == role and "condition" not in b for m in b["members"]}


@pytest.fixture
def world(graph_server, tmp_path):
    (tmp_path / "policy.yaml").write_text(POLICY)
    graph_server.set_members(TENANT, G_ENG, [ALICE])
    graph_server.set_members(TENANT, G_STAFF, [BOB])
    with CloudRunIamServer() as cloudrun:
        settings = graph_settings(graph_server, policy_path=str(tmp_path / "policy.yaml"),
                                  store_url=f"sqlite:///{tmp_path}/state.db", iam_mode="cloudrun",
                                  cloudrun_endpoint=cloudrun.url, client_states=(STATE,), notification_url=NOTIFY)
        w = World(graph_server, cloudrun, settings, [])
        yield w
        for app in w.apps:
            if app.__dict__.get("_sync") is not None:
                app.sync.close()


def actions(summary: dict) -> dict[str, str]:
    """Resource -> action of a run's subscriptions task."""
    return {a["resource"]: a["action"] for a in summary["tasks"]["subscriptions"]["actions"]}


# -- subscriptions -------------------------------------------------------------------

def test_subscriptions_pass_the_real_validation_handshake(world, tmp_path):
    world.graph.validate_notifications = True
    world.graph.require_https_notifications = False
    env = {"AADRUN_POLICY_PATH": str(tmp_path / "policy.yaml"), "AADRUN_STORE": f"sqlite:///{tmp_path}/hook.db",
           "AADRUN_CLIENT_STATE": STATE}
    with FunctionServer("graph_webhook", env) as webhook:
        summary = world.app(notification_url=webhook.url).maintenance.run(["subscriptions"])
    assert summary["ok"], summary
    assert actions(summary) == {f"/groups/{G_ENG}": "created", f"/groups/{G_STAFF}": "created"}
    # Both URLs of both subscriptions were validated by graph_webhook echoing the token.
    assert sorted(world.graph.validations) == sorted([(webhook.url, True), (webhook.url + "/lifecycle", True)] * 2)
    for group in (G_ENG, G_STAFF):
        sub = world.subs()[f"/groups/{group}"]
        assert (sub["changeType"], sub["clientState"]) == ("updated,deleted", STATE)
        assert (sub["notificationUrl"], sub["lifecycleNotificationUrl"]) == (webhook.url, webhook.url + "/lifecycle")


def test_a_failed_handshake_is_reported_and_the_http_answer_is_503(world):
    world.graph.validate_notifications = True
    world.graph.require_https_notifications = False
    app = world.app(notification_url=f"http://127.0.0.1:{free_port()}")   # nobody listens
    response = app.maintenance.handle(HttpRequest("POST", "/", {}, {}, b'{"tasks": ["subscriptions"]}'))
    body = response.json_body()
    assert response.status == 503 and not body["ok"]   # every subscription failed: so did the run
    task = body["tasks"]["subscriptions"]
    assert task["status"] == "error" and task["counts"] == {"error": 2}
    assert all("ValidationError" in e["error"] for e in task["errors"]) and world.subs() == {}


def test_second_run_keeps_then_renews_near_expiry(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    assert set(actions(app.maintenance.run(["subscriptions"])).values()) == {"kept"}
    eng, staff = world.subs()[f"/groups/{G_ENG}"], world.subs()[f"/groups/{G_STAFF}"]
    # Renewed with under 3 days left, so a daily run (or one that fails twice) never lets
    # a subscription lapse; kept with more.
    world.graph.set_expiration(TENANT, CLIENT_ID, eng["id"], utcnow() + dt.timedelta(days=2.5))
    world.graph.set_expiration(TENANT, CLIENT_ID, staff["id"], utcnow() + dt.timedelta(days=3.5))
    before = len(world.graph.calls("PATCH"))
    assert actions(app.maintenance.run(["subscriptions"])) == {f"/groups/{G_ENG}": "renewed",
                                                                 f"/groups/{G_STAFF}": "kept"}
    assert len(world.graph.calls("PATCH")) == before + 1
    renewed = dt.datetime.fromisoformat(world.subs()[f"/groups/{G_ENG}"]["expirationDateTime"].replace("Z", "+00:00"))
    # To Graph's maximum for groups (41,760 minutes), less a margin of minutes.
    longest = utcnow() + dt.timedelta(minutes=41_760)
    assert dt.timedelta(0) < longest - renewed < dt.timedelta(minutes=15)


@pytest.mark.parametrize("renewals_gone", [1, 50])
def test_a_subscription_gone_when_renewed_is_created_again_or_the_run_fails(world, renewals_gone):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    eng = world.subs()[f"/groups/{G_ENG}"]
    world.graph.set_expiration(TENANT, CLIENT_ID, eng["id"], utcnow() + dt.timedelta(days=2))
    # The renewal answers 404 (gone between the listing and the renewal): aadrun creates
    # it again. (Graph here still holds it, so the create meets 409 and adopts it.) While
    # Graph goes on listing it and answering gone, create and renew must not call each
    # other without end: the run fails, and the next tries again.
    world.graph.fail_next(renewals_gone, status=404, retry_after=None, code="ResourceNotFound", method="PATCH",
                          path=f"/v1.0/subscriptions/{eng['id']}")
    before = len(world.graph.calls(prefix="/v1.0/subscriptions"))
    summary = app.maintenance.run(["subscriptions"])
    world.graph.clear_faults()
    calls = world.graph.calls(prefix="/v1.0/subscriptions")[before:]
    done = [a["action"] for a in summary["tasks"]["subscriptions"]["actions"] if a["resource"] == f"/groups/{G_ENG}"]
    assert actions(summary)[f"/groups/{G_STAFF}"] == "kept" and f"/groups/{G_ENG}" in world.subs()
    if renewals_gone == 1:
        assert summary["ok"] and done == ["exists", "renewed"]
    else:   # list, renew, create, list, renew, create
        assert not summary["ok"] and done == ["exists", "error"] and len(calls) <= 6, calls
        assert actions(app.maintenance.run(["subscriptions"]))[f"/groups/{G_ENG}"] == "renewed"


def test_expired_subscriptions_whose_re_creation_failed_are_a_failed_run(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    for sub in world.subs().values():   # still listed, already expired: deleted and created again
        world.graph.set_expiration(TENANT, CLIENT_ID, sub["id"], utcnow() - dt.timedelta(minutes=1))
    world.graph.fail_next(2, status=403, retry_after=None, code="ExtensionError", method="POST",
                          path="/v1.0/subscriptions")
    status, answer = post(app, b'{"tasks": ["subscriptions"]}')
    assert sorted(a["action"] for a in answer["tasks"]["subscriptions"]["actions"]) == [
        "deleted", "deleted", "error", "error"]
    assert status == 503   # nothing is covered: the deletions made for the creates are no progress


def test_a_renewal_keeps_the_record_of_the_subscription_s_client_state(world, monkeypatch):
    # The record of which state a subscription was made with lives as long as the
    # subscription: a renewal extends it, so a renewed subscription is not replaced.
    import aadrun.subscriptions as subscriptions_module

    monkeypatch.setattr(subscriptions_module, "STATE_RECORD_TTL_S", 2.0)
    app = world.app()
    app.maintenance.run(["subscriptions"])
    eng = world.subs()[f"/groups/{G_ENG}"]
    time.sleep(1.2)
    world.graph.set_expiration(TENANT, CLIENT_ID, eng["id"], utcnow() + dt.timedelta(days=2))
    assert actions(app.maintenance.run(["subscriptions"]))[f"/groups/{G_ENG}"] == "renewed"
    time.sleep(1.2)   # past the record's first lifetime, within the renewed one
    assert actions(app.maintenance.run(["subscriptions"]))[f"/groups/{G_ENG}"] == "kept"


def test_vanished_and_unreferenced_subscriptions(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    graph = GraphClient(world.settings, TENANT)
    graph.delete_subscription(world.subs()[f"/groups/{G_ENG}"]["id"])           # removed behind our back
    graph.create_subscription(f"/groups/{G_OTHER}", NOTIFY, NOTIFY + "/lifecycle", STATE, max_expiration())
    assert actions(app.maintenance.run(["subscriptions"])) == {
        f"/groups/{G_ENG}": "created", f"/groups/{G_STAFF}": "kept", f"/groups/{G_OTHER}": "deleted"}
    assert sorted(world.subs()) == sorted([f"/groups/{G_ENG}", f"/groups/{G_STAFF}"])


def test_a_client_state_rotation_replaces_every_subscription_then_the_old_state_can_go(world):
    world.app().maintenance.run(["subscriptions"])
    before = {r: s["id"] for r, s in world.subs().items()}
    assert {s["clientState"] for s in world.subs().values()} == {STATE}
    # Step 1: NEW first, OLD still accepted. Graph never returns a clientState: aadrun knows
    # which state each subscription carries from its own record, and replaces the old ones.
    rotating = world.app(client_states=("new-state", STATE))
    summary = rotating.maintenance.run(["subscriptions"])
    assert actions(summary) == {f"/groups/{G_ENG}": "replaced", f"/groups/{G_STAFF}": "replaced"}
    done = summary["tasks"]["subscriptions"]["actions"]
    assert {a["replaced"] for a in done if a["action"] == "replaced"} == set(before.values())
    assert {a["subscription"] for a in done if a["action"] == "deleted"} == set(before.values())
    assert all("not the first configured" in a["why"] for a in done if a["action"] == "replaced")
    assert {s["clientState"] for s in world.subs().values()} == {"new-state"}
    assert not set(before.values()) & {s["id"] for s in world.subs().values()}
    assert set(actions(rotating.maintenance.run(["subscriptions"])).values()) == {"kept"}
    # Step 2: OLD dropped: nothing left to replace.
    assert set(actions(world.app(client_states=("new-state",)).maintenance.run(["subscriptions"])).values()) \
        == {"kept"}


def test_a_replacement_whose_create_failed_is_created_by_the_next_run(world):
    world.app().maintenance.run(["subscriptions"])
    rotating = world.app(client_states=("new-state", STATE))
    # Graph refuses the first re-create (after its delete): reported, and the group waits
    # for the scheduled reconcile until the next run creates it.
    world.graph.fail_next(1, status=403, retry_after=None, code="ExtensionError", method="POST",
                          path="/v1.0/subscriptions")
    before = {r: s["id"] for r, s in world.subs().items()}
    summary = rotating.maintenance.run(["subscriptions"])
    assert sorted(actions(summary).values()) == ["error", "replaced"] and not summary["ok"]
    assert len(world.subs()) == 1
    # The subscription deleted before the failed create is named: that group is uncovered.
    [failed] = [r for r, a in actions(summary).items() if a == "error"]
    assert [a["subscription"] for a in summary["tasks"]["subscriptions"]["actions"]
            if a["resource"] == failed and a["action"] == "deleted"] == [before[failed]]
    assert set(actions(rotating.maintenance.run(["subscriptions"])).values()) <= {"created", "kept"}
    assert {s["clientState"] for s in world.subs().values()} == {"new-state"} and len(world.subs()) == 2


def test_a_subscription_graph_created_is_reported_even_when_its_state_record_fails(world):
    class StoreDownAfterCreate:
        """The app's store, whose write of a subscription's state record fails."""

        def __init__(self, store):
            self._store = store

        def acquire_lease(self, name, holder, ttl):
            if name.startswith("graph-subscription-state/"):
                raise Unavailable("the store did not answer")
            return self._store.acquire_lease(name, holder, ttl)

        def __getattr__(self, name):
            return getattr(self._store, name)

    app = world.app()
    subs = Subscriptions(app.settings, StoreDownAfterCreate(app.store), app.maintenance.graph)
    summary = Maintenance(app, subscriptions=subs).run(["subscriptions"])
    done = summary["tasks"]["subscriptions"]["actions"]
    created = {a["resource"]: a["subscription"] for a in done if a["action"] == "created"}
    assert created == {r: s["id"] for r, s in world.subs().items()} and len(created) == 2   # each named
    assert sorted(a["action"] for a in done) == ["created", "created", "error", "error"]


def test_a_rotation_whose_every_replacement_failed_is_a_failed_run(world):
    world.app().maintenance.run(["subscriptions"])
    world.graph.fail_next(2, status=403, retry_after=None, code="ExtensionError", method="POST",
                          path="/v1.0/subscriptions")
    status, answer = post(world.app(client_states=("new-state",)), b'{"tasks": ["subscriptions"]}')
    done = answer["tasks"]["subscriptions"]["actions"]
    assert sorted(a["action"] for a in done) == ["deleted", "deleted", "error", "error"]
    assert all(a["replacing"] for a in done if a["action"] == "deleted")
    assert status == 503 and world.subs() == {}     # every group uncovered: Cloud Scheduler must see it


def test_a_state_changed_in_one_step_still_replaces_the_subscriptions_of_the_old_one(world):
    world.app().maintenance.run(["subscriptions"])
    summary = world.app(client_states=("new-state",)).maintenance.run(["subscriptions"])
    assert set(actions(summary).values()) == {"replaced"}
    assert {s["clientState"] for s in world.subs().values()} == {"new-state"}


def test_subscriptions_made_before_states_were_recorded_are_replaced_once(world):
    graph = GraphClient(world.settings, TENANT)
    for group in (G_ENG, G_STAFF):   # no record of their state: it may be an earlier one
        graph.create_subscription(f"/groups/{group}", NOTIFY, NOTIFY + "/lifecycle", "an-earlier-state",
                                  max_expiration())
    summary = world.app().maintenance.run(["subscriptions"])
    assert set(actions(summary).values()) == {"replaced"}
    assert all("unknown" in a["why"] for a in summary["tasks"]["subscriptions"]["actions"] if a["action"] == "replaced")
    assert {s["clientState"] for s in world.subs().values()} == {STATE}
    assert set(actions(world.app().maintenance.run(["subscriptions"])).values()) == {"kept"}


def test_a_subscription_not_told_of_permanent_deletions_is_replaced_once(world):
    world.app().maintenance.run(["subscriptions"])
    # As an earlier version made it: "updated" alone, which a security group's permanent
    # deletion does not fire. Graph cannot change a subscription's changeType.
    old = world.subs()[f"/groups/{G_ENG}"]
    world.graph.edit_subscription(TENANT, CLIENT_ID, old["id"], changeType="updated")
    summary = world.app().maintenance.run(["subscriptions"])
    assert actions(summary) == {f"/groups/{G_ENG}": "replaced", f"/groups/{G_STAFF}": "kept"}
    [replaced] = [a for a in summary["tasks"]["subscriptions"]["actions"] if a["action"] == "replaced"]
    assert replaced["replaced"] == old["id"] and "'updated'" in replaced["why"]
    assert {s["changeType"] for s in world.subs().values()} == {"updated,deleted"}
    assert set(actions(world.app().maintenance.run(["subscriptions"])).values()) == {"kept"}


def test_during_a_rotation_a_subscription_of_unknown_state_is_replaced(world):
    graph = GraphClient(world.settings, TENANT)
    graph.create_subscription(f"/groups/{G_ENG}", NOTIFY, NOTIFY + "/lifecycle", STATE, max_expiration())
    assert actions(world.app(client_states=("new-state", STATE)).maintenance.run(["subscriptions"])) == {
        f"/groups/{G_ENG}": "replaced", f"/groups/{G_STAFF}": "created"}
    assert {s["clientState"] for s in world.subs().values()} == {"new-state"}


def test_409_for_another_urls_subscription_is_left_alone_and_fails_the_run(world, audit_lines):
    graph = GraphClient(world.settings, TENANT)
    # The same app already subscribes to G_ENG, for another endpoint (a deployment at an
    # earlier URL): left alone, but the run is not ok, since that group now waits for the resync.
    other = graph.create_subscription(f"/groups/{G_ENG}", "https://old.example/hook", None, "x", max_expiration())
    status, summary = post(world.app(), b'{"tasks": ["subscriptions"]}')
    task = summary["tasks"]["subscriptions"]
    assert [a["action"] for a in task["actions"]] == ["foreign", "created"]
    foreign = task["actions"][0]
    assert (foreign["subscription"], foreign["notification_url"]) == (other["id"], "https://old.example/hook")
    assert task["errors"] == [foreign] and task["status"] == "error" and not summary["ok"]
    assert status == 200   # G_STAFF is covered: the run made progress
    assert len(world.graph.calls("POST", "/v1.0/subscriptions")) == 3
    severities = {line["resource"]: line["severity"] for line in audit_lines if line["event"] == "subscription"}
    assert severities == {f"/groups/{G_ENG}": "ERROR", f"/groups/{G_STAFF}": "INFO"}
    assert "resync" in foreign["why"]


def test_409_after_a_concurrent_create_adopts_the_subscription(world):
    class StaleList(GraphClient):
        """Lists nothing the first time, as if another run created everything right after."""
        stale = True

        def list_subscriptions(self):
            listed = super().list_subscriptions()
            stale, StaleList.stale = StaleList.stale, False
            return [] if stale else listed

    app = world.app()
    app.maintenance.run(["subscriptions"])
    created = {r: s["id"] for r, s in world.subs().items()}
    maintenance = Maintenance(app, graph_factory=lambda tenant: StaleList(app.settings, tenant))
    summary = maintenance.run(["subscriptions"])
    assert set(actions(summary).values()) == {"exists"} and summary["ok"]
    assert {r: s["id"] for r, s in world.subs().items()} == created


def test_past_the_quota_one_tenant_wide_subscription(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    small = Maintenance(app, subscriptions=Subscriptions(app.settings, app.store, app.maintenance.graph, quota=1))
    before = len(world.graph.calls())
    assert actions(small.run(["subscriptions"])) == {
        "/groups": "created", f"/groups/{G_ENG}": "deleted", f"/groups/{G_STAFF}": "deleted"}
    assert list(world.subs()) == ["/groups"]
    # Ours filled the quota: one was deleted to make room before the tenant-wide one was created.
    calls = [c.method for c in world.graph.calls()[before:] if c.path.startswith("/v1.0/subscriptions")]
    assert calls[:3] == ["GET", "DELETE", "POST"]
    assert actions(app.maintenance.run(["subscriptions"])) == {   # back within the quota
        f"/groups/{G_ENG}": "created", f"/groups/{G_STAFF}": "created", "/groups": "deleted"}


def test_back_within_the_quota_by_less_than_a_slot_the_tenant_wide_subscription_stays(world):
    # Two groups, a quota of two: while it exists, the tenant-wide subscription holds
    # the slot the second group's would need.
    world.graph.subscription_quota = 2
    app = world.app()
    tiny = Maintenance(app, subscriptions=Subscriptions(app.settings, app.store, app.maintenance.graph, quota=0))
    assert actions(tiny.run(["subscriptions"])) == {"/groups": "created"}
    sized = Maintenance(app, subscriptions=Subscriptions(app.settings, app.store, app.maintenance.graph, quota=2))
    for _ in range(2):
        summary = sized.run(["subscriptions"])
        assert actions(summary) == {"/groups": "kept"} and summary["ok"]
    roomy = Maintenance(app, subscriptions=Subscriptions(app.settings, app.store, app.maintenance.graph, quota=3))
    world.graph.subscription_quota = 3
    assert actions(roomy.run(["subscriptions"])) == {
        f"/groups/{G_ENG}": "created", f"/groups/{G_STAFF}": "created", "/groups": "deleted"}


def test_when_the_tenant_wide_subscription_fails_only_the_slot_freed_for_it_is_lost(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    # Graph refuses the tenant-wide subscription that would replace them (e.g. its quota is used up).
    world.graph.fail_next(1, status=403, retry_after=None, code="ExtensionError", method="POST",
                          path="/v1.0/subscriptions")
    small = Maintenance(app, subscriptions=Subscriptions(app.settings, app.store, app.maintenance.graph, quota=1))
    assert actions(small.run(["subscriptions"])) == {
        "/groups": "error", f"/groups/{G_ENG}": "deleted", f"/groups/{G_STAFF}": "kept"}
    assert list(world.subs()) == [f"/groups/{G_STAFF}"]   # still covered until a later run succeeds


def test_the_first_run_past_the_quota_creates_the_tenant_wide_subscription(world):
    app = world.app()   # nothing of ours yet: no slot to free
    small = Maintenance(app, subscriptions=Subscriptions(app.settings, app.store, app.maintenance.graph, quota=0))
    assert actions(small.run(["subscriptions"])) == {"/groups": "created"}


def test_a_tenant_wide_subscription_to_another_endpoint_does_not_replace_ours(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    graph = GraphClient(world.settings, TENANT)
    graph.create_subscription("/groups", "https://old.example/hook", None, "x", max_expiration())
    small = Maintenance(app, subscriptions=Subscriptions(app.settings, app.store, app.maintenance.graph, quota=1))
    done = actions(small.run(["subscriptions"]))
    assert done["/groups"] == "foreign" and done[f"/groups/{G_STAFF}"] == "kept"   # its notifications go elsewhere
    assert f"/groups/{G_STAFF}" in world.subs()


def test_a_failed_create_does_not_keep_a_subscription_nothing_replaces(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    graph = GraphClient(world.settings, TENANT)
    graph.create_subscription(f"/groups/{G_OTHER}", NOTIFY, NOTIFY + "/lifecycle", STATE, max_expiration())
    graph.delete_subscription(world.subs()[f"/groups/{G_ENG}"]["id"])
    world.graph.fail_next(1, status=403, retry_after=None, code="Forbidden", method="POST",
                          path="/v1.0/subscriptions")
    assert actions(app.maintenance.run(["subscriptions"])) == {
        f"/groups/{G_ENG}": "error", f"/groups/{G_STAFF}": "kept", f"/groups/{G_OTHER}": "deleted"}


def test_a_tenant_naming_no_group_without_graph_access_is_not_an_error(world, tmp_path):
    other = "33333333-3333-3333-3333-333333333333"   # listed, no service, no app consented there
    app = with_policy(world, tmp_path, POLICY.replace("\nprincipal:", f"\n  - id: {other}\n"
                                                      f"    audiences: [\"api://x\"]\nprincipal:"))
    assert other in app.policy.tenants
    task = app.maintenance.run(["subscriptions"])["tasks"]["subscriptions"]
    assert task["status"] == "ok" and task["counts"] == {"created": 2, "unreachable": 1}


def test_graph_refusing_every_tenant_fails_the_run_even_with_a_tenant_naming_no_group(world, tmp_path,
                                                                                      audit_lines):
    other = "33333333-3333-3333-3333-333333333333"   # listed, no service: "unreachable" is no progress
    text = POLICY.replace("\nprincipal:", f"\n  - id: {other}\n    audiences: [\"api://x\"]\nprincipal:")
    path = tmp_path / "two.yaml"
    path.write_text(text)
    status, answer = post(world.app(policy_path=str(path), client_secret="no-longer-valid"),
                          b'{"tasks": ["subscriptions"]}')
    assert answer["tasks"]["subscriptions"]["counts"] == {"error": 1, "unreachable": 1}
    assert status == 503 and world.subs() == {}   # Cloud Scheduler must see it fail
    # ... and the log says which tenant and why: a scheduler keeps no response body.
    logged = {(a["tenant"], a["action"], a["severity"]) for a in audit_lines if a["event"] == "subscription"}
    assert logged == {(TENANT, "error", "ERROR"), (other, "unreachable", "WARNING")}
    assert all(a["tenant"] in a["error"] for a in audit_lines if a["event"] == "subscription")


def test_a_policy_change_near_the_quota_frees_the_slots_it_no_longer_needs_first(world, tmp_path):
    world.graph.subscription_quota = 3
    world.app().maintenance.run(["subscriptions"])   # G_ENG, G_STAFF
    g_a, g_b = "aaaaaaaa-0000-0000-0000-0000000000a1", "aaaaaaaa-0000-0000-0000-0000000000b2"
    app = with_policy(world, tmp_path, POLICY.replace(f"groups: [{G_STAFF}]", f"groups: [{g_a}, {g_b}]"))
    small = Maintenance(app, subscriptions=Subscriptions(app.settings, app.store, app.maintenance.graph, quota=3))
    summary = small.run(["subscriptions"])
    assert summary["ok"] and actions(summary) == {f"/groups/{G_ENG}": "kept", f"/groups/{G_STAFF}": "deleted",
                                                  f"/groups/{g_a}": "created", f"/groups/{g_b}": "created"}
    assert sorted(world.subs()) == sorted(f"/groups/{g}" for g in (G_ENG, g_a, g_b))


def test_a_cleanup_where_one_deletion_failed_is_a_partial_failure_not_a_failed_run(world, tmp_path):
    world.app().maintenance.run(["subscriptions"])
    # No service names a group any more: both subscriptions are to go; one delete fails.
    app = with_policy(world, tmp_path, POLICY.replace(f"groups: [{G_ENG}]", "app_roles: [X]")
                      .replace(f"groups: [{G_STAFF}]", "app_roles: [Y]"))
    assert app.policy.referenced_groups() == {TENANT: set()}
    staff = world.subs()[f"/groups/{G_STAFF}"]["id"]
    world.graph.fail_next(1, status=500, retry_after=None, code="InternalServerError", method="DELETE",
                          path=f"/v1.0/subscriptions/{staff}")
    status, answer = post(app, b'{"tasks": ["subscriptions"]}')
    assert answer["tasks"]["subscriptions"]["counts"] == {"deleted": 1, "error": 1}
    assert status == 200 and not answer["ok"] and list(world.subs()) == [f"/groups/{G_STAFF}"]


def test_an_entra_outage_in_one_tenant_leaves_the_other_tenants_subscriptions_kept(world):
    down = "00000000-0000-0000-0000-00000000000a"   # taken first
    world.graph.add_app(down, CLIENT_ID, secret=CLIENT_SECRET)
    world.graph.entra_outage(down, 503)
    app = world.app()
    done = Subscriptions(app.settings, app.store, app.maintenance.graph).ensure({down: {G_ENG}, TENANT: {G_ENG}})
    assert [(a["tenant"], a["action"]) for a in done] == [(down, "error"), (TENANT, "created")]
    assert "HTTP 503" in done[0]["error"] and list(world.subs()) == [f"/groups/{G_ENG}"]


def test_a_tenant_whose_services_name_no_group_keeps_no_subscription(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    assert len(world.subs()) == 2
    # The policy still lists the tenant, but no service of it names a group any more.
    groupless = dataclasses.replace(app.policy, services={})
    assert groupless.referenced_groups() == {TENANT: set()}
    assert sorted(a["action"] for a in app.maintenance.subscriptions.ensure(groupless.referenced_groups())) == \
        ["deleted", "deleted"]
    assert world.subs() == {}


def test_reauthorize_and_renew_never_within_ten_minutes(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    subs = app.maintenance.subscriptions
    eng, staff = world.subs()[f"/groups/{G_ENG}"]["id"], world.subs()[f"/groups/{G_STAFF}"]["id"]
    assert subs.reauthorize(TENANT, eng) == "reauthorized"
    assert world.graph.reauthorizations(TENANT, CLIENT_ID, eng) == 1
    for sub in (eng, staff):
        world.graph.set_expiration(TENANT, CLIENT_ID, sub, utcnow() + dt.timedelta(hours=1))
    # eng was just reauthorized: its renewal waits for the next run; staff is renewed.
    assert actions(app.maintenance.run(["subscriptions"])) == {f"/groups/{G_ENG}": "deferred",
                                                                 f"/groups/{G_STAFF}": "renewed"}
    # staff was just renewed, which reauthorizes it: no reauthorize call now.
    assert subs.reauthorize(TENANT, staff) == "deferred"
    assert world.graph.reauthorizations(TENANT, CLIENT_ID, staff) == 0
    assert subs.reauthorize(TENANT, "0" * 32) == "gone"


def test_a_renewal_that_failed_does_not_defer_a_reauthorization(world):
    app = world.app()
    app.maintenance.run(["subscriptions"])
    subs = app.maintenance.subscriptions
    eng = world.subs()[f"/groups/{G_ENG}"]["id"]
    world.graph.set_expiration(TENANT, CLIENT_ID, eng, utcnow() + dt.timedelta(hours=1))
    world.graph.fail_next(1, status=500, retry_after=None, code="InternalServerError", method="PATCH")
    assert "error" in actions(app.maintenance.run(["subscriptions"])).values()   # the renewal failed
    assert subs.reauthorize(TENANT, eng) == "reauthorized"    # so Graph's reauthorizationRequired is answered
    assert world.graph.reauthorizations(TENANT, CLIENT_ID, eng) == 1


# -- reconcile and drift -------------------------------------------------------------------

def test_reconcile_finds_a_change_whose_notification_never_came(world):
    app = world.app()
    first = app.maintenance.run(["reconcile"])["tasks"]["reconcile"]
    assert first["status"] == "ok" and first["added"] == 2 and first["groups"] == 2
    assert world.members() == {user(ALICE)}
    world.graph.add_members(TENANT, G_ENG, [CAROL])     # Graph changed; no notification arrives
    world.graph.remove_members(TENANT, G_ENG, [ALICE])
    task = app.maintenance.run(["reconcile"])["tasks"]["reconcile"]
    assert (task["status"], task["added"], task["removed"]) == ("ok", 1, 1)
    assert task["reads"] == {"full": 0, "incremental": 2}
    assert {(c["kind"], c["user"]) for c in task["changes"]} == {("member_added", CAROL), ("member_removed", ALICE)}
    assert app.store.group_members(TENANT, G_ENG) == {CAROL}
    assert world.members() == {user(CAROL)}
    assert task["iam"]["billing"] == {INVOKER: {"add": [user(CAROL)], "remove": [user(ALICE)]}}


def test_a_reconcile_whose_every_read_failed_is_a_failed_run(world):
    world.graph.fail_next(50, status=500, retry_after=None, code="InternalServerError", path="/v1.0/groups/delta")
    status, answer = post(world.app(), b'{"tasks": ["reconcile"]}')
    assert (status, answer["tasks"]["reconcile"]["status"]) == (503, "error")   # Cloud Scheduler retries


WITHOUT_STAFF = POLICY.replace(f"groups: [{G_STAFF}]", "app_roles: [Y]")


def test_a_reconcile_whose_list_of_stored_groups_fails_still_reads_the_groups_and_reports_it(world):
    app = world.app()

    def failing():   # the store failing on this one call (a Firestore query timing out)
        raise Unavailable("store: deadline exceeded")

    app.store.synced_groups = failing
    status, answer = post(app, b'{"tasks": ["reconcile"]}')
    task = answer["tasks"]["reconcile"]
    assert task["forgotten"] == [] and task["reads"] == {"full": 2, "incremental": 0}
    assert task["errors"] == [{"error": "unavailable", "detail": "store: deadline exceeded"}]
    assert status == 200 and not answer["ok"]   # a partial failure: the next scheduled run tries again


def test_a_reconcile_whose_every_read_failed_is_a_failed_run_even_if_it_forgot_a_group(world, tmp_path):
    world.app().maintenance.run(["reconcile"])
    world.graph.fail_next(50, status=500, retry_after=None, code="InternalServerError", path="/v1.0/groups/delta")
    status, answer = post(with_policy(world, tmp_path, WITHOUT_STAFF), b'{"tasks": ["reconcile"]}')
    assert [g["group"] for g in answer["tasks"]["reconcile"]["forgotten"]] == [G_STAFF]
    assert status == 503   # forgetting is no read: Graph is down, and Cloud Scheduler must see it


def test_a_group_that_could_not_be_forgotten_spares_the_others_and_is_reported(world, tmp_path, audit_lines):
    world.app().maintenance.run(["reconcile"])
    app = with_policy(world, tmp_path, WITHOUT_STAFF.replace(f"groups: [{G_ENG}]", "app_roles: [X]"))
    forget = app.store.forget_group

    def failing_for_eng(tenant, group, **kw):   # the store failing for one group only
        if group == G_ENG:
            raise Unavailable("store: deadline exceeded")
        return forget(tenant, group, **kw)

    app.store.forget_group = failing_for_eng
    task = app.maintenance.run(["reconcile"])["tasks"]["reconcile"]
    assert task["forgotten"] == [{"tenant": TENANT, "group": G_STAFF, "members": 1}]
    assert [(e["group"], e["error"]) for e in task["errors"]] == [(G_ENG, "unavailable")]
    [failed] = [a for a in audit_lines if a["event"] == "maintenance_item_failed"]
    assert (failed["severity"], failed["task"], failed["group"]) == ("ERROR", "reconcile", G_ENG)
    assert app.store.sync_state(TENANT, G_ENG) and app.store.sync_state(TENANT, G_STAFF) is None


def test_a_reconcile_where_one_group_fails_still_reports_what_the_others_did(world, tmp_path):
    app = world.app()
    world.graph.fail_next(1, status=500, retry_after=None, code="InternalServerError", path="/v1.0/groups/delta")
    # 200, not ok: the next scheduled run reads that group again; a retry of the whole
    # run (Cloud Scheduler's, on a 503) would read every group again, throttled or not.
    status, answer = post(app, b'{"tasks": ["reconcile"]}')
    assert status == 200 and not answer["ok"]
    task = answer["tasks"]["reconcile"]
    assert task["status"] == "error" and task["groups"] == 2
    [error] = task["errors"]
    [unread] = [g for g in (G_ENG, G_STAFF) if app.store.sync_state(TENANT, g) is None]
    assert error["tenant"] == TENANT and "500" in error["error"]
    assert error["error"].startswith(f"group {unread}: ")    # which item failed, for the operator
    applied = sum(len(app.store.group_members(TENANT, g) or ()) for g in (G_ENG, G_STAFF))
    assert task["added"] == applied == 1                   # the group that was read, in the report
    assert len(task["changes"]) == 1
    # Reads that worked are progress, whatever IAM answered (drift reports IAM failures):
    # one group, read and adding CAROL, and billing's set refused: as many errors as groups.
    wiki = f"  - name: wiki\n    tenant: {TENANT}\n    access:\n      - groups: [{G_STAFF}]\n"
    assert wiki in POLICY
    one_group = with_policy(world, tmp_path, POLICY.replace(wiki, ""))
    world.graph.add_members(TENANT, G_ENG, [CAROL])
    world.cloudrun.inject_error(BILLING, "setIamPolicy", 403, "PERMISSION_DENIED", "Permission denied.")
    status, answer = post(one_group, b'{"tasks": ["reconcile"]}')
    reconcile = answer["tasks"]["reconcile"]
    assert (status, reconcile["groups"], len(reconcile["errors"]), answer["ok"]) == (200, 1, 1, False)
    # When every item fails (an expired client secret), the run failed: Cloud Scheduler sees 503.
    expired = world.app(client_secret="no-longer-valid")
    status, answer = post(expired, b"")
    assert status == 503 and not answer["ok"]
    assert {answer["tasks"][t]["status"] for t in ("subscriptions", "reconcile")} == {"error"}


def test_drift_restores_managed_members_and_reports_the_rest(world, audit_lines):
    app = world.app()
    world.graph.add_members(TENANT, G_ENG, [CAROL])
    app.maintenance.run(["reconcile"])
    assert world.members() == {user(ALICE), user(CAROL)}
    condition = {"title": "office hours", "expression": "request.time.getHours('UTC') < 18"}
    # (CAROL, whom aadrun grants, in the conditional binding too: that grant is not aadrun's.)
    foreign = [{"role": "roles/run.admin", "members": ["user:ops@example.com"]},
               {"role": INVOKER, "members": ["user:cond@example.com", user(CAROL)], "condition": condition}]
    # Behind aadrun's back: ALICE's grant removed, EVE added beside CAROL, admins and a condition.
    world.cloudrun.set_policy(BILLING, {"version": 3, "bindings": [
        {"role": INVOKER, "members": [user(CAROL), "user:eve@example.com"]}, *foreign]})
    task = app.maintenance.run(["drift"])["tasks"]["drift"]
    report = task["services"]["billing"]
    assert task["status"] == "ok" and task["repaired"] == ["billing"]
    assert (report["restored"], report["removed"]) == ({INVOKER: [user(ALICE)]}, {})
    assert {json.dumps(u, sort_keys=True) for u in report["unmanaged"]} == {json.dumps(u, sort_keys=True) for u in [
        {"role": INVOKER, "members": ["user:eve@example.com"]}, {"role": "roles/run.admin", "members": [
            "user:ops@example.com"]}, {"role": INVOKER, "members": sorted(["user:cond@example.com", user(CAROL)]),
                                       "condition": condition}]}
    assert world.members() == {user(ALICE), user(CAROL), "user:eve@example.com"}
    bindings = world.cloudrun.policy(BILLING)["bindings"]
    assert all(b in bindings for b in foreign)
    assert app.store.managed_members(BILLING) == {INVOKER: {user(ALICE), user(CAROL)}}
    restored = [e for e in app.store.changes() if e.kind == "iam_restored"]
    assert [(e.service, e.role, e.member, e.source) for e in restored] == [
        (BILLING, INVOKER, user(ALICE), "maintenance")]                   # evidence for access reviews
    audited = [(a["kind"], a["member"]) for a in audit_lines if a["event"] == "iam_change"
               and a["source"] == "maintenance"]
    assert audited == [("iam_restored", user(ALICE))]                     # one audit entry per change (§9)
    again = app.maintenance.run(["drift"])["tasks"]["drift"]["services"]["billing"]
    assert (again["restored"], again["removed"]) == ({}, {})


def test_drift_on_a_live_policy_others_filled_past_the_limit_reports_it_and_writes_nothing(world):
    app = world.app()
    app.maintenance.run(["reconcile"])
    others = [f"user:someone{i}@example.com" for i in range(1501)]   # granted by others, not by aadrun
    world.cloudrun.set_policy(BILLING, {"bindings": [{"role": INVOKER, "members": [user(ALICE)]},
                                                     {"role": "roles/run.developer", "members": others}]})
    app.store.apply(GroupUpdate(TENANT, G_ENG, removed=frozenset({ALICE}), source="test"))
    sets = world.cloudrun.sets(BILLING)
    task = app.maintenance.run(["drift"])["tasks"]["drift"]
    report = task["services"]["billing"]
    assert task["status"] == "ok" and "over Google's limit" in report["refused"]
    assert (report["restored"], report["removed"]) == ({}, {}) and world.cloudrun.sets(BILLING) == sets
    assert app.store.managed_members(BILLING) == {INVOKER: {user(ALICE)}}


def test_a_spell_in_record_mode_neither_claims_a_grant_made_by_hand_nor_forgets_aadrun_s(world):
    # Record mode plans as if its plans had been applied; switching modes must not make
    # either mode's idea of what aadrun manages the other's.
    world.cloudrun.set_policy(BILLING, {"bindings": [{"role": INVOKER, "members": [user(BOB)]}]})  # by hand
    world.graph.set_members(TENANT, G_ENG, [ALICE, BOB])
    world.app(iam_mode="record").maintenance.run(["reconcile"])        # plans Alice and Bob
    world.app().maintenance.run(["reconcile", "drift"])                 # grants Alice; Bob was there
    assert world.members() == {user(ALICE), user(BOB)}
    world.graph.set_members(TENANT, G_ENG, [])
    world.app(iam_mode="record").maintenance.run(["reconcile"])        # plans them both away
    world.app().maintenance.run(["reconcile", "drift"])
    # Alice, whom aadrun granted, is revoked; Bob's grant, made by hand, stays as found.
    assert world.members() == {user(BOB)}


def members_on(world, resource: str) -> set[str]:
    return {m for b in world.cloudrun.policy(resource).get("bindings", [])
            if b["role"] == INVOKER and "condition" not in b for m in b["members"]}


def with_policy(world, tmp_path, text: str) -> App:
    """An instance started after an operator changed the policy (a redeploy)."""
    path = tmp_path / "changed.yaml"
    path.write_text(text)
    return world.app(policy_path=str(path))


def test_drift_takes_a_deleted_subjects_grant_for_the_grant_it_is(world):
    app = world.app()
    app.maintenance.run(["reconcile"])
    world.cloudrun.deleted_subjects.add(ALICE)   # IAM shows deleted:principal://.../ALICE
    sets = world.cloudrun.sets(BILLING)
    task = app.maintenance.run(["drift"])["tasks"]["drift"]["services"]["billing"]
    assert (task["restored"], task["unmanaged"], world.cloudrun.sets(BILLING)) == ({}, [], sets)


def test_a_service_removed_from_the_policy_loses_every_grant_aadrun_made(world, tmp_path):
    app = world.app()
    app.maintenance.run(["reconcile"])
    world.cloudrun.set_policy(BILLING, {"version": 3, "bindings": [
        {"role": INVOKER, "members": [user(ALICE), "user:eve@example.com"]}]})   # EVE granted by hand
    billing = f"  - name: billing\n    tenant: {TENANT}\n    cloud_run: {BILLING}\n    access:\n      - groups: [{G_ENG}]\n"
    assert billing in POLICY
    later = with_policy(world, tmp_path, POLICY.replace(billing, ""))
    task = later.maintenance.run(["drift"])["tasks"]["drift"]
    assert task["status"] == "ok" and task["orphaned"][BILLING]["removed"] == {INVOKER: [user(ALICE)]}
    assert world.members() == {"user:eve@example.com"}                  # someone else's grant stays
    assert later.store.managed_members(BILLING) == {} and later.store.managed_targets() == set()
    again = later.maintenance.run(["drift"])["tasks"]["drift"]
    assert again["orphaned"] == {} and world.members() == {"user:eve@example.com"}


def test_drift_refused_for_size_still_revokes_what_is_no_longer_wanted(world):
    app = world.app()
    crowd = frozenset(str(uuid.UUID(int=i + 1)) for i in range(1501))   # over the 1,500 limit
    app.store.apply(GroupUpdate(TENANT, G_ENG, replace=crowd, sync=SyncState(None, utcnow())))
    world.cloudrun.set_policy(BILLING, {"bindings": [{"role": INVOKER, "members": [user(ALICE)]}]})
    app.store.record_iam(BILLING, {INVOKER: {user(ALICE)}}, source="test", why="granted earlier")
    task = app.maintenance.run(["drift"])["tasks"]["drift"]
    billing = task["services"]["billing"]
    assert "1501 principals" in billing["refused"] and billing["removed"] == {INVOKER: [user(ALICE)]}
    assert world.members() == set() and app.store.managed_members(BILLING) == {}


def with_a_refused_group_rule(world, tmp_path) -> App:
    """A redeploy adds a ``bind: group`` rule whose group_principal names a workforce
    pool that does not exist (a typo): IAM refuses every set that grants it (400)."""
    world.cloudrun.pools = {"entra"}
    typo = "principalSet://iam.googleapis.com/locations/global/workforcePools/entra-typo/group/{group_id}"
    rule = f"      - groups: [{G_ENG}]\n"
    assert rule in POLICY and "\nservices:" in POLICY
    return with_policy(world, tmp_path, POLICY.replace(rule, f"{rule}      - groups: [{G_STAFF}]\n        bind: group\n")
                       .replace("\nservices:", f'\ngroup_principal: "{typo}"\nservices:'))


def test_a_grant_iam_refuses_does_not_keep_a_removed_member_in_iam(world, tmp_path, audit_lines):
    world.app().maintenance.run(["reconcile", "drift"])
    assert world.members() == {user(ALICE)}
    later = with_a_refused_group_rule(world, tmp_path)
    world.graph.set_members(TENANT, G_ENG, [])                      # Alice leaves
    removal = MembershipChange("m-alice-left", TENANT, G_ENG, (), (ALICE,), "sub-1", "2024-05-01T12:00:00.000Z")
    summary = later.sync.handle_messages([removal])                  # not raised: redelivery cannot fix it
    assert "Identity Pool does not exist" in summary.refused["billing"]
    assert world.members() == set()                                  # revoked all the same
    assert later.store.managed_members(BILLING) == {}                # the refused grant's claim is dropped
    [refused] = [a for a in audit_lines if a["event"] == "iam_refused"]
    assert refused["severity"] == "ERROR" and refused["service"] == "billing"
    # Drift reports the refusal on each run, and nothing else goes wrong.
    task = later.maintenance.run(["drift"])["tasks"]["drift"]
    assert task["status"] == "ok" and "Identity Pool does not exist" in task["services"]["billing"]["refused"]
    assert world.members() == set() and later.store.managed_members(BILLING) == {}


def test_a_role_cloud_run_refuses_is_logged_by_name_and_the_revocations_are_made(world, tmp_path, audit_lines):
    world.app().maintenance.run(["reconcile", "drift"])
    assert world.members() == {user(ALICE)}
    rule = f"      - groups: [{G_ENG}]\n"
    assert rule in POLICY
    later = with_policy(world, tmp_path, POLICY.replace(
        rule, f"{rule}      - groups: [{G_STAFF}]\n        role: roles/storage.objectViewer\n"))
    assert [w.field for w in later.policy.warnings] == ["services[0].access[1].role"]   # validate said so
    world.graph.set_members(TENANT, G_ENG, [])                      # Alice leaves
    removal = MembershipChange("m-alice-left", TENANT, G_ENG, (), (ALICE,), "sub-1", "2024-05-01T12:00:00.000Z")
    summary = later.sync.handle_messages([removal])
    assert "Role roles/storage.objectViewer is not supported" in summary.refused["billing"]
    assert world.members() == set()                                  # revoked all the same
    [refused] = [a for a in audit_lines if a["event"] == "iam_refused"]
    assert refused["service"] == "billing" and "roles/storage.objectViewer" in refused["message"]


def test_drift_whose_grant_iam_refuses_still_revokes(world, tmp_path):
    world.app().maintenance.run(["reconcile", "drift"])
    later = with_a_refused_group_rule(world, tmp_path)
    later.store.apply(GroupUpdate(TENANT, G_ENG, removed=frozenset({ALICE}), source="test"))   # notification lost
    task = later.maintenance.run(["drift"])["tasks"]["drift"]
    billing = task["services"]["billing"]
    assert task["status"] == "ok" and "Identity Pool does not exist" in billing["refused"]
    assert billing["removed"] == {INVOKER: [user(ALICE)]} and world.members() == set()
    # Once the operator fixes the pool, the next run grants the group.
    world.cloudrun.pools.add("entra-typo")
    again = later.maintenance.run(["drift"])["tasks"]["drift"]["services"]["billing"]
    assert "refused" not in again and world.members() == {
        f"principalSet://iam.googleapis.com/locations/global/workforcePools/entra-typo/group/{G_STAFF}"}


def test_drift_does_not_claim_a_grant_someone_else_makes_during_its_409_retry(world):
    app = world.app()
    app.store.apply(GroupUpdate(TENANT, G_ENG, added=frozenset({ALICE}), sync=SyncState(None, utcnow())))
    # Someone grants ALICE between drift's read and its write: drift's set gets a 409.
    world.cloudrun.write_before_next_set(BILLING, {"bindings": [{"role": INVOKER, "members": [user(ALICE)]}]})
    task = app.maintenance.run(["drift"])["tasks"]["drift"]
    assert task["status"] == "ok" and world.cloudrun.sets(BILLING) == 1   # refused (409); nothing left after
    assert world.members() == {user(ALICE)} and app.store.managed_members(BILLING) == {}


def test_a_removed_service_whose_cloud_run_service_was_deleted_is_forgotten_not_retried(world, tmp_path,
                                                                                        audit_lines):
    app = world.app()
    app.maintenance.run(["reconcile"])
    assert app.store.managed_members(BILLING) == {INVOKER: {user(ALICE)}}
    billing = f"  - name: billing\n    tenant: {TENANT}\n    cloud_run: {BILLING}\n    access:\n      - groups: [{G_ENG}]\n"
    later = with_policy(world, tmp_path, POLICY.replace(billing, ""))
    world.cloudrun.delete_service(BILLING)   # and its bindings with it
    task = later.maintenance.run(["drift"])["tasks"]["drift"]
    assert task["status"] == "ok" and task["errors"] == []
    assert task["orphaned"][BILLING]["gone"] and task["orphaned"][BILLING]["forgotten"] == {INVOKER: [user(ALICE)]}
    assert later.store.managed_targets() == set()
    forgotten = [e for e in later.store.changes() if e.why == "its Cloud Run service no longer exists"]
    audited = [a for a in audit_lines if a["event"] == "iam_change" and a.get("why") == forgotten[0].why]
    assert [(a["kind"], a["member"]) for a in audited] == [(e.kind, e.member) for e in forgotten] == [
        ("iam_removed", user(ALICE))]
    again = later.maintenance.run(["drift"])["tasks"]["drift"]
    assert again["status"] == "ok" and again["orphaned"] == {}


def test_a_service_the_policy_names_whose_cloud_run_service_is_missing_is_an_error(world, audit_lines):
    app = world.app()
    app.maintenance.run(["reconcile"])
    world.cloudrun.delete_service(BILLING)
    task = app.maintenance.run(["drift"])["tasks"]["drift"]
    assert task["status"] == "error" and [e["service"] for e in task["errors"]] == ["billing"]
    # Logged too: Scheduler keeps no answer, and a partial failure may answer 200.
    [failed] = [a for a in audit_lines if a["event"] == "maintenance_item_failed"]
    assert (failed["severity"], failed["task"], failed["service"]) == ("ERROR", "drift", "billing")
    assert app.store.managed_members(BILLING) == {INVOKER: {user(ALICE)}}   # kept: the policy still names it


def test_policy_sync_reports_a_missing_cloud_run_service_without_asking_for_a_redelivery(world, audit_lines):
    app = world.app()
    app.maintenance.run(["reconcile", "drift"])
    world.cloudrun.delete_service(BILLING)
    world.graph.set_members(TENANT, G_ENG, [])
    removal = MembershipChange("m-alice-left", TENANT, G_ENG, (), (ALICE,), "sub-1", "2024-05-01T12:00:00.000Z")
    summary = app.sync.handle_messages([removal])                    # not raised: redelivery cannot fix it
    assert "does not exist" in summary.refused["billing"] and app.store.group_members(TENANT, G_ENG) == set()
    [line] = [a for a in audit_lines if a["event"] == "iam_target_missing"]
    assert line["severity"] == "ERROR" and (line["service"], line["cloud_run"]) == ("billing", BILLING)


def test_a_moved_service_is_revoked_on_the_old_resource_and_never_claims_a_grant_on_the_new(world, tmp_path):
    app = world.app()
    app.maintenance.run(["reconcile"])
    assert world.members() == {user(ALICE)}
    moved_to = BILLING + "-v2"
    world.cloudrun.set_policy(moved_to, {"version": 3, "bindings": [{"role": INVOKER, "members": [user(BOB)]}]})
    later = with_policy(world, tmp_path, POLICY.replace(f"cloud_run: {BILLING}", f"cloud_run: {moved_to}"))
    task = later.maintenance.run(["drift"])["tasks"]["drift"]
    assert task["orphaned"][BILLING]["removed"] == {INVOKER: [user(ALICE)]}
    assert task["services"]["billing"]["restored"] == {INVOKER: [user(ALICE)]}
    assert world.members() == set()                                      # old resource: nothing left of aadrun's
    assert members_on(world, moved_to) == {user(ALICE), user(BOB)}     # BOB was granted by hand: never claimed
    assert later.store.managed_members(moved_to) == {INVOKER: {user(ALICE)}}
    world.graph.remove_members(TENANT, G_ENG, [ALICE])
    later.maintenance.run(["reconcile"])
    assert members_on(world, moved_to) == {user(BOB)}


def test_two_services_on_one_resource_keep_the_union_of_their_members(world, tmp_path):
    wiki = f"  - name: wiki\n    tenant: {TENANT}\n"
    assert wiki in POLICY
    shared = POLICY.replace(wiki, f"{wiki}    cloud_run: {BILLING}\n")
    world.graph.add_members(TENANT, G_STAFF, [ALICE])
    app = with_policy(world, tmp_path, shared)
    app.maintenance.run(["reconcile"])
    assert world.members() == {user(ALICE), user(BOB)}
    world.graph.remove_members(TENANT, G_ENG, [ALICE])     # ALICE is still in wiki's group
    app.maintenance.run(["reconcile"])
    assert world.members() == {user(ALICE), user(BOB)}
    drift = app.maintenance.run(["drift"])["tasks"]["drift"]
    assert drift["repaired"] == [] and world.members() == {user(ALICE), user(BOB)}
    world.graph.remove_members(TENANT, G_STAFF, [ALICE])
    app.maintenance.run(["reconcile"])
    assert world.members() == {user(BOB)}


def test_drift_adopts_members_an_earlier_version_kept_under_the_service_name(world):
    app = world.app()
    app.maintenance.run(["reconcile"])
    assert world.members() == {user(ALICE)}
    # As an earlier version kept them: under the service's name, not its resource.
    managed = app.store.managed_members(BILLING)
    app.store.record_iam("billing", managed, source="test", why="an earlier version")
    app.store.record_iam(BILLING, {}, source="test", why="an earlier version")
    world.graph.remove_members(TENANT, G_ENG, [ALICE])
    drift = app.maintenance.run(["reconcile", "drift"])["tasks"]["drift"]
    assert drift["status"] == "ok" and drift["errors"] == [] and drift["orphaned"] == {}
    assert world.members() == set()                               # ALICE's grant was aadrun's: revoked
    assert app.store.managed_targets() == set() and app.store.managed_members("billing") == {}


def test_drift_in_record_mode_compares_nothing(world):
    task = world.app(iam_mode="record").maintenance.run(["drift"])["tasks"]["drift"]
    assert task["status"] == "ok" and task["mode"] == "record" and task["services"] == {}


# -- the HTTP entry point and the lease ------------------------------------------------------

def post(app, body: bytes, method: str = "POST"):
    response = app.maintenance.handle(HttpRequest(method, "/", {}, {"content-type": "application/json"}, body))
    return response.status, response.json_body()


@pytest.mark.parametrize("body, detail", [
    (b"{not json", "not JSON"), (b"[]", "JSON object"), (b'{"tasks": "drift"}', "non-empty list"),
    (b'{"tasks": []}', "non-empty list"), (b'{"tasks": ["drift", "coffee"]}', "unknown task"),
    (b'{"task": ["drift"]}', "unknown field"),
])
def test_bad_bodies_are_400(world, body, detail, audit_lines):
    status, answer = post(world.app(), body)
    assert status == 400 and answer["error"] == "bad_request" and detail in answer["detail"]
    [logged] = [a for a in audit_lines if a["event"] == "maintenance_refused"]   # the run that did not happen
    assert (logged["reason"], logged["detail"]) == ("bad_request", answer["detail"])


def test_method_and_size(world, audit_lines):
    app = world.app()
    assert post(app, b"", "GET")[0] == 405
    big = app.maintenance.handle(HttpRequest("POST", "/", {}, {}, b"", body_too_large=True))
    assert big.status == 413
    refused = [a for a in audit_lines if a["event"] == "maintenance_refused"]
    assert [(a["reason"], a["severity"]) for a in refused] == [("method_not_allowed", "WARNING"),
                                                              ("too_large", "WARNING")]


def test_a_held_lease_skips_the_task_with_200(world):
    app = world.app()
    assert app.store.acquire_lease("maintenance/reconcile", "another-run", 60)
    status, answer = post(app, b"")
    assert status == 200 and answer["ok"]
    skipped = answer["tasks"]["reconcile"]
    assert (skipped["status"], skipped["reason"]) == ("skipped", "lease_held")
    assert answer["tasks"]["subscriptions"]["status"] == "ok" and answer["tasks"]["drift"]["status"] == "ok"
    assert not world.graph.calls("GET", "/v1.0/groups/delta")


def test_a_task_keeps_its_lease_however_long_it_runs_and_a_dead_run_holds_it_briefly(world, monkeypatch):
    import aadrun.maintenance as maintenance

    monkeypatch.setattr(maintenance, "LEASE_TTL_S", 0.6)
    world.graph.delays["/v1.0/groups/delta"] = 2.0      # a reconcile that outlasts the lease's ttl
    app = world.app()
    running = threading.Thread(target=lambda: app.maintenance.run(["reconcile"]))
    running.start()
    time.sleep(1.2)                                      # twice the ttl: renewed, not expired
    taken_over = app.store.acquire_lease("maintenance/reconcile", "another run", 60)
    still_running = running.is_alive()
    running.join()
    assert still_running and not taken_over
    # A run that died holds it no longer than the ttl: nothing renews it.
    assert app.store.acquire_lease("maintenance/reconcile", "a run that dies", maintenance.LEASE_TTL_S)
    assert not app.store.acquire_lease("maintenance/reconcile", "the next run", 60)
    time.sleep(0.7)
    assert app.store.acquire_lease("maintenance/reconcile", "the next run", 60)


def test_a_failing_task_is_503_with_a_summary_never_500(world):
    status, answer = post(world.app(notification_url=None), b'{"tasks": ["subscriptions", "reconcile"]}')
    assert status == 503 and not answer["ok"]
    assert answer["tasks"]["subscriptions"]["error"] == "not_configured"
    assert "AADRUN_NOTIFICATION_URL" in answer["tasks"]["subscriptions"]["detail"]
    assert answer["tasks"]["reconcile"]["status"] == "ok"


def test_two_overlapping_scheduler_calls_share_one_lease(world, tmp_path):
    world.graph.delays["/v1.0/groups/delta"] = 0.4     # slow delta reads, so the two calls overlap
    env = {"AADRUN_POLICY_PATH": str(tmp_path / "policy.yaml"), "AADRUN_STORE": world.settings.store_url,
           "AADRUN_GRAPH_URL": world.graph.graph_url, "AADRUN_AUTHORITY_URL": world.graph.authority_url,
           "AADRUN_CLIENT_ID": CLIENT_ID, "AADRUN_CLIENT_SECRET": CLIENT_SECRET, "AADRUN_IAM": "record"}
    answers: list[dict] = []
    with FunctionServer("maintenance", env) as server:
        start = threading.Barrier(2)

        def call():
            start.wait()
            request = urllib.request.Request(server.url, data=b'{"tasks": ["reconcile"]}', method="POST",
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=30) as resp:
                answers.append({"status": resp.status, **json.load(resp)})

        threads = [threading.Thread(target=call) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert sorted(a["tasks"]["reconcile"]["status"] for a in answers) == ["ok", "skipped"]
    assert {a["status"] for a in answers} == {200}
    assert len(world.graph.calls("GET", "/v1.0/groups/delta")) == 2    # one read per group, not two


def test_a_policy_update_event_a_reconcile_lost_is_published_by_the_next_one(world, pubsub_emulator):
    # Nothing redelivers a reconcile, and the next one changes nothing: the tenant owes
    # the event until a reconcile publishes one for its groups (once).
    from tests.test_webhook_pubsub import PROJECT, PubSub

    topic_id = f"policy-{uuid.uuid4().hex[:8]}"
    app = world.app(bus="pubsub", project=PROJECT, topic_policy=topic_id)   # no such topic yet
    assert post(app, b'{"tasks": ["reconcile"]}')[1]["tasks"]["reconcile"]["status"] == "error"
    pubsub = PubSub(pubsub_emulator)
    subscription = pubsub.subscribe(pubsub.create_topic(topic_id))
    status, answer = post(app, b'{"tasks": ["reconcile"]}')
    assert (status, answer["ok"], answer["tasks"]["reconcile"]["added"]) == (200, True, 0)
    [event] = [json.loads(m.data) for m in pubsub.pull(subscription, until=bool)]
    assert {(g["tenant"], g["group"]) for g in event["groups"]} == {(TENANT, G_ENG), (TENANT, G_STAFF)}
    assert "billing" in event["services"] and len(event["replaces"]) == 1
    post(app, b'{"tasks": ["reconcile"]}')
    assert pubsub.pull(subscription, wait=2) == []   # paid: not published again
    # Another change whose event is lost: its payment names that event, so it is not
    # the first payment again (a consumer drops an id it has seen).
    pubsub.publisher.delete_topic(topic=f"projects/{PROJECT}/topics/{topic_id}")
    world.graph.set_members(TENANT, G_ENG, [ALICE, CAROL])
    assert post(app, b'{"tasks": ["reconcile"]}')[1]["tasks"]["reconcile"]["status"] == "error"
    subscription = pubsub.subscribe(pubsub.create_topic(topic_id))
    post(app, b'{"tasks": ["reconcile"]}')
    [again] = [json.loads(m.data) for m in pubsub.pull(subscription, until=bool)]
    assert again["id"] != event["id"] and again["replaces"] != event["replaces"]
    # The same change again (Carol leaves and comes back), its event lost again: the lost
    # event has the same content, so the same id, but its payment is a new event all the same.
    world.graph.set_members(TENANT, G_ENG, [ALICE])
    post(app, b'{"tasks": ["reconcile"]}')
    pubsub.pull(subscription, until=bool)
    pubsub.publisher.delete_topic(topic=f"projects/{PROJECT}/topics/{topic_id}")
    world.graph.set_members(TENANT, G_ENG, [ALICE, CAROL])
    post(app, b'{"tasks": ["reconcile"]}')
    subscription = pubsub.subscribe(pubsub.create_topic(topic_id))
    post(app, b'{"tasks": ["reconcile"]}')
    [third] = [json.loads(m.data) for m in pubsub.pull(subscription, until=bool)]
    assert third["id"] not in (event["id"], again["id"])


def test_a_reconcile_whose_policy_update_event_is_lost_reports_it(world, pubsub_emulator):
    # The membership and IAM changes are applied, but the services listening for policy
    # updates never hear of them: the run is not ok, and says why.
    app = world.app(bus="pubsub", project="aadrun-test", topic_policy=f"missing-{uuid.uuid4().hex[:8]}")
    status, answer = post(app, b'{"tasks": ["reconcile"]}')
    task = answer["tasks"]["reconcile"]
    assert (status, answer["ok"], task["status"], task["added"]) == (200, False, "error", 2)
    [error] = task["errors"]
    assert "Unavailable" in error["error"] and error["tenant"] == TENANT
    assert world.members() == {user(ALICE)}


@pytest.mark.parametrize("change_type", ["deleted,updated", "Updated,Deleted", "updated, deleted",
                                         "created,updated,deleted"])
def test_a_subscription_for_every_change_in_another_spelling_is_kept(world, change_type):
    # Only fewer change types than SUBSCRIBED_CHANGES need a replacement: order, case,
    # blanks or an extra type must not replace (and briefly uncover) a group every run.
    world.app().maintenance.run(["subscriptions"])
    old = world.subs()[f"/groups/{G_ENG}"]
    world.graph.edit_subscription(TENANT, CLIENT_ID, old["id"], changeType=change_type)
    assert set(actions(world.app().maintenance.run(["subscriptions"])).values()) == {"kept"}
    assert world.subs()[f"/groups/{G_ENG}"]["id"] == old["id"]

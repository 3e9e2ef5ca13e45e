"""aadrun.iam against a real google-cloud-run client and a local Cloud Run IAM server."""
from __future__ import annotations

import json
import threading

import pytest
from google.auth.credentials import AnonymousCredentials
from google.iam.v1 import policy_pb2
from google.protobuf import json_format
from hypothesis import given, settings
from hypothesis import strategies as st

from aadrun.config import Settings
from aadrun.errors import ConfigError, PlanError, UpstreamError
from aadrun.iam import IamWriter, edit_policy
from aadrun.plan import Binding, diff
from tests.support.cloudrun_server import CloudRunIamServer
from tests.support.emulators import free_port

RUN = "projects/p/locations/europe-west1/services/billing-api"
INVOKER = "roles/run.invoker"
COND = {"title": "office hours", "description": "weekdays only",
        "expression": "request.time.getDayOfWeek('Europe/Berlin') < 5"}
OTHERS = [
    {"role": "roles/run.admin", "members": ["user:ops@example.com", "serviceAccount:ci@p.iam.gserviceaccount.com"]},
    {"role": INVOKER, "members": ["user:cond@example.com"], "condition": COND},
]
AUDIT = [{"service": "allServices", "auditLogConfigs": [{"logType": "DATA_READ"}]}]


def user(oid: str) -> str:
    return f"principal://iam.googleapis.com/locations/global/workforcePools/entra/subject/{oid}"


@pytest.fixture(autouse=True)
def no_adc(offline_google):
    """Google clients of these tests stay offline (see conftest)."""


@pytest.fixture
def server():
    with CloudRunIamServer() as srv:
        yield srv


@pytest.fixture
def writer(server):
    w = IamWriter(Settings(iam_mode="cloudrun", cloudrun_endpoint=server.url), backoff=0.01)
    yield w
    w.close()


def plan(writer, desired, managed):
    return diff(desired, managed, writer.live_bindings(RUN), service="billing-api", cloud_run=RUN)


def canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True)


def not_managed(policy: dict) -> list[str]:
    """Every binding except the unconditioned invoker one, as canonical JSON."""
    return [canonical(b) for b in policy.get("bindings", []) if b["role"] != INVOKER or "condition" in b]


def test_adds_and_removes_are_applied(server, writer):
    server.set_policy(RUN, {"bindings": [{"role": INVOKER, "members": [user("old"), "user:x@example.com"]}]})
    changes = plan(writer, {INVOKER: {user("u1"), user("u2")}}, {INVOKER: {user("old")}})
    result = writer.apply(changes)
    assert result.wrote and result.attempts == 1 and server.sets(RUN) == 1
    invoker = [b for b in server.policy(RUN)["bindings"] if b["role"] == INVOKER]
    assert [sorted(b["members"]) for b in invoker] == [sorted([user("u1"), user("u2"), "user:x@example.com"])]
    assert result.members == {INVOKER: {user("u1"), user("u2"), "user:x@example.com"}}


def test_policy_version_3_is_requested(server, writer):
    writer.live_bindings(RUN)
    assert server.requests[0]["query"]["options.requestedPolicyVersion"] == ["3"]


def test_unmanaged_conditional_and_audit_parts_are_kept_byte_for_byte(server, writer):
    server.set_policy(RUN, {"version": 3, "bindings": OTHERS + [{"role": INVOKER, "members": [user("old")]}],
                            "auditConfigs": AUDIT})
    before = server.policy(RUN)
    live = writer.live_bindings(RUN)
    assert Binding(INVOKER, ("user:cond@example.com",), COND) in live
    writer.apply(plan(writer, {INVOKER: {user("u1")}}, {INVOKER: {user("old")}}))
    after = server.policy(RUN)
    assert not_managed(after) == not_managed(before)
    assert after["version"] == 3
    sent = server.requests[-1]["body"]["policy"]
    assert sent["version"] == 3
    assert not_managed(sent) == not_managed(before)
    # Audit configs go back as read (enums as numbers: the rest transport sends enum-encoding=int).
    assert sent["auditConfigs"] == [{"service": "allServices", "auditLogConfigs": [{"logType": 3}]}]
    assert after["auditConfigs"] == AUDIT


def test_a_managed_only_binding_that_becomes_empty_is_dropped(server, writer):
    server.set_policy(RUN, {"version": 3, "bindings": OTHERS + [{"role": INVOKER, "members": [user("old")]}]})
    writer.apply(plan(writer, {INVOKER: set()}, {INVOKER: {user("old")}}))
    assert [canonical(b) for b in server.policy(RUN)["bindings"]] == [canonical(b) for b in OTHERS]


def test_a_new_role_gets_its_own_unconditioned_binding(server, writer):
    server.set_policy(RUN, {"version": 3, "bindings": OTHERS})
    writer.apply(plan(writer, {"roles/run.viewer": {user("u1")}}, {}))
    assert server.policy(RUN)["bindings"][-1] == {"role": "roles/run.viewer", "members": [user("u1")]}


def test_stale_etag_is_retried_and_succeeds(server, writer):
    server.set_policy(RUN, {"bindings": [{"role": INVOKER, "members": ["user:x@example.com"]}]})
    changes = plan(writer, {INVOKER: {user("u1")}}, {})
    server.inject_conflicts(RUN, 2)
    result = writer.apply(changes)
    assert result.wrote and result.attempts == 3 and server.sets(RUN) == 3
    assert set(server.policy(RUN)["bindings"][0]["members"]) == {"user:x@example.com", user("u1")}


def test_conflicts_beyond_the_attempt_budget_raise_upstream_error(server):
    w = IamWriter(Settings(iam_mode="cloudrun", cloudrun_endpoint=server.url), max_attempts=3, backoff=0.001)
    server.inject_conflicts(RUN, 5)
    with pytest.raises(UpstreamError) as info:
        w.apply(diff({INVOKER: {user("u1")}}, {}, [], service="billing-api", cloud_run=RUN))
    assert info.value.status_code == 409 and server.sets(RUN) == 3


def test_a_set_whose_etag_went_stale_between_read_and_write_is_redone(server, writer):
    """A real race: another writer changes the policy after our read."""
    server.set_policy(RUN, {"bindings": [{"role": INVOKER, "members": ["user:x@example.com"]}]})
    client = writer.client
    real_get = client.get_iam_policy
    raced = []

    def get_then_race(**kwargs):
        policy = real_get(**kwargs)
        if not raced:
            raced.append(True)
            server.set_policy(RUN, {"bindings": [{"role": INVOKER, "members": ["user:x@example.com", "user:y@e.com"]}]})
        return policy

    client.get_iam_policy = get_then_race
    result = writer.apply(diff({INVOKER: {user("u1")}}, {}, [], service="billing-api", cloud_run=RUN))
    assert result.attempts == 2
    assert set(server.policy(RUN)["bindings"][0]["members"]) == {"user:x@example.com", "user:y@e.com", user("u1")}


def test_concurrent_writers_lose_no_update(server):
    server.set_policy(RUN, {"version": 3, "bindings": OTHERS})
    writers = [IamWriter(Settings(iam_mode="cloudrun", cloudrun_endpoint=server.url),
                         max_attempts=30, backoff=0.005, max_backoff=0.05) for _ in range(4)]
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            barrier.wait()
            for j in range(3):
                members = {user(f"w{i}-{j}")}
                writers[i].apply(diff({INVOKER: members}, {}, [], service="billing-api", cloud_run=RUN))
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors
    final = server.policy(RUN)
    plain = [b for b in final["bindings"] if b["role"] == INVOKER and "condition" not in b]
    assert set(plain[0]["members"]) == {user(f"w{i}-{j}") for i in range(4) for j in range(3)}
    assert not_managed(final) == [canonical(b) for b in OTHERS]
    for w in writers:
        w.close()


def test_no_write_when_nothing_changes(server, writer):
    server.set_policy(RUN, {"bindings": [{"role": INVOKER, "members": [user("u1")]}]})
    changes = plan(writer, {INVOKER: {user("u1")}}, {INVOKER: {user("u1")}})
    assert changes.empty
    result = writer.apply(changes)
    assert not result.wrote and server.sets(RUN) == 0
    # A stale plan whose effect is already live does not write either.
    stale = diff({INVOKER: {user("u1")}}, {}, [], service="billing-api", cloud_run=RUN)
    assert not writer.apply(stale).wrote and server.sets(RUN) == 0


def test_record_mode_makes_no_http_call(server):
    w = IamWriter(Settings(iam_mode="record", cloudrun_endpoint=server.url))
    changes = diff({INVOKER: {user("u1")}}, {}, w.live_bindings(RUN), service="billing-api", cloud_run=RUN)
    result = w.apply(changes)
    assert not result.wrote and result.attempts == 0 and result.members == {INVOKER: {user("u1")}}
    assert server.requests == [] and w._client is None


def test_anonymous_credentials_without_adc(writer):
    assert isinstance(writer.client._transport._credentials, AnonymousCredentials)


def test_api_errors_become_upstream_errors_without_credentials(server, writer):
    server.inject_error(RUN, "getIamPolicy", 403, "PERMISSION_DENIED", "Permission 'run.services.getIamPolicy' denied")
    with pytest.raises(UpstreamError) as info:
        writer.live_bindings(RUN)
    assert info.value.status_code == 403 and "run.services.getIamPolicy" in str(info.value)
    assert "Bearer" not in str(info.value) and "Authorization" not in str(info.value)
    # Throttling that outlasts the in-place retries.
    impatient = IamWriter(Settings(iam_mode="cloudrun", cloudrun_endpoint=server.url), backoff=0.01,
                          transient_retry_s=0.3)
    server.inject_error(RUN, "getIamPolicy", 429, "RESOURCE_EXHAUSTED", "Quota exceeded", n=1000)
    with pytest.raises(UpstreamError) as info:
        impatient.live_bindings(RUN)
    assert info.value.status_code == 429 and "Quota exceeded" in str(info.value)
    impatient.close()


@pytest.mark.parametrize("call, answers", [
    ("getIamPolicy", [(429, "RESOURCE_EXHAUSTED"), (503, "UNAVAILABLE")]),
    ("setIamPolicy", [(429, "RESOURCE_EXHAUSTED")]),   # a refusal: the write did not happen
])
def test_throttling_and_a_passing_unavailability_of_a_read_are_retried_in_place(server, writer, call, answers):
    changes = plan(writer, {INVOKER: {"user:a@example.com"}}, {})
    for code, status in answers:
        server.inject_error(RUN, call, code, status, "Try again later.")
    assert writer.apply(changes).wrote
    [invoker] = [b for b in server.policy(RUN)["bindings"] if b["role"] == INVOKER]
    assert "user:a@example.com" in invoker["members"]


def test_unreachable_endpoint_is_an_upstream_error():
    w = IamWriter(Settings(iam_mode="cloudrun", cloudrun_endpoint=f"http://127.0.0.1:{free_port()}",
                           http_timeout_seconds=2))
    with pytest.raises(UpstreamError, match="getIamPolicy"):
        w.live_bindings(RUN)


def test_apply_refuses_a_policy_over_the_principal_limit(server, writer):
    crowd = [f"user:u{i}@example.com" for i in range(1500)]
    server.set_policy(RUN, {"bindings": [{"role": "roles/run.admin", "members": crowd}]})
    changes = diff({INVOKER: {user("u1")}}, {}, [], service="billing-api", cloud_run=RUN)
    with pytest.raises(PlanError, match="bind: group"):
        writer.apply(changes)
    assert server.sets(RUN) == 0


# --- property: the proto edit agrees with the plan --------------------------------

MEMBERS = st.sets(st.sampled_from([f"user:{c}" for c in "abcdef"]), max_size=6)
ROLE_MAP = st.dictionaries(st.sampled_from([INVOKER, "roles/run.viewer"]), MEMBERS, max_size=2)


@settings(max_examples=200, deadline=None)
@given(desired=ROLE_MAP, managed=ROLE_MAP, live=ROLE_MAP)
def test_edit_policy_applies_exactly_the_diff(desired, managed, live):
    live_json = [{"role": r, "members": sorted(m)} for r, m in live.items() if m] + OTHERS
    policy = json_format.ParseDict({"version": 3, "bindings": live_json}, policy_pb2.Policy())
    bindings = [Binding(b.role, tuple(b.members), json_format.MessageToDict(b.condition)
                        if b.HasField("condition") else None) for b in policy.bindings]
    changes = diff(desired, managed, bindings)
    changed = edit_policy(policy, changes.adds, changes.removes)
    assert changed == (not changes.empty)
    result = json_format.MessageToDict(policy)
    assert not_managed({"bindings": [b for b in result["bindings"] if b["role"] != "roles/run.viewer"]}) \
        == [canonical(b) for b in OTHERS]
    for role in set(desired) | set(managed) | set(live):
        plain = [b for b in result["bindings"] if b["role"] == role and "condition" not in b]
        assert all(b["members"] for b in plain)
        got = {m for b in plain for m in b["members"]}
        assert got == desired.get(role, set()) | (live.get(role, set()) - managed.get(role, set()))


def test_missing_adc_for_google_endpoint_is_a_config_error():
    w = IamWriter(Settings(iam_mode="cloudrun"))
    with pytest.raises(ConfigError, match="Application Default Credentials"):
        w.live_bindings(RUN)

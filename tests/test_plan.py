"""aadrun.plan: desired members, the diff against live IAM, and the principal guard."""
from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from aadrun.errors import PlanError
from aadrun.plan import Binding, desired_members, desired_on, diff, iam_targets, orphans, plan_orphan, plan_service
from aadrun.policy import MAX_PRINCIPALS, parse_documents

TENANT = "11111111-1111-1111-1111-111111111111"
G1 = "aaaaaaaa-0000-0000-0000-000000000001"
G2 = "aaaaaaaa-0000-0000-0000-000000000002"
G3 = "aaaaaaaa-0000-0000-0000-000000000003"
G4 = "aaaaaaaa-0000-0000-0000-000000000004"
RUN = "projects/p/locations/europe-west1/services/billing-api"
INVOKER = "roles/run.invoker"
POLICY = f"""
tenants:
  - id: {TENANT}
    audiences: ["api://aadrun-demo"]
principal: "principal://iam.googleapis.com/locations/global/workforcePools/entra/subject/{{oid}}"
group_principal: "principalSet://iam.googleapis.com/locations/global/workforcePools/entra/group/{{group_id}}"
services:
  - name: billing-api
    tenant: {TENANT}
    cloud_run: {RUN}
    access:
      - groups: [{G1}]
      - app_roles: [Billing.Admin]
      - groups: [{G2}]
        bind: group
      - groups: [{G3}]
        role: roles/run.viewer
  - name: no-iam
    tenant: {TENANT}
    access:
      - groups: [{G1}]
"""


def load(text: str = POLICY):
    return parse_documents([(yaml.safe_load(text), {}, "test.yaml")])


def user(oid: str) -> str:
    return f"principal://iam.googleapis.com/locations/global/workforcePools/entra/subject/{oid}"


def group(gid: str) -> str:
    return f"principalSet://iam.googleapis.com/locations/global/workforcePools/entra/group/{gid}"


def members_of(table: dict[str, set[str] | None]):
    return lambda tenant, gid: (table.get(gid) if tenant == TENANT else None)


# --- desired members ---------------------------------------------------------------

def test_bind_members_puts_one_principal_per_member():
    policy = load()
    desired = desired_members(policy, policy.services["billing-api"], members_of({G1: {"u1", "u2"}, G3: {"u3"}}))
    assert desired[INVOKER] == {user("u1"), user("u2"), group(G2)}
    assert desired["roles/run.viewer"] == {user("u3")}


def test_bind_group_puts_the_group_principal_even_when_never_synced():
    policy = load()
    desired = desired_members(policy, policy.services["billing-api"], members_of({}))
    assert desired[INVOKER] == {group(G2)}


def test_never_synced_group_contributes_nothing_but_keeps_its_role():
    policy = load()
    desired = desired_members(policy, policy.services["billing-api"], members_of({G1: {"u1"}}))
    assert desired["roles/run.viewer"] == set()   # G3 never synced: nobody granted on a guess
    synced_empty = desired_members(policy, policy.services["billing-api"], members_of({G3: set()}))
    assert synced_empty["roles/run.viewer"] == set()


def test_service_without_cloud_run_and_app_roles_plan_nothing():
    policy = load()
    assert desired_members(policy, policy.services["no-iam"], members_of({G1: {"u1"}})) == {}
    only_roles = POLICY.replace(f"      - groups: [{G1}]\n      - app_roles", "      - app_roles", 1)
    only_roles = only_roles.replace(f"      - groups: [{G2}]\n        bind: group\n", "")
    only_roles = only_roles.replace(f"      - groups: [{G3}]\n        role: roles/run.viewer\n", "")
    policy = load(only_roles)
    assert desired_members(policy, policy.services["billing-api"], members_of({G1: {"u1"}})) == {}


# --- diff ----------------------------------------------------------------------------

def test_diff_adds_and_removes_only_managed_members():
    live = [Binding(INVOKER, ("user:ops@example.com", user("old"), user("keep")))]
    changes = diff({INVOKER: {user("keep"), user("new")}}, {INVOKER: {user("old"), user("keep")}}, live,
                   service="billing-api", cloud_run=RUN)
    assert changes.adds == {INVOKER: {user("new")}}
    assert changes.removes == {INVOKER: {user("old")}}
    assert changes.managed == {INVOKER: {user("keep"), user("new")}}
    assert changes.principals == 3


def test_diff_never_removes_unmanaged_members():
    live = [Binding(INVOKER, ("user:ops@example.com", user("x"))), Binding("roles/run.admin", (user("old"),))]
    changes = diff({INVOKER: set()}, {INVOKER: set(), "roles/run.admin": set()}, live)
    assert changes.empty


def test_a_member_someone_else_granted_is_not_claimed():
    live = [Binding(INVOKER, (user("u1"),))]
    changes = diff({INVOKER: {user("u1")}}, {}, live)
    assert changes.empty and changes.managed == {INVOKER: frozenset()}
    # Later u1 leaves the group: the other party's grant stays.
    assert diff({INVOKER: set()}, changes.managed, live).empty


def test_managed_member_removed_by_hand_is_added_back():
    changes = diff({INVOKER: {user("u1")}}, {INVOKER: {user("u1")}}, [])
    assert changes.adds == {INVOKER: {user("u1")}}


def test_conditional_bindings_are_neither_counted_as_present_nor_edited():
    cond = {"title": "office hours", "expression": "request.time.getHours('Europe/Berlin') < 18"}
    live = [Binding(INVOKER, (user("u1"),), cond)]
    changes = diff({INVOKER: {user("u1")}}, {INVOKER: {user("u1")}}, live)
    assert changes.adds == {INVOKER: {user("u1")}}   # only the unconditioned grant is aadrun's
    gone = diff({INVOKER: set()}, {INVOKER: {user("u1")}}, live)
    assert gone.empty and gone.principals == 1


def test_record_mode_diffs_against_managed_members():
    changes = diff({INVOKER: {user("a"), user("b")}}, {INVOKER: {user("b"), user("c")}}, None)
    assert changes.adds == {INVOKER: {user("a")}} and changes.removes == {INVOKER: {user("c")}}
    assert changes.principals == 2


def test_to_json_is_sorted_and_complete():
    changes = diff({INVOKER: {user("b"), user("a")}}, {INVOKER: {user("c")}}, None,
                   service="billing-api", cloud_run=RUN)
    assert changes.to_json() == {
        "service": "billing-api", "cloud_run": RUN,
        "changes": {INVOKER: {"add": [user("a"), user("b")], "remove": [user("c")]}},
        "managed": {INVOKER: [user("a"), user("b")]}, "principals": 2}


def test_plan_policy_plans_only_services_with_cloud_run():
    policy = load()
    plans = [plan_service(policy, policy.services[n], members_of({G1: {"u1"}}), {}) for n, _ in iam_targets(policy, ())]
    assert [p.service for p in plans] == ["billing-api"]
    assert plans[0].adds[INVOKER] == {user("u1"), group(G2)}
    with pytest.raises(ValueError):
        plan_service(policy, policy.services["no-iam"], members_of({}), {})


def test_two_services_on_one_resource_want_the_union_and_neither_revokes_the_other():
    policy = load(POLICY.replace("  - name: no-iam\n    tenant: " + TENANT, "  - name: no-iam\n    tenant: " + TENANT
                                 + "\n    cloud_run: " + RUN))
    table = members_of({G1: {"u1"}, G2: set(), G3: set()})
    assert desired_on(policy, RUN, table)[INVOKER] == {user("u1"), group(G2)}
    # Both services want u1 (through G1): the plan of either keeps what the other grants.
    for name in ("billing-api", "no-iam"):
        changes = plan_service(policy, policy.services[name], table, {INVOKER: {user("u1"), group(G2)}},
                               [Binding(INVOKER, (user("u1"), group(G2)))])
        assert changes.empty


def test_a_resource_no_service_names_is_an_orphan_whose_managed_members_are_all_revoked():
    policy = load()
    old = RUN.replace("billing-api", "old-billing")
    assert orphans(policy, {RUN, old}) == [old]
    managed = {RUN: {}, old: {INVOKER: {user("u1")}}}
    live = {RUN: [], old: [Binding(INVOKER, (user("u1"), "user:eve@example.com"))]}
    plans = [plan_service(policy, policy.services[n], members_of({G1: set()}), managed[r], live[r]) if n
             else plan_orphan(r, managed[r], live[r]) for n, r in iam_targets(policy, {old})]
    assert [(p.service, p.cloud_run) for p in plans] == [("billing-api", RUN), ("", old)]
    assert plans[1].removes == {INVOKER: {user("u1")}} and not plans[1].adds   # EVE's grant stays
    assert plans[1].managed == {INVOKER: frozenset()}


# --- the principal guard -----------------------------------------------------------

def big_group(n: int) -> set[str]:
    return {f"{i:08d}-0000-0000-0000-000000000000" for i in range(n)}


def test_guard_allows_exactly_the_limit():
    policy = load()
    # 1 group principal (G2) + members of G1
    table = {G1: big_group(MAX_PRINCIPALS - 1)}
    changes = plan_service(policy, policy.services["billing-api"], members_of(table), {}, [])
    assert changes.principals == MAX_PRINCIPALS


def test_guard_refuses_over_the_limit_naming_service_and_bind_group():
    policy = load()
    with pytest.raises(PlanError) as info:
        plan_service(policy, policy.services["billing-api"], members_of({G1: big_group(MAX_PRINCIPALS)}), {}, None)
    assert "billing-api" in str(info.value) and "bind: group" in str(info.value)
    assert info.value.reason == "plan_error"


def test_guard_over_a_resource_two_services_share_names_both_the_largest_first():
    # The refusal's advice (bind: group) must reach the service whose groups are large,
    # whichever of the two is planned first.
    shared = POLICY + f"""  - name: wiki
    tenant: {TENANT}
    cloud_run: {RUN}
    access:
      - groups: [{G4}]
"""
    policy = load(shared)
    table = {G1: {"u1"}, G4: big_group(MAX_PRINCIPALS)}
    for name in ("billing-api", "wiki"):
        with pytest.raises(PlanError) as info:
            plan_service(policy, policy.services[name], members_of(table), {}, None)
        assert str(info.value).startswith(f"services 'wiki' ({MAX_PRINCIPALS}) and 'billing-api' (2) share {RUN}:")
        assert "use `bind: group` for their large groups" in str(info.value)


def test_guard_counts_unmanaged_and_conditional_occurrences():
    policy = load()
    cond = {"title": "t", "expression": "true"}
    live = [Binding("roles/run.admin", ("user:a@example.com", "user:b@example.com")),
            Binding(INVOKER, ("user:a@example.com",), cond)]
    table = {G1: big_group(MAX_PRINCIPALS - 3)}   # + G2 = limit - 2, + 3 live occurrences
    with pytest.raises(PlanError, match="billing-api"):
        plan_service(policy, policy.services["billing-api"], members_of(table), {}, live)
    plan_service(policy, policy.services["billing-api"], members_of(table), {}, live[:1])


def test_guard_counts_removals():
    many = tuple(user(o) for o in big_group(MAX_PRINCIPALS))
    changes = diff({INVOKER: set(many[1:]) | {user("new")}}, {INVOKER: set(many)}, [Binding(INVOKER, many)])
    assert changes.principals == MAX_PRINCIPALS


# --- grants that outlived their account ----------------------------------------------------

GONE = "deleted:user:x@example.com?uid=123456789012345678901"   # IAM's form for a deleted Google account


def test_a_deleted_account_s_grant_that_is_not_ours_does_not_stand_for_the_member_we_want():
    # An older account of that email, someone else's grant: the new one is granted, and
    # the deleted grant is neither claimed nor counted as ours.
    changes = diff({INVOKER: {"user:x@example.com"}}, {}, [Binding(INVOKER, (GONE,))])
    assert changes.adds == {INVOKER: {"user:x@example.com"}} and changes.principals == 2


def test_our_grant_whose_account_was_deleted_is_still_ours_to_revoke():
    # A restore of the account within 30 days would revive it: it is counted present, and removed.
    changes = diff({INVOKER: set()}, {INVOKER: {"user:x@example.com"}}, [Binding(INVOKER, (GONE,))])
    assert changes.removes == {INVOKER: {"user:x@example.com"}} and changes.principals == 0


def test_beside_our_live_grant_a_deleted_account_s_grant_is_someone_else_s_and_stays():
    # One snapshot cannot tell which came first: the deleted one is taken for an older
    # account's, so revoking ours leaves it, and it still counts against the limit.
    changes = diff({INVOKER: set()}, {INVOKER: {"user:x@example.com"}},
                   [Binding(INVOKER, ("user:x@example.com", GONE))])
    assert changes.removes == {INVOKER: {"user:x@example.com"}} and changes.principals == 1


def test_a_deleted_workforce_subject_s_grant_is_its_member_s():
    subject = user("u1")
    live = [Binding(INVOKER, (f"deleted:{subject}",))]
    assert diff({INVOKER: {subject}}, {INVOKER: {subject}}, live).adds == {}          # present: not granted twice
    assert diff({INVOKER: set()}, {INVOKER: {subject}}, live).removes == {INVOKER: {subject}}


# --- property ------------------------------------------------------------------------

MEMBERS = st.sets(st.sampled_from([f"user:{c}" for c in "abcdefgh"]), max_size=8)
ROLE_MAP = st.dictionaries(st.sampled_from([INVOKER, "roles/run.viewer", "roles/run.admin"]), MEMBERS, max_size=3)


@settings(max_examples=300, deadline=None)
@given(desired=ROLE_MAP, managed=ROLE_MAP, live=ROLE_MAP, conditional=ROLE_MAP)
def test_diff_only_removes_managed_and_converges(desired, managed, live, conditional):
    bindings = [Binding(r, tuple(sorted(m))) for r, m in live.items()]
    bindings += [Binding(r, tuple(sorted(m)), {"expression": "true"}) for r, m in conditional.items()]
    changes = diff(desired, managed, bindings)
    for role in set(desired) | set(managed) | set(live):
        removed = changes.removes.get(role, set())
        assert removed <= managed.get(role, set())
        before = live.get(role, set())
        after = (before - removed) | changes.adds.get(role, set())
        assert after == desired.get(role, set()) | (before - managed.get(role, set()))
    # Applying is idempotent: a second plan against the result changes nothing.
    applied = {r: (live.get(r, set()) - changes.removes.get(r, set())) | changes.adds.get(r, set())
               for r in set(live) | set(changes.adds)}
    again = diff(desired, changes.managed,
                 [Binding(r, tuple(sorted(m))) for r, m in applied.items()] + bindings[len(live):])
    assert again.empty


def test_the_principal_count_keeps_conditional_occurrences_of_a_removed_member():
    condition = {"title": "t", "expression": "true"}
    live = [Binding(INVOKER, ("user:a", "user:b")), Binding(INVOKER, ("user:a",), condition)]
    changes = diff({INVOKER: {"user:b"}}, {INVOKER: {"user:a", "user:b"}}, live)
    assert changes.removes == {INVOKER: frozenset({"user:a"})}
    assert changes.principals == 2      # b, and a's conditional binding, which aadrun never edits


def test_a_plan_refused_its_grants_records_none_of_them_as_managed():
    changes = diff({INVOKER: {"user:a", "user:new"}}, {INVOKER: {"user:a", "user:gone"}}, None, grants=False)
    assert changes.removes == {INVOKER: frozenset({"user:gone"})}
    assert changes.managed == {INVOKER: frozenset({"user:a"})}

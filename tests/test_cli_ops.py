"""scripts/aadrun plan, subscribe, resync and audit as an operator runs them, against the
local Microsoft Graph (TLS, real MSAL) and the local Cloud Run IAM server."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
from pathlib import Path

import pytest

from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from tests.support.cloudrun_server import CloudRunIamServer
from tests.support.graph_fixtures import *  # noqa: F401,F403 - graph_server, graph_pki, loopback_only
from tests.support.graph_fixtures import CLIENT_ID, CLIENT_SECRET, TENANT
from tests.support.metadata_server import ACCESS_TOKEN, MetadataServer
from tests.test_maintenance import ALICE, BILLING, BOB, CAROL, G_ENG, G_OTHER, G_STAFF, INVOKER, NOTIFY, POLICY, \
    STATE, user

CLI = str(Path(__file__).resolve().parents[1] / "scripts" / "aadrun")


@pytest.fixture
def ops(graph_server, tmp_path):
    """(run, store url, graph server, cloudrun server): ``run(*args)`` -> (exit code, stdout, stderr)."""
    (tmp_path / "policy.yaml").write_text(POLICY)
    graph_server.set_members(TENANT, G_ENG, [ALICE])
    graph_server.set_members(TENANT, G_STAFF, [BOB])
    store_url = f"sqlite:///{tmp_path}/state.db"
    with CloudRunIamServer() as cloudrun:
        env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
        env.update({"AADRUN_POLICY_PATH": str(tmp_path / "policy.yaml"), "AADRUN_STORE": store_url,
                    "AADRUN_GRAPH_URL": graph_server.graph_url, "AADRUN_AUTHORITY_URL": graph_server.authority_url,
                    "AADRUN_CLIENT_ID": CLIENT_ID, "AADRUN_CLIENT_SECRET": CLIENT_SECRET,
                    "AADRUN_CLIENT_STATE": STATE, "AADRUN_NOTIFICATION_URL": NOTIFY, "AADRUN_IAM": "cloudrun",
                    "AADRUN_CLOUDRUN_ENDPOINT": cloudrun.url, "NO_GCE_CHECK": "true",
                    "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")})

        def run(*args, unset=(), shell=False, **overrides):
            proc = subprocess.run(["bash", *args] if shell else [CLI, *args], capture_output=True, text=True,
                                  timeout=60,
                                  env={**{k: v for k, v in env.items() if k not in unset}, **overrides})
            return proc.returncode, proc.stdout, proc.stderr

        yield run, store_url, graph_server, cloudrun


def test_plan_shows_adds_removes_and_the_principal_count(ops):
    run, store_url, _, cloudrun = ops
    open_store(store_url)   # the functions' store, before any sync
    code, out, _ = run("plan", "--json")
    assert code == 0
    assert json.loads(out)["services"] == [{
        "service": "billing", "cloud_run": BILLING, "changes": {}, "managed": {INVOKER: []}, "principals": 0,
        "also": [], "limit": 1500, "live": True}]    # G_ENG was never synced: nobody is granted on a guess
    assert run("resync", "--json")[0] == 0
    open_store(store_url).apply(GroupUpdate(TENANT, G_ENG, added=frozenset({CAROL}), removed=frozenset({ALICE})))
    code, out, _ = run("plan", "--json")
    service = json.loads(out)["services"][0]
    assert code == 0 and service["principals"] == 1
    assert service["changes"] == {INVOKER: {"add": [user(CAROL)], "remove": [user(ALICE)]}}
    code, out, _ = run("plan")
    assert code == 0 and f"billing ({BILLING}): +1 -1, 1/1500 principals" in out
    assert f"  + {INVOKER} {user(CAROL)}" in out and f"  - {INVOKER} {user(ALICE)}" in out
    assert cloudrun.sets(BILLING) == 1     # plan wrote nothing (the one set is resync's)


def test_plan_shows_a_resource_two_services_share_once(ops, tmp_path):
    run, store_url, _, _ = ops
    wiki = f"  - name: wiki\n    tenant: {TENANT}\n"
    (tmp_path / "policy.yaml").write_text(POLICY.replace(wiki, f"{wiki}    cloud_run: {BILLING}\n"))
    open_store(store_url)
    code, out, _ = run("plan")
    assert code == 0 and [line.split(" (")[0] for line in out.splitlines() if BILLING in line] == ["billing + wiki"]
    [shared] = json.loads(run("plan", "--json")[1])["services"]
    assert (shared["service"], shared["also"]) == ("billing", ["wiki"])


def test_plan_shows_the_revocations_on_a_resource_no_service_names_any_more(ops):
    run, store_url, _, cloudrun = ops
    old = BILLING + "-old"
    cloudrun.set_policy(old, {"version": 3, "bindings": [{"role": INVOKER, "members": [user(ALICE), user(BOB)]}]})
    open_store(store_url).record_iam(old, {INVOKER: {user(ALICE)}}, source="test", why="granted by aadrun")
    code, out, _ = run("plan", "--json")
    orphan = json.loads(out)["services"][1]
    assert code == 0 and (orphan["service"], orphan["cloud_run"]) == ("", old)
    assert orphan["changes"] == {INVOKER: {"add": [], "remove": [user(ALICE)]}}     # BOB's grant is not aadrun's
    code, out, _ = run("plan")
    assert f"(no service any more) ({old}): +0 -1" in out and cloudrun.sets(old) == 0   # plan wrote nothing
    cloudrun.delete_service(old)   # deleted, its bindings with it: nothing left to revoke
    code, out, _ = run("plan")
    assert code == 0 and f"GONE {old}" in out and "(no service any more)" not in out


def test_plan_reports_a_service_whose_cloud_run_service_does_not_exist_and_plans_the_others(ops, tmp_path):
    run, store_url, _, cloudrun = ops
    new = BILLING.replace("/billing", "/not-deployed-yet")
    wiki = f"  - name: wiki\n    tenant: {TENANT}\n"
    (tmp_path / "policy.yaml").write_text(POLICY.replace(wiki, f"{wiki}    cloud_run: {new}\n"))
    cloudrun.delete_service(new)
    open_store(store_url)
    code, out, err = run("plan", "--json")
    plan = json.loads(out)
    assert code == 1 and plan["missing"] == {"wiki": new} and not err      # a finding, not a failure
    assert [s["service"] for s in plan["services"]] == ["billing"]         # the other plans go on
    code, out, _ = run("plan")
    assert code == 1 and f"MISSING wiki ({new}): no such Cloud Run service" in out and "billing (" in out


def test_the_cli_takes_google_credentials_from_the_metadata_server_as_on_cloud_build(ops, tmp_path):
    # cloudbuild.yaml runs `scripts/aadrun plan` with no key file: the credentials are
    # the build account's, from the metadata server. The CLI must not switch that off.
    _, store_url, _, cloudrun = ops
    open_store(store_url)
    env = {k: v for k, v in os.environ.items() if k not in ("NO_GCE_CHECK", "GOOGLE_APPLICATION_CREDENTIALS")}
    env.update({"AADRUN_POLICY_PATH": str(tmp_path / "policy.yaml"), "AADRUN_STORE": store_url,
                "AADRUN_IAM": "cloudrun", "AADRUN_CLOUDRUN_ENDPOINT": cloudrun.url,
                "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")})
    with MetadataServer() as metadata:
        proc = subprocess.run([CLI, "plan", "--json"], capture_output=True, text=True, timeout=60,
                              env={**env, **metadata.env()})
    assert proc.returncode == 0, proc.stderr
    assert {r["authorization"] for r in cloudrun.requests} == {f"Bearer {ACCESS_TOKEN}"}
    assert metadata.tokens_issued >= 1


def test_plan_over_the_principal_limit_is_a_finding_that_still_shows_its_revocations(ops):
    run, store_url, _, _ = ops
    assert run("resync")[0] == 0                      # ALICE granted and managed
    many = frozenset(f"00000000-0000-0000-0000-{i:012d}" for i in range(1501))
    open_store(store_url).apply(GroupUpdate(TENANT, G_ENG, replace=many, sync=SyncState(None, utcnow())))
    code, out, _ = run("plan")
    assert code == 1 and "REFUSED billing" in out and "bind: group" in out
    assert "(grants REFUSED: revocations only)" in out and f"  - {INVOKER} {user(ALICE)}" in out
    [service] = json.loads(run("plan", "--json")[1])["services"]
    assert service["changes"] == {INVOKER: {"add": [], "remove": [user(ALICE)]}}


def test_plan_where_others_filled_the_live_policy_past_the_limit_shows_nothing_would_be_written(ops):
    run, store_url, _, cloudrun = ops
    assert run("resync")[0] == 0                      # ALICE granted and managed
    old = BILLING + "-old"                            # and a resource no service names any more
    others = [f"user:someone{i}@example.com" for i in range(1501)]
    for resource in (BILLING, old):
        cloudrun.set_policy(resource, {"bindings": [{"role": INVOKER, "members": [user(ALICE)]},
                                                    {"role": "roles/run.developer", "members": others}]})
    open_store(store_url).record_iam(old, {INVOKER: {user(ALICE)}}, source="test", why="granted by aadrun")
    open_store(store_url).apply(GroupUpdate(TENANT, G_ENG, removed=frozenset({ALICE}), source="test"))
    code, out, err = run("plan", "--json")
    plan = json.loads(out)
    # Even the revocations would leave 1,501 principals: policy_sync and drift write nothing.
    assert code == 1 and set(plan["refused"]) == {"billing", old} and plan["services"] == [], err
    sets = cloudrun.sets(BILLING)
    run("resync", "--full")
    assert cloudrun.sets(BILLING) == sets             # as planned


def test_subscribe(ops):
    run, store_url, graph, _ = ops
    # A store that does not exist is not the functions': every subscription's client state
    # would be unknown there, and replaced.
    code, _, err = run("subscribe")
    assert code == 2 and "AADRUN_STORE" in err and not graph.subscriptions(TENANT, CLIENT_ID)
    open_store(store_url)   # the functions' store
    code, out, _ = run("subscribe", "--json")
    result = json.loads(out)
    assert code == 0 and result["counts"] == {"created": 2}
    assert sorted(s["resource"] for s in graph.subscriptions(TENANT, CLIENT_ID).values()) == [
        f"/groups/{G_ENG}", f"/groups/{G_STAFF}"]
    code, out, _ = run("subscribe")
    assert code == 0 and out.count("kept") == 2
    open_store(store_url).acquire_lease("maintenance/subscriptions", "a scheduled run", 60)
    code, out, _ = run("subscribe")
    assert code == 1 and "lease_held" in out


def test_subscribe_names_a_tenant_it_could_not_read(ops):
    run, store_url, _, _ = ops
    open_store(store_url)
    code, out, _ = run("subscribe", AADRUN_CLIENT_SECRET="no-longer-valid")
    assert code == 1 and out.startswith(f"error     {TENANT} (the tenant)  token request refused"), out


def test_subscribe_at_another_url_shows_the_url_the_subscriptions_notify_and_exits_1(ops):
    run, store_url, graph, _ = ops
    open_store(store_url)
    assert run("subscribe")[0] == 0
    code, out, _ = run("subscribe", AADRUN_NOTIFICATION_URL="https://other.example/graph_webhook")
    assert code == 1, out
    assert out.count(f"foreign   {TENANT}") == 2 and out.count(f"notifies {NOTIFY}, not this webhook") == 2, out


def test_resync_with_progress_and_one_group(ops):
    run, store_url, graph, cloudrun = ops
    code, out, err = run("resync", "--progress")
    assert code == 0 and "2 group(s): +2 -0 member(s)" in out and "2/2 groups" in err
    graph.add_members(TENANT, G_ENG, [CAROL])
    code, out, err = run("resync", "--group", G_ENG.upper(), "--json", "--progress")
    result = json.loads(out)
    assert code == 0 and (result["groups"], result["added"], result["reads"]) == (1, 1, {"full": 0, "incremental": 1})
    assert "groups" not in err          # a single group needs no bar
    assert {m for b in cloudrun.policy(BILLING)["bindings"] for m in b["members"]} == {user(ALICE), user(CAROL)}
    assert run("resync", "--group", G_OTHER)[0] == 2
    assert run("resync", "--frobnicate")[0] == 2
    open_store(store_url).acquire_lease("maintenance/reconcile", "a scheduled run", 60)
    code, _, err = run("resync")
    assert code == 1 and "lease" in err


def test_resync_of_policies_naming_no_group_reads_nothing_and_succeeds(ops, tmp_path):
    run, _, graph, _ = ops
    roles_only = tmp_path / "roles-only.yaml"
    roles_only.write_text(POLICY.replace(f"groups: [{G_ENG}]", "app_roles: [X]")
                          .replace(f"groups: [{G_STAFF}]", "app_roles: [Y]"))
    for flags in ((), ("--tenant", TENANT)):
        code, out, _ = run("resync", *flags, "--json", AADRUN_POLICY_PATH=str(roles_only))
        assert code == 0 and json.loads(out)["groups"] == 0
    assert graph.calls("GET", "/v1.0/groups/delta") == []
    assert run("resync", "--tenant", "99999999-9999-9999-9999-999999999999",
               AADRUN_POLICY_PATH=str(roles_only))[0] == 2   # a tenant the policies do not define


def test_audit_exports_the_change_log(ops, tmp_path):
    run, _, _, _ = ops
    run("resync")
    code, out, _ = run("audit")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and list(rows[0]) == ["seq", "at", "kind", "tenant", "group", "user", "service", "role",
                                           "member", "source", "why", "message_id"]
    assert {(r["kind"], r["user"] or r["member"]) for r in rows} == {
        ("member_added", ALICE), ("member_added", BOB), ("iam_added", user(ALICE))}
    claims = list(csv.DictReader(io.StringIO(run("audit", "--claims")[1])))
    assert [(r["kind"], r["member"]) for r in claims if r["kind"] not in {r["kind"] for r in rows}] == [
        ("iam_claimed", user(ALICE))]      # recorded just before the set call that granted her
    assert all(r["at"].endswith("Z") and r["source"] and r["why"] for r in rows)
    code, out, _ = run("audit", "--format", "json", "--since", "2000-01-01")
    document = json.loads(out)
    assert code == 0 and document["count"] == 3 and document["since"] == "2000-01-01T00:00:00+00:00"
    assert json.loads(run("audit", "--json", "--since", "2999-01-01T00:00:00Z")[1])["entries"] == []
    assert run("audit", "--since", "last tuesday")[0] == 2
    assert run("audit", "--format", "xml")[0] == 2
    code, out, err = run("audit", "--format", "csv", "--json")   # two answers asked for: neither is guessed
    assert (code, out) == (2, "") and "give one" in err
    assert json.loads(run("audit", "--format", "json", "--json")[1])["count"] == 3
    target = tmp_path / "evidence.csv"
    code, out, _ = run("audit", "--output", str(target))
    assert code == 0 and out == "" and len(target.read_text().splitlines()) == 4
    for unwritable in (tmp_path / "no-such-folder" / "x.csv", tmp_path):
        code, _, err = run("audit", "--output", str(unwritable))
        assert code == 2 and f"cannot write {unwritable}" in err and "Traceback" not in err


def test_an_export_the_disk_cuts_short_leaves_no_file_that_looks_whole(ops, tmp_path):
    run, store_url, _, _ = ops
    many = frozenset(f"00000000-0000-0000-0000-{i:012d}" for i in range(3000))   # about 500 KB of CSV
    open_store(store_url).apply(GroupUpdate(TENANT, G_ENG, added=many, sync=SyncState(None, utcnow())))
    target = tmp_path / "evidence.csv"
    # A file size limit of 100 KB: the write fails midway, as on a full disk.
    limited = f'ulimit -f 200; exec "{CLI}" audit -o "{target}"'
    code, out, err = run("-c", limited, shell=True)
    assert code == 1 and "Traceback" not in err and f"cannot write {target}" in err and "no file made" in err
    assert list(tmp_path.glob("*evidence*")) == []          # no partial export, no leftover part file
    target.write_text("the last export\n")
    code, _, err = run("-c", limited, shell=True)
    assert code == 1 and "the file is as it was" in err and target.read_text() == "the last export\n"
    assert [p.name for p in tmp_path.glob("*evidence*")] == ["evidence.csv"]
    assert run("audit", "-o", str(target))[0] == 0 and len(target.read_text().splitlines()) == 3001


@pytest.mark.parametrize("command", [["audit"], ["audit", "-o", "/dev/full"], ["validate"], ["plan", "--json"]])
def test_output_that_cannot_be_written_is_one_line_of_error_and_exit_1(ops, command):
    stdout = "" if "-o" in command else " > /dev/full"
    code, _, err = ops[0]("-c", f'"{CLI}" {" ".join(command)}{stdout}', shell=True)
    assert code == 1 and "Traceback" not in err and "error: cannot write" in err and "No space left" in err, err


def test_a_reader_that_stops_early_changes_no_exit_code(ops, tmp_path):
    run, store_url, _, _ = ops
    many = frozenset(f"00000000-0000-0000-0000-{i:012d}" for i in range(3000))   # far more than a pipe holds
    open_store(store_url).apply(GroupUpdate(TENANT, G_ENG, added=many, sync=SyncState(None, utcnow())))
    code, out, err = run("-c", f'"{CLI}" audit | head -1; exit "${{PIPESTATUS[0]}}"', shell=True)
    assert (code, out.strip(), err) == (0, "seq,at,kind,tenant,group,user,service,role,member,source,why,message_id",
                                        "")
    # A command with a finding keeps its exit code: `validate | head` must not pass a bad policy.
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n" + "".join(f"  - name: s{i}\n    tenant: nope\n" for i in range(3000)))
    code, out, err = run("-c", f'"{CLI}" validate --policy "{bad}" | head -1; exit "${{PIPESTATUS[0]}}"', shell=True)
    assert (code, err) == (1, "") and out.startswith("error: ")


@pytest.mark.parametrize("start", ["=", "+", "-", "@", "\t", "\r"])
def test_audit_csv_exports_a_value_that_looks_like_a_formula_as_text(ops, start):
    run, store_url, _, _ = ops
    formula = start + 'HYPERLINK("http://evil.example/","open")'
    open_store(store_url).apply(GroupUpdate(TENANT, G_ENG, added=frozenset({ALICE}), source="test", why=formula))
    [row] = list(csv.DictReader(io.StringIO(run("audit")[1])))
    # (A carriage return reaches this reader as a line feed: text mode.)
    assert row["why"][0] == "'" and row["why"][2:] == formula[1:] and row["user"] == ALICE
    assert json.loads(run("audit", "--json")[1])["entries"][0]["why"] == formula   # JSON keeps the value


@pytest.mark.parametrize("command", ["subscribe", "resync"])
def test_graph_commands_without_a_client_id_are_bad_usage(ops, command):
    run, store_url, graph_server, _ = ops
    open_store(store_url)
    code, _, err = run(command, unset=("AADRUN_CLIENT_ID",))
    assert code == 2 and "AADRUN_CLIENT_ID" in err and "Traceback" not in err
    assert graph_server.token_requests == 0


def test_resync_refuses_record_mode_against_the_functions_store(ops):
    # Record mode would log IAM changes never made and forget revoked members as managed:
    # against the deployed functions' store, drift would then never revoke them.
    run, _, graph_server, cloudrun = ops
    code, _, err = run("resync", AADRUN_IAM="record", AADRUN_STORE="firestore://", unset=("FIRESTORE_EMULATOR_HOST",))
    assert code == 2 and "AADRUN_IAM=cloudrun" in err and "Traceback" not in err
    assert graph_server.token_requests == 0 and cloudrun.sets(BILLING) == 0
    assert run("resync", AADRUN_IAM="record")[0] == 0   # a local SQLite store is record mode's own


@pytest.mark.parametrize("command", ["validate", "plan", "subscribe", "resync", "audit"])
def test_every_command_takes_json(ops, command):
    run, store_url, _, _ = ops
    open_store(store_url)
    code, out, _ = run(command, "--json")
    assert code == 0 and isinstance(json.loads(out), dict)

"""scripts/aadrun as an operator runs it: exit codes and output."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.support.devidp import DevIdentityProvider
from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from tests.support.world import ALICE, BOB, G_ENG, TENANT_A, env_for, write_policy

CLI = str(Path(__file__).resolve().parents[1] / "scripts" / "aadrun")


def run(*args, env=None):
    proc = subprocess.run([CLI, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    return proc.returncode, proc.stdout, proc.stderr


def test_validate_ok():
    code, out, _ = run("validate", "--policy", "policies")
    assert code == 0 and "billing-api" in out


def test_validate_refuses_an_empty_policy_flag_rather_than_check_the_default():
    code, out, err = run("validate", "--policy", "")   # a CI step's "$POLICY_DIR", unset
    assert (code, out) == (2, "") and "--policy is empty" in err


def test_validate_tells_a_missing_policy_from_one_that_is_not_a_file(tmp_path):
    fifo = tmp_path / "policy.yaml"
    os.mkfifo(fifo)
    assert "no such file or folder" in run("validate", "--policy", str(tmp_path / "missing.yaml"))[1]
    code, out, _ = run("validate", "--policy", str(fifo))
    assert code == 1 and "not a regular file or folder" in out


def test_validate_reports_file_line_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  - id: 11111111-1111-1111-1111-111111111111\n    audiences: []\n")
    code, out, _ = run("validate", "--policy", str(bad), "--json")
    assert code == 1
    error = json.loads(out)["error"]
    assert (error["file"], error["line"], error["field"]) == (str(bad), 3, "tenants[0].audiences")


def test_validate_lists_every_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tenants:\n  - id: 11111111-1111-1111-1111-111111111111\n    audiences: []\n"
                   "services:\n  - name: s\n    tenant: nope\n    access: []\n")
    code, out, err = run("validate", "--policy", str(bad))
    assert code == 1 and "Traceback" not in out + err
    assert [line.split("bad.yaml:", 1)[1].split(":", 1)[0] for line in out.splitlines()] == ["3", "6"]
    code, out, _ = run("validate", "--policy", str(bad), "--json")
    assert [e["field"] for e in json.loads(out)["errors"]] == ["tenants[0].audiences", "services[0].tenant"]


V2_ONLY = """\
tenants:
  - id: 11111111-1111-1111-1111-111111111111
    audiences: ["api://demo"]
    token_versions: VERSIONS
services:
  - {name: uses-tenant, tenant: 11111111-1111-1111-1111-111111111111, access: [{app_roles: [R]}]}
  - {name: also-tenant, tenant: 11111111-1111-1111-1111-111111111111, access: [{app_roles: [R]}]}
  - {name: app-id-uri, tenant: 11111111-1111-1111-1111-111111111111, audience: "api://x", access: [{app_roles: [R]}]}
  - {name: client-id, tenant: 11111111-1111-1111-1111-111111111111, audience: "c1000000-0000-0000-0000-00000000000a",
     access: [{app_roles: [R]}]}
"""


def test_validate_warns_when_v2_tokens_could_never_match_an_audience(tmp_path):
    # A v2 token's aud is always the API's client id: with only App ID URIs, every
    # token of a v2-only service is refused. The policy loads (IAM works); validate says so.
    policy = tmp_path / "p.yaml"
    policy.write_text(V2_ONLY.replace("VERSIONS", "[2]"))
    code, out, _ = run("validate", "--policy", str(policy))
    assert code == 0 and out.startswith("warning: ") and out.splitlines()[-1].startswith("ok: ")
    code, out, _ = run("validate", "--policy", str(policy), "--strict")   # e.g. to stop a build
    assert code == 1 and out.splitlines()[-1].startswith("not ok (--strict): 2 warning(s) in 1 file(s)")
    code, out, _ = run("validate", "--policy", str(policy), "--strict", "--json")
    assert code == 1 and not json.loads(out)["valid"]
    code, out, _ = run("validate", "--policy", str(policy), "--json")
    report = json.loads(out)
    assert code == 0 and report["valid"]
    assert [(w["line"], w["field"]) for w in report["warnings"]] == [(3, "tenants[0].audiences"),
                                                                     (8, "services[2].audience")]
    assert "also-tenant, uses-tenant" in report["warnings"][0]["message"]
    policy.write_text(V2_ONLY.replace("VERSIONS", "[1, 2]"))   # v1 tokens may carry the App ID URI
    code, out, _ = run("validate", "--policy", str(policy), "--json", "--strict")
    assert code == 0 and json.loads(out)["warnings"] == []


def test_validate_warns_of_a_cloud_run_service_named_by_its_project_number(tmp_path):
    # Cloud Run answers to the project id and number alike; aadrun keeps its members per
    # name, so switching between them would revoke them as a removed service's.
    policy = tmp_path / "p.yaml"
    policy.write_text("tenants:\n  - {id: 11111111-1111-1111-1111-111111111111, audiences: [c1000000-0000-0000-0000-00000000000a]}\n"
                      "principal: 'principal://iam.googleapis.com/locations/global/workforcePools/p/subject/{oid}'\n"
                      "services:\n"
                      "  - name: by-number\n    tenant: 11111111-1111-1111-1111-111111111111\n"
                      "    cloud_run: projects/123456789012/locations/l/services/s\n"
                      "    access: [{groups: [aaaaaaaa-0000-0000-0000-000000000001]}]\n"
                      "  - name: by-id\n    tenant: 11111111-1111-1111-1111-111111111111\n"
                      "    cloud_run: projects/my-project-1/locations/l/services/s\n"
                      "    access: [{groups: [aaaaaaaa-0000-0000-0000-000000000001]}]\n")
    code, out, _ = run("validate", "--policy", str(policy), "--json")
    [warning] = json.loads(out)["warnings"]
    assert code == 0 and (warning["line"], warning["field"]) == (7, "services[0].cloud_run")
    assert "projects/123456789012 is a project number" in warning["message"]
    assert run("validate", "--policy", str(policy), "--strict")[0] == 1


def test_bad_usage_exits_2(tmp_path):
    assert run("explain")[0] == 2
    assert run("no-such-command")[0] == 2
    # A command's unknown option or argument shows that command's usage, with its options.
    for extra in ("--bogus", "stray"):
        code, _, err = run("validate", extra)
        assert code == 2 and err.startswith("usage: aadrun validate ") and "--strict" in err
        assert f"error: unrecognized arguments: {extra}" in err
    for flag in ("--token", "--user"):   # "$UNSET_VARIABLE", quoted or blank
        for blank in ("", "  "):
            code, out, err = run("explain", "--service", "billing", flag, blank)
            assert (code, out) == (2, "") and err.endswith(f"error: {flag} is empty\n"), err
    # A configuration variable that is invalid, or missing for the command.
    code, _, err = run("validate", env={"AADRUN_STORE": "postgres://x"})
    assert code == 2 and "AADRUN_STORE" in err and "Traceback" not in err
    env = {"AADRUN_POLICY_PATH": str(write_policy(tmp_path)), "AADRUN_STORE": f"sqlite:///{tmp_path}/s.db",
           "AADRUN_NOTIFICATION_URL": "", "AADRUN_CLIENT_STATE": "s"}
    open_store(env["AADRUN_STORE"])
    code, _, err = run("subscribe", env=env)
    assert code == 2 and "AADRUN_NOTIFICATION_URL" in err + run("subscribe", "--json", env=env)[1]


@pytest.fixture()
def env(tmp_path):
    with DevIdentityProvider() as idp:
        store_url = f"sqlite:///{tmp_path}/state.db"
        open_store(store_url).apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}),
                                                sync=SyncState(None, utcnow())))
        yield idp, env_for(idp.url, write_policy(tmp_path), store_url)


def test_explain_token_allow_lists_every_step(env):
    idp, variables = env
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    code, out, _ = run("explain", "--service", "billing", "--token", token, "--json", env=variables)
    result = json.loads(out)
    assert code == 0 and result["allow"] and result["reason"] == "ok"
    assert len(result["steps"]) == 13 and all(s["outcome"].startswith("pass") for s in result["steps"])
    assert token not in out
    # The rule that allowed, named as validate names fields: the second is access[1].
    admin = idp.mint(TENANT_A, oid=BOB, aud="api://billing", roles=["Billing.Admin"])
    code, out, _ = run("explain", "--service", "billing", "--token", admin, env=variables)
    assert code == 0 and "pass (access[1], via Billing.Admin) a rule of the service matches" in out


def test_explain_token_deny_shows_the_failing_step(env):
    idp, variables = env
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://elsewhere")
    code, out, _ = run("explain", "--service", "billing", "--token", token, "--json", env=variables)
    result = json.loads(out)
    assert code == 1 and result["reason"] == "wrong_audience"
    outcomes = [s["outcome"] for s in result["steps"]]
    failed = outcomes.index("fail")
    assert result["steps"][failed]["reason"] == "wrong_audience"
    assert set(outcomes[:failed]) == {"pass"} and set(outcomes[failed + 1:]) == {"skipped"}


def test_explain_token_names_the_step_that_could_not_decide_and_why(env, tmp_path):
    idp, variables = env
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")

    def failed_step(extra):
        code, out, _ = run("explain", "--service", "billing", "--token", token, "--json", env={**variables, **extra})
        [step] = [s for s in json.loads(out)["steps"] if s["outcome"] == "fail"]
        return code, step

    broken = tmp_path / "broken.db"
    broken.write_bytes(b"not a database" * 100)
    code, step = failed_step({"AADRUN_STORE": f"sqlite:///{broken}"})       # the token verifies; the store fails
    assert code == 1 and (step["check"], step["reason"]) == ("a rule of the service matches", "unavailable")
    assert "store" in step["detail"]
    idp.down = True                                                          # no keys were ever fetched
    code, step = failed_step({})
    assert code == 1 and step["reason"] == "unavailable" and "signing keys" in step["detail"]
    assert step["check"] != "a rule of the service matches"
    idp.down = False
    policy = tmp_path / "bad.yaml"
    policy.write_text("tenants:\n  - id: 11111111-1111-1111-1111-111111111111\n    audiences: []\n")
    code, out, err = run("explain", "--service", "billing", "--token", token, env={**variables,
                                                                                  "AADRUN_POLICY_PATH": str(policy)})
    assert code == 1 and out == "" and f"{policy}:3" in err and "Traceback" not in err


@pytest.mark.parametrize("command, code, out", [
    (["audit", "--format", "json"], 0, "[]\n"),
    (["plan", "--json"], 0, '"changes": {}'),      # never synced: nobody is granted on a guess
    (["explain", "--service", "billing", "--user", ALICE, "--json"], 1, '"reason": "membership_unknown"'),
])
def test_a_command_reading_a_store_that_does_not_exist_reads_it_empty_and_creates_nothing(tmp_path, command, code,
                                                                                          out):
    # A fresh clone has no store yet: a read says what an empty store says, and warns.
    missing = tmp_path / "nowhere" / "state.db"
    env = {"AADRUN_STORE": f"sqlite:///{missing}", "AADRUN_POLICY_PATH": str(write_policy(tmp_path))}
    got = run(*command, env=env)
    assert got[0] == code and out in got[1] and f"warning: no store at {missing}" in got[2]
    assert not missing.parent.exists()


def test_explain_says_a_group_never_synced_is_unknown(tmp_path):
    env = {"AADRUN_STORE": f"sqlite:///{tmp_path}/state.db", "AADRUN_POLICY_PATH": str(write_policy(tmp_path))}
    code, out, _ = run("explain", "--service", "billing", "--user", ALICE, env=env)
    assert code == 1 and f"group {G_ENG}: never synced: unknown" in out and "None" not in out


def test_explain_with_an_unknown_service_or_a_user_that_is_no_object_id_is_bad_usage(env):
    idp, variables = env
    token = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
    code, out, err = run("explain", "--service", "biling", "--token", token, env=variables)
    assert (code, out) == (2, "") and "unknown service 'biling'" in err and "billing" in err
    assert run("explain", "--service", "biling", "--user", ALICE, env=variables)[0] == 2
    code, _, err = run("explain", "--service", "billing", "--user", "alice@example.com", env=variables)
    assert code == 2 and "object id" in err


def test_explain_user(env):
    _, variables = env
    code, out, _ = run("explain", "--service", "billing", "--user", ALICE, env=variables)
    assert code == 0 and "ALLOW" in out and G_ENG in out and f"allowed by access[0] via {G_ENG}" in out
    code, out, _ = run("explain", "--service", "billing", "--user", ALICE.upper(), env=variables)
    assert code == 0 and "ALLOW" in out   # object ids are GUIDs: any letter case
    code, out, _ = run("explain", "--service", "billing", "--user", BOB, "--json", env=variables)
    result = json.loads(out)
    assert code == 1 and result["reason"] == "not_member" and result["groups"][0]["member"] is False
    assert result["status"] == 403   # the status verify would answer, as explain --token says it

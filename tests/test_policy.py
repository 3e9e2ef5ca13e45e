"""Policy files: loading, merging and errors located by file, line and field."""
from __future__ import annotations

import textwrap

import pytest

from aadrun.errors import PolicyError
from aadrun.policy import load_policy
from tests.support.world import G_ENG, POLICY, TENANT_A, TENANT_B

T = TENANT_A


def write(tmp_path, name, text):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_shipped_example_policy_loads():
    policy = load_policy("policies")
    assert "billing-api" in policy.services
    assert policy.services["billing-api"].rules[2].bind == "group"


def test_defaults_and_overrides(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", POLICY))
    billing = policy.services["billing"]
    assert billing.rules[0].role == "roles/run.invoker" and billing.rules[0].bind == "members"
    assert policy.audiences_for(billing) == ("api://billing",)
    assert policy.audiences_for(policy.services["roles-only"]) == ("api://aadrun-test",)
    assert policy.tenants[TENANT_B].token_versions == (1, 2)
    assert policy.referenced_groups()[TENANT_A] >= {G_ENG}
    assert policy.member_principal("u").endswith("/subject/u")


def test_a_service_may_accept_several_audiences(tmp_path):
    # A v1 client may ask for the App ID URI, while a v2 token always carries the client id.
    text = POLICY.replace("audience: api://billing",
                          'audience: ["api://billing", "de300000-0000-0000-0000-0000000000a1"]')
    policy = load_policy(write(tmp_path, "p.yaml", text))
    assert policy.audiences_for(policy.services["billing"]) == ("api://billing", "de300000-0000-0000-0000-0000000000a1")
    with pytest.raises(PolicyError, match="non-empty list"):
        load_policy(write(tmp_path, "p.yaml", POLICY.replace("audience: api://billing", "audience: []")))


def test_a_client_id_audience_is_compared_in_lower_case_as_entra_writes_it(tmp_path):
    text = POLICY.replace("audience: api://billing", "audience: DE300000-0000-0000-0000-0000000000A1") \
        .replace('audiences: ["api://aadrun-test"]', 'audiences: ["API://Upper", "AB000000-0000-0000-0000-0000000000CD"]')
    policy = load_policy(write(tmp_path, "p.yaml", text))
    assert policy.audiences_for(policy.services["billing"]) == ("de300000-0000-0000-0000-0000000000a1",)
    assert policy.audiences_for(policy.services["roles-only"]) == ("API://Upper", "ab000000-0000-0000-0000-0000000000cd")


BASE = f"""\
tenants:
  - id: {T}
    audiences: [api://a]
services:
  - name: s
    tenant: {T}
    access:
      - groups: [{G_ENG}]
"""

ERRORS = [
    ("bad tenant id", BASE.replace(f"id: {T}", "id: not-a-guid"), 2, "tenants[0].id"),
    ("unknown field", BASE + "    colour: blue\n", 9, "services[0].colour"),
    ("bad group", BASE.replace(f"groups: [{G_ENG}]", "groups: [engineers]"), 8, "services[0].access[0].groups[0]"),
    ("empty access", BASE.replace(f"    access:\n      - groups: [{G_ENG}]\n", "    access: []\n"), 7,
     "services[0].access"),
    ("bad version", BASE.replace("    audiences: [api://a]", "    audiences: [api://a]\n    token_versions: [3]"), 4,
     "tenants[0].token_versions"),
    ("undefined tenant", BASE.replace(f"    tenant: {T}", f"    tenant: {TENANT_B}"), 6, "services[0].tenant"),
    ("bad bind", BASE.replace(f"groups: [{G_ENG}]", f"groups: [{G_ENG}]\n        bind: everyone"), 9,
     "services[0].access[0].bind"),
    ("bad role", BASE.replace(f"groups: [{G_ENG}]", f"groups: [{G_ENG}]\n        role: admin"), 9,
     "services[0].access[0].role"),
    ("bad project in a custom role", BASE.replace(f"groups: [{G_ENG}]", f"groups: [{G_ENG}]\n"
                                                  "        role: projects/a b/roles/x"), 9,
     "services[0].access[0].role"),
    ("bind on app roles", BASE.replace(f"groups: [{G_ENG}]", "app_roles: [A]\n        bind: group"), 9,
     "services[0].access[0].bind"),
    ("group bind without group_principal",
     BASE.replace("    access:", "    cloud_run: projects/p/locations/l/services/s\n    access:")
     .replace(f"groups: [{G_ENG}]", f"groups: [{G_ENG}]\n        bind: group"), 10, "services[0].access[0].bind"),
    ("bad cloud_run", BASE.replace("    access:", "    cloud_run: services/s\n    access:"), 7,
     "services[0].cloud_run"),
    ("invalid YAML", BASE + "  - [\n", None, None),
    ("duplicate key", BASE.replace("    audiences: [api://a]", "    audiences: [api://a]\n    audiences: [b]"), 4,
     "tenants[0].audiences"),
    ("principal without placeholder", BASE + "principal: principal://x\n", 9, "principal"),
    ("top level list", "- a\n", 1, None),
    ("empty value", BASE.replace("    audiences: [api://a]", "    audiences:"), 3, "tenants[0].audiences"),
    ("unknown tag", BASE.replace("    audiences: [api://a]", "    audiences: [!secret a]"), 3,
     "tenants[0].audiences[0]"),
    ("known tag, impossible value", BASE.replace("  - name: s", "  - name: !!int abc"), 5, "services[0].name"),
    ("impossible timestamp", BASE.replace("  - name: s", "  - name: !!timestamp x"), 5, "services[0].name"),
    ("impossible bool", BASE.replace("  - name: s", "  - name: !!bool maybe"), 5, "services[0].name"),
    ("principal with another placeholder", BASE + "principal: principal://x/{pool}/{oid}\n", 9, "principal"),
    ("principal that is no IAM member", BASE + "principal: '{oid}'\n", 9, "principal"),
    ("group_principal with the user placeholder", BASE + "group_principal: principalSet://x/{oid}\n", 9,
     "group_principal"),
    ("no tenant at all", "# everything commented out\n", None, "tenants"),
    ("no token version", BASE.replace("    audiences: [api://a]", "    audiences: [api://a]\n    token_versions: []"),
     4, "tenants[0].token_versions"),
    ("a boolean token version", BASE.replace("    audiences: [api://a]",
                                             "    audiences: [api://a]\n    token_versions: [yes]"),
     4, "tenants[0].token_versions"),
    ("a rule of nothing", BASE.replace(f"      - groups: [{G_ENG}]", "      - {}"), 8, "services[0].access[0]"),
    ("an IAM role on app roles", BASE.replace(f"groups: [{G_ENG}]", "app_roles: [A]\n        role: roles/run.admin"),
     9, "services[0].access[0].role"),
    # A value reached through an alias is the using entry's: its line, not the anchor's.
    ("error under an alias", BASE.replace(f"    access:\n      - groups: [{G_ENG}]\n", f"""\
    access: &rules
      - groups: [{G_ENG}]
        bind: group
  - name: t
    tenant: {T}
    cloud_run: projects/p/locations/l/services/t
    access: *rules
"""), 13, "services[1].access[0].bind"),
    ("tenant repeated by an alias", BASE.replace(f"  - id: {T}\n    audiences: [api://a]\n",
                                                 f"  - &t {{id: {T}, audiences: [api://a]}}\n  - *t\n"), 3,
     "tenants[1].id"),
]


def test_yaml_merge_keys_are_applied_and_written_keys_win(tmp_path):
    policy = load_policy(write(tmp_path, "p.yaml", f"""\
        tenants:
          - id: {T}
            audiences: [api://a]
        services:
          - &base
            name: s
            tenant: {T}
            audience: api://s
            access:
              - groups: [{G_ENG}]
          - <<: *base
            name: t
        """))
    assert sorted(policy.services) == ["s", "t"]
    assert policy.services["t"].audiences == ("api://s",) and policy.services["t"].groups == policy.services["s"].groups


def test_a_value_yaml_reads_as_a_boolean_or_number_says_to_quote_it(tmp_path):
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, "p.yaml", BASE.replace("  - name: s", "  - name: yes")))
    assert (caught.value.line, caught.value.field) == (5, "services[0].name")
    assert "read True as a bool: quote it" in str(caught.value)


@pytest.mark.parametrize("case,text,line,field", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors_name_file_line_and_field(tmp_path, case, text, line, field):
    path = write(tmp_path, "p.yaml", text)
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    error = caught.value
    assert error.file == str(path)
    if line is not None:
        assert error.line == line, str(error)
    assert error.field == field, str(error)


def test_an_error_reached_through_an_alias_of_an_alias_names_the_outer_alias_line(tmp_path):
    text = BASE.replace(f"    access:\n      - groups: [{G_ENG}]\n", f"""\
    access: &first
      - &rule
        app_roles: [R]
        bind: 5
  - name: two
    tenant: {T}
    access: &second [*rule]
  - name: three
    tenant: {T}
    access: *second
""")
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, "p.yaml", text))
    assert [(e.line, e.field) for e in caught.value.errors] == [
        (10, "services[0].access[0].bind"), (13, "services[1].access[0].bind"), (16, "services[2].access[0].bind")]


@pytest.mark.parametrize("value", ['["principal://x/{oid}"]', "null", "7"])
def test_a_principal_of_the_wrong_type_is_one_error_not_also_a_missing_one(tmp_path, value):
    text = BASE.replace("    access:", "    cloud_run: projects/p/locations/l/services/s\n    access:") + \
        f"principal: {value}\n"
    with pytest.raises(PolicyError) as caught:
        load_policy(write(tmp_path, "p.yaml", text))
    assert [(e.line, e.field) for e in caught.value.errors] == [(10, "principal")]


def test_a_service_named_like_its_tenant_leaves_the_tenant_s_warning_on_the_tenant(tmp_path):
    text = BASE.replace("  - id:", "  - token_versions: [2]\n    id:") + f"""\
  - name: {T}
    tenant: {T}
    audience: api://own
    access:
      - app_roles: [R]
"""
    policy = load_policy(write(tmp_path, "p.yaml", text))
    assert sorted((w.line, w.field) for w in policy.warnings) == [(4, "tenants[0].audiences"),
                                                                 (12, f"services[1].audience")]


def test_a_role_cloud_run_may_refuse_on_a_service_is_a_warning_at_its_rule(tmp_path):
    # Cloud Run refuses a set call granting a role that does not apply to a service, and
    # with it every grant of the write: validate says so before a deploy.
    roles = ["roles/run.invoker", "roles/run.developer", "roles/viewer", "projects/my-project/roles/caller",
             "organizations/123/roles/caller", "roles/storage.objectViewer"]
    access = "".join(f"      - groups: [{G_ENG}]\n        role: {role}\n" for role in roles)
    text = BASE.replace("      - groups: [" + G_ENG + "]\n", access + "      - app_roles: [Reader]\n").replace(
        "    access:", "    cloud_run: projects/p/locations/l/services/s\n    access:") + \
        "principal: 'principal://iam.googleapis.com/locations/global/workforcePools/p/subject/{oid}'\n"
    policy = load_policy(write(tmp_path, "p.yaml", text))
    [warning] = [w for w in policy.warnings if w.field.endswith(".role")]
    assert (warning.field, warning.line) == ("services[0].access[5].role", 20)
    assert "roles/storage.objectViewer is neither a Cloud Run role" in warning.message
    # Without cloud_run nothing is bound in IAM: nothing to refuse.
    no_iam = load_policy(write(tmp_path, "q.yaml", text.replace("    cloud_run: projects/p/locations/l/services/s\n",
                                                                "")))
    assert not [w for w in no_iam.warnings if w.field.endswith(".role")]


def test_ids_written_in_upper_case_are_read_as_entra_writes_them(tmp_path):
    # Tokens and Graph carry object ids in lower case; the store keys groups by them.
    tenant = "abcdef00-0000-0000-0000-00000000000a"
    policy = load_policy(write(tmp_path, "p.yaml", BASE.replace(T, tenant.upper()).replace(G_ENG, G_ENG.upper())))
    assert list(policy.tenants) == [tenant] and policy.services["s"].tenant == tenant
    assert policy.services["s"].groups == (G_ENG,)


def test_a_service_with_only_app_role_rules_needs_no_principal_for_its_cloud_run(tmp_path):
    # App roles are checked by verify and put nothing into IAM.
    text = BASE.replace("    access:", "    cloud_run: projects/p/locations/l/services/s\n    access:") \
        .replace(f"groups: [{G_ENG}]", "app_roles: [Admin]")
    assert load_policy(write(tmp_path, "p.yaml", text)).services["s"].app_roles == {"Admin"}


def test_folder_merges_files(tmp_path):
    write(tmp_path, "a.yaml", f"tenants:\n  - id: {T}\n    audiences: [x]\n")
    write(tmp_path, "b.yml", f"services:\n  - name: s\n    tenant: {T}\n    access:\n      - app_roles: [R]\n")
    policy = load_policy(tmp_path)
    assert list(policy.services) == ["s"] and len(policy.sources) == 2


@pytest.mark.parametrize("second,field", [
    (f"tenants:\n  - id: {T}\n    audiences: [y]\n", "tenants[0].id"),
    (f"services:\n  - name: s\n    tenant: {T}\n    access:\n      - app_roles: [R]\n", "services[0].name"),
    ("principal: 'principal://p/{oid}'\n", "principal"),
])
def test_folder_refuses_duplicates_across_files(tmp_path, second, field):
    write(tmp_path, "a.yaml", BASE + "principal: 'principal://q/{oid}'\n")
    path = write(tmp_path, "b.yaml", second)
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path)
    assert (caught.value.file, caught.value.field) == (str(path), field)


def test_every_problem_is_reported_in_file_and_line_order(tmp_path):
    write(tmp_path, "a.yaml", f"""\
tenants:
  - id: {T}
    audiences: [x]
services:
  - name: bad-group
    tenant: {T}
    access:
      - groups: [not-a-guid]
  - name: no-tenant
    tenant: {TENANT_B}
    access:
      - app_roles: [R]
""")
    write(tmp_path, "b.yaml", "services:\n  - name: no-access\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path)
    found = [(e.file.rsplit("/", 1)[1], e.line, e.field) for e in caught.value.errors]
    assert found == [("a.yaml", 8, "services[0].access[0].groups[0]"), ("a.yaml", 10, "services[1].tenant"),
                     ("b.yaml", 2, "services[0].tenant")]
    assert "(and 2 more)" in str(caught.value)


def test_a_service_that_does_not_parse_still_has_its_tenant_reference_checked(tmp_path):
    path = write(tmp_path, "a.yaml", f"""\
tenants:
  - id: {T}
    audiences: [x]
services:
  - name: s
    tenant: {TENANT_B}
    cloud_run: not/a/resource
    access:
      - app_roles: [R]
  - name: t
    tenant: {T}
    cloud_run: not/a/resource
    access:
      - app_roles: [R]
""")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert [(e.line, e.field) for e in caught.value.errors] == [
        (6, "services[0].tenant"), (7, "services[0].cloud_run"), (12, "services[1].cloud_run")]


def test_a_wrong_principal_hides_no_other_problem(tmp_path):
    path = write(tmp_path, "a.yaml", f"""\
tenants:
  - id: {T}
    audiences: [x]
principal: "principal://iam.googleapis.com/x/{{user}}"
services:
  - name: s
    tenant: {TENANT_B}
    cloud_run: projects/p/locations/l/services/s
    access:
      - groups: [aaaaaaaa-0000-0000-0000-000000000001]
""")
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    # The service is not also told it lacks a principal: one was given, wrongly.
    assert [(e.line, e.field) for e in caught.value.errors] == [(4, "principal"), (7, "services[0].tenant")]


@pytest.mark.parametrize("broken", ["tenants: [\n", "tenant: []\n"])
def test_a_file_that_cannot_be_read_does_not_make_the_others_references_look_wrong(tmp_path, broken):
    write(tmp_path, "a.yaml", broken)     # where the tenants would be
    write(tmp_path, "b.yaml", f"services:\n  - name: s\n    tenant: {T}\n    access:\n      - app_roles: [R]\n")
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path)
    assert [e.file.rsplit("/", 1)[1] for e in caught.value.errors] == ["a.yaml"]


@pytest.mark.parametrize("text,message", [
    ("a: &x [*x]\n", "alias that contains itself"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", "nested too deep"),
    ("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 9)), "aliases expand to, more than 100000 values"),
    # A long key aliased at every level: few values, each with a path of megabytes.
    ("k: &k " + "K" * 20000 + "\nx: &x " + "{*k : " * 100 + "[1, 2]" + "}" * 100 + "\ny: [*x, *x, *x, *x]\n",
     "nest the fields too deep"),
])
def test_self_referencing_or_exploding_aliases_are_policy_errors(tmp_path, text, message):
    with pytest.raises(PolicyError, match=message):
        load_policy(write(tmp_path, "p.yaml", text))


@pytest.mark.parametrize("data,line,message", [
    ("tenants:\n  # Caf\u00e9 team\n".encode("latin-1"), 2, "not UTF-8: byte 0xe9 at offset 16"),
    ("tenants:\n".encode("utf-16"), 1, "not UTF-8: byte 0xff at offset 0"),
    (b"tenants:\n  - id: a\x1bb\n", 2, "character 0x001b is not allowed"),
    (b"tenants:\n\n  - id: \x00\n", 3, "character 0x0000 is not allowed"),
    (b"tenants:\r  # x\r\n  - id: a\x1bb\r", 3, "character 0x001b is not allowed"),   # CR and CRLF breaks
    ("tenants:\r  # \u00e9\r".encode("latin-1"), 2, "not UTF-8: byte 0xe9 at offset 13"),
])
def test_a_file_an_editor_garbled_names_the_line(tmp_path, data, line, message):
    (tmp_path / "p.yaml").write_bytes(data)
    with pytest.raises(PolicyError) as caught:
        load_policy(tmp_path / "p.yaml")
    [error] = caught.value.errors
    assert (error.line, error.message) == (line, f"{'invalid YAML: ' if 'character' in message else ''}{message}")


def test_hidden_files_and_folders_of_a_policy_folder_are_not_read(tmp_path):
    write(tmp_path, "p.yaml", POLICY)
    (tmp_path / ".github" / "workflows").mkdir(parents=True)
    (tmp_path / ".github" / "workflows" / "ci.yml").write_text("jobs: {}\n")
    (tmp_path / ".p.yaml.swp.yaml").write_text("not: a policy\n")
    assert "billing" in load_policy(tmp_path).services


def test_a_policy_folder_is_read_through_links_and_in_any_case_and_a_broken_one_is_an_error(tmp_path):
    # A file left out would drop its services: drift would revoke what aadrun granted for them.
    write(tmp_path / "kept", "tenants.yaml", f"tenants:\n  - id: {T}\n    audiences: [x]\n")
    write(tmp_path / "kept" / "teams", "BILLING.YML", f"services:\n  - name: s\n    tenant: {T}\n"
                                                    "    access:\n      - app_roles: [R]\n")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "shared").symlink_to(tmp_path / "kept")              # a linked folder
    policy = load_policy(policies)
    assert list(policy.services) == ["s"] and len(policy.sources) == 2
    for broken in ("gone.yaml", "team"):                              # a file's link, a folder's
        (policies / broken).symlink_to(tmp_path / "nowhere")
        with pytest.raises(PolicyError, match="a broken link") as caught:
            load_policy(policies)
        assert caught.value.file == str(policies / broken)
        (policies / broken).unlink()
    # Reached twice, the folder would be shipped twice (its links copied as contents).
    for second in (policies / "again", policies / "shared" / "loop"):   # another link to it, a link back up
        second.symlink_to(tmp_path / "kept")
        with pytest.raises(PolicyError, match="reached twice"):
            load_policy(policies)
        second.unlink()


def test_empty_folder_is_an_error(tmp_path):
    with pytest.raises(PolicyError, match="no policy files"):
        load_policy(tmp_path)

"""Fuzzing with Hypothesis (bounded here; `scripts/chaos --fuzz` runs long):
the verify request and the policy loader answer bad input with a 4xx or a
clear validation error, never a crash."""
from __future__ import annotations

import json
import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.devidp import DevIdentityProvider
from aadrun.errors import PolicyError
from aadrun.http import HttpRequest
from aadrun.keys import KeyCache
from aadrun.policy import load_policy
from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from aadrun.verify import STATUS, Verifier
from aadrun.verify_http import VerifyEndpoint
from tests.support.world import ALICE, G_ENG, TENANT_A, settings_for, write_policy

EXAMPLES = int(os.environ.get("AADRUN_FUZZ_EXAMPLES", "150"))
REASONS = set(STATUS) | {"missing_token", "malformed_token", "disallowed_alg", "unknown_tenant", "unknown_key",
                         "bad_signature", "wrong_issuer", "expired", "not_yet_valid", "wrong_audience",
                         "wrong_tenant"}


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    with DevIdentityProvider() as idp:
        policy_path = write_policy(folder)
        store = open_store(f"sqlite:///{folder}/s.db")
        store.apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}), sync=SyncState(None, utcnow())))
        config = settings_for(idp.url, policy_path, f"sqlite:///{folder}/s.db")
        policy = load_policy(policy_path)
        verifier = Verifier(config, lambda: policy, KeyCache(config), lambda: store)
        good = idp.mint(TENANT_A, oid=ALICE, aud="api://billing")
        yield VerifyEndpoint(verifier, lambda: (True, {})), good


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda children: st.lists(children, max_size=3)
                           | st.dictionaries(st.text(max_size=8), children, max_size=3), max_leaves=8)
bodies = st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({}, optional={"service": json_values | st.sampled_from(["billing", "nope", ""]),
                                        "token": json_values | st.text(max_size=60)}).map(
        lambda d: json.dumps(d).encode()),
)


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["POST", "GET", "PUT", "DELETE", "OPTIONS"]),
       body=bodies,
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=utf-8"]),
       authorization=st.one_of(st.none(), st.text(max_size=80), st.just("Bearer "), st.just("Bearer a.b.c")),
       query=st.dictionaries(st.sampled_from(["service", "x"]), st.text(max_size=12), max_size=2),
       use_good_token=st.booleans())
def test_verify_request_never_crashes(endpoint, method, body, content_type, authorization, query, use_good_token):
    handler, good = endpoint
    headers = {"content-type": content_type}
    if use_good_token:
        headers["authorization"] = f"Bearer {good}"
    elif authorization is not None:
        headers["authorization"] = authorization
    response = handler.handle(HttpRequest(method, "/verify", query, headers, body))
    assert response.status in (200, 400, 401, 403, 404, 413)
    payload = response.json_body()
    assert payload["reason"] in REASONS and isinstance(payload["decision_id"], str)
    assert payload["allow"] is (response.status == 200)


policy_docs = st.fixed_dictionaries({}, optional={
    "tenants": st.lists(st.fixed_dictionaries({}, optional={
        "id": st.sampled_from([TENANT_A, "x", 3, None]), "audiences": json_values,
        "token_versions": st.lists(st.integers(0, 3), max_size=3) | json_values}), max_size=2) | json_values,
    "services": st.lists(st.fixed_dictionaries({}, optional={
        "name": st.text(max_size=10) | json_values, "tenant": st.sampled_from([TENANT_A, "y"]),
        "cloud_run": st.sampled_from(["projects/p/locations/l/services/s", "bad"]),
        "access": st.lists(st.fixed_dictionaries({}, optional={
            "groups": st.lists(st.sampled_from([G_ENG, "g"]), max_size=2) | json_values,
            "app_roles": json_values, "bind": st.sampled_from(["members", "group", "x"]),
            "role": st.sampled_from(["roles/run.invoker", "owner"])}), max_size=2) | json_values}), max_size=2),
    "principal": st.sampled_from(["p/{oid}", "p", None]),
    "group_principal": st.sampled_from(["g/{group_id}", "g"]),
    "extra": json_values,
})


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=policy_docs | json_values, raw=st.one_of(st.none(), st.text(max_size=120)))
def test_policy_loader_gives_a_policy_or_a_located_error(tmp_path_factory, doc, raw):
    path = tmp_path_factory.mktemp("policy") / "p.yaml"
    path.write_text(raw if raw is not None else yaml.safe_dump(doc))
    try:
        policy = load_policy(path)
    except PolicyError as e:
        assert e.file == str(path) and str(e)
    else:
        assert all(s.tenant in policy.tenants for s in policy.services.values())

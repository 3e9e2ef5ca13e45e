"""Requests whose body is broken on the wire (a malformed or cut-off chunked
encoding, fewer bytes than Content-Length), sent to each HTTP function served by
the real functions-framework: a 400 with a reason code and one log line, never a
500 with a traceback, and never the action of an empty body."""
from __future__ import annotations

import json

import pytest

from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from tests.support.serve import FunctionServer, raw_exchange
from tests.support.world import ALICE, G_ENG, TENANT_A, env_for, write_policy

BROKEN = {
    "bad chunk size": b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "cut-off chunk": b"Transfer-Encoding: chunked\r\n\r\n10\r\n{}",
    "shorter than its length": b"Content-Length: 20\r\n\r\n{}",
}
# (function, path, the log line of a refused request)
FUNCTIONS = [
    ("verify", "/verify", lambda e: e.get("event") == "decision" and e.get("reason") == "bad_request"),
    ("verify", "/verify?service=billing", lambda e: e.get("event") == "decision" and e.get("reason") == "bad_request"),
    ("graph_webhook", "/", lambda e: e.get("event") == "webhook_error" and e.get("reason") == "bad_request"),
    ("maintenance", "/", lambda e: e.get("event") == "maintenance_refused" and e.get("reason") == "bad_request"),
]


@pytest.fixture(scope="module")
def servers(tmp_path_factory, idp):
    folder = tmp_path_factory.mktemp("framing")
    policy = write_policy(folder)
    store_url = f"sqlite:///{folder}/state.db"
    open_store(store_url).apply(GroupUpdate(TENANT_A, G_ENG, replace=frozenset({ALICE}),
                                            sync=SyncState(None, utcnow())))
    env = env_for(idp.url, policy, store_url, AADRUN_CLIENT_STATE="framing-test-state")
    started = {}
    try:
        for name in dict.fromkeys(f for f, _, _ in FUNCTIONS):
            started[name] = FunctionServer(name, env).start()
        yield started
    finally:
        for server in started.values():
            server.stop()


@pytest.mark.parametrize("function,path,refused", FUNCTIONS, ids=[f"{f} {p}" for f, p, _ in FUNCTIONS])
@pytest.mark.parametrize("framing", list(BROKEN), ids=list(BROKEN))
def test_a_body_broken_on_the_wire_is_a_400_with_one_log_line(servers, function, path, refused, framing):
    server = servers[function]
    before = len([e for e in server.log_entries() if refused(e)])
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               "Connection: close\r\n").encode() + BROKEN[framing]
    status, body = raw_exchange(server.port, request)
    answer = json.loads(body)
    assert status == 400, body
    assert "bad_request" in (answer.get("reason"), answer.get("error"))
    lines = server.log_entries(until=lambda entries: len([e for e in entries if refused(e)]) > before)
    assert len([e for e in lines if refused(e)]) == before + 1
    # Nothing but JSON lines: no traceback reached the log.
    assert [line for line in server.output().splitlines() if line and not line.startswith("{")] == []


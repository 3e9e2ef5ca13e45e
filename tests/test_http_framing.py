"""Requests whose body is broken on the wire (a malformed or cut-off chunked
encoding, fewer bytes than Content-Length), sent to each HTTP function served by
the real functions-framework: a 400 with a reason code and one log line, never a
500 with a traceback, and never the action of an empty body."""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from aadrun.store import GroupUpdate, SyncState, open_store, utcnow
from tests.support.serve import FunctionServer, raw_exchange
from tests.support.world import ALICE, G_ENG, TENANT_A, env_for, write_policy

GOLDEN_ADDITION = Path(__file__).parent / "golden" / "members_added.graph.json"

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



def test_a_body_that_arrives_slowly_counts_against_graphs_three_seconds(tmp_path):
    # policy_sync's core (the local bus) hangs on an identity provider that accepts and
    # never answers: the webhook answers 503 within the publish timeout of the request's
    # first byte, however slowly its body came (Graph gives up at 3 s).
    with socket.socket() as blackhole:
        blackhole.bind(("127.0.0.1", 0))
        blackhole.listen(64)
        silent = f"https://127.0.0.1:{blackhole.getsockname()[1]}"   # not even a TLS handshake
        env = {"AADRUN_POLICY_PATH": str(write_policy(tmp_path)), "AADRUN_STORE": f"sqlite:///{tmp_path}/s.db",
               "AADRUN_CLIENT_STATE": "golden-client-state", "AADRUN_CLIENT_ID": "c11e47a0-0000-0000-0000-00000000b111",
               "AADRUN_CLIENT_SECRET": "x", "AADRUN_AUTHORITY_URL": silent, "AADRUN_GRAPH_URL": f"{silent}/v1.0"}
        body = GOLDEN_ADDITION.read_bytes()   # Graph's notification of two members added to G_ENG
        with FunctionServer("graph_webhook", env) as webhook, \
                socket.create_connection(("127.0.0.1", webhook.port), timeout=10) as conn:
            started = time.monotonic()
            conn.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
            for i in range(10):   # the body over 1.2 s
                conn.sendall(body[len(body) * i // 10:len(body) * (i + 1) // 10])
                time.sleep(0.12)
            status = conn.recv(64).split(b" ", 2)[1]
            took = time.monotonic() - started
    assert status == b"503" and took < 2.6, (status, took)


FAULTY_SOURCE = '''
import runpy

import functions_framework

# aadrun's entry points as deployed, with their error handler, plus one whose core fails
# in a way none of aadrun's own handlers expects: a defect, which must still not show.
aadrun = runpy.run_path({main!r}, run_name="aadrun_main")


def broken_core(request):
    raise RuntimeError("internal detail: /srv/aadrun/state.db")


@functions_framework.http
def faulty(request):
    return aadrun["_serve"](broken_core, request)
'''


def test_an_exception_in_aadruns_code_is_a_500_with_no_detail_and_one_log_line(tmp_path, idp):
    source = tmp_path / "faulty.py"
    source.write_text(FAULTY_SOURCE.format(main=str(Path(__file__).parents[1] / "functions" / "main.py")))
    env = env_for(idp.url, write_policy(tmp_path), f"sqlite:///{tmp_path}/state.db")
    trace = "0123456789abcdef0123456789abcdef"
    with FunctionServer("faulty", env, source=source) as server:
        failed = lambda entries: [e for e in entries if e.get("event") == "request_failed"]  # noqa: E731
        before = len(failed(server.log_entries(until=failed)))   # the start-up probe's GET failed alike
        status, body = raw_exchange(server.port, (
            "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
            f"X-Cloud-Trace-Context: {trace}/1;o=1\r\nContent-Length: 2\r\n\r\n{{}}").encode())
        lines = failed(server.log_entries(until=lambda entries: len(failed(entries)) > before))
        output = server.output()
    assert (status, json.loads(body)) == (500, {"error": "error"})
    [line] = lines[before:]
    assert (line["severity"], line["status"], line["error"]) == ("ERROR", 500, "RuntimeError")
    assert line["logging.googleapis.com/trace"].endswith(trace)   # joins the request's trace
    # One JSON line each, no traceback, and the exception's message nowhere.
    assert [text for text in output.splitlines() if text and not text.startswith("{")] == []
    assert "internal detail" not in output and b"internal detail" not in body

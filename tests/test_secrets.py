"""No secret reaches a log line, no internal detail reaches an error body.

Every log line written while the attack catalog runs against verify (tests/
test_verify_http.py's table plus forged tokens of tests/test_verify_core.py), while
abusive requests hit graph_webhook and maintenance, and while a fault scenario of
``scripts/chaos`` runs, is captured: the stdout and stderr of every function process
and this process's ``aadrun`` logger. No token (nor its signature), client state or
raw body content (a canary string put in every body) may appear in any of them.
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import chaos  # noqa: E402
from chaos_lab import Lab  # noqa: E402
from tests.test_chaos import isolated_env  # noqa: E402,F401 - fixture
from tests.test_verify_core import forge  # noqa: E402
from tests.test_verify_http import CASES, call  # noqa: E402
from tests.support.serve import FunctionServer  # noqa: E402
from tests.support.world import env_for, write_policy  # noqa: E402

INTERNAL = re.compile(r"Traceback|File \"|/work/|site-packages|\.py\b|\b[A-Z][A-Za-z]*(Error|Exception)\b|"
                      r"Expecting value|codec can't|json\.decoder|grpc|google\.|sqlite|werkzeug|gunicorn")
JWT = re.compile(r"eyJ[\w-]+\.[\w-]+\.[\w-]*")


@pytest.fixture
def aadrun_records():
    """This process's aadrun log records, rendered as their JSON fields and message."""
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage() + " " + json.dumps(getattr(record, "json_fields", {}), default=str))

    log = logging.getLogger("aadrun")
    handler = Capture()
    log.addHandler(handler)
    yield lines
    log.removeHandler(handler)


def tokens_in(kwargs: dict) -> set[str]:
    """Every token a request carries (header or body)."""
    text = json.dumps(kwargs.get("headers", {})) + json.dumps(kwargs.get("body")) + \
        (kwargs.get("raw") or b"").decode(errors="replace")
    return set(JWT.findall(text)) | {t for t in ("abc.def", "eyJhbGciOiJub25lIn0.e30.") if t in text}


def assert_absent(secrets: set[str], text: str) -> None:
    for secret in secrets:
        parts = [secret] + [p for p in secret.split(".")[2:] if len(p) > 20]   # a token's signature too
        for part in parts:
            assert part not in text, f"a secret ({part[:12]}...) was logged"


def test_attack_catalog_and_abusive_requests_log_no_secret(tmp_path, pubsub_emulator, aadrun_records,
                                                         isolated_env):
    lab = Lab(tmp_path, pubsub=pubsub_emulator)
    try:
        lab.webhook = lab.function("graph_webhook")
        lab.provision()
        (tmp_path / "world").mkdir()
        policy = write_policy(tmp_path / "world")
        secrets, bodies = set(lab.secrets), []
        with FunctionServer("verify", env_for(lab.idp.url, policy, f"sqlite:///{tmp_path}/v.db")) as verify:
            for _, build, _, _ in CASES:
                kwargs = build(lab.idp)
                secrets |= tokens_in(kwargs)
                bodies.append(call(verify, **kwargs)[2])
            forged = forge({"alg": "HS256", "kid": lab.idp.current.kid}, {"canary": lab.canary}, b"s" * 32)
            secrets.add(forged)
            bodies.append(call(verify, body={"service": "billing", "token": forged})[2])
            for raw in (b"{" + lab.canary.encode(), lab.canary.encode() + b"\xff", b'{"service": 7, "x": "'
                        + lab.canary.encode() + b'"}'):
                bodies.append(call(verify, raw=raw, headers={"Content-Type": "application/json"})[2])
        verify_log = verify.output()   # after the stop, which writes every queued line
        attacker_state = "attacker-state-" + lab.canary
        secrets.add(attacker_state)
        for body in (b"{" + lab.canary.encode(), b"\xfe" + lab.canary.encode(), json.dumps({"value": lab.canary}).encode(),
                     json.dumps({"value": [lab.item("c0000000-0000-0000-0000-000000000000",
                                                    "0a000000-0000-0000-0000-000000000001", False,
                                                    state=attacker_state)]}).encode(),
                     json.dumps({"value": [lab.item("c0000000-0000-0000-0000-000000000000",
                                                    "0a000000-0000-0000-0000-000000000001", False)]}).encode()):
            status, answer = lab.call(lab.webhook.port, "/", body)
            assert status in (202, 400)
            bodies.append(answer)
        maintenance = lab.function("maintenance")
        for body in (b"{" + lab.canary.encode(), json.dumps({lab.canary: 1}).encode(),
                     json.dumps({"tasks": [lab.canary]}).encode(), b"\xff\xfe"):
            status, answer = lab.call(maintenance.port, "/", body)
            assert status == 400
            bodies.append(answer.replace(lab.canary.encode(), b"<echoed task name>"))
        assert lab.call(maintenance.port, "/", b"", method="GET")[0] == 405
    finally:
        lab.stop()
    logs = verify_log + lab.logs() + "\n".join(aadrun_records)
    assert '"decision"' in logs and '"security"' in logs    # the lines were captured
    assert_absent(secrets, logs)
    for body in bodies:
        text = body.decode(errors="replace")
        assert not INTERNAL.search(text), text


def test_a_fault_scenario_logs_no_secret(pubsub_emulator, aadrun_records, isolated_env):
    row, lab = chaos.run_one("notifications", quick=True, pubsub=pubsub_emulator)
    assert row.ok, chaos.table([row])
    logs = lab.logs() + "\n".join(aadrun_records)
    assert '"membership_notification"' in logs
    assert len(lab.secrets) > 50       # the client state, the canary and every token verify saw
    assert_absent(lab.secrets, logs)

"""The local stack behind ``scripts/dev``: the whole pipeline on one machine.

Default (embedded): SQLite store, in-process bus (graph_webhook runs policy_sync's
core itself), ``record`` IAM mode, the local dev identity provider and a local
Microsoft Graph stand-in. ``--emulators``: the same across processes, with the
Pub/Sub and Firestore emulators and a push subscription into policy_sync.

It plays a scripted scenario and prints its timeline, then stays up and prints
how to call verify and send a notification by hand. Ctrl-C (or SIGTERM) stops
everything it started.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "functions"), str(ROOT)]

from tests.support.devidp import DevIdentityProvider  # noqa: E402
from tests.support.emulators import Emulator  # noqa: E402
from tests.support.graph_fixtures import make_pki  # noqa: E402
from tests.support.graph_server import GraphServer  # noqa: E402
from tests.support.parts import Parts
from tests.support.serve import FunctionServer  # noqa: E402

TENANT = "11111111-1111-1111-1111-111111111111"
ENGINEERS = "aaaaaaaa-0000-0000-0000-000000000001"
STAFF = "aaaaaaaa-0000-0000-0000-000000000002"
ALICE = "a11ce000-0000-0000-0000-000000000001"
BOB = "b0b00000-0000-0000-0000-000000000002"
CAROL = "ca401000-0000-0000-0000-000000000003"
CLIENT_ID = "00000000-0000-0000-0000-00000000a0a0"
BILLING_API = "b111a9e0-0000-0000-0000-0000000000a1"   # billing-api's audience in policies/example.yaml
PROJECT = "aadrun-dev"
SUBSCRIPTION = "5e5e5e5e-0000-0000-0000-000000000001"
STATE_MARKER = ".aadrun-dev-state"   # in a state folder this script made (and may empty)
# What a state folder held before it had a marker (an earlier version of this script).
EARLIER_STATE = {"ca.pem", "server.pem", "server-key.pem", "state.db", "state.db-shm", "state.db-wal"}


class Stack:
    """Starts and stops every part; ``stop`` is safe to call twice."""

    def __init__(self, state: Path, emulators: bool, port: int):
        self.state, self.emulators, self.port = state, emulators, port
        self.parts = Parts()
        self.client_state = secrets.token_urlsafe(24)
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{(time.monotonic() - self.t0) * 1000:8.0f} ms] {text}", flush=True)

    def start(self) -> None:
        self._claim_state()
        _check_port_free(self.port)
        pki = make_pki(self.state)
        os.environ["REQUESTS_CA_BUNDLE"] = os.environ["SSL_CERT_FILE"] = pki.ca_file  # MSAL needs https
        self.graph = self._keep(GraphServer(pki).start())
        secret = secrets.token_urlsafe(16)
        self.graph.add_app(TENANT, CLIENT_ID, secret=secret)
        self.graph.set_members(TENANT, ENGINEERS, set())
        self.graph.set_members(TENANT, STAFF, {BOB})
        self.idp = self._keep(DevIdentityProvider().start())
        common = {"AADRUN_POLICY_PATH": str(ROOT / "policies"), "AADRUN_IAM": "record",
                  "AADRUN_CLIENT_ID": CLIENT_ID, "AADRUN_CLIENT_SECRET": secret,
                  "AADRUN_CLIENT_STATE": self.client_state, "AADRUN_GRAPH_URL": self.graph.graph_url,
                  "AADRUN_AUTHORITY_URL": self.graph.authority_url, "GOOGLE_CLOUD_PROJECT": PROJECT,
                  "REQUESTS_CA_BUNDLE": pki.ca_file, "SSL_CERT_FILE": pki.ca_file}
        if self.emulators:
            common.update(self._start_emulators())
        else:
            common.update({"AADRUN_STORE": f"sqlite:///{self.state / 'state.db'}", "AADRUN_BUS": "local"})
        self.env = common
        self.webhook = self._keep(FunctionServer("graph_webhook", common).start())
        if self.emulators:
            sync = self._keep(FunctionServer("policy_sync", common, signature="cloudevent").start())
            self._push_into(sync.url)
        # verify trusts the identity provider that signs users' tokens.
        self.verify = self._keep(FunctionServer("verify", {**common, "AADRUN_AUTHORITY_URL": self.idp.url},
                                                port=self.port).start())

    def _start_emulators(self) -> dict[str, str]:
        pubsub = self._keep(Emulator("pubsub").start())
        firestore = self._keep(Emulator("firestore").start())
        os.environ["PUBSUB_EMULATOR_HOST"], os.environ["FIRESTORE_EMULATOR_HOST"] = pubsub.host, firestore.host
        return {"AADRUN_STORE": "firestore://", "AADRUN_BUS": "pubsub", "PUBSUB_EMULATOR_HOST": pubsub.host,
                "FIRESTORE_EMULATOR_HOST": firestore.host}

    def _push_into(self, url: str) -> None:
        from google.cloud import pubsub_v1

        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        for topic in ("aadrun-membership-changes", "aadrun-policy-updates"):
            publisher.create_topic(name=publisher.topic_path(PROJECT, topic))
        subscriber.create_subscription(
            name=subscriber.subscription_path(PROJECT, "aadrun-policy-sync"),
            topic=publisher.topic_path(PROJECT, "aadrun-membership-changes"),
            push_config={"push_endpoint": url + "/"}, ack_deadline_seconds=30)

    def _claim_state(self) -> None:
        """Hold the state folder for this run, then empty it. Only a folder this script
        made (its marker inside) is ever emptied, and never while another run holds it."""
        if self.state.exists() and not self.state.is_dir():
            raise SystemExit(f"dev: {self.state} is a file: give --state a folder")
        if self.state.is_dir() and not (self.state / STATE_MARKER).exists() and \
                not {p.name for p in self.state.iterdir()} <= EARLIER_STATE:
            raise SystemExit(f"dev: {self.state} is not empty and not a scripts/dev state folder: "
                             "give --state an empty or new folder (or delete this one, if it is)")
        self.state.mkdir(parents=True, exist_ok=True)
        (self.state / STATE_MARKER).touch()
        self._lock = open(self.state / STATE_MARKER, "rb")   # held (and locked) until the process ends
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"dev: another scripts/dev is running on {self.state}: stop it, "
                             "or give this one --state and --port of its own") from None
        for entry in self.state.iterdir():
            if entry.name != STATE_MARKER:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()

    def _keep(self, part):
        return self.parts.keep(part)

    def stop(self) -> None:
        self.parts.stop()

    # -- actions ------------------------------------------------------------------

    def cli(self, *args: str) -> dict:
        out = subprocess.run([str(ROOT / "scripts" / "aadrun"), *args, "--json"], capture_output=True, text=True,
                             env={**os.environ, **self.env}, timeout=120)
        return json.loads(out.stdout) if out.stdout.strip().startswith("{") else {"error": out.stderr[-500:]}

    def notify(self, group: str, added=(), removed=()) -> int:
        delta = [{"@odata.type": "#microsoft.graph.user", "id": u} for u in added] + \
                [{"@odata.type": "#microsoft.graph.user", "id": u, "@removed": "deleted"} for u in removed]
        body = {"value": [{
            "subscriptionId": SUBSCRIPTION, "clientState": self.client_state, "changeType": "updated",
            "resource": f"Groups/{group}", "tenantId": TENANT,
            "subscriptionExpirationDateTime": "2026-12-01T00:00:00Z",
            "resourceData": {"@odata.type": "#Microsoft.Graph.Group", "@odata.id": f"Groups/{group}",
                             "id": group, "organizationId": TENANT, "members@delta": delta}}]}
        return _post(self.webhook.url + "/", body)[0]

    def verify_status(self, user: str) -> tuple[int, str]:
        token = self.idp.mint(TENANT, oid=user, aud=BILLING_API)
        status, payload = _post(self.verify.url + "/verify", {"service": "billing-api"},
                                {"Authorization": f"Bearer {token}"})
        return status, payload.get("reason", "")

    def wait_for(self, user: str, status: int, within: float = 10.0) -> float | None:
        start = time.monotonic()
        while time.monotonic() - start < within:
            if self.verify_status(user)[0] == status:
                return time.monotonic() - start
            time.sleep(0.01)
        return None

    def bound(self, user: str) -> bool | None:
        """Whether the IAM plan binds ``user``; None when the plan could not be made."""
        plan = self.cli("plan")
        if "error" in plan:
            self.say(f"plan failed: {plan['error'].strip()}")
            return None
        return f"subject/{user}" in json.dumps(plan)


def _check_port_free(port: int) -> None:
    """A port already taken would leave another server answering as verify."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds: TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(f"dev: port {port} is in use: stop what listens there, or give --port") from None


def _post(url: str, body: dict, headers: dict | None = None) -> tuple[int, dict]:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json",
                                                                  **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=15) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw.startswith(b"{") else {}
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw.startswith(b"{") else {}


def scenario(stack: Stack) -> bool:
    """Plays onboarding, offboarding and a forged addition; True when all went as expected."""
    ok = True
    say = stack.say
    summary = stack.cli("resync")
    failed = summary.get("error") or summary.get("errors")
    ok &= not failed
    say(f"initial delta sync from Graph: {summary.get('groups', '?')} group(s) read"
        + (f", FAILED: {failed}" if failed else ""))
    say("Graph: Alice is added to billing engineers; Graph notifies graph_webhook")
    stack.graph.add_members(TENANT, ENGINEERS, {ALICE})
    sent = time.monotonic()
    say(f"graph_webhook answered {stack.notify(ENGINEERS, added=[ALICE])}; policy_sync confirms by delta query")
    allowed_after = stack.wait_for(ALICE, 200)
    ok &= allowed_after is not None
    say(f"verify allows Alice ({(time.monotonic() - sent) * 1000:.0f} ms after the notification)"
        if allowed_after is not None else "verify did NOT allow Alice within 10 s")
    bound = stack.bound(ALICE)
    ok &= bound is True
    say(f"IAM plan (record mode): Alice's principal bound to roles/run.invoker on billing-api: {bound}")

    say("Graph: Alice is removed from billing engineers; Graph notifies graph_webhook")
    stack.graph.remove_members(TENANT, ENGINEERS, {ALICE})
    sent = time.monotonic()
    stack.notify(ENGINEERS, removed=[ALICE])
    denied_after = stack.wait_for(ALICE, 403)
    ok &= denied_after is not None
    say(f"verify denies Alice {(time.monotonic() - sent) * 1000:.0f} ms after the removal notification "
        f"(her token is still valid for an hour)" if denied_after is not None
        else "verify did NOT deny Alice within 10 s")
    unbound = stack.bound(ALICE) is False
    ok &= unbound
    say(f"IAM plan: Alice's binding removed: {unbound}")

    say("forged notification: 'Carol was added to billing engineers' (Graph says she was not)")
    # In-process bus: 503, as Graph's read does not confirm it (Graph would send it again).
    say(f"graph_webhook answered {stack.notify(ENGINEERS, added=[CAROL])}; Graph's delta read does not list Carol")
    time.sleep(0.5)
    status, reason = stack.verify_status(CAROL)
    bound = stack.bound(CAROL)
    ok &= status == 403 and bound is False
    say(f"verify for Carol: {status} {reason}; IAM plan binds Carol: {bound}")
    return bool(ok)


def instructions(stack: Stack) -> str:
    token = stack.idp.mint(TENANT, oid=BOB, aud=BILLING_API, lifetime=3600)
    carol = stack.idp.mint(TENANT, oid=CAROL, aud=BILLING_API, lifetime=3600)
    store_env = " ".join(f"{k}={v}" for k, v in stack.env.items()
                         if k.endswith("_EMULATOR_HOST") or k in ("AADRUN_STORE", "GOOGLE_CLOUD_PROJECT"))
    # The CLI reads what the functions read: users' tokens are the identity provider's
    # (verify's authority); Graph tokens are the Graph stand-in's (the other functions').
    graph_env = " ".join(f"{k}={v}" for k, v in stack.env.items()
                         if k.startswith("AADRUN_") and k not in ("AADRUN_STORE", "AADRUN_BUS") or
                         k in ("REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"))
    redelivery = ("Pub/Sub delivers it again by itself." if stack.emulators else
                  "graph_webhook answers 503, as the in-process bus could not\nsettle it, and Graph would "
                  "send it again: send the same curl again to play that retry.")
    return f"""
aadrun local stack is up ({'emulators' if stack.emulators else 'embedded'} mode)
  verify               {stack.verify.url}
  graph_webhook        {stack.webhook.url}
  identity provider    {stack.idp.url}    (tenant {TENANT})
  Graph stand-in       {stack.graph.graph_url}
  policies             {ROOT / 'policies'}

Call verify (Bob is in all-staff, bound to billing-api as one group principal):
  TOKEN={token}
  curl -s {stack.verify.url}/verify -H 'Content-Type: application/json' \\
    -H "Authorization: Bearer $TOKEN" -d '{{"service": "billing-api"}}'
Carol is in no group of billing-api (403 not_member):
  CAROL_TOKEN={carol}
Every check of a decision, step by step:
  {store_env} AADRUN_AUTHORITY_URL={stack.idp.url} scripts/aadrun explain --service billing-api --token "$TOKEN"

Send a notification by hand: "Bob left all-staff", which the Graph stand-in does
not confirm (the scenario above removed Alice in Graph first; nobody removed Bob).
Bob is denied on the removal alone. policy_sync's read still lists him, so the
delivery fails and the removal is kept until the notification comes again; that
delivery's read decides, and restores him: a notification Graph does not confirm
cannot change access for long. {redelivery}
  curl -s -i {stack.webhook.url}/ -H 'Content-Type: application/json' -d '{{"value": [{{
    "subscriptionId": "{SUBSCRIPTION}", "clientState": "{stack.client_state}",
    "changeType": "updated", "resource": "Groups/{STAFF}", "tenantId": "{TENANT}",
    "resourceData": {{"id": "{STAFF}", "members@delta": [{{"id": "{BOB}", "@removed": "deleted"}}]}}}}]}}'
and read the audit log (Bob's member_removed, then his member_added):
  {store_env} scripts/aadrun audit
Read every group from the Graph stand-in again (the CLI as the functions run it):
  {store_env} {graph_env} scripts/aadrun resync

Ctrl-C stops everything."""


def main() -> int:
    parser = argparse.ArgumentParser(prog="scripts/dev", description="Run the aadrun pipeline locally.")
    parser.add_argument("--emulators", action="store_true", help="Pub/Sub + Firestore emulators, one process each")
    parser.add_argument("--port", type=int, default=8080, help="verify's port (default 8080)")
    parser.add_argument("--state", default=str(ROOT / ".aadrun" / "dev"), help="folder for local state")
    parser.add_argument("--once", action="store_true", help="play the scenario, then stop (exit 1 if it failed)")
    args = parser.parse_args()
    stack = Stack(Path(args.state), args.emulators, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # Ctrl-C stops everything even when started with SIGINT ignored (a shell's background
    # job is, and so is everything a suite started that way starts): Python then installs
    # no handler of its own.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    started = False
    try:
        stack.start()
        started = True
        ok = scenario(stack)
        stack.say("scenario " + ("passed" if ok else "FAILED"))
        if args.once:
            return 0 if ok else 1
        print(instructions(stack), flush=True)
        # Wake up regularly: a signal delivered to another thread (a server's) does
        # not interrupt an untimed wait, so Ctrl-C would otherwise go unnoticed.
        while not stop.wait(0.2):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        stack.stop()
        if started:   # a refusal to start (a port in use) says why, not "stopped"
            print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The local stack behind ``scripts/dev``: identity provider, verify, a demo membership.

Everything listens on 127.0.0.1 and stops on Ctrl-C (or SIGTERM), leaving no
process behind.
"""
from __future__ import annotations

import argparse
import shlex
import signal
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "functions"), str(ROOT)]

from aadrun.devidp import DevIdentityProvider  # noqa: E402
from aadrun.store import GroupUpdate, SyncState, open_store, utcnow  # noqa: E402
from tests.support.serve import FunctionServer  # noqa: E402

TENANT = "11111111-1111-1111-1111-111111111111"
ENGINEERS = "aaaaaaaa-0000-0000-0000-000000000001"
STAFF = "aaaaaaaa-0000-0000-0000-000000000002"
ALICE = "a11ce000-0000-0000-0000-000000000001"
BOB = "b0b00000-0000-0000-0000-000000000002"


def main() -> int:
    parser = argparse.ArgumentParser(description="Run aadrun locally.")
    parser.add_argument("--port", type=int, default=8080, help="verify's port (default 8080)")
    parser.add_argument("--state", default=str(ROOT / ".aadrun" / "dev"), help="folder for the local state")
    parser.add_argument("--once", action="store_true", help="start, print, check one call, then stop")
    args = parser.parse_args()

    state = Path(args.state)
    state.mkdir(parents=True, exist_ok=True)
    store_url = f"sqlite:///{state / 'state.db'}"
    store = open_store(store_url)
    store.apply(GroupUpdate(TENANT, ENGINEERS, replace=frozenset({ALICE}), sync=SyncState(None, utcnow()),
                            source="dev-seed", why="demo membership"))
    store.apply(GroupUpdate(TENANT, STAFF, replace=frozenset({ALICE, BOB}), sync=SyncState(None, utcnow()),
                            source="dev-seed", why="demo membership"))

    idp = DevIdentityProvider().start()
    env = {"AADRUN_AUTHORITY_URL": idp.url, "AADRUN_POLICY_PATH": str(ROOT / "policies"),
           "AADRUN_STORE": store_url}
    verify = FunctionServer("verify", env, port=args.port).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        token = idp.mint(TENANT, oid=ALICE, aud="api://billing-api", lifetime=3600)
        denied = idp.mint(TENANT, oid="c0c00000-0000-0000-0000-000000000003", aud="api://billing-api")
        print(f"""
aadrun local stack is up
  identity provider  {idp.url}   (tenant {TENANT})
  verify             {verify.url}
  policies           {ROOT / 'policies'}
  store              {store_url}

Alice (member of billing engineers) is allowed:
  TOKEN={token}
  curl -s {verify.url}/verify -H 'Content-Type: application/json' \\
    -H "Authorization: Bearer $TOKEN" -d '{{"service": "billing-api"}}'

Someone in no group is denied (403 not_member):
  curl -s {verify.url}/verify -H 'Content-Type: application/json' \\
    -H {shlex.quote('Authorization: Bearer ' + denied)} \\
    -d '{{"service": "billing-api"}}'

Explain a decision step by step:
  AADRUN_AUTHORITY_URL={idp.url} AADRUN_STORE={store_url} \\
    scripts/aadrun explain --service billing-api --token "$TOKEN"

Ctrl-C stops everything.""", flush=True)
        if args.once:
            import json
            import urllib.request
            req = urllib.request.Request(f"{verify.url}/verify", data=json.dumps({"service": "billing-api"}).encode(),
                                         headers={"Content-Type": "application/json",
                                                  "Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                print(resp.status, resp.read().decode())
            return 0
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        verify.stop()
        idp.stop()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A local identity provider shaped like Microsoft Entra ID, for development and tests.

Serves, on 127.0.0.1, per tenant: the v2 and v1 OIDC discovery documents and
their JWKS, with real RSA keys; mints tokens with Entra's v1 or v2 claims; and
rotates keys. It signs with private keys it holds in memory: never deploy it.

    idp = DevIdentityProvider().start()
    token = idp.mint(TENANT, oid=USER, aud=API_CLIENT_ID, roles=["Billing.Admin"])
    # AADRUN_AUTHORITY_URL=idp.url
"""
from __future__ import annotations

import argparse
import json
import ssl
import threading
import time
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.slow import head_and_body, write_slowly


class SigningKey:
    def __init__(self, kid: str | None = None, issuer: str | None = None):
        self.kid = kid or uuid.uuid4().hex[:16]
        self.issuer = issuer   # the v2 key set's ``issuer`` of this key, if not the default
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self, issuer: str | None = None) -> dict:
        data = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key()))
        return {**data, "kid": self.kid, "use": "sig", "kty": "RSA", "alg": "RS256",
                **({"issuer": issuer} if issuer else {})}


class DevIdentityProvider:
    """Discovery + JWKS server and token minter. Thread-safe; ``start()`` binds a free port."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, tls: ssl.SSLContext | None = None):
        self.keys: list[SigningKey] = [SigningKey()]
        # Entra's global cloud. Another cloud (or authority) names other issuers and key
        # locations: its discovery documents are the only place to learn them from.
        self.issuers = {2: "https://login.microsoftonline.com/{tenant}/v2.0", 1: "https://sts.windows.net/{tenant}/"}
        self.key_paths = {2: "discovery/v2.0/keys", 1: "discovery/keys"}
        self.requests: Counter[str] = Counter()
        self.down = False          # answer 503 to everything (an outage)
        self.delay = 0.0           # seconds before each answer (a slow identity provider)
        self.trickle = 0.0         # seconds between the bytes of each answer's body (one that never ends)
        self.trickle_head = False  # trickle the status line and headers too
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer((host, port), _handler(self))
        self._server.daemon_threads = True
        self._server.RequestHandlerClass.disable_nagle_algorithm = True  # no 40 ms delayed-ACK stalls
        if tls is not None:   # https, as the real authority (and MSAL) insists on
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self.url = f"{'https' if tls else 'http'}://{host}:{self._server.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- server ---------------------------------------------------------------

    def start(self) -> "DevIdentityProvider":
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True,
                                        name="devidp")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> "DevIdentityProvider":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def jwks_fetches(self, tenant: str | None = None) -> int:
        return sum(n for path, n in self.requests.items()
                   if "/discovery/" in path and (tenant is None or path.startswith(f"/{tenant}/")))

    def issuer(self, tenant: str, version: int = 2) -> str:
        return self.issuers[version].format(tenant=tenant)

    def document(self, path: str) -> dict | None:
        parts = path.strip("/").split("/")
        if len(parts) < 2:
            return None
        tenant, rest = parts[0], "/".join(parts[1:])
        with self._lock:
            keys = list(self.keys)
        # Entra's v2 key sets scope each key to an issuer (the v1 sets name none).
        key_issuer = self.issuers[2].replace("{tenant}", "{tenantid}")
        table = {
            "v2.0/.well-known/openid-configuration": lambda: self._discovery(tenant, 2),
            ".well-known/openid-configuration": lambda: self._discovery(tenant, 1),
            self.key_paths[2]: lambda: {"keys": [k.jwk(k.issuer or key_issuer) for k in keys]},
            self.key_paths[1]: lambda: {"keys": [k.jwk() for k in keys]},
        }
        build = table.get(rest)
        return build() if build else None

    def _discovery(self, tenant: str, version: int) -> dict:
        keys = self.key_paths[version]
        token = "oauth2/v2.0/token" if version == 2 else "oauth2/token"
        return {"issuer": self.issuer(tenant, version), "jwks_uri": f"{self.url}/{tenant}/{keys}",
                "token_endpoint": f"{self.url}/{tenant}/{token}",
                "id_token_signing_alg_values_supported": ["RS256"]}

    # -- keys and tokens --------------------------------------------------------

    def rotate(self, keep_old: bool = True) -> SigningKey:
        """Add a new signing key (first in the JWKS); drop the old ones unless ``keep_old``."""
        key = SigningKey()
        with self._lock:
            self.keys = [key] + (self.keys if keep_old else [])
        return key

    @property
    def current(self) -> SigningKey:
        return self.keys[0]

    def mint(self, tenant: str, *, oid: str, aud: str, version: int = 2, roles: list[str] | None = None,
             groups: list[str] | None = None, lifetime: int = 3600, now: float | None = None,
             key: SigningKey | None = None, headers: dict | None = None, **claims) -> str:
        """A token with Entra's claims for ``version`` (1 or 2), signed RS256."""
        now = int(time.time() if now is None else now)
        body = {"aud": aud, "iss": self.issuer(tenant, version), "iat": now, "nbf": now, "exp": now + lifetime,
                "oid": oid, "sub": oid, "tid": tenant, "uti": uuid.uuid4().hex[:22],
                "ver": "2.0" if version == 2 else "1.0"}
        if version == 2:
            body.update({"azp": "00000000-0000-0000-0000-0000000000aa", "azpacr": "1",
                         "preferred_username": f"{oid[:8]}@example.test", "name": "Dev User", "scp": "access"})
        else:
            body.update({"appid": "00000000-0000-0000-0000-0000000000aa", "appidacr": "1",
                         "upn": f"{oid[:8]}@example.test", "unique_name": f"{oid[:8]}@example.test"})
        if roles is not None:
            body["roles"] = roles
        if groups is not None:
            body["groups"] = groups
        body.update(claims)
        signer = key or self.current
        return jwt.encode(body, signer.private, algorithm="RS256", headers={"kid": signer.kid, **(headers or {})})


def _handler(idp: DevIdentityProvider):
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server naming
            path = self.path.split("?", 1)[0]
            idp.requests[path] += 1
            if idp.delay:
                time.sleep(idp.delay)
            if idp.down:
                return self._send(503, {"error": "temporarily_unavailable"})
            document = idp.document(path)
            self._send(200 if document is not None else 404, document or {"error": "not_found"})

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if idp.trickle and idp.trickle_head:
                data = head_and_body(self, data)
            else:
                self.end_headers()
            if idp.trickle:
                write_slowly(self.wfile, data, idp.trickle)
            else:
                self.wfile.write(data)

        def log_message(self, *args) -> None:  # keep test and dev output clean
            pass

    return Handler


def main() -> None:
    parser = argparse.ArgumentParser(description="Local Entra-like identity provider (development only).")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    idp = DevIdentityProvider(port=args.port).start()
    print(json.dumps({"authority_url": idp.url}), flush=True)
    try:
        while True:  # a timed sleep, so Ctrl-C is seen even when another thread got the signal
            time.sleep(0.5)
    except KeyboardInterrupt:
        idp.stop()


if __name__ == "__main__":
    main()

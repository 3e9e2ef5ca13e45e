"""The Compute Engine metadata server as Cloud Build, Cloud Run and Cloud Shell offer
it, on 127.0.0.1: what google-auth's Application Default Credentials read when no key
file is set (https://cloud.google.com/compute/docs/metadata/querying-metadata).
Point google-auth at it with ``env()``."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ACCESS_TOKEN = "metadata-server-access-token"
PROJECT = "metadata-project"
EMAIL = "aadrun-deployer@metadata-project.iam.gserviceaccount.com"
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


class MetadataServer:
    def __init__(self) -> None:
        self.tokens_issued = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server naming
                path = self.path.split("?", 1)[0].rstrip("/")
                if self.headers.get("Metadata-Flavor") != "Google":
                    return self._send(403, "text/plain", b"Missing Metadata-Flavor:Google header.")
                if path == "":
                    return self._send(200, "application/text", b"computeMetadata/")
                if path == "/computeMetadata/v1/project/project-id":
                    return self._send(200, "application/text", PROJECT.encode())
                if path == "/computeMetadata/v1/instance/service-accounts/default":
                    account = {"email": EMAIL, "aliases": ["default"], "scopes": [CLOUD_PLATFORM]}
                    return self._send(200, "application/json", json.dumps(account).encode())
                if path == "/computeMetadata/v1/instance/service-accounts/default/token":
                    server.tokens_issued += 1
                    return self._send(200, "application/json", json.dumps(
                        {"access_token": ACCESS_TOKEN, "expires_in": 3599, "token_type": "Bearer"}).encode())
                self._send(404, "text/plain", b"not found")

            def _send(self, status: int, content_type: str, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Metadata-Flavor", "Google")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.host = f"127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> "MetadataServer":
        threading.Thread(target=self._server.serve_forever, daemon=True, name="metadata").start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def env(self) -> dict[str, str]:
        """The variables google-auth reads to find it (instead of metadata.google.internal)."""
        return {"GCE_METADATA_HOST": self.host, "GCE_METADATA_IP": self.host}

"""Framework-free request and response values: entry points translate Flask to
these, so the core never sees ``flask.Request``."""
from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping

_TRACE_ID = re.compile(r"[0-9a-fA-F]{32}")
# One encoder for every response: json.dumps builds a new one per call when given separators.
_JSON = json.JSONEncoder(separators=(",", ":"))


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]   # lower-cased keys, or a mapping that ignores case
    body: bytes
    body_too_large: bool = False  # the body exceeded the entry point's read limit
    body_incomplete: bool = False  # the body ended before its declared length, or was malformed
    received: float | None = None  # time.monotonic() when the request began (before its body was read)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";", 1)[0].strip().lower()

    def trace(self, project: str | None) -> str | None:
        """Cloud Logging trace name from X-Cloud-Trace-Context or W3C traceparent."""
        raw = self.header("x-cloud-trace-context")
        trace_id = raw.split("/", 1)[0] if raw else None
        if not trace_id and self.header("traceparent"):
            parts = self.header("traceparent").split("-")
            trace_id = parts[1] if len(parts) >= 3 else None
        # Both formats carry 32 hex digits; W3C forbids all zeros. Anything else is ignored.
        if not trace_id or not _TRACE_ID.fullmatch(trace_id) or not trace_id.strip("0"):
            return None
        return f"projects/{project}/traces/{trace_id}" if project else trace_id


@dataclasses.dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def json(cls, status: int, obj, headers: Mapping[str, str] | None = None) -> "HttpResponse":
        return cls(status, _JSON.encode(obj).encode(), "application/json", dict(headers or {}))

    @classmethod
    def text(cls, status: int, text: str) -> "HttpResponse":
        return cls(status, text.encode("utf-8"), "text/plain; charset=utf-8")

    def json_body(self):
        return json.loads(self.body)

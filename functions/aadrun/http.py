"""Framework-free request and response values: entry points translate Flask to
these, so the core never sees ``flask.Request``."""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]   # lower-cased keys, or a mapping that ignores case
    body: bytes
    body_too_large: bool = False  # the body exceeded the entry point's read limit

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    @property
    def content_type(self) -> str:
        return (self.header("content-type") or "").split(";", 1)[0].strip().lower()


@dataclasses.dataclass
class HttpResponse:
    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def json(cls, status: int, obj, headers: Mapping[str, str] | None = None) -> "HttpResponse":
        return cls(status, json.dumps(obj, separators=(",", ":")).encode(), "application/json", dict(headers or {}))

    @classmethod
    def text(cls, status: int, text: str) -> "HttpResponse":
        return cls(status, text.encode("utf-8"), "text/plain; charset=utf-8")

    def json_body(self):
        return json.loads(self.body)

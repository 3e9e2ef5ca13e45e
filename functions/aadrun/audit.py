"""Structured audit and operational log lines (CONTRACT.md §9).

One JSON object per line on stdout in Cloud Logging's structured format, written
by google-cloud-logging's ``StructuredLogHandler`` (constructed directly: its
``setup_logging()`` probes the metadata server, which is absent off GCP).
Tokens, client states and raw bodies are never passed here: use
``token_fingerprint`` for a token.
"""
from __future__ import annotations

import atexit
import hashlib
import logging
import queue
import sys
import threading
from logging.handlers import QueueHandler, QueueListener

from google.cloud.logging.handlers import StructuredLogHandler

LOGGER_NAME = "aadrun"
# Cloud Logging's NOTICE (between INFO and WARNING) has no stdlib level: give it one,
# so a denial is logged as NOTICE rather than falling back to INFO.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
_setup_lock = threading.Lock()
_configured = False


class _Enqueue(QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Our records carry no %-args and no exc_info: nothing to render before
        # queueing, so skip the default's format-and-copy on the request thread.
        return record


def logger(stream=None) -> logging.Logger:
    """The aadrun logger, writing to stdout (Cloud Functions collects it) unless
    the first caller names another stream (the CLI keeps stdout for its output).

    Request threads only enqueue records; one listener thread formats and writes
    them. Formatting there, outside the request context, also spares the
    handler's per-line inspection of the Flask request (we pass the trace
    ourselves), which otherwise costs more than a whole decision. The queue is
    drained at interpreter exit, so no line is dropped on shutdown.
    """
    global _configured
    log = logging.getLogger(LOGGER_NAME)
    if not _configured:
        with _setup_lock:
            if not _configured:
                records: queue.SimpleQueue = queue.SimpleQueue()
                listener = QueueListener(records, StructuredLogHandler(stream=stream or sys.stdout))
                listener.start()
                atexit.register(listener.stop)
                log.addHandler(_Enqueue(records))
                log.setLevel(logging.INFO)
                log.propagate = False
                _configured = True
    return log


def token_fingerprint(token: str) -> str:
    """First 16 hex digits of the token's SHA-256: correlates without revealing."""
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()[:16]


def entry(event: str, message: str, *, severity: str = "INFO", trace: str | None = None, **fields) -> None:
    """Write one log line: ``event`` names its kind (``decision``, ``membership_change``,
    ``iam_change``, ``security``...); ``fields`` become top-level JSON fields."""
    level = logging.getLevelName(severity)
    if not isinstance(level, int):
        level = logging.INFO
    payload = {"event": event, **{k: v for k, v in fields.items() if v is not None}}
    extra = {"json_fields": payload}
    if trace:
        extra["trace"] = trace
    log = logger()
    if log.isEnabledFor(level):
        # makeRecord + handle skips logging's stack walk for the caller: the call
        # site of an audit line is always this function, so it would say nothing.
        log.handle(log.makeRecord(log.name, level, __name__, 0, message, None, None, extra=extra))


def security(message: str, **fields) -> None:
    entry("security", message, severity="WARNING", **fields)

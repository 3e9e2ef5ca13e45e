"""Structured audit and operational log lines (CONTRACT.md §9).

One JSON object per line on stdout in Cloud Logging's structured format, written
by google-cloud-logging's ``StructuredLogHandler`` (constructed directly: its
``setup_logging()`` probes the metadata server, which is absent off GCP).
Tokens, client states and raw bodies are never passed here: use
``token_fingerprint`` for a token.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import io
import json
import logging
import queue
import sys
import threading
from logging.handlers import QueueHandler

from google.cloud.logging.handlers import StructuredLogHandler

from .tokens import token_digest

LOGGER_NAME = "aadrun"
# Cloud Logging's NOTICE (between INFO and WARNING) has no stdlib level: give it one,
# so a denial is logged as NOTICE rather than falling back to INFO.
NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")
# How long a line may wait to be written: long enough to batch a busy instance's
# lines (tens per write), short enough that a crash loses little.
WRITE_INTERVAL = 0.01
_LEVELS = {name: logging.getLevelName(name) for name in ("DEBUG", "INFO", "NOTICE", "WARNING", "ERROR", "CRITICAL")}
_setup_lock = threading.Lock()
# The trace of the request being served, for every line written while serving it.
_request_trace: contextvars.ContextVar[str | None] = contextvars.ContextVar("aadrun_request_trace", default=None)
_logger: logging.Logger | None = None


class _Enqueue(QueueHandler):
    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Our records carry no %-args and no exc_info: nothing to render before
        # queueing, so skip the default's format-and-copy on the request thread.
        return record


class _BatchWriter:
    """Renders queued records with the library's handler and writes them to the
    stream in batches: one write per batch instead of one per line, and a thread
    that wakes on a timer rather than on every record (a wake-up per record costs
    a context switch per decision on a busy instance)."""

    def __init__(self, records: queue.SimpleQueue, stream, interval: float):
        self._records, self._stream, self._interval = records, stream, interval
        self._buffer = io.StringIO()
        self._handler = StructuredLogHandler(stream=self._buffer)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="aadrun-log-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Write whatever is queued, then end the thread (at interpreter exit)."""
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping.wait(self._interval):
            self._drain()
        self._drain()

    def _drain(self) -> None:
        while True:
            try:
                record = self._records.get_nowait()
            except queue.Empty:
                break
            try:
                self._handler.handle(record)
            except Exception:  # noqa: BLE001 - one bad record must not end the writer
                self._handler.handleError(record)
        if not self._buffer.tell():
            return
        text = self._buffer.getvalue()
        try:
            try:
                self._stream.write(text)
            except UnicodeEncodeError:
                # A caller's string the stream cannot encode (a lone surrogate) must
                # not take the batch's other lines with it.
                self._stream.write(_escaped(text))
            self._stream.flush()
        except (OSError, ValueError):
            # A closed or broken stdout must not end the thread and leave the queue
            # to grow: the batch is lost, as a line written to it would be.
            pass
        finally:
            self._buffer.seek(0)
            self._buffer.truncate()


def _escaped(text: str) -> str:
    """The lines of ``text`` in pure ASCII: each JSON line re-encoded with escapes."""
    out = []
    for line in text.split("\n"):
        if line:
            try:
                line = json.dumps(json.loads(line), ensure_ascii=True)
            except ValueError:
                line = line.encode("ascii", "backslashreplace").decode("ascii")
            out.append(line + "\n")
    return "".join(out)


def logger(stream=None) -> logging.Logger:
    """The aadrun logger, writing to stdout (Cloud Functions collects it) unless
    the first caller names another stream (the CLI keeps stdout for its output).

    Request threads only enqueue records; one writer thread renders them with
    google-cloud-logging's ``StructuredLogHandler`` and writes them, at most
    ``WRITE_INTERVAL`` seconds later. Rendering there, outside the request
    context, also spares the handler's per-line inspection of the Flask request
    (we pass the trace ourselves). The queue is drained at interpreter exit, so
    no line is dropped on shutdown.
    """
    global _logger
    if _logger is None:
        with _setup_lock:
            if _logger is None:
                log = logging.getLogger(LOGGER_NAME)
                records: queue.SimpleQueue = queue.SimpleQueue()
                writer = _BatchWriter(records, stream or sys.stdout, WRITE_INTERVAL)
                writer.start()
                atexit.register(writer.stop)
                log.addHandler(_Enqueue(records))
                log.setLevel(logging.INFO)
                log.propagate = False
                _logger = log
    return _logger


def token_fingerprint(token: str, digest: bytes | None = None) -> str:
    """First 16 hex digits of the token's SHA-256 (``digest``, when the caller has it):
    correlates without revealing."""
    return (digest or token_digest(token))[:8].hex()


@contextlib.contextmanager
def request_trace(trace: str | None):
    """Lines written inside (on this thread or context) carry ``trace``: the entry
    points wrap each HTTP request in it, so every line of a request joins its trace."""
    token = _request_trace.set(trace)
    try:
        yield
    finally:
        _request_trace.reset(token)


def entry(event: str, message: str, *, severity: str = "INFO", **fields) -> None:
    """Write one log line: ``event`` names its kind (``decision``, ``membership_change``,
    ``iam_change``, ``security``...); ``fields`` become top-level JSON fields. It carries
    the trace of the request being served, if any (``request_trace``)."""
    level = _LEVELS.get(severity, logging.INFO)
    log = _logger or logger()
    if not log.isEnabledFor(level):
        return
    trace = _request_trace.get()
    payload = {"event": event}
    payload.update((k, v) for k, v in fields.items() if v is not None)
    # No source location: the call site of an audit line is always this function, so
    # it would say nothing (and the library then skips working it out). makeRecord +
    # handle skips logging's stack walk for the caller, for the same reason.
    extra = {"json_fields": payload, "source_location": None}
    if trace:
        extra["trace"] = trace
    log.handle(log.makeRecord(log.name, level, __name__, 0, message, None, None, extra=extra))


def security(message: str, **fields) -> None:
    entry("security", message, severity="WARNING", **fields)

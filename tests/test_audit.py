"""The audit log writer, in a fresh interpreter each (the aadrun logger is set up
once per process): every entry becomes one complete Cloud Logging line, from any
number of threads, including the ones still queued when the process exits."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from tests.support.serve import ROOT


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env={"PYTHONPATH": str(ROOT / "functions"), "PATH": "/usr/bin:/bin"})


def lines(out: str) -> list[dict]:
    """Our entries; the library adds one line describing itself, the first time it writes."""
    entries = [json.loads(line) for line in out.splitlines()]
    return [e for e in entries if "logging.googleapis.com/diagnostic" not in e]


def test_entries_from_many_threads_are_all_written_whole_including_those_queued_at_exit():
    done = run("""
        import threading
        from aadrun import audit

        def write(thread):
            for n in range(500):
                with audit.request_trace("projects/p/traces/abc" if n == 0 else None):
                    audit.entry("decision", f"allow billing: ok", severity="INFO" if n % 2 else "NOTICE",
                                thread=thread, n=n)

        threads = [threading.Thread(target=write, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # exit at once: the lines still queued must be written on the way out
    """)
    assert done.returncode == 0, done.stderr
    entries = lines(done.stdout)
    assert len(entries) == 8 * 500
    for thread in range(8):
        mine = [e["n"] for e in entries if e["thread"] == thread]
        assert mine == list(range(500)), "lost or reordered lines"
    assert {e["severity"] for e in entries} == {"INFO", "NOTICE"}
    assert all(e["event"] == "decision" and e["message"] == "allow billing: ok" for e in entries)
    traced = [e for e in entries if e["n"] == 0]
    assert all(e["logging.googleapis.com/trace"] == "projects/p/traces/abc" for e in traced)


def test_a_line_is_written_while_the_process_runs_not_only_at_exit():
    done = run("""
        import sys, time
        from aadrun import audit

        class Watched:
            def __init__(self):
                self.text = ""
            def write(self, text):
                self.text += text
            def flush(self):
                pass

        stream = Watched()
        audit.logger(stream)
        audit.entry("security", "first")
        deadline = time.monotonic() + 10
        while '"first"' not in stream.text and time.monotonic() < deadline:
            time.sleep(0.01)
        print("seen" if '"first"' in stream.text else "never written")
    """)
    assert done.stdout.strip() == "seen", done.stderr


def test_a_failing_stream_loses_that_batch_but_not_the_writer():
    done = run("""
        import sys, time
        from aadrun import audit

        class FailsOnce:
            failed = False
            def write(self, text):
                if not self.failed:
                    self.failed = True
                    raise OSError("broken pipe")
                sys.stdout.write(text)
            def flush(self):
                sys.stdout.flush()

        audit.logger(FailsOnce())
        audit.entry("security", "lost with its batch")
        time.sleep(0.5)
        audit.entry("security", "written after the failure")
    """)
    assert done.returncode == 0, done.stderr
    assert [e["message"] for e in lines(done.stdout)] == ["written after the failure"]
    assert "Traceback" not in done.stderr


def test_an_entry_that_cannot_be_rendered_is_reported_and_the_next_ones_are_written():
    done = run("""
        from aadrun import audit

        audit.entry("security", "before")
        audit.entry("security", "not JSON", value=object())
        audit.entry("security", "after")
    """)
    assert done.returncode == 0, done.stderr
    assert [e["message"] for e in lines(done.stdout)] == ["before", "after"]
    assert "Logging error" in done.stderr   # the standard library's report of a lost record


def test_an_entry_the_stream_cannot_encode_is_written_escaped_and_takes_no_other_line_with_it():
    # A lone surrogate (JSON "\ud800" in a caller's request) has no UTF-8 form.
    done = run("""
        from aadrun import audit
        audit.entry("decision", "allow billing: ok", service="billing")
        audit.entry("decision", "deny: unknown_service", service="\\ud800x\\u00e9")
        audit.entry("decision", "allow billing: ok (2)", service="billing")
    """)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    entries = lines(done.stdout)
    assert [e["service"] for e in entries] == ["billing", "\ud800x\u00e9", "billing"]

"""scripts/dev: the local stack plays its scenario and Ctrl-C leaves nothing behind."""
from __future__ import annotations

import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.support.emulators import free_port

ROOT = Path(__file__).resolve().parents[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def run_once(state: Path, port: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "devstack.py"), "--once", "--port", str(port),
                           "--state", str(state)], capture_output=True, text=True, timeout=120)


def test_a_state_folder_it_did_not_make_is_never_emptied(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    proc = run_once(tmp_path / "work", free_port())
    assert proc.returncode != 0 and "not a scripts/dev state folder" in proc.stderr
    assert "stopped" not in proc.stdout   # nothing was started
    assert [p.name for p in (tmp_path / "work").iterdir()] == ["notes.txt"]
    # One an earlier version made (no marker yet) is taken, and played in.
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    for name in ("ca.pem", "server.pem", "server-key.pem", "state.db"):
        (earlier / name).write_text("from an earlier run")
    proc = run_once(earlier, free_port())
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


def test_scenario_passes_in_embedded_mode(tmp_path):
    port = free_port()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "devstack.py"), "--once", "--port", str(port),
                           "--state", str(tmp_path / "dev")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    timeline = [line for line in proc.stdout.splitlines() if line.startswith("[")]
    assert any("verify denies Alice" in line for line in timeline)
    assert any("verify for Carol: 403 not_member" in line for line in timeline)
    assert timeline[-1].endswith("scenario passed") and proc.stdout.splitlines()[-1] == "stopped"
    assert not listening(port)
    usage = subprocess.run([sys.executable, str(ROOT / "scripts" / "devstack.py"), "--no-such-flag"],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: scripts/dev ")


def test_scenario_passes_across_processes_with_the_emulators(tmp_path):
    port = free_port()
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "devstack.py"), "--once", "--emulators",
                           "--port", str(port), "--state", str(tmp_path / "dev")],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert any(line.endswith("scenario passed") for line in proc.stdout.splitlines())
    assert not listening(port)


def test_ctrl_c_stops_everything(tmp_path):
    port = free_port()
    # Started with SIGINT ignored, as a shell starts a background job (and a CI runner may
    # start the whole suite): Ctrl-C must stop it all the same.
    proc = subprocess.Popen(["bash", "-c", 'trap "" INT; exec "$@"', "dev", sys.executable,
                             str(ROOT / "scripts" / "devstack.py"), "--port", str(port),
                             "--state", str(tmp_path / "dev")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen = []
    try:
        deadline = time.monotonic() + 180
        while not any("Ctrl-C stops everything" in line for line in seen):
            seen.append(lines.get(timeout=max(deadline - time.monotonic(), 0.1)))
        ports = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", "".join(seen))}
        assert port in ports and all(listening(p) for p in ports), "".join(seen[-30:])
        # A second run on the same state folder, or on the same port, refuses at once and
        # leaves the running stack alone.
        for state, on_port, refusal in ((tmp_path / "dev", free_port(), "another scripts/dev is running"),
                                        (tmp_path / "other", port, f"port {port} is in use")):
            second = run_once(state, on_port)
            assert second.returncode != 0 and refusal in second.stderr, second.stderr[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as health:
            assert health.status == 200
        _hand_sent_notification_plays_as_printed("".join(seen))
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=90)
        # verify, graph_webhook, the identity provider and the Graph stand-in are all gone.
        assert [p for p in ports if listening(p)] == []
    finally:
        if proc.poll() is None:
            proc.kill()


def _bash(command: str) -> str:
    return subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30).stdout


def _hand_sent_notification_plays_as_printed(printed: str) -> None:
    """The printed curls, run as printed: the unconfirmed removal of Bob is a 503 and
    denies him; the same curl again (Graph's retry) is read again and restores him."""
    notify = re.search(r"^  (curl -s -i .*?\}\]\}')$", printed, re.S | re.M).group(1)
    ask = (re.search(r"^  (TOKEN=\S+)$", printed, re.M).group(1) + "\n"
           + re.search(r"^  (curl -s \S+/verify .*?billing-api\"\}')$", printed, re.S | re.M).group(1))
    def comes(answer: str, why: str) -> None:   # verify sees a change within its 0.2 s poll
        deadline = time.monotonic() + 10
        while answer not in _bash(ask):
            assert time.monotonic() < deadline, why
            time.sleep(0.1)

    assert '"allow":true' in _bash(ask)
    assert _bash(notify).startswith("HTTP/1.1 503")
    comes('"reason":"not_member"', "the removal alone did not deny Bob")
    assert _bash(notify).startswith("HTTP/1.1 202")
    comes('"allow":true', "Bob was not restored by the notification's second delivery")

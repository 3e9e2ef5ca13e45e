"""Faults, load and abuse: runs the resilience scenarios and prints one row each.

    python scripts/chaos.py [--quick] [--only NAME ...]   fault scenarios (the table)
    python scripts/chaos.py --load [--quick]              verify at its HTTP ceiling, webhook under 50 senders
    python scripts/chaos.py --fuzz [--examples N]         the Hypothesis fuzz suites, long

Every part runs on 127.0.0.1: the local Graph and Cloud Run IAM servers, the dev
identity provider, the Pub/Sub and Firestore emulators (reused from
PUBSUB_EMULATOR_HOST when set, except where a scenario restarts its own), and the
functions as real functions-framework processes. Exit status 1 when any row lost
a message, ended in a wrong state or did not converge.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos_lab  # noqa: E402,F401 - puts the repository on sys.path
import chaos_scenarios as sc  # noqa: E402
import chaos_tokens as tk  # noqa: E402
from chaos_lab import Row  # noqa: E402
from tests.support.emulators import Emulator  # noqa: E402

# name -> (function, needs a shared Pub/Sub emulator)
SCENARIOS = {
    "notifications": (sc.notifications, True),
    "sync_killed": (sc.sync_killed, True),
    "pubsub_restart": (sc.pubsub_restart, False),
    "firestore_restart": (sc.firestore_restart, True),
    "graph_429": (sc.graph_429, True),
    "jwks_down": (tk.jwks_down, False),
    "clock_skew": (tk.clock_skew, False),
    "iam_writers": (sc.iam_writers, False),
}


def table(rows: list[Row]) -> str:
    head = f"{'scenario':<44} {'messages':>8} {'lost':>5} {'wrong':>6} {'converge':>9}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        took = "never" if r.converge_s is None else f"{r.converge_s:.1f} s"
        lines.append(f"{r.scenario:<44} {r.messages:>8} {r.lost:>5} {r.wrong:>6} {took:>9}  {r.note}")
    return "\n".join(lines)


def run_one(name: str, quick: bool, pubsub: str | None) -> tuple[Row, "chaos_lab.Lab"]:
    """Run scenario ``name`` in a fresh folder; returns its row and its (stopped) lab."""
    fn, shared = SCENARIOS[name]
    folder = Path(tempfile.mkdtemp(prefix=f"aadrun-chaos-{name}-"))
    lab = None
    try:
        row, lab = fn(folder, pubsub, quick=quick) if shared else fn(folder, quick=quick)
        return row, lab
    finally:
        if lab is not None:
            lab.stop()
        shutil.rmtree(folder, ignore_errors=True)


def faults(names: list[str], quick: bool) -> list[Row]:
    own = None
    pubsub = os.environ.get("PUBSUB_EMULATOR_HOST")
    if not pubsub and any(SCENARIOS[n][1] for n in names):
        own = Emulator("pubsub").start()
        pubsub = own.host
    rows = []
    try:
        for name in names:
            started = time.monotonic()
            try:
                row, _ = run_one(name, quick, pubsub)
            except Exception as e:  # a scenario that breaks is a failed row, the others still run
                row = Row(name, 0, 0, 1, None, f"crashed: {type(e).__name__}: {e}")
            row.note = (row.note + "; " if row.note else "") + f"{time.monotonic() - started:.0f} s"
            print(table([row]).splitlines()[-1], flush=True)
            rows.append(row)
    finally:
        if own:
            own.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shortened scenarios (the test suite)")
    parser.add_argument("--load", action="store_true", help="the two load scenarios")
    parser.add_argument("--fuzz", action="store_true", help="the fuzz suites, long")
    parser.add_argument("--examples", type=int, default=20000, help="Hypothesis examples per fuzz test")
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS), help="run only these fault scenarios")
    args = parser.parse_args(argv)
    from aadrun import audit

    # This process's own aadrun lines (in-process verifiers) go to a file, not into the table.
    audit.logger(open(Path(tempfile.gettempdir()) / "aadrun-chaos-audit.log", "a"))
    if args.fuzz:
        import chaos_load

        return chaos_load.fuzz(args.examples)
    if args.load:
        import chaos_load

        rows = chaos_load.load(args.quick)
    else:
        rows = faults(args.only or list(SCENARIOS), args.quick)
    print("\n" + table(rows), flush=True)
    failed = [r.scenario for r in rows if not r.ok]
    if failed:
        print(f"\nFAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

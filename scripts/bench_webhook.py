"""graph_webhook benchmark against the Pub/Sub emulator, each figure next to a
baseline measured in the same run.

Starts a Pub/Sub emulator and graph_webhook (functions-framework, production
server) publishing to it, then measures:

1. latency from POST to 202 for batches of notifications, one POST at a time:
   p50 and p99 (target p99 <= 0.5 s; Graph's deadline is 3 s), next to the
   baseline of publishing the same number of messages straight to the emulator
   with one ordered PublisherClient (the floor any webhook pays);
2. sustained notifications per second with several concurrent senders, and the
   latency under that load (must stay under Graph's 3 s deadline).

Usage: python scripts/bench_webhook.py [--batches N] [--batch-size N]
       [--duration SECONDS] [--concurrency N] [--check]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "functions")]

from tests.support.emulators import Emulator  # noqa: E402
from tests.support.serve import FunctionServer  # noqa: E402

PROJECT = "aadrun-bench"
TOPIC = "aadrun-membership-changes"
TENANT = "11111111-1111-1111-1111-111111111111"
CLIENT_STATE = "bench-client-state"
TARGET_P99 = 0.5
GRAPH_DEADLINE = 3.0


def notification() -> dict:
    """One group membership notification as Graph sends it, with fresh ids."""
    group = str(uuid.uuid4())
    return {
        "changeType": "updated", "clientState": CLIENT_STATE, "resource": f"Groups/{group}",
        "resourceData": {"@odata.type": "#Microsoft.Graph.Group", "@odata.id": f"Groups/{group}", "id": group,
                         "organizationId": TENANT,
                         "members@delta": [{"id": str(uuid.uuid4())}, {"id": str(uuid.uuid4()), "@removed": "deleted"}]},
        "subscriptionExpirationDateTime": "2030-01-01T00:00:00+00:00",
        "subscriptionId": str(uuid.uuid4()), "tenantId": TENANT,
    }


def batch(size: int) -> bytes:
    return json.dumps({"value": [notification() for _ in range(size)]}).encode()


class Sender:
    """One keep-alive connection to the webhook."""

    def __init__(self, port: int):
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)

    def post(self, body: bytes) -> tuple[int, float]:
        started = time.perf_counter()
        self.conn.request("POST", "/", body, {"Content-Type": "application/json"})
        response = self.conn.getresponse()
        response.read()
        return response.status, time.perf_counter() - started


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))]


def latency(port: int, batches: int, size: int) -> list[float]:
    sender = Sender(port)
    bodies = [batch(size) for _ in range(batches)]
    times = []
    for body in bodies:
        status, seconds = sender.post(body)
        if status != 202:
            raise SystemExit(f"unexpected status {status}")
        times.append(seconds)
    return times


def throughput(port: int, size: int, duration: float, concurrency: int) -> tuple[int, float, list[float], int]:
    """(notifications accepted, elapsed seconds, latencies, failures) with concurrent senders."""
    bodies = [batch(size) for _ in range(64)]
    stop = time.monotonic() + duration
    lock = threading.Lock()
    accepted, failures, times = [0], [0], []

    def run(index: int) -> None:
        sender, i = Sender(port), index
        while time.monotonic() < stop:
            status, seconds = sender.post(bodies[i % len(bodies)])
            i += concurrency
            with lock:
                times.append(seconds)
                if status == 202:
                    accepted[0] += size
                else:
                    failures[0] += 1

    started = time.monotonic()
    threads = [threading.Thread(target=run, args=(n,)) for n in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return accepted[0], time.monotonic() - started, times, failures[0]


def direct(project: str, batches: int, size: int) -> list[float]:
    """Baseline: the same number of ordered messages per batch, published straight
    to the emulator by one PublisherClient, each batch awaited."""
    from google.cloud import pubsub_v1

    client = pubsub_v1.PublisherClient(
        publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True))
    topic = client.topic_path(project, TOPIC)
    times = []
    for _ in range(batches):
        data = [(json.dumps(notification()).encode(), f"{TENANT}/{uuid.uuid4()}") for _ in range(size)]
        started = time.perf_counter()
        futures = [client.publish(topic, body, ordering_key=key, kind="membership", tenant=TENANT)
                   for body, key in data]
        for future in futures:
            future.result(timeout=10)
        times.append(time.perf_counter() - started)
    client.stop()
    return times


def report(args, lat: list[float], base: list[float], sustained: tuple[int, float, list[float], int]) -> bool:
    p50, p99 = statistics.median(lat), percentile(lat, 99)
    base50, base99 = statistics.median(base), percentile(base, 99)
    count, elapsed, load_times, failures = sustained
    load99 = percentile(load_times, 99) if load_times else float("inf")
    rows = [
        (f"POST->202 p50 ({args.batch_size}/POST)", f"{p50:.3f} s vs direct publish {base50:.3f} s",
         f"{p50 / base50:.2f}x", "-", True),
        (f"POST->202 p99 ({args.batch_size}/POST)", f"{p99:.3f} s vs direct publish {base99:.3f} s",
         f"{p99 / base99:.2f}x", f"<= {TARGET_P99} s", p99 <= TARGET_P99),
        (f"sustained, {args.concurrency} senders", f"{count / elapsed:,.0f} notifications/s, {failures} not 202",
         "-", "all 202", failures == 0),
        ("POST->202 p99 under load", f"{load99:.3f} s ({len(load_times)} POSTs in {elapsed:.1f} s)",
         "-", f"< {GRAPH_DEADLINE} s", load99 < GRAPH_DEADLINE),
    ]
    print(f"{'benchmark':<34} {'measured':<48} {'ratio':>8}  {'target':<9} met")
    for name, measured, ratio_text, target, met in rows:
        print(f"{name:<34} {measured:<48} {ratio_text:>8}  {target:<9} {'yes' if met else 'NO'}")
    return all(row[-1] for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=100, help="POSTs for the latency figure")
    parser.add_argument("--batch-size", type=int, default=100, help="notifications per POST")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of sustained load")
    parser.add_argument("--concurrency", type=int, default=8, help="concurrent senders under load")
    parser.add_argument("--check", action="store_true", help="exit 1 when a target is missed")
    args = parser.parse_args(argv)

    emulator = Emulator("pubsub").start()
    try:
        os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
        from google.cloud import pubsub_v1

        pubsub_v1.PublisherClient().create_topic(name=f"projects/{PROJECT}/topics/{TOPIC}")
        env = {"AADRUN_BUS": "pubsub", "PUBSUB_EMULATOR_HOST": emulator.host, "GOOGLE_CLOUD_PROJECT": PROJECT,
               "AADRUN_CLIENT_STATE": CLIENT_STATE, "AADRUN_TOPIC_CHANGES": TOPIC,
               "AADRUN_POLICY_PATH": str(ROOT / "policies" / "example.yaml")}
        with FunctionServer("graph_webhook", env) as server:
            latency(server.port, 5, args.batch_size)  # warm-up: connections, publisher, imports
            lat = latency(server.port, args.batches, args.batch_size)
            sustained = throughput(server.port, args.batch_size, args.duration, args.concurrency)
        base = direct(PROJECT, min(args.batches, 50), args.batch_size)
        ok = report(args, lat, base, sustained)
    finally:
        emulator.stop()
    return 0 if ok or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())

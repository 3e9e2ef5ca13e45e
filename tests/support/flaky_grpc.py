"""A Google gRPC service on 127.0.0.1 going through an outage: one method of it
answers UNAVAILABLE at once for the outage's first ``failing`` seconds, then hangs
past each caller's deadline (the real request protos, over a real socket)."""
from __future__ import annotations

import time
from concurrent import futures

import grpc


class FlakyMethod:
    """``service``/``method`` served as that outage; ``deadlines`` records when each
    call's RPC deadline falls (monotonic clock); ``outage_starts()`` begins it again."""

    # A server's deadline is its receive time plus the caller's timeout, so it lies past
    # the caller's own by the call's transit time: tens of milliseconds on a loaded
    # machine. The defect these tests catch overshoots by the outage's whole timeout.
    TRANSIT_SLACK = 0.3

    def __init__(self, service: str, method: str, request_type, *, streaming: bool = False, failing: float = 0.6):
        self.deadlines: list[float] = []
        self._first: float | None = None

        def answer(request, context):
            now = time.monotonic()
            self.deadlines.append(now + context.time_remaining())
            self._first = self._first or now
            if now - self._first < failing:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the service is unavailable")
            time.sleep(context.time_remaining() + 0.2)   # past the caller's deadline
            context.abort(grpc.StatusCode.UNAVAILABLE, "the service is unavailable")

        def stream(request, context):
            answer(request, context)
            yield from ()

        make = grpc.unary_stream_rpc_method_handler if streaming else grpc.unary_unary_rpc_method_handler
        handler = grpc.method_handlers_generic_handler(service, {
            method: make(stream if streaming else answer, request_deserializer=request_type.deserialize)})
        self._server = grpc.server(futures.ThreadPoolExecutor(8))
        self._server.add_generic_rpc_handlers((handler,))
        self.host = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def outage_starts(self) -> None:
        self._first = None
        self.deadlines.clear()

    def stop(self) -> None:
        self._server.stop(0)

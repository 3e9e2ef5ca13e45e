"""A time budget for one call of a Google generated (GAPIC) client, retries included."""
from __future__ import annotations

import functools
import time
from collections.abc import Callable

# The shortest RPC deadline given to an attempt the retry still starts.
_MIN_ATTEMPT_S = 0.01


class Budget:
    """A GAPIC ``timeout``: each attempt's RPC deadline is the time left of ``seconds``
    counted from the start of the call. A float timeout will not do: google-api-core
    (``TimeToDeadlineTimeout``) gives an attempt the whole timeout again once less
    than a second is left, so a call that failed fast for a while, then hung, would
    outlive its budget by up to the whole timeout."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, rpc: Callable) -> Callable:
        # Applied once per call (the generated client decorates its RPC on each call).
        deadline = time.monotonic() + self.seconds

        @functools.wraps(rpc)
        def attempt(*args, **kwargs):
            kwargs["timeout"] = max(deadline - time.monotonic(), _MIN_ATTEMPT_S)
            return rpc(*args, **kwargs)
        return attempt

    def __repr__(self) -> str:
        return f"Budget({self.seconds})"

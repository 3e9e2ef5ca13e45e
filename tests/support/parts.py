"""What a local run started (servers, emulators), stopped last-first."""
from __future__ import annotations

import contextlib


class Parts:
    def __init__(self) -> None:
        self._parts: list = []

    def keep(self, part):
        self._parts.append(part)
        return part

    def stop(self) -> None:
        while self._parts:
            part = self._parts.pop()
            # Stopping the rest matters more than one part's error.
            with contextlib.suppress(Exception):
                part.stop()

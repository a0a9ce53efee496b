"""Aggregation of students' keyframe requests into a few PLIs per second to the teacher."""

from __future__ import annotations

import asyncio
import time
from typing import Callable, Optional


class KeyframeRequester:
    """Coalesce keyframe requests (joins, students' PLI/FIR) into at most one per interval.

    A request inside the interval is not dropped: it arms one trailing request at the
    interval's end, so a student who joins just after a keyframe still gets one within
    ``min_interval`` seconds, while a thousand students joining at 8:00 cost the teacher
    ``1 / min_interval`` PLIs per second.
    """

    def __init__(self, send: Callable[[], None], min_interval: float = 0.5) -> None:
        self._send = send
        self.min_interval = min_interval
        self._last_sent = float("-inf")
        self._pending: Optional[asyncio.TimerHandle] = None
        self.requested = 0
        self.sent = 0

    def request(self) -> None:
        self.requested += 1
        if self._pending is not None:
            return
        wait = self._last_sent + self.min_interval - time.monotonic()
        if wait <= 0:
            self._fire()
        else:
            self._pending = asyncio.get_running_loop().call_later(wait, self._fire)

    def _fire(self) -> None:
        self._pending = None
        self._last_sent = time.monotonic()
        self.sent += 1
        self._send()

    def close(self) -> None:
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

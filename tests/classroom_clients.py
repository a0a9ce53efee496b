"""A small websocket client for the classroom tests: collects every message, waits for one."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional

import aiohttp


class WsClient:
    def __init__(self, http: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.http = http
        self.ws = ws
        self.messages: list[dict] = []
        self.closed = asyncio.Event()
        self._new = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, base_url: str, room: str, token: str) -> "WsClient":
        http = aiohttp.ClientSession()
        try:
            ws = await http.ws_connect(f"{base_url}/ws/{room}?token={token}", heartbeat=None)
        except Exception:
            await http.close()
            raise
        client = cls(http, ws)
        await client.next("welcome")
        return client

    async def _read(self) -> None:
        try:
            async for message in self.ws:
                if message.type == aiohttp.WSMsgType.TEXT:
                    self.messages.append(message.json())
                    self._new.set()
        finally:
            self.closed.set()
            self._new.set()

    @property
    def welcome(self) -> dict:
        return next(m for m in self.messages if m["type"] == "welcome")

    def of(self, kind: str) -> list[dict]:
        return [m for m in self.messages if m["type"] == kind]

    async def next(self, kind: str, where: Optional[Callable[[dict], bool]] = None, timeout: float = 5.0,
                   after: int = 0) -> dict:
        """The first message of ``kind`` (matching ``where``) from index ``after`` on, waiting for it."""
        deadline = time.monotonic() + timeout
        while True:
            self._new.clear()
            for m in self.messages[after:]:
                if m["type"] == kind and (where is None or where(m)):
                    return m
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed.is_set():
                raise AssertionError(f"no {kind!r} message; got {[m['type'] for m in self.messages]}")
            try:
                await asyncio.wait_for(self._new.wait(), remaining)
            except asyncio.TimeoutError:
                pass

    async def send(self, **msg: Any) -> int:
        """Send a message; returns the index from which replies will appear."""
        mark = len(self.messages)
        await self.ws.send_json(msg)
        return mark

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        await self.http.close()


async def presence_where(client: WsClient, predicate: Callable[[dict], bool], timeout: float = 8.0) -> dict:
    """Wait until the latest presence satisfies ``predicate`` (presence comes as aggregate updates)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        latest = [m for m in client.messages if m["type"] == "presence"]
        if latest and predicate(latest[-1]):
            return latest[-1]
        await asyncio.sleep(0.1)
    latest = [m for m in client.messages if m["type"] == "presence"]
    raise AssertionError(f"presence never matched; last: {latest[-1] if latest else None}")

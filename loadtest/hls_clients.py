"""Simulated replay viewers: students who play a recorded lesson over HLS like a player would.

A viewer fetches the playlist, the init segment and then media segments, never more than
``buffer_ahead`` seconds of media ahead of its playhead (hls.js keeps ~30 s), so a crowd
of viewers loads the server the way a crowd of players does: a burst at start, then one
segment per segment duration each. Playback is simulated, not decoded: the playhead
starts when the first segment has arrived (startup time) and advances in real time; a
segment that arrives after its playback time stalls the playhead (stall time), exactly
what a viewer would see as buffering.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import aiohttp

logger = logging.getLogger(__name__)


@dataclass
class Playlist:
    init: Optional[str]
    segments: list[tuple[float, str]]  # (duration s, uri)
    ended: bool


def parse_playlist(text: str) -> Playlist:
    """The parts of an HLS media playlist a player needs: init map, segments, ENDLIST."""
    init: Optional[str] = None
    segments: list[tuple[float, str]] = []
    duration: Optional[float] = None
    ended = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#EXT-X-MAP:"):
            for part in line[len("#EXT-X-MAP:"):].split(","):
                key, _, value = part.partition("=")
                if key.strip() == "URI":
                    init = value.strip().strip('"')
        elif line.startswith("#EXTINF:"):
            duration = float(line[len("#EXTINF:"):].split(",", 1)[0])
        elif line.startswith("#EXT-X-ENDLIST"):
            ended = True
        elif not line.startswith("#"):
            segments.append((duration or 0.0, line))
            duration = None
    return Playlist(init, segments, ended)


@dataclass
class ReplayViewer:
    """One viewer's replay and what it saw."""

    id: str
    recording: str
    playlist_url: str
    watch: float
    buffer_ahead: float
    state: str = "scheduled"
    failure: str = ""
    requested_at: Optional[float] = None
    started_at: Optional[float] = None    # first media segment arrived: playback starts
    ended_at: Optional[float] = None
    stall_s: float = 0.0
    stalls: int = 0
    bytes: int = 0
    segments: int = 0
    media_s: float = 0.0                  # media fetched (s)
    fetch_ms: list[float] = field(default_factory=list)

    def playhead(self, now: float) -> float:
        """Seconds of media played by ``now`` (0 before start; stalls do not advance it)."""
        if self.started_at is None:
            return 0.0
        return min(self.media_s, max(0.0, now - self.started_at - self.stall_s))

    async def _get(self, http: aiohttp.ClientSession, url: str) -> bytes:
        began = time.monotonic()
        async with http.get(url) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise RuntimeError(f"GET {url}: HTTP {resp.status}")
        self.fetch_ms.append(1000 * (time.monotonic() - began))
        self.bytes += len(body)
        return body

    async def play(self, http: aiohttp.ClientSession, base_url: str) -> None:
        """Play until ``watch`` seconds of media (or the whole lesson) have been fetched."""
        base = base_url.rstrip("/")
        directory = self.playlist_url.rsplit("/", 1)[0]
        self.state = "playing"
        self.requested_at = time.monotonic()
        try:
            playlist = parse_playlist((await self._get(http, base + self.playlist_url)).decode())
            if not playlist.segments:
                raise RuntimeError("empty playlist")
            if playlist.init:
                await self._get(http, f"{base}{directory}/{playlist.init}")
            target = min(self.watch, sum(d for d, _ in playlist.segments))
            position = 0.0  # media start of the next segment
            for duration, uri in playlist.segments:
                if position >= target:
                    break
                # a player does not fetch further ahead than its buffer
                while self.started_at is not None and position - self.playhead(time.monotonic()) > self.buffer_ahead:
                    await asyncio.sleep(min(1.0, position - self.playhead(time.monotonic()) - self.buffer_ahead))
                await self._get(http, f"{base}{directory}/{uri}")
                now = time.monotonic()
                if self.started_at is None:
                    self.started_at = now
                else:
                    due = self.started_at + self.stall_s + position  # when the playhead reaches this segment
                    if now > due:
                        self.stall_s += now - due
                        self.stalls += 1
                self.segments += 1
                position += duration
                self.media_s = position
            self.state = "done"
        except asyncio.CancelledError:
            self.state = "cancelled"
            raise
        except Exception as exc:
            self.state = "failed"
            self.failure = f"{exc.__class__.__name__}: {exc}"
            logger.debug("replay viewer %s failed: %s", self.id, self.failure)
        finally:
            self.ended_at = time.monotonic()

    def sample(self) -> tuple:
        return (self.state, self.bytes, self.segments, round(self.stall_s, 3))

    def record(self) -> dict[str, Any]:
        startup = None if self.started_at is None or self.requested_at is None else self.started_at - self.requested_at
        watched = self.media_s
        return {"id": self.id, "recording": self.recording, "state": self.state, "failure": self.failure,
                "requested_at": self.requested_at, "startup_s": startup, "stall_s": round(self.stall_s, 3),
                "stalls": self.stalls, "bytes": self.bytes, "segments": self.segments, "media_s": round(watched, 3),
                "fetch_ms_max": round(max(self.fetch_ms), 1) if self.fetch_ms else None}

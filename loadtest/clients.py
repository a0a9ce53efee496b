"""aiortc WHIP/WHEP clients: the teacher and students that tests, benchmarks and load tests drive.

They speak the public interface only (HTTP + SDP), like any outside client would.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import aiohttp
import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack, VideoStreamTrack

logger = logging.getLogger(__name__)


class SignallingFailed(Exception):
    def __init__(self, status: int, text: str, headers: Optional[dict] = None) -> None:
        super().__init__(f"{status}: {text.strip()}")
        self.status = status
        self.text = text
        self.headers = headers or {}


@dataclass
class PeerSession:
    """A WHIP or WHEP session seen from the client: the peer connection and its resource URL."""

    pc: RTCPeerConnection
    resource: str
    token: str
    posted_at: float
    answered_at: float
    connected: asyncio.Event = field(default_factory=asyncio.Event)

    async def close(self, delete: bool = True) -> None:
        if delete:
            async with aiohttp.ClientSession() as http:
                async with http.delete(self.resource, headers={"Authorization": f"Bearer {self.token}"}) as resp:
                    await resp.read()
        await self.pc.close()


def _prefer(transceiver, mime: str) -> None:
    caps = RTCRtpSender.getCapabilities(transceiver.kind).codecs
    preferred = [c for c in caps if c.mimeType.lower() == mime.lower()]
    rest = [c for c in caps if c.mimeType.lower() != mime.lower() and not c.mimeType.lower().endswith("/rtx")]
    rtx = [c for c in caps if c.mimeType.lower().endswith("/rtx")]
    transceiver.setCodecPreferences(preferred + rest + rtx)


async def _exchange(base_url: str, path: str, token: str, pc: RTCPeerConnection) -> PeerSession:
    await pc.setLocalDescription(await pc.createOffer())
    posted = time.monotonic()
    async with aiohttp.ClientSession() as http:
        async with http.post(
            base_url.rstrip("/") + path,
            data=pc.localDescription.sdp,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {token}"},
        ) as resp:
            text = await resp.text()
            if resp.status != 201:
                await pc.close()
                raise SignallingFailed(resp.status, text, dict(resp.headers))
            location = resp.headers["Location"]
    session = PeerSession(pc=pc, resource=base_url.rstrip("/") + location, token=token, posted_at=posted,
                          answered_at=time.monotonic())

    @pc.on("connectionstatechange")
    def on_state() -> None:
        if pc.connectionState == "connected":
            session.connected.set()

    await pc.setRemoteDescription(RTCSessionDescription(sdp=text, type="answer"))
    return session


async def publish(base_url: str, room: str, token: str, tracks: list[MediaStreamTrack],
                  video_codec: str = "video/H264") -> PeerSession:
    """Publish ``tracks`` over WHIP as a teacher."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for track in tracks:
        transceiver = pc.addTransceiver(track, direction="sendonly")
        if track.kind == "video":
            _prefer(transceiver, video_codec)
    return await _exchange(base_url, f"/whip/{room}", token, pc)


async def watch(base_url: str, room: str, token: str,
                on_track: Optional[Callable[[MediaStreamTrack], None]] = None,
                kinds: tuple[str, ...] = ("audio", "video")) -> PeerSession:
    """Watch ``room`` over WHEP as a student; ``on_track`` gets each decoded track."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    for kind in kinds:
        pc.addTransceiver(kind, direction="recvonly")
    if on_track is not None:
        pc.on("track", on_track)
    return await _exchange(base_url, f"/whep/{room}", token, pc)


# --- known content -----------------------------------------------------------------

GRID_COLS, GRID_ROWS = 4, 4
INDEX_BITS = 12  # 16 blocks: 12 bits of frame index + 4 bits of check


def _check_bits(index: int) -> int:
    return (index * 7 + 3) % 16


def encode_index_frame(index: int, width: int, height: int) -> np.ndarray:
    """A grey frame whose 4×4 blocks spell ``index`` and a check nibble, readable after lossy coding."""
    value = (index & 0xFFF) | (_check_bits(index & 0xFFF) << INDEX_BITS)
    img = np.full((height, width), 16, dtype=np.uint8)
    bw, bh = width // GRID_COLS, height // GRID_ROWS
    for bit in range(GRID_COLS * GRID_ROWS):
        if value >> bit & 1:
            r, c = divmod(bit, GRID_COLS)
            img[r * bh:(r + 1) * bh, c * bw:(c + 1) * bw] = 235
    return img


def decode_index_frame(luma: np.ndarray) -> Optional[int]:
    """The index spelled by a frame from :func:`encode_index_frame`, or None if the check fails."""
    height, width = luma.shape
    bw, bh = width // GRID_COLS, height // GRID_ROWS
    value = 0
    for bit in range(GRID_COLS * GRID_ROWS):
        r, c = divmod(bit, GRID_COLS)
        block = luma[r * bh + bh // 4:(r + 1) * bh - bh // 4, c * bw + bw // 4:(c + 1) * bw - bw // 4]
        if block.mean() > 128:
            value |= 1 << bit
    index = value & 0xFFF
    if value >> INDEX_BITS != _check_bits(index):
        return None
    return index


class IndexedVideoTrack(VideoStreamTrack):
    """Video whose every frame carries its own index: tests check students see the teacher's frames."""

    def __init__(self, width: int = 320, height: int = 240, fps: int = 15, start: int = 0) -> None:
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self.index = start
        self.sent: list[int] = []
        self._start: Optional[float] = None
        self._count = 0

    async def recv(self) -> av.VideoFrame:
        if self._start is None:
            self._start = time.monotonic()
        target = self._start + self._count / self.fps
        delay = target - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        luma = encode_index_frame(self.index, self.width, self.height)
        yuv = np.concatenate([luma, np.full((self.height // 2, self.width), 128, dtype=np.uint8)])
        frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
        frame.pts = self._count * (90000 // self.fps)
        frame.time_base = fractions.Fraction(1, 90000)
        self.sent.append(self.index)
        self.index = (self.index + 1) & 0xFFF
        self._count += 1
        return frame


class ToneAudioTrack(MediaStreamTrack):
    """A continuous sine tone in 20 ms Opus-sized frames."""

    kind = "audio"

    def __init__(self, frequency: float = 440.0, rate: int = 48000) -> None:
        super().__init__()
        self.frequency, self.rate = frequency, rate
        self._samples = 0
        self._start: Optional[float] = None

    async def recv(self) -> av.AudioFrame:
        if self._start is None:
            self._start = time.monotonic()
        n = self.rate // 50
        delay = self._start + self._samples / self.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        t = (np.arange(n) + self._samples) / self.rate
        pcm = (np.sin(2 * math.pi * self.frequency * t) * 8000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = self.rate
        frame.pts = self._samples
        frame.time_base = fractions.Fraction(1, self.rate)
        self._samples += n
        return frame


class FrameChecker:
    """Consumes a student's decoded video track and records the indices it saw."""

    def __init__(self, track: MediaStreamTrack) -> None:
        self.indices: list[int] = []
        self.bad_frames = 0
        self.first_frame_at: Optional[float] = None
        self._task = asyncio.ensure_future(self._run(track))

    async def _run(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                if self.first_frame_at is None:
                    self.first_frame_at = time.monotonic()
                luma = frame.to_ndarray(format="gray")
                index = decode_index_frame(luma)
                if index is None:
                    self.bad_frames += 1
                else:
                    self.indices.append(index)
        except Exception:
            return

    async def wait_frames(self, count: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while len(self.indices) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return len(self.indices) >= count

    def stop(self) -> None:
        self._task.cancel()

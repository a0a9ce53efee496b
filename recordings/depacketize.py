"""RTP payloads back into the codec's access units: H.264 (RFC 6184), VP8 (RFC 7741), Opus (RFC 7587).

Runs on the recorder's writer thread, never on the live path. Loss policy: a video frame
that lost a packet is dropped, and so is every frame after it until the next key frame,
because those would decode with artefacts. The file stays clean and the picture holds
instead (a "skipped frame"). Audio just loses the packet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .bitstream import (
    NAL_AUD, NAL_FILLER, NAL_IDR, NAL_PPS, NAL_SPS, avc_codec_string, avcc_record, opus_head,
    opus_packet_samples, parse_sps, vp8_frame_size,
)


@dataclass(frozen=True)
class TrackConfig:
    """What a track header needs: equal configs share an init segment, a change makes a new one."""

    kind: str  # "video" | "audio"
    codec: str  # "h264" | "vp8" | "opus"
    timescale: int
    codec_string: str
    private: bytes = b""  # avcC for H.264, OpusHead for Opus (WebM), empty for VP8
    width: int = 0
    height: int = 0
    channels: int = 0


@dataclass(slots=True)
class Sample:
    """One access unit in RTP time (unwrapped); the writer turns ``ext_ts`` into media time."""

    kind: str
    ext_ts: int
    data: bytes
    keyframe: bool
    config: Optional[TrackConfig]
    samples: int = 0  # audio: decoded length in samples (for the last sample of a segment)


OPUS_CONFIG = TrackConfig("audio", "opus", 48000, "opus", opus_head(2), channels=2)


class Unwrapper:
    """Extends a wrapping counter (16-bit sequence numbers, 32-bit timestamps) to a monotonic int."""

    __slots__ = ("bits", "_half", "_mask", "last")

    def __init__(self, bits: int) -> None:
        self.bits = bits
        self._half = 1 << (bits - 1)
        self._mask = (1 << bits) - 1
        self.last: Optional[int] = None

    def __call__(self, value: int) -> int:
        if self.last is None:
            self.last = value + (1 << self.bits)  # headroom for values just before the first
            return self.last
        delta = ((value - self.last + self._half) & self._mask) - self._half
        ext = self.last + delta
        if delta > 0:
            self.last = ext
        return ext


class H264Depacketizer:
    """Single NAL unit, STAP-A and FU-A packets → access units with length-prefixed NAL units."""

    kind = "video"

    def __init__(self) -> None:
        self._nals: list[bytes] = []
        self._ts: Optional[int] = None
        self._fu: Optional[bytearray] = None
        self._broken = False
        self._need_idr = True
        self._sps: Optional[bytes] = None
        self._pps: Optional[bytes] = None
        self._configs: dict[tuple[bytes, bytes], TrackConfig] = {}
        self.dropped_frames = 0

    def lost(self) -> None:
        """Packets were lost before the next one pushed: the frame in progress is damaged."""
        self._broken = True
        self._fu = None

    def push(self, ext_ts: int, marker: int, payload: bytes) -> list[Sample]:
        out: list[Sample] = []
        if self._ts is not None and ext_ts != self._ts:
            # The previous frame never saw its marker: finish it (damaged if a loss hit it).
            self._finish(out)
        self._ts = ext_ts
        self._add(payload)
        if marker:
            self._finish(out)
        return out

    def flush(self) -> list[Sample]:
        out: list[Sample] = []
        if self._nals or self._broken:
            self._finish(out)
        return out

    def _add(self, payload: bytes) -> None:
        if not payload:
            return
        nal_type = payload[0] & 0x1F
        if 1 <= nal_type <= 23:
            self._fu = None
            self._nals.append(payload)
        elif nal_type == 24:  # STAP-A
            pos, n = 1, len(payload)
            while pos + 2 <= n:
                size = (payload[pos] << 8) | payload[pos + 1]
                pos += 2
                if size == 0 or pos + size > n:
                    self._broken = True
                    break
                self._nals.append(payload[pos:pos + size])
                pos += size
        elif nal_type == 28 and len(payload) > 2:  # FU-A
            header = payload[1]
            if header & 0x80:  # start
                self._fu = bytearray([(payload[0] & 0xE0) | (header & 0x1F)])
                self._fu += payload[2:]
            elif self._fu is None:
                self._broken = True  # a middle or end without its start
                return
            else:
                self._fu += payload[2:]
            if header & 0x40:  # end
                self._nals.append(bytes(self._fu))
                self._fu = None
        else:
            # STAP-B, MTAP, FU-B only exist in interleaved mode, which WebRTC does not negotiate.
            self._broken = True

    def _finish(self, out: list[Sample]) -> None:
        nals, broken, ts = self._nals, self._broken or self._fu is not None, self._ts
        self._nals, self._broken, self._fu = [], False, None
        if not nals and not broken:
            return
        if broken:
            self._need_idr = True
            self.dropped_frames += 1
            return
        is_idr = False
        sps = pps = None
        parts = []
        for nal in nals:
            t = nal[0] & 0x1F
            if t == NAL_IDR:
                is_idr = True
            elif t == NAL_SPS:
                sps = nal
            elif t == NAL_PPS:
                pps = nal
            elif t in (NAL_AUD, NAL_FILLER):
                continue
            parts.append(len(nal).to_bytes(4, "big"))
            parts.append(nal)
        if sps is not None:
            self._sps = sps
        if pps is not None:
            self._pps = pps
        config = None
        if is_idr:
            if self._sps is None or self._pps is None:
                self._need_idr = True  # cannot describe the stream yet
                self.dropped_frames += 1
                return
            config = self._config(self._sps, self._pps)
            if config is None:
                self._need_idr = True
                self.dropped_frames += 1
                return
            self._need_idr = False
        elif self._need_idr:
            self.dropped_frames += 1
            return
        if not parts or ts is None:
            return
        out.append(Sample("video", ts, b"".join(parts), is_idr, config))

    def _config(self, sps: bytes, pps: bytes) -> Optional[TrackConfig]:
        key = (sps, pps)
        config = self._configs.get(key)
        if config is None:
            try:
                info = parse_sps(sps)
                private = avcc_record(sps, pps)
            except (IndexError, ValueError):
                return None
            config = TrackConfig("video", "h264", 90000, avc_codec_string(sps), private, info.width, info.height)
            self._configs[key] = config
        return config


class VP8Depacketizer:
    """RFC 7741 payloads → whole VP8 frames (the payload descriptor stripped)."""

    kind = "video"

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ts: Optional[int] = None
        self._started = False
        self._broken = False
        self._need_key = True
        self._config: Optional[TrackConfig] = None
        self.dropped_frames = 0

    def lost(self) -> None:
        self._broken = True

    def push(self, ext_ts: int, marker: int, payload: bytes) -> list[Sample]:
        out: list[Sample] = []
        if self._ts is not None and ext_ts != self._ts and (self._parts or self._broken):
            self._finish(out)
        self._ts = ext_ts
        body, start = self._strip(payload)
        if body is None:
            self._broken = True
        elif start:
            if self._parts:
                self._broken = True  # a second start for one timestamp: give up on this frame
            self._parts = [body]
            self._started = True
        elif self._started:
            self._parts.append(body)
        else:
            self._broken = True
        if marker:
            self._finish(out)
        return out

    def flush(self) -> list[Sample]:
        out: list[Sample] = []
        if self._parts or self._broken:
            self._finish(out)
        return out

    @staticmethod
    def _strip(payload: bytes) -> tuple[Optional[bytes], bool]:
        """The VP8 payload without its descriptor, and whether it starts partition 0."""
        if not payload:
            return None, False
        first = payload[0]
        pos = 1
        if first & 0x80:
            if len(payload) < 2:
                return None, False
            ext = payload[1]
            pos = 2
            if ext & 0x80:
                if len(payload) <= pos:
                    return None, False
                pos += 2 if payload[pos] & 0x80 else 1
            if ext & 0x40:
                pos += 1
            if ext & 0x30:
                pos += 1
        if pos > len(payload):
            return None, False
        return payload[pos:], bool(first & 0x10) and (first & 0x07) == 0

    def _finish(self, out: list[Sample]) -> None:
        parts, broken, ts = self._parts, self._broken, self._ts
        self._parts, self._broken, self._started = [], False, False
        if broken or not parts or ts is None:
            self._need_key = True
            self.dropped_frames += 1 if (broken or parts) else 0
            return
        frame = b"".join(parts)
        size = vp8_frame_size(frame)
        key = size is not None
        if key:
            width, height = size  # type: ignore[misc]
            if self._config is None or (self._config.width, self._config.height) != (width, height):
                self._config = TrackConfig("video", "vp8", 90000, "vp8", b"", width, height)
            self._need_key = False
        elif self._need_key:
            self.dropped_frames += 1
            return
        out.append(Sample("video", ts, frame, key, self._config if key else None))


class OpusDepacketizer:
    """One Opus packet per RTP payload (RFC 7587): nothing to reassemble."""

    kind = "audio"
    dropped_frames = 0

    def lost(self) -> None:
        pass

    def push(self, ext_ts: int, marker: int, payload: bytes) -> list[Sample]:
        if not payload:
            return []
        return [Sample("audio", ext_ts, payload, True, OPUS_CONFIG, opus_packet_samples(payload))]

    def flush(self) -> list[Sample]:
        return []


def depacketizer_for(mime_type: str):
    """The depacketizer for a negotiated codec, or None if we cannot record it."""
    mime = mime_type.lower()
    if mime == "video/h264":
        return H264Depacketizer()
    if mime == "video/vp8":
        return VP8Depacketizer()
    if mime == "audio/opus":
        return OpusDepacketizer()
    return None

"""RTP arithmetic and codec-specific peeks that forwarding needs (no depacketization)."""

from __future__ import annotations

import struct

RTP_VERSION_BYTE = 0x80  # V=2, no padding, no extension, no CSRC: forwarded headers are minimal
_HEADER = struct.Struct("!BBHII")


def seq_add(a: int, b: int) -> int:
    return (a + b) & 0xFFFF


def seq_gt(a: int, b: int) -> bool:
    """RFC 3550 serial-number comparison for 16-bit sequence numbers."""
    return a != b and ((a - b) & 0xFFFF) < 0x8000


def ts_add(a: int, b: int) -> int:
    return (a + b) & 0xFFFFFFFF


def build_header(marker: int, payload_type: int, seq: int, ts: int, ssrc: int) -> bytes:
    """A 12-byte RTP header. Forwarded packets carry no header extensions: students route
    by the SSRC signalled in the answer, and the teacher's extension ids mean nothing to them."""
    return _HEADER.pack(RTP_VERSION_BYTE, (marker << 7) | payload_type, seq, ts, ssrc)


def h264_is_keyframe(payload: bytes) -> bool:
    """True if this RTP payload (RFC 6184) starts or carries an IDR picture or an SPS.

    A student may start decoding at such a packet: encoders send SPS/PPS right before
    the IDR slice, so the first of them in a frame is where a clean join begins.
    """
    if not payload:
        return False
    nal_type = payload[0] & 0x1F
    if nal_type in (5, 7):
        return True
    if nal_type == 24:  # STAP-A: walk the aggregated NAL units
        pos = 1
        n = len(payload)
        while pos + 2 < n:
            size = (payload[pos] << 8) | payload[pos + 1]
            if size == 0:
                break
            if payload[pos + 2] & 0x1F in (5, 7):
                return True
            pos += 2 + size
        return False
    if nal_type in (28, 29) and len(payload) > 1:  # FU-A/FU-B: start fragment of an IDR
        return bool(payload[1] & 0x80) and (payload[1] & 0x1F) == 5
    return False


def vp8_is_keyframe(payload: bytes) -> bool:
    """True if this RTP payload (RFC 7741) is the first packet of a VP8 key frame."""
    if not payload:
        return False
    first = payload[0]
    if not first & 0x10:  # S: start of a partition
        return False
    if first & 0x07:  # PID must be 0: the first partition
        return False
    pos = 1
    if first & 0x80:  # X: extended control bits
        if len(payload) < 2:
            return False
        ext = payload[1]
        pos = 2
        if ext & 0x80:  # I: picture id
            if len(payload) <= pos:
                return False
            pos += 2 if payload[pos] & 0x80 else 1
        if ext & 0x40:  # L: TL0PICIDX
            pos += 1
        if ext & 0x30:  # T or K: TID/KEYIDX byte
            pos += 1
    if len(payload) <= pos:
        return False
    return not (payload[pos] & 0x01)  # P bit 0 in the VP8 payload header: key frame


def keyframe_detector(mime_type: str):
    """The keyframe peek for a codec, or None for audio and unknown codecs."""
    mime = mime_type.lower()
    if mime == "video/h264":
        return h264_is_keyframe
    if mime == "video/vp8":
        return vp8_is_keyframe
    return None

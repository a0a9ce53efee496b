"""WebM segments for VP8 lessons, in the shape Media Source Extensions expects.

VP8 has no MP4 binding that browsers accept (Chromium's MSE refuses ``video/mp4; codecs=vp08``),
so a VP8 lesson is written as the WebM byte stream format: an init segment (EBML header, a
``Segment`` of unknown size, ``Info`` and ``Tracks``) plus one ``Cluster`` per media segment.
``init + clusters`` concatenated is a playable WebM file, and each cluster can be appended to a
``video/webm; codecs="vp8,opus"`` SourceBuffer on its own.
"""

from __future__ import annotations

import struct
from typing import Iterable, Optional

from .depacketize import TrackConfig

TIMESCALE_NS = 1_000_000  # block timestamps in milliseconds
MAX_CLUSTER_SPAN_MS = 30_000  # a block's int16 offset from its cluster must stay below 32767 ms


def _vint_size(n: int) -> bytes:
    for length in range(1, 9):
        if n < (1 << (7 * length)) - 1:
            return (n | (1 << (7 * length))).to_bytes(length, "big")
    raise ValueError("element too large")


def element(eid: int, payload: bytes) -> bytes:
    return eid.to_bytes((eid.bit_length() + 7) // 8, "big") + _vint_size(len(payload)) + payload


def uint(eid: int, value: int) -> bytes:
    return element(eid, value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def string(eid: int, value: str) -> bytes:
    return element(eid, value.encode())


def _track_number(kind: str) -> int:
    return 1 if kind == "video" else 2


def init_segment(configs: Iterable[TrackConfig]) -> bytes:
    ebml = element(0x1A45DFA3, b"".join([
        uint(0x4286, 1), uint(0x42F7, 1), uint(0x42F2, 4), uint(0x42F3, 8),
        string(0x4282, "webm"), uint(0x4287, 4), uint(0x4285, 2),
    ]))
    info = element(0x1549A966, uint(0x2AD7B1, TIMESCALE_NS) + string(0x4D80, "skyclass") + string(0x5741, "skyclass"))
    entries = []
    for config in sorted(configs, key=lambda c: _track_number(c.kind)):
        number = _track_number(config.kind)
        fields = [uint(0xD7, number), uint(0x73C5, number), uint(0x9C, 0)]
        if config.kind == "video":
            fields += [uint(0x83, 1), string(0x86, "V_VP8"),
                       element(0xE0, uint(0xB0, config.width) + uint(0xBA, config.height))]
        else:
            fields += [uint(0x83, 2), string(0x86, "A_OPUS"), element(0x63A2, config.private),
                       uint(0x56BB, 80_000_000),  # SeekPreRoll: 80 ms, as RFC 7845 advises
                       element(0xE1, element(0xB5, struct.pack(">d", float(config.timescale)))
                               + uint(0x9F, config.channels))]
        entries.append(element(0xAE, b"".join(fields)))
    tracks = element(0x1654AE6B, b"".join(entries))
    segment_header = bytes.fromhex("18538067") + b"\x01\xff\xff\xff\xff\xff\xff\xff"  # unknown size
    return ebml + segment_header + info + tracks


def media_segment(blocks: list[tuple[int, str, bool, bytes]]) -> bytes:
    """Clusters for ``blocks`` = (time in ms, kind, keyframe, frame) sorted by time."""
    out = []
    i = 0
    while i < len(blocks):
        base = blocks[i][0]
        body = [uint(0xE7, base)]
        while i < len(blocks) and blocks[i][0] - base < MAX_CLUSTER_SPAN_MS:
            ms, kind, key, frame = blocks[i]
            header = bytes([0x80 | _track_number(kind)]) + struct.pack(">hB", ms - base, 0x80 if key else 0)
            body.append(element(0xA3, header + frame))
            i += 1
        out.append(element(0x1F43B675, b"".join(body)))
    return b"".join(out)


def _read_vint(data: bytes, pos: int, keep_marker: bool) -> tuple[int, int]:
    first = data[pos]
    length = 1
    while length <= 8 and not first & (0x80 >> (length - 1)):
        length += 1
    if length > 8 or pos + length > len(data):
        raise ValueError("bad vint")
    value = int.from_bytes(data[pos:pos + length], "big")
    if not keep_marker:
        value &= (1 << (7 * length)) - 1
    return value, pos + length


def read_segment_timing(data: bytes) -> Optional[tuple[int, int]]:
    """(first, last) block time in ms of a media segment, or None unless it is whole clusters."""
    pos = 0
    first: Optional[int] = None
    last: Optional[int] = None
    try:
        while pos < len(data):
            eid, pos = _read_vint(data, pos, True)
            size, pos = _read_vint(data, pos, False)
            end = pos + size
            if eid != 0x1F43B675 or end > len(data):
                return None
            base = 0
            inner = pos
            while inner < end:
                cid, inner = _read_vint(data, inner, True)
                csize, inner = _read_vint(data, inner, False)
                if cid == 0xE7:
                    base = int.from_bytes(data[inner:inner + csize], "big")
                elif cid == 0xA3:
                    _, p = _read_vint(data, inner, False)
                    t = base + struct.unpack_from(">h", data, p)[0]
                    first = t if first is None else min(first, t)
                    last = t if last is None else max(last, t)
                inner += csize
            pos = end
    except (ValueError, IndexError, struct.error):
        return None
    if first is None or last is None:
        return None
    return first, last

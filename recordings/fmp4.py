"""Fragmented MP4 (ISO/IEC 14496-12) for HLS: an init segment per codec configuration, and one
``moof``+``mdat`` fragment per media segment. Written by hand rather than through libavformat
so that every segment is a separate, complete file the moment it is renamed into place (crash
safety), timestamps are exactly the ones we computed, and a segment costs a few struct packs.

Also a small reader (:func:`read_fragment_timing`) that recovers a segment's timing from its
``moof``, used to repair a recording after a crash.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterable, Optional

from .depacketize import TrackConfig

MOVIE_TIMESCALE = 1000
VIDEO_TRACK_ID = 1
AUDIO_TRACK_ID = 2


def box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)


def track_id(kind: str) -> int:
    return VIDEO_TRACK_ID if kind == "video" else AUDIO_TRACK_ID


def _sample_entry(config: TrackConfig) -> bytes:
    if config.codec == "h264":
        return box(
            b"avc1",
            bytes(6), struct.pack(">H", 1),  # reserved, data_reference_index
            bytes(16),  # pre_defined, reserved
            struct.pack(">HHIIIH", config.width, config.height, 0x00480000, 0x00480000, 0, 1),
            bytes(32),  # compressorname
            struct.pack(">Hh", 0x0018, -1),
            box(b"avcC", config.private),
        )
    if config.codec == "vp8":
        # VP codec ISO media binding: vpcC v1 (profile 0, level 10, 8-bit 4:2:0, BT.709)
        vpcc = full_box(b"vpcC", 1, 0, bytes([0, 10, (8 << 4) | (1 << 1), 1, 1, 1]), struct.pack(">H", 0))
        return box(b"vp08", bytes(6), struct.pack(">H", 1), bytes(16),
                   struct.pack(">HHIIIH", config.width, config.height, 0x00480000, 0x00480000, 0, 1),
                   bytes(32), struct.pack(">Hh", 0x0018, -1), vpcc)
    if config.codec == "opus":
        # Opus in ISOBMFF (opus-codec.org/docs/opus_in_isobmff.html): dOps is big-endian.
        dops = box(b"dOps", bytes([0, config.channels]), struct.pack(">HIhB", 0, config.timescale, 0, 0))
        return box(
            b"Opus",
            bytes(6), struct.pack(">H", 1),
            bytes(8), struct.pack(">HHHH", config.channels, 16, 0, 0),
            struct.pack(">I", config.timescale << 16),
            dops,
        )
    raise ValueError(f"no MP4 sample entry for {config.codec}")


def _trak(config: TrackConfig) -> bytes:
    tid = track_id(config.kind)
    video = config.kind == "video"
    tkhd = full_box(
        b"tkhd", 0, 0x3,  # enabled, in movie
        struct.pack(">IIIII", 0, 0, tid, 0, 0),  # creation, modification, track_ID, reserved, duration
        bytes(8), struct.pack(">hhhH", 0, 0 if video else 1, 0x0100 if not video else 0, 0),
        _MATRIX,
        struct.pack(">II", (config.width << 16) if video else 0, (config.height << 16) if video else 0),
    )
    mdhd = full_box(b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, config.timescale, 0, 0x55C4, 0))  # 'und'
    handler = b"vide" if video else b"soun"
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, handler), bytes(12),
                    (b"skyclass video" if video else b"skyclass audio") + b"\x00")
    media_header = full_box(b"vmhd", 0, 1, bytes(8)) if video else full_box(b"smhd", 0, 0, bytes(4))
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, 0, struct.pack(">I", 1), _sample_entry(config)),
        full_box(b"stts", 0, 0, struct.pack(">I", 0)),
        full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
        full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
        full_box(b"stco", 0, 0, struct.pack(">I", 0)),
    )
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", media_header, dinf, stbl)))


def init_segment(configs: Iterable[TrackConfig]) -> bytes:
    """``ftyp`` + ``moov`` with an empty sample table per track and ``mvex`` (fragments follow)."""
    configs = sorted(configs, key=lambda c: track_id(c.kind))
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6iso5isommp41dash")
    mvhd = full_box(
        b"mvhd", 0, 0,
        struct.pack(">IIIIIH", 0, 0, MOVIE_TIMESCALE, 0, 0x00010000, 0x0100), bytes(10), _MATRIX, bytes(24),
        struct.pack(">I", AUDIO_TRACK_ID + 1),
    )
    trex = [full_box(b"trex", 0, 0, struct.pack(">IIIII", track_id(c.kind), 1, 0, 0, 0)) for c in configs]
    moov = box(b"moov", mvhd, *(_trak(c) for c in configs), box(b"mvex", *trex))
    return ftyp + moov


@dataclass
class TrackRun:
    """One track's samples in a fragment: decode times in the track's timescale."""

    kind: str
    base_dts: int
    durations: list[int]
    sizes: list[int]
    keyframes: list[bool]
    data: list[bytes]


_SYNC = 0x02000000  # sample_depends_on = 2 (independent)
_NON_SYNC = 0x01010000  # depends on others, is_non_sync_sample


def media_segment(sequence: int, runs: list[TrackRun]) -> bytes:
    """``moof`` + ``mdat`` for one segment; ``trun`` data offsets point into the ``mdat``."""
    runs = [r for r in runs if r.sizes]
    # The moof's size does not depend on the offsets, so build it twice: sizes first, then offsets.
    def build_moof(offsets: list[int]) -> bytes:
        trafs = []
        for run, offset in zip(runs, offsets):
            tfhd = full_box(b"tfhd", 0, 0x020000, struct.pack(">I", track_id(run.kind)))  # default-base-is-moof
            tfdt = full_box(b"tfdt", 1, 0, struct.pack(">Q", run.base_dts))
            flags = 0x000001 | 0x000100 | 0x000200 | 0x000400  # data offset, duration, size, flags
            entries = b"".join(
                struct.pack(">III", d, s, _SYNC if k else _NON_SYNC)
                for d, s, k in zip(run.durations, run.sizes, run.keyframes)
            )
            trun = full_box(b"trun", 0, flags, struct.pack(">Ii", len(run.sizes), offset), entries)
            trafs.append(box(b"traf", tfhd, tfdt, trun))
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)

    moof_size = len(build_moof([0] * len(runs)))
    offsets, pos = [], moof_size + 8
    for run in runs:
        offsets.append(pos)
        pos += sum(run.sizes)
    moof = build_moof(offsets)
    mdat_body = b"".join(b"".join(r.data) for r in runs)
    return moof + struct.pack(">I4s", 8 + len(mdat_body), b"mdat") + mdat_body


# --- reading back (crash repair) -------------------------------------------------------

def iter_boxes(data: bytes, start: int = 0, end: Optional[int] = None):
    """(type, payload start, box end) for each complete box in ``data[start:end]``."""
    end = len(data) if end is None else end
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:
            if pos + 16 > end:
                return
            size = struct.unpack_from(">Q", data, pos + 8)[0]
            header = 16
        if size < header or pos + size > end:
            return
        yield kind, pos + header, pos + size
        pos += size


@dataclass
class FragmentTiming:
    """What a repair needs from a segment: per track (first decode time, total duration)."""

    tracks: dict[int, tuple[int, int]]
    complete: bool


def read_fragment_timing(data: bytes) -> Optional[FragmentTiming]:
    """Timing of a ``moof``+``mdat`` segment, or None if it is not a whole, valid fragment."""
    tracks: dict[int, tuple[int, int]] = {}
    saw_moof = saw_mdat = False
    total = 0
    for kind, body, end in iter_boxes(data):
        total = end
        if kind == b"moof":
            saw_moof = True
            for tkind, tbody, tend in iter_boxes(data, body, end):
                if tkind != b"traf":
                    continue
                tid, base, duration = None, 0, 0
                for bkind, bbody, bend in iter_boxes(data, tbody, tend):
                    version = data[bbody]
                    flags = int.from_bytes(data[bbody + 1:bbody + 4], "big")
                    if bkind == b"tfhd":
                        tid = struct.unpack_from(">I", data, bbody + 4)[0]
                    elif bkind == b"tfdt":
                        base = struct.unpack_from(">Q" if version == 1 else ">I", data, bbody + 4)[0]
                    elif bkind == b"trun":
                        count = struct.unpack_from(">I", data, bbody + 4)[0]
                        pos = bbody + 8 + (4 if flags & 0x1 else 0) + (4 if flags & 0x4 else 0)
                        per = 4 * sum(1 for bit in (0x100, 0x200, 0x400, 0x800) if flags & bit)
                        if not flags & 0x100 or pos + per * count > bend:
                            return None
                        for i in range(count):
                            duration += struct.unpack_from(">I", data, pos + i * per)[0]
                if tid is not None:
                    tracks[tid] = (base, duration)
        elif kind == b"mdat":
            saw_mdat = True
    if not (saw_moof and saw_mdat) or total != len(data):
        return None
    return FragmentTiming(tracks, True)

"""Codec facts the recorder needs from the teacher's own bitstream (never from an encoder's template).

An MP4/WebM track header must describe the stream it carries: H.264 needs an ``avcC``
built from the stream's SPS/PPS and the picture size from the SPS; VP8 the size from its
key frame header; Opus the frame duration from its TOC byte. Opening an encoder to get
these (``add_stream("h264")`` in PyAV) would describe libx264's template instead
(aiortc-notes.md, "Recording encoded packets with PyAV").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# H.264 NAL unit types (ITU-T H.264 table 7-1)
NAL_SLICE = 1
NAL_IDR = 5
NAL_SEI = 6
NAL_SPS = 7
NAL_PPS = 8
NAL_AUD = 9
NAL_FILLER = 12

_HIGH_PROFILES = {100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135}


def unescape_rbsp(nal: bytes) -> bytes:
    """Strip emulation-prevention bytes (00 00 03 → 00 00) so the SPS can be bit-parsed."""
    if b"\x00\x00\x03" not in nal:
        return nal
    out = bytearray()
    zeros = 0
    for byte in nal:
        if zeros >= 2 and byte == 3:
            zeros = 0
            continue
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


class BitReader:
    """MSB-first bit reader with Exp-Golomb codes, enough for an SPS."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            byte = self.data[self.pos >> 3]
            value = (value << 1) | ((byte >> (7 - (self.pos & 7))) & 1)
            self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
            if zeros > 31:
                raise ValueError("bad Exp-Golomb code")
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k & 1 else -(k // 2)


@dataclass(frozen=True)
class SpsInfo:
    profile_idc: int
    constraint_flags: int
    level_idc: int
    width: int
    height: int
    chroma_format_idc: int = 1
    bit_depth_luma: int = 8
    bit_depth_chroma: int = 8


def _skip_scaling_list(r: BitReader, size: int) -> None:
    last = next_ = 8
    for _ in range(size):
        if next_ != 0:
            next_ = (last + r.se() + 256) % 256
        last = last if next_ == 0 else next_


def parse_sps(sps: bytes) -> SpsInfo:
    """Profile, level and the cropped picture size from an SPS NAL unit (header byte included)."""
    r = BitReader(unescape_rbsp(sps[1:]))
    profile = r.u(8)
    constraints = r.u(8)
    level = r.u(8)
    r.ue()  # seq_parameter_set_id
    chroma, depth_luma, depth_chroma, separate_planes = 1, 8, 8, 0
    if profile in _HIGH_PROFILES:
        chroma = r.ue()
        if chroma == 3:
            separate_planes = r.u(1)
        depth_luma = r.ue() + 8
        depth_chroma = r.ue() + 8
        r.u(1)  # qpprime_y_zero_transform_bypass_flag
        if r.u(1):  # seq_scaling_matrix_present_flag
            for i in range(8 if chroma != 3 else 12):
                if r.u(1):
                    _skip_scaling_list(r, 16 if i < 6 else 64)
    r.ue()  # log2_max_frame_num_minus4
    poc_type = r.ue()
    if poc_type == 0:
        r.ue()
    elif poc_type == 1:
        r.u(1)
        r.se()
        r.se()
        for _ in range(r.ue()):
            r.se()
    r.ue()  # max_num_ref_frames
    r.u(1)  # gaps_in_frame_num_value_allowed_flag
    width_mbs = r.ue() + 1
    height_units = r.ue() + 1
    frame_mbs_only = r.u(1)
    if not frame_mbs_only:
        r.u(1)
    r.u(1)  # direct_8x8_inference_flag
    crop = (0, 0, 0, 0)
    if r.u(1):
        crop = (r.ue(), r.ue(), r.ue(), r.ue())
    if chroma == 0 or separate_planes:
        unit_x, unit_y = 1, 2 - frame_mbs_only
    else:
        unit_x = 1 if chroma == 3 else 2
        unit_y = (2 if chroma == 1 else 1) * (2 - frame_mbs_only)
    width = width_mbs * 16 - unit_x * (crop[0] + crop[1])
    height = (2 - frame_mbs_only) * height_units * 16 - unit_y * (crop[2] + crop[3])
    return SpsInfo(profile, constraints, level, width, height, chroma, depth_luma, depth_chroma)


def avcc_record(sps: bytes, pps: bytes) -> bytes:
    """AVCDecoderConfigurationRecord (ISO/IEC 14496-15 §5.3.3.1) from the stream's own SPS and PPS."""
    info = parse_sps(sps)
    out = bytearray([1, sps[1], sps[2], sps[3], 0xFF, 0xE1])  # 4-byte NAL lengths, one SPS
    out += len(sps).to_bytes(2, "big") + sps
    out += bytes([1]) + len(pps).to_bytes(2, "big") + pps
    if info.profile_idc in _HIGH_PROFILES:
        out += bytes([0xFC | info.chroma_format_idc, 0xF8 | (info.bit_depth_luma - 8),
                      0xF8 | (info.bit_depth_chroma - 8), 0])
    return bytes(out)


def avc_codec_string(sps: bytes) -> str:
    """RFC 6381 codec string for HLS/MSE, e.g. ``avc1.42e01f``."""
    return f"avc1.{sps[1]:02x}{sps[2]:02x}{sps[3]:02x}"


def vp8_frame_size(frame: bytes) -> Optional[tuple[int, int]]:
    """Width and height from a VP8 key frame (RFC 6386 §9.1), None for an inter frame."""
    if len(frame) < 10 or frame[0] & 0x01 or frame[3:6] != b"\x9d\x01\x2a":
        return None
    width = int.from_bytes(frame[6:8], "little") & 0x3FFF
    height = int.from_bytes(frame[8:10], "little") & 0x3FFF
    return width, height


_SILK_MS = (10, 20, 40, 60)
_CELT_US = (2500, 5000, 10000, 20000)


def opus_packet_samples(packet: bytes, rate: int = 48000) -> int:
    """Samples (at ``rate``) an Opus packet decodes to, from its TOC byte (RFC 6716 §3.1)."""
    if not packet:
        return 0
    toc = packet[0]
    config = toc >> 3
    if config < 12:
        frame_us = _SILK_MS[config % 4] * 1000
    elif config < 16:
        frame_us = (10000, 20000)[config % 2]
    else:
        frame_us = _CELT_US[config % 4]
    code = toc & 3
    if code == 0:
        frames = 1
    elif code in (1, 2):
        frames = 2
    else:
        frames = packet[1] & 0x3F if len(packet) > 1 else 1
    return frames * frame_us * rate // 1_000_000


def opus_head(channels: int = 2, pre_skip: int = 0, rate: int = 48000) -> bytes:
    """The OpusHead identification header (RFC 7845 §5.1): WebM's CodecPrivate for Opus."""
    return (b"OpusHead" + bytes([1, channels]) + pre_skip.to_bytes(2, "little")
            + rate.to_bytes(4, "little") + (0).to_bytes(2, "little") + bytes([0]))

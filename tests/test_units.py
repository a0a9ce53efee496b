"""Unit tests of the pure pieces: RTP arithmetic and keyframe peeks, the packet cache, the
keyframe-request aggregator, tokens and configuration. No server, no network."""

from __future__ import annotations

import asyncio
import fractions
import struct
import time
from pathlib import Path

import av
import jwt
import numpy as np
import pytest
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.vpx import Vp8Encoder, VpxPayloadDescriptor

from skyclass.media.keyframe import KeyframeRequester
from skyclass.media.packetcache import CachedPacket, PacketCache
from skyclass.media.rtp import (
    build_header,
    h264_is_keyframe,
    keyframe_detector,
    seq_add,
    seq_gt,
    ts_add,
    vp8_is_keyframe,
)
from skyclass.server import cli
from skyclass.server.config import Config, add_serve_arguments, config_from_args
from skyclass.server.tokens import (
    ROLE_GRANTS,
    Claims,
    TokenError,
    issue_token,
    parse_ttl,
    verify_token,
)

SECRET = "unit-secret-0123456789abcdef0123456789"


# --- RTP arithmetic ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "a, b, expected",
    [
        (1, 0, True),
        (0, 1, False),
        (5, 5, False),
        (0, 0xFFFF, True),  # wrapped: 0 comes right after 65535
        (0xFFFF, 0, False),
        (10, 0xFFF0, True),  # 26 ahead across the wrap
        (0xFFF0, 10, False),
        (0x7FFF, 0, True),  # just under half the space ahead
        (0x8000, 0, False),  # half the space: not "greater"
        (0, 0x8000, False),
        (0, 0x8001, True),
    ],
)
def test_seq_gt_serial_arithmetic(a: int, b: int, expected: bool) -> None:
    assert seq_gt(a, b) is expected


def test_seq_and_ts_add_wrap() -> None:
    assert seq_add(0xFFFF, 1) == 0
    assert seq_add(0xFFF0, 0x20) == 0x10
    assert ts_add(0xFFFFFFFF, 2) == 1
    assert seq_gt(seq_add(0xFFFF, 1), 0xFFFF)


def test_build_header_is_minimal_rtp() -> None:
    header = build_header(1, 102, 0xBEEF, 0xDEADBEEF, 0x01020304)
    assert len(header) == 12
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", header)
    assert b0 == 0x80  # V=2, no padding/extension/CSRC
    assert b1 == 0x80 | 102
    assert (seq, ts, ssrc) == (0xBEEF, 0xDEADBEEF, 0x01020304)
    assert struct.unpack("!BBHII", build_header(0, 96, 1, 2, 3))[1] == 96


# --- H.264 keyframe peek (RFC 6184) ----------------------------------------------------------

def nal(nal_type: int, nri: int = 3, body: bytes = b"\x88\x84\x00") -> bytes:
    return bytes([(nri << 5) | nal_type]) + body


def stap_a(*units: bytes) -> bytes:
    out = bytes([(3 << 5) | 24])
    for unit in units:
        out += struct.pack("!H", len(unit)) + unit
    return out


def fu_a(nal_type: int, start: bool, end: bool = False, body: bytes = b"\x01\x02\x03") -> bytes:
    indicator = (3 << 5) | 28
    header = (0x80 if start else 0) | (0x40 if end else 0) | nal_type
    return bytes([indicator, header]) + body


def test_h264_single_nal_units() -> None:
    assert h264_is_keyframe(nal(5))  # IDR slice
    assert h264_is_keyframe(nal(7))  # SPS
    assert not h264_is_keyframe(nal(1))  # non-IDR slice
    assert not h264_is_keyframe(nal(8))  # PPS alone is not an entry point
    assert not h264_is_keyframe(nal(6))  # SEI
    assert not h264_is_keyframe(b"")


def test_h264_stap_a() -> None:
    sps, pps, sei, idr, slice_ = nal(7, body=b"\x42\xe0\x1f"), nal(8), nal(6), nal(5), nal(1)
    assert h264_is_keyframe(stap_a(sps, pps))
    assert h264_is_keyframe(stap_a(sei, sps, pps))  # SPS not first in the aggregate
    assert h264_is_keyframe(stap_a(sei, idr))
    assert not h264_is_keyframe(stap_a(sei, slice_))
    assert not h264_is_keyframe(stap_a(pps, sei))
    # a truncated aggregate must not raise
    assert not h264_is_keyframe(stap_a(sei)[:-1])
    assert not h264_is_keyframe(stap_a(sei) + b"\x00")
    assert not h264_is_keyframe(bytes([(3 << 5) | 24]))


def test_h264_fu_a() -> None:
    assert h264_is_keyframe(fu_a(5, start=True))  # first fragment of an IDR
    assert not h264_is_keyframe(fu_a(5, start=False))  # middle fragment of an IDR
    assert not h264_is_keyframe(fu_a(5, start=False, end=True))  # last fragment
    assert not h264_is_keyframe(fu_a(1, start=True))  # first fragment of a non-IDR slice
    assert not h264_is_keyframe(bytes([(3 << 5) | 28]))  # FU indicator without header


def _frames(count: int, width: int = 320, height: int = 240):
    for i in range(count):
        img = np.random.default_rng(i).integers(0, 255, size=(height * 3 // 2, width), dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(img, format="yuv420p")
        frame.pts = i * 3000
        frame.time_base = fractions.Fraction(1, 90000)
        yield frame


def test_h264_real_encoder_output() -> None:
    """aiortc's own H.264 packetizer: the first frame (IDR) starts with an entry point,
    later frames carry none, a forced keyframe does again."""
    encoder = H264Encoder()
    frames = list(_frames(6))
    first, _ = encoder.encode(frames[0])
    assert first and h264_is_keyframe(first[0])
    for frame in frames[1:5]:
        payloads, _ = encoder.encode(frame)
        assert payloads
        assert not any(h264_is_keyframe(p) for p in payloads)
    forced, _ = encoder.encode(frames[5], force_keyframe=True)
    assert h264_is_keyframe(forced[0])


# --- VP8 keyframe peek (RFC 7741) ---------------------------------------------------------------

VP8_KEY = bytes([0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A])  # frame tag with P=0, then start code
VP8_INTER = bytes([0x31, 0x02, 0x00])  # P=1


def vp8(descriptor: VpxPayloadDescriptor, frame: bytes) -> bytes:
    return bytes(descriptor) + frame


def test_vp8_without_extension() -> None:
    assert vp8(VpxPayloadDescriptor(1, 0), VP8_KEY)[0] == 0x10  # one-byte descriptor, S=1
    assert vp8_is_keyframe(vp8(VpxPayloadDescriptor(1, 0), VP8_KEY))
    assert not vp8_is_keyframe(vp8(VpxPayloadDescriptor(1, 0), VP8_INTER))
    assert not vp8_is_keyframe(vp8(VpxPayloadDescriptor(0, 0), VP8_KEY))  # continuation packet
    assert not vp8_is_keyframe(vp8(VpxPayloadDescriptor(1, 1), VP8_KEY))  # not the first partition


def test_vp8_with_picture_id() -> None:
    # 15-bit (extended) picture id: two bytes, M bit set
    long_id = VpxPayloadDescriptor(1, 0, picture_id=0x1234)
    assert len(bytes(long_id)) == 4
    assert vp8_is_keyframe(vp8(long_id, VP8_KEY))
    assert not vp8_is_keyframe(vp8(long_id, VP8_INTER))
    # 7-bit picture id: one byte (aiortc only writes 15-bit ones, browsers may send either)
    short_key = bytes([0x90, 0x80, 0x05]) + VP8_KEY
    short_inter = bytes([0x90, 0x80, 0x05]) + VP8_INTER
    assert vp8_is_keyframe(short_key)
    assert not vp8_is_keyframe(short_inter)
    # picture id whose low byte would look like an interframe if mis-skipped
    assert vp8_is_keyframe(bytes([0x90, 0x80, 0x80 | 0x12, 0x01]) + VP8_KEY)
    assert not vp8_is_keyframe(bytes([0x90, 0x80, 0x80 | 0x12, 0x00]) + VP8_INTER)


def test_vp8_with_all_extensions() -> None:
    full = VpxPayloadDescriptor(1, 0, picture_id=300, tl0picidx=7, tid=(1, 1), keyidx=3)
    assert len(bytes(full)) == 6
    assert vp8_is_keyframe(vp8(full, VP8_KEY))
    assert not vp8_is_keyframe(vp8(full, VP8_INTER))
    tl0_only = VpxPayloadDescriptor(1, 0, tl0picidx=1)
    assert vp8_is_keyframe(vp8(tl0_only, VP8_KEY))
    assert not vp8_is_keyframe(vp8(tl0_only, VP8_INTER))


def test_vp8_truncated_payloads_do_not_raise() -> None:
    assert not vp8_is_keyframe(b"")
    assert not vp8_is_keyframe(b"\x90")  # X set, no extension byte
    assert not vp8_is_keyframe(b"\x90\x80")  # I set, no picture id
    assert not vp8_is_keyframe(b"\x10")  # no VP8 payload header


def test_vp8_real_encoder_output() -> None:
    encoder = Vp8Encoder()
    frames = list(_frames(6))
    first, _ = encoder.encode(frames[0])
    assert vp8_is_keyframe(first[0])
    assert not any(vp8_is_keyframe(p) for p in first[1:])  # only the frame's first packet
    for frame in frames[1:5]:
        payloads, _ = encoder.encode(frame)
        assert not any(vp8_is_keyframe(p) for p in payloads)
    forced, _ = encoder.encode(frames[5], force_keyframe=True)
    assert vp8_is_keyframe(forced[0])


def test_keyframe_detector_by_mime() -> None:
    assert keyframe_detector("video/H264") is h264_is_keyframe
    assert keyframe_detector("VIDEO/vp8") is vp8_is_keyframe
    assert keyframe_detector("audio/opus") is None
    assert keyframe_detector("video/VP9") is None


# --- packet cache --------------------------------------------------------------------------

def pkt(seq: int, payload: bytes = b"x") -> CachedPacket:
    return CachedPacket(seq=seq, timestamp=seq * 3000, marker=seq & 1, payload=payload)


def test_packet_cache_put_get() -> None:
    cache = PacketCache(16)
    for seq in range(10):
        cache.put(pkt(seq, bytes([seq])))
    for seq in range(10):
        entry = cache.get(seq)
        assert entry is not None and entry.seq == seq and entry.payload == bytes([seq])
        assert entry.timestamp == seq * 3000 and entry.marker == seq & 1
    assert cache.get(10) is None  # never stored


def test_packet_cache_evicts_and_rejects_mismatched_seq() -> None:
    cache = PacketCache(16)
    for seq in range(40):
        cache.put(pkt(seq))
    assert all(cache.get(seq) is None for seq in range(24))  # overwritten slots
    assert all(cache.get(seq) is not None for seq in range(24, 40))
    # same slot, different sequence number: a stale entry must not be served
    assert cache.get(40 - 16 - 16) is None
    assert cache.get(39 + 16) is None


def test_packet_cache_across_sequence_wrap() -> None:
    cache = PacketCache(8)
    seqs = [(0xFFFC + i) & 0xFFFF for i in range(8)]  # 65532..65535, 0..3
    for seq in seqs:
        cache.put(pkt(seq))
    assert [cache.get(s).seq for s in seqs] == seqs  # type: ignore[union-attr]
    cache.put(pkt(4))  # evicts 65532 (same slot modulo 8)
    assert cache.get(0xFFFC) is None
    assert cache.get(4) is not None and cache.get(0xFFFD) is not None


@pytest.mark.parametrize("size", [3, 100, 513, 1000])
def test_packet_cache_size_must_be_power_of_two(size: int) -> None:
    with pytest.raises(ValueError):
        PacketCache(size)


def test_packet_cache_refuses_size_zero() -> None:
    with pytest.raises(ValueError):
        PacketCache(0)


@pytest.mark.parametrize("size", [1, 2, 64, 512, 4096])
def test_packet_cache_accepts_powers_of_two(size: int) -> None:
    cache = PacketCache(size)
    cache.put(pkt(size + 1))
    assert cache.get(size + 1) is not None


# --- keyframe request aggregation -------------------------------------------------------------

async def test_keyframe_requester_coalesces_a_storm() -> None:
    sent_at: list[float] = []
    requester = KeyframeRequester(lambda: sent_at.append(time.monotonic()), min_interval=0.5)
    start = time.monotonic()
    for _ in range(100):
        requester.request()
        await asyncio.sleep(0.002)
    storm_end = time.monotonic()
    assert storm_end - start < 0.5, "the storm took longer than the interval; test invalid on this machine"
    assert len(sent_at) == 1, "the first request must be sent immediately, the rest held back"
    assert sent_at[0] - start < 0.05
    assert requester.requested == 100
    await asyncio.sleep(0.5 - (time.monotonic() - sent_at[0]) + 0.4)
    # exactly one trailing request, not before the interval has passed
    assert len(sent_at) == 2, sent_at
    assert sent_at[1] - sent_at[0] >= 0.5 - 0.01
    assert requester.sent == 2
    # quiet for a full interval: the next request goes out at once
    await asyncio.sleep(0.55)
    before = len(sent_at)
    requester.request()
    assert len(sent_at) == before + 1
    requester.close()


async def test_keyframe_requester_single_request_has_no_trailer() -> None:
    sent: list[float] = []
    requester = KeyframeRequester(lambda: sent.append(time.monotonic()), min_interval=0.2)
    requester.request()
    await asyncio.sleep(0.4)
    assert len(sent) == 1


async def test_keyframe_requester_close_cancels_trailer() -> None:
    sent: list[float] = []
    requester = KeyframeRequester(lambda: sent.append(time.monotonic()), min_interval=0.2)
    requester.request()
    requester.request()
    requester.close()
    await asyncio.sleep(0.35)
    assert len(sent) == 1


# --- tokens ----------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["teacher", "assistant", "student", "ops"])
def test_token_round_trip(role: str) -> None:
    before = int(time.time())
    token = issue_token(SECRET, role, "maths-7b", "Ada Lovelace", 600, extra={"grade": 7})
    claims = verify_token(SECRET, token)
    assert claims.name == "Ada Lovelace" and claims.role == role and claims.room == "maths-7b"
    assert claims.grants == ROLE_GRANTS[role]
    assert before + 600 <= claims.expires_at <= int(time.time()) + 600
    assert claims.extra == {"grade": 7}


def test_grants_per_role() -> None:
    def claims(role: str) -> Claims:
        return verify_token(SECRET, issue_token(SECRET, role, "r1", "x"))

    teacher, student, assistant = claims("teacher"), claims("student"), claims("assistant")
    assert teacher.may("publish", "r1") and teacher.may("subscribe", "r1") and teacher.may("moderate", "r1")
    assert student.may("subscribe", "r1") and student.may("chat", "r1")
    assert not student.may("publish", "r1") and not student.may("moderate", "r1")
    assert assistant.may("moderate", "r1") and not assistant.may("publish", "r1")
    # a room's token is for that room only
    assert not teacher.may("publish", "r2") and not student.may("subscribe", "r2")


def test_narrowed_grants() -> None:
    token = issue_token(SECRET, "teacher", "r1", "x", grants=("subscribe",))
    claims = verify_token(SECRET, token)
    assert claims.grants == ("subscribe",)
    assert not claims.may("publish", "r1")


def test_wildcard_room() -> None:
    ops = verify_token(SECRET, issue_token(SECRET, "ops", "*", "night shift"))
    assert ops.may("subscribe", "any-room") and ops.may("moderate", "other-room")
    assert not ops.may("publish", "any-room")  # "*" widens the room, not the grants
    # "*" in the *asked* room is not a wildcard for a token bound to one room
    student = verify_token(SECRET, issue_token(SECRET, "student", "r1", "x"))
    assert not student.may("subscribe", "*")


def test_expired_token() -> None:
    token = issue_token(SECRET, "student", "r1", "x", ttl_seconds=-10)
    with pytest.raises(TokenError, match="expired"):
        verify_token(SECRET, token)


def test_wrong_secret_and_garbage() -> None:
    token = issue_token("another-secret-0123456789abcdef0123", "teacher", "r1", "x")
    with pytest.raises(TokenError):
        verify_token(SECRET, token)
    with pytest.raises(TokenError):
        verify_token(SECRET, "not.a.jwt")
    with pytest.raises(TokenError):
        verify_token(SECRET, "")


def test_token_must_be_hs256_with_required_claims() -> None:
    unsigned = jwt.encode({"sub": "x", "role": "teacher", "room": "r1", "exp": int(time.time()) + 60},
                          None, algorithm="none")
    with pytest.raises(TokenError):
        verify_token(SECRET, unsigned)
    no_room = jwt.encode({"sub": "x", "role": "teacher", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    with pytest.raises(TokenError):
        verify_token(SECRET, no_room)
    bad_role = jwt.encode({"sub": "x", "role": "admin", "room": "r1", "exp": int(time.time()) + 60},
                          SECRET, algorithm="HS256")
    with pytest.raises(TokenError):
        verify_token(SECRET, bad_role)


def test_issue_token_rejects_unknown_role() -> None:
    with pytest.raises(ValueError):
        issue_token(SECRET, "admin", "r1", "x")


@pytest.mark.parametrize("text, seconds", [("8h", 28800), ("30m", 1800), ("45s", 45), ("2d", 172800),
                                           ("3600", 3600), (" 1.5h ", 5400)])
def test_parse_ttl(text: str, seconds: int) -> None:
    assert parse_ttl(text) == seconds


# --- configuration -------------------------------------------------------------------------------

def _parse(argv: list[str]) -> Config:
    import argparse

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv))


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for key in list(os.environ):
        if key.startswith("SKYCLASS_"):
            monkeypatch.delenv(key)
    return monkeypatch


def test_config_defaults(clean_env: pytest.MonkeyPatch) -> None:
    config = _parse([])
    default = Config()
    assert config.host == default.host and config.port == default.port
    assert config.data == default.data and config.redis is None and config.secret == ""
    assert config.ice_addresses == [] and config.workers == default.workers
    assert config.max_viewers_per_worker == default.max_viewers_per_worker
    assert config.peer_timeout == default.peer_timeout


def test_config_from_flags(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = _parse([
        "--host", "127.0.0.2", "--port", "9999", "--data", str(tmp_path), "--redis", "redis://r:6379/1",
        "--secret", "s3", "--ice-address", "10.0.0.1", "--ice-address", "10.0.0.2", "--workers", "3",
        "--max-viewers-per-worker", "42", "--peer-timeout", "2.5", "--public-url", "https://class.example",
    ])
    assert config == Config(host="127.0.0.2", port=9999, data=tmp_path, redis="redis://r:6379/1", secret="s3",
                            ice_addresses=["10.0.0.1", "10.0.0.2"], workers=3, max_viewers_per_worker=42,
                            peer_timeout=2.5, public_url="https://class.example")


def test_config_from_env(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    env = {
        "SKYCLASS_HOST": "127.0.0.3", "SKYCLASS_PORT": "8181", "SKYCLASS_DATA": str(tmp_path),
        "SKYCLASS_REDIS": "redis://localhost:6380/0", "SKYCLASS_SECRET": "from-env",
        "SKYCLASS_ICE_ADDRESS": "127.0.0.1,192.168.1.5", "SKYCLASS_WORKERS": "2",
        "SKYCLASS_MAX_VIEWERS_PER_WORKER": "77", "SKYCLASS_PEER_TIMEOUT": "6",
        "SKYCLASS_PUBLIC_URL": "https://env.example",
    }
    for key, value in env.items():
        clean_env.setenv(key, value)
    config = _parse([])
    assert config == Config(host="127.0.0.3", port=8181, data=tmp_path, redis="redis://localhost:6380/0",
                            secret="from-env", ice_addresses=["127.0.0.1", "192.168.1.5"], workers=2,
                            max_viewers_per_worker=77, peer_timeout=6.0, public_url="https://env.example")


def test_flags_beat_env(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("SKYCLASS_PORT", "8181")
    clean_env.setenv("SKYCLASS_SECRET", "from-env")
    clean_env.setenv("SKYCLASS_ICE_ADDRESS", "192.168.1.5")
    config = _parse(["--port", "9000", "--secret", "from-flag", "--ice-address", "127.0.0.1"])
    assert config.port == 9000 and config.secret == "from-flag" and config.ice_addresses == ["127.0.0.1"]


def test_cli_serve_parser_fills_config(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    clean_env.setenv("SKYCLASS_PEER_TIMEOUT", "3")
    args = cli.build_parser().parse_args(["serve", "--port", "7001", "--data", str(tmp_path)])
    config = config_from_args(args)
    assert config.port == 7001 and config.data == tmp_path and config.peer_timeout == 3.0


def test_resolved_secret_is_kept_under_data(tmp_path: Path) -> None:
    assert Config(secret="given", data=tmp_path).resolved_secret() == "given"
    first = Config(data=tmp_path / "d").resolved_secret()
    assert len(first) >= 32
    assert Config(data=tmp_path / "d").resolved_secret() == first  # survives a restart
    assert (tmp_path / "d" / "secret").stat().st_mode & 0o077 == 0


# relay protocol over real loopback UDP --------------------------------------------------------

class _Collect:
    """A PacketSink that keeps what reaches it."""

    def __init__(self) -> None:
        self.seqs: list[int] = []

    def on_rtp(self, seq: int, timestamp: int, marker: int, payload: bytes, entry_point: bool) -> None:
        self.seqs.append(seq)

    def on_sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> None:
        pass


async def _until(check, timeout: float = 3.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        await asyncio.sleep(0.02)
    return bool(check())


async def test_relay_key_gates_subscriptions_and_the_hop_repairs_loss() -> None:
    from skyclass.media.relay import RelayEdge, RelayOrigin, relay_key
    from skyclass.media.router import MediaCounters, TrackStream

    counters = MediaCounters()
    source = TrackStream("r", "video", counters)
    source.set_codec("video/VP8", 90000)
    origin = RelayOrigin(lambda room: {"video": source} if room == "r" else None, key=relay_key("s3cret"))
    address = await origin.start("127.0.0.1", 0)
    copies = {name: TrackStream("r", "video", MediaCounters()) for name in ("stranger", "peer")}
    got = {name: _Collect() for name in copies}
    for name, stream in copies.items():
        stream.add_sink(got[name])
    edges = {
        "stranger": RelayEdge(address, lambda room, slot: copies["stranger"], lambda: ["r"], key=relay_key("guess")),
        "peer": RelayEdge(address, lambda room, slot: copies["peer"], lambda: ["r"], key=relay_key("s3cret")),
    }
    try:
        for edge in edges.values():
            await edge.start()
        assert await _until(lambda: copies["peer"].mime_type == "video/VP8"), "the keyed edge learnt the codec"
        dropped = 7
        for seq in range(1, 20):
            if seq != dropped:  # never sent on the hop: the edge must NACK it from the origin's cache
                source.on_relayed(seq, seq * 3000, 1, b"\x10frame%d" % seq, seq == 1)
            else:
                source.cache.put(CachedPacket(seq, seq * 3000, 1, b"\x10frame7"))
        assert await _until(lambda: set(got["peer"].seqs) >= set(range(1, 20))), got["peer"].seqs
        assert edges["peer"].nacks_sent >= 1 and origin.retransmissions >= 1
        copies["peer"].upstream_keyframe()  # what a joining student at the edge triggers
        assert await _until(lambda: counters.keyframe_requests_received == 1)
        assert got["stranger"].seqs == [] and copies["stranger"].mime_type is None
        assert origin.refused >= 1
    finally:
        for edge in edges.values():
            edge.close()
        origin.close()

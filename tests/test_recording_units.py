"""Recorder pieces without a server: depacketizers, SPS parsing, the segment writer under loss,
crash repair, playlists, policy and naming."""

from __future__ import annotations

import argparse
import fractions
import io
import secrets
import time
from pathlib import Path

import av
import numpy as np
import pytest
from aiortc.codecs.h264 import H264Encoder
from aiortc.codecs.opus import OpusEncoder
from aiortc.codecs.vpx import Vp8Encoder

from skyclass.loadtest.clients import decode_index_frame, encode_index_frame
from skyclass.media.rtp import h264_is_keyframe
from skyclass.recordings import fmp4, playlist
from skyclass.recordings.bitstream import opus_packet_samples, parse_sps, vp8_frame_size
from skyclass.recordings.catalogue import classify_room, load_meta, save_meta, RecordingInfo
from skyclass.recordings.depacketize import H264Depacketizer, OpusDepacketizer, Unwrapper, VP8Depacketizer
from skyclass.recordings.recorder import RecorderSettings, RecordingManager
from skyclass.recordings.repair import load_all
from skyclass.recordings.writer import SegmentWriter
from skyclass.server.config import add_serve_arguments, config_from_args


def video_frame(index: int, width: int, height: int, noise: bool = False) -> av.VideoFrame:
    luma = encode_index_frame(index, width, height)
    if noise:  # faint noise everywhere: big frames (FU-A), the index still readable
        rng = np.random.default_rng(index)
        luma = (luma.astype(np.int16) + rng.integers(-20, 20, luma.shape)).clip(0, 255).astype(np.uint8)
    yuv = np.concatenate([luma, np.full((height // 2, width), 128, dtype=np.uint8)])
    frame = av.VideoFrame.from_ndarray(yuv, format="yuv420p")
    frame.pts = index * 6000
    frame.time_base = fractions.Fraction(1, 90000)
    return frame


def rtp_lesson(encoder, frames: int, fps: int = 15, width: int = 320, height: int = 240, noise: bool = False,
               keyframe_every: int = 30, audio: bool = True) -> list[tuple[float, str, int, int, bytes]]:
    """(time, kind, rtp timestamp, marker, payload) as a teacher would send them."""
    events = []
    for i in range(frames):
        payloads, ts = encoder.encode(video_frame(i, width, height, noise), force_keyframe=i % keyframe_every == 0)
        for k, payload in enumerate(payloads):
            events.append((i / fps, "video", ts, int(k == len(payloads) - 1), payload))
    if audio:
        opus = OpusEncoder()
        for n in range(int(frames / fps * 50)):
            pcm = (np.sin(2 * np.pi * 440 * (np.arange(960) + n * 960) / 48000) * 8000).astype(np.int16)
            frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 48000, n * 960, fractions.Fraction(1, 48000)
            payloads, ts = opus.encode(frame)
            events.extend((n / 50, "audio", ts, 1, p) for p in payloads)
    events.sort(key=lambda e: e[0])
    return events


def record(events, directory: Path, video_depacketizer, drop: frozenset[int] = frozenset()) -> SegmentWriter:
    """Depacketize and write ``events``; packets whose index is in ``drop`` are lost."""
    writer = SegmentWriter(directory, "test", 2.0)
    writer.expect({"video", "audio"} if any(e[1] == "audio" for e in events) else {"video"})
    depacketizers = {"video": video_depacketizer, "audio": OpusDepacketizer()}
    unwrap = {"video": Unwrapper(32), "audio": Unwrapper(32)}
    for n, (_, kind, ts, marker, payload) in enumerate(events):
        if n in drop:
            depacketizers[kind].lost()
            continue
        for sample in depacketizers[kind].push(unwrap[kind](ts), marker, payload):
            # (the unwrapper starts at 2**32 to leave room for reordered packets)
            writer.add((sample.ext_ts - 2 ** 32) / (90000 if kind == "video" else 48000), sample)
    writer.finish()
    return writer


def decode_playlist(path: Path) -> tuple[list[int | None], int]:
    indices, errors = [], 0
    with av.open(str(path)) as c:
        for packet in c.demux(c.streams.video[0]):
            if not packet.size:
                continue
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                errors += 1
                continue
            indices.extend(decode_index_frame(f.to_ndarray(format="gray")) for f in frames)
    return indices, errors


@pytest.mark.parametrize("width,height,profile", [(320, 240, "baseline"), (640, 360, "baseline"),
                                                  (1280, 720, "high"), (638, 358, "main")])
def test_sps_gives_the_real_picture_size(width: int, height: int, profile: str) -> None:
    codec = av.CodecContext.create("libx264", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuv420p"
    codec.time_base = fractions.Fraction(1, 30)
    codec.options = {"profile": profile, "tune": "zerolatency"}
    frame = av.VideoFrame.from_ndarray(np.zeros((height * 3 // 2, width), dtype=np.uint8), format="yuv420p")
    data = b"".join(bytes(p) for p in codec.encode(frame))
    sps = next(n for n in data.split(b"\x00\x00\x01") if n and n[0] & 0x1F == 7)
    info = parse_sps(sps.rstrip(b"\x00"))
    assert (info.width, info.height) == (width, height)


def test_h264_fu_a_stap_a_and_loss_give_clean_frames(tmp_path: Path) -> None:
    events = rtp_lesson(H264Encoder(), 60, width=640, height=480, noise=True)
    fragmented = [e for e in events if e[1] == "video" and e[4][0] & 0x1F == 28]
    assert fragmented, "expected FU-A packets for big frames"
    # lose a middle fragment of frame 10 (not a key frame): frames 10..29 cannot decode cleanly
    frame10 = [n for n, e in enumerate(events) if e[1] == "video" and abs(e[0] - 10 / 15) < 1e-9]
    writer = record(events, tmp_path, H264Depacketizer(), drop=frozenset({frame10[len(frame10) // 2]}))
    indices, errors = decode_playlist(tmp_path / "index.m3u8")
    assert errors == 0 and None not in indices
    resume = min(round(e[0] * 15) for e in events if e[1] == "video" and e[0] > 10 / 15 and h264_is_keyframe(e[4]))
    assert indices == list(range(10)) + list(range(resume, 60)), indices  # skipped, never corrupt
    assert writer.stats.video_frames == 10 + 60 - resume


def test_vp8_frames_reassembled(tmp_path: Path) -> None:
    events = rtp_lesson(Vp8Encoder(), 45, width=640, height=480, noise=True)
    depacketizer = VP8Depacketizer()
    writer = record(events, tmp_path, depacketizer)
    assert writer.entries[0].uri.endswith(".webm")
    data = b"".join((tmp_path / name).read_bytes() for name in
                    [writer.entries[0].init] + [e.uri for e in writer.entries])
    with av.open(io.BytesIO(data)) as c:
        frames = [f for p in c.demux(c.streams.video[0]) for f in p.decode()]
    assert [decode_index_frame(f.to_ndarray(format="gray")) for f in frames] == list(range(45))
    assert frames[0].width == 640


def test_opus_toc_and_vp8_header() -> None:
    assert opus_packet_samples(bytes([0xFC, 0])) == 960  # CELT 20 ms, one frame
    assert opus_packet_samples(bytes([0x78 | 1, 0])) == 1920  # config 15 (hybrid 20 ms), two frames
    key = bytes([0x10, 0x02, 0x00, 0x9D, 0x01, 0x2A, 0x80, 0x02, 0xE0, 0x01])
    assert vp8_frame_size(key) == (640, 480) and vp8_frame_size(bytes([0x11]) + key[1:]) is None


def test_unwrapper_handles_wrap_and_reorder() -> None:
    unwrap = Unwrapper(16)
    values = [unwrap(v) for v in (65534, 65535, 0, 65533, 1)]
    assert values[2] - values[0] == 2 and values[3] - values[0] == -1 and values[4] - values[0] == 3


def test_repair_keeps_whole_segments_and_recovers_an_unlisted_one(tmp_path: Path) -> None:
    directory = tmp_path / "rec" / "20260101-080000-grade7-maths-abcd"
    directory.mkdir(parents=True)
    writer = record(rtp_lesson(H264Encoder(), 90), directory, H264Depacketizer())
    entries = writer.entries
    assert len(entries) >= 3
    # as if killed: the playlist is one segment behind, the next segment half-written
    (directory / "index.m3u8").write_text(playlist.render(entries[:-1], ended=False, target=2.0))
    (directory / "seg_99999.m4s.tmp").write_bytes(b"partial")
    info = RecordingInfo(id=directory.name, room="grade7-maths", title="t", teacher="T", started_at=1.0)
    save_meta(directory, info)
    (repaired,) = load_all(tmp_path / "rec")
    assert repaired.state == "repaired" and repaired.segments == len(entries)
    assert abs(repaired.duration - sum(e.duration for e in entries)) < 0.05
    text = (directory / "index.m3u8").read_text()
    assert "#EXT-X-PLAYLIST-TYPE:VOD" in text and text.rstrip().endswith("#EXT-X-ENDLIST")
    assert not list(directory.glob("*.tmp")) and load_meta(directory).state == "repaired"
    indices, errors = decode_playlist(directory / "index.m3u8")
    assert errors == 0 and indices == list(range(90))
    # a damaged segment is dropped, not served
    timing = fmp4.read_fragment_timing((directory / entries[0].uri).read_bytes()[:-10])
    assert timing is None


def test_playlist_round_trip() -> None:
    entries = [playlist.SegmentEntry("seg_00000.m4s", 2.0, "init_0.mp4"),
               playlist.SegmentEntry("seg_00001.m4s", 2.5, "init_1.mp4", discontinuity=True)]
    text = playlist.render(entries, ended=True, target=2.0)
    assert "#EXT-X-DISCONTINUITY" in text and text.count("#EXT-X-MAP") == 2
    parsed, ended = playlist.parse(text)
    assert ended and [(e.uri, e.duration, e.init) for e in parsed] == [(e.uri, e.duration, e.init) for e in entries]


def test_policy_and_flags(tmp_path: Path) -> None:
    manager = RecordingManager(RecorderSettings(root=tmp_path, disabled_rooms=("tutoring-*", "staff")))
    assert manager.records("grade7-maths") and not manager.records("tutoring-3b") and not manager.records("staff")
    assert not RecordingManager(RecorderSettings(root=tmp_path, disabled_rooms=("*",))).records("any")
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    config = config_from_args(parser.parse_args(["--no-record", "tutoring-*", "--no-record", "staff",
                                                 "--record-grace", "3"]))
    assert config.no_record == ["tutoring-*", "staff"] and config.record_grace == 3.0


@pytest.mark.parametrize("room,grade,subject", [("grade7-maths", "7", "maths"), ("g5_science", "5", "science"),
                                                ("maths-grade10", "10", "maths"), ("demo", None, None)])
def test_grade_and_subject_from_room_names(room: str, grade, subject) -> None:
    got_grade, got_subject, title = classify_room(room)
    assert (got_grade, got_subject) == (grade, subject) and title
    assert classify_room("demo", {"grade": 3, "subject": "art", "title": "Art"}) == ("3", "art", "Art")


class FakeStream:
    """Just enough of media.router.TrackStream for the recorder."""

    def __init__(self, kind: str, mime: str, clock: int, peer: str) -> None:
        self.kind, self.mime_type, self.clock_rate = kind, mime, clock
        self.producer = type("P", (), {"peer_id": peer})()
        self.sinks: list = []
        self.keyframe_requests = 0

    def add_sink(self, sink) -> None:
        self.sinks.append(sink)

    def remove_sink(self, sink) -> None:
        self.sinks.remove(sink)

    def request_keyframe(self) -> None:
        self.keyframe_requests += 1


async def test_manager_times_tracks_by_sender_reports(tmp_path: Path) -> None:
    """Audio and video RTP clocks start at unrelated random values; the teacher's sender
    reports tie both to one wall clock, so the recording starts them together. The lesson
    lookup fills grade/subject/title."""
    import asyncio
    import types

    async def describe(room: str, at: float) -> dict:
        return {"grade": "4", "subject": "music", "title": "Rhythm"}

    manager = RecordingManager(RecorderSettings(root=tmp_path), describe=describe)
    await manager.start()
    video = FakeStream("video", "video/H264", 90000, "s1")
    audio = FakeStream("audio", "audio/opus", 48000, "s1")
    room = types.SimpleNamespace(name="lesson", router=types.SimpleNamespace(streams={"video": video, "audio": audio}))
    session = types.SimpleNamespace(id="s1", name="T")
    manager.publisher_joined(room, session)
    assert "lesson" in manager.active
    origins = {"video": 123_456_789, "audio": 3_000_000_000}  # wraps past 2**32 during the lesson
    ntp0 = 3_900_000_000 << 32
    for stream in (video, audio):
        for sink in stream.sinks:
            sink.on_sender_report(ntp0, origins[stream.kind])
    seqs = {"video": 65000, "audio": 100}
    for t, kind, ts, marker, payload in rtp_lesson(H264Encoder(), 45):
        stream = video if kind == "video" else audio
        for sink in stream.sinks:
            sink.on_rtp(seqs[kind] & 0xFFFF, (ts + origins[kind]) & 0xFFFFFFFF, marker, payload, False)
        seqs[kind] += 1
    manager.publisher_left(room, session, ended=True)
    await asyncio.wait_for(asyncio.gather(*manager._finishing), 10)
    info = (await manager.store.list(room="lesson"))[0]
    assert info.state == "complete" and (info.grade, info.subject, info.title) == ("4", "music", "Rhythm")
    assert load_meta(tmp_path / info.id).title == "Rhythm"
    assert abs(info.duration - 3.0) < 0.1 and not video.sinks
    with av.open(str(tmp_path / info.id / "index.m3u8")) as c:
        firsts = {}
        for packet in c.demux():
            if packet.pts is not None and packet.stream.type not in firsts:
                firsts[packet.stream.type] = float(packet.pts * packet.time_base)
    assert abs(firsts["video"] - firsts["audio"]) < 0.03, firsts


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_catalogue_stores_filter_alike(kind: str, request: pytest.FixtureRequest) -> None:
    """The single-node and the shared catalogue answer the same queries the same way."""
    from skyclass.recordings.catalogue import MemoryStore, RecordingInfo, RedisStore, local_date

    client = None
    if kind == "redis":
        import redis.asyncio as aioredis
        client = aioredis.Redis.from_url(request.getfixturevalue("redis_url"))
        store = RedisStore(client, prefix=f"units-{secrets.token_hex(3)}:")
    else:
        store = MemoryStore()
    day = 86400.0
    now = time.time()
    a = RecordingInfo(id="a", room="grade7-maths", title="t", teacher="T", started_at=now - 2 * day, grade="7",
                      subject="maths", node="n1", origin="http://n1:8080")
    b = RecordingInfo(id="b", room="grade7-maths", title="t", teacher="T", started_at=now - 60, grade="7",
                      subject="maths")
    c = RecordingInfo(id="c", room="grade8-art", title="t", teacher="U", started_at=now - 30, grade="8", subject="Art")
    try:
        for info in (a, b, c):
            await store.put(info)
        assert [i.id for i in await store.list()] == ["c", "b", "a"]  # newest first
        assert [i.id for i in await store.list(room="grade7-maths")] == ["b", "a"]
        assert [i.id for i in await store.list(grade="8")] == ["c"]
        assert [i.id for i in await store.list(subject="art")] == ["c"]  # case-insensitive
        assert [i.id for i in await store.list(date=local_date(a.started_at))] == ["a"]
        assert await store.list(room="nobody") == []
        got = await store.get("a")
        assert got == a and got.origin == "http://n1:8080"
        b.state, b.ended_at = "complete", now
        await store.put(b)  # an update replaces, never duplicates
        assert [(i.id, i.state) for i in await store.list(room="grade7-maths")] == [("b", "complete"), ("a", "recording")]
        await store.delete("a")
        assert await store.get("a") is None
        assert [i.id for i in await store.list(room="grade7-maths")] == ["b"]
        assert [i.id for i in await store.list()] == ["c", "b"]
    finally:
        if client is not None:
            await client.aclose()

"""Light simulated clients for benchmarks: a teacher that only packetizes, students that only count.

The teacher (:class:`PacketVideoTrack`, :class:`PacketAudioTrack`) sends a clip encoded
once at start-up (H.264 constrained baseline in Annex B, Opus), looped, as ``av.Packet``
objects: aiortc's sender then only packetizes, so the teacher costs a few percent of a
core whatever the run length.

A student (:class:`CountingStudent`) is a real aiortc ``RTCPeerConnection`` (ICE, DTLS,
SRTP keys, RTCP, ICE consent: the server sees a real peer), but once it has joined its
RTP never enters aiortc: the ICE socket's ``datagram_received`` is wrapped so that RTP
datagrams are counted from their clear header (SRTP encrypts only the payload) and
dropped, while everything else (STUN: ICE checks and consent; DTLS; RTCP) still goes to
aioice and aiortc. No SRTP decryption, no jitter buffer, no decoder: a student costs
tens of microseconds of client CPU per packet at most, so the load generator is not what
a fan-out benchmark measures.

The entry points :func:`student_worker_main` and :func:`teacher_main` run these clients
in their own processes, driven over a ``multiprocessing`` pipe (see ``fanout_bench``).
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import av
import numpy as np
from aiortc import sdp as aiortc_sdp
from aiortc.mediastreams import MediaStreamTrack

from skyclass.media import aiortc_glue
from skyclass.media.rtp import h264_is_keyframe

from .clients import PeerSession, SignallingFailed, publish, watch

logger = logging.getLogger(__name__)

VIDEO_CLOCK = 90000
AUDIO_CLOCK = 48000


# --- the teacher's media: encoded once, then only packetized ---------------------------

def make_h264_clip(path: Path, width: int = 640, height: int = 480, fps: int = 30, seconds: int = 10,
                   bitrate: int = 1_000_000, gop_seconds: float = 2.0) -> Path:
    """Encode a synthetic clip with libx264 to a raw Annex B ``.h264`` file.

    Constrained baseline (no B-frames, what WebRTC's packetization-mode=1 peers expect),
    an IDR with SPS/PPS every ``gop_seconds`` and nowhere else (scenecut off), CBR-ish
    ``bitrate``. Content: a scrolling noise texture plus a moving box of fresh noise, so
    the encoder has to spend its bitrate like on a real camera. ``seconds`` should be a
    multiple of ``gop_seconds`` so the loop point is an IDR.
    """
    gop = max(1, int(round(fps * gop_seconds)))
    frames = int(fps * seconds)
    output = av.open(str(path), "w", format="h264")  # the raw h264 muxer writes Annex B
    stream = output.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.bit_rate = bitrate
    kbps = bitrate // 1000
    stream.options = {
        "preset": "veryfast",
        "tune": "zerolatency",
        "profile": "baseline",
        "x264-params": f"keyint={gop}:min-keyint={gop}:scenecut=0:bframes=0:repeat-headers=1"
                       f":vbv-maxrate={int(kbps * 1.1)}:vbv-bufsize={kbps}",
    }
    rng = np.random.default_rng(1)
    texture = rng.integers(0, 256, (height * 2, width * 2), dtype=np.uint8).astype(np.uint16)
    texture = ((texture + np.roll(texture, 1, 0) + np.roll(texture, 1, 1) + np.roll(texture, 1, (0, 1))) // 4)
    texture = texture.astype(np.uint8)
    chroma = np.full((height // 2, width // 2), 128, dtype=np.uint8)
    box = min(80, width // 4, height // 4)
    for i in range(frames):
        y0, x0 = (i * 3) % height, (i * 5) % width
        luma = texture[y0:y0 + height, x0:x0 + width].copy()
        bx = (i * 8) % (width - box)
        luma[height // 5:height // 5 + box, bx:bx + box] = rng.integers(0, 256, (box, box), dtype=np.uint8)
        frame = av.VideoFrame(width, height, "yuv420p")
        frame.planes[0].update(np.ascontiguousarray(luma))
        frame.planes[1].update(chroma)
        frame.planes[2].update(chroma)
        frame.pts = i
        for packet in stream.encode(frame):
            output.mux(packet)
    for packet in stream.encode():
        output.mux(packet)
    output.close()
    return path


def load_h264_access_units(path: Path) -> list[tuple[bytes, bool]]:
    """The clip's access units in Annex B, each with its keyframe flag."""
    units: list[tuple[bytes, bool]] = []
    with av.open(str(path), format="h264") as container:
        for packet in container.demux(video=0):
            if packet.size:
                units.append((bytes(packet), bool(packet.is_keyframe)))
    if not units or not units[0][1]:
        raise ValueError(f"{path}: clip must start with a keyframe")
    return units


def make_opus_packets(seconds: float = 1.0, frequency: float = 440.0, bitrate: int = 32000) -> list[bytes]:
    """``seconds`` of a mono sine tone as 20 ms Opus packets (a whole number of periods,
    so the loop is seamless)."""
    codec = av.CodecContext.create("libopus", "w")
    codec.sample_rate, codec.layout, codec.format, codec.bit_rate = AUDIO_CLOCK, "mono", "s16", bitrate
    codec.open()
    samples = AUDIO_CLOCK // 50
    count = int(seconds * 50)
    packets: list[bytes] = []
    for i in range(count + 4):  # libopus has a small look-ahead: feed a few extra frames
        t = (np.arange(samples) + (i % count) * samples) / AUDIO_CLOCK
        pcm = (np.sin(2 * math.pi * frequency * t) * 8000).astype(np.int16).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
        frame.sample_rate = AUDIO_CLOCK
        frame.pts = i * samples
        frame.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        packets.extend(bytes(p) for p in codec.encode(frame))
    return packets[:count]


class _PacedTrack(MediaStreamTrack):
    """Common pacing: ``recv()`` returns item ``k`` at ``start + k * interval``.

    Like a live camera or microphone, a track that fell behind (its process was starved
    of CPU) does not burst to catch up: it skips the slots it missed (the next item's
    time stamp is the wall clock's), so a stalled teacher shows as a gap, never as a
    faster-than-real-time stream.
    """

    def __init__(self, interval: float) -> None:
        super().__init__()
        self._interval = interval
        self._start: Optional[float] = None
        self._count = 0

    async def _pace(self) -> int:
        if self._start is None:
            self._start = time.monotonic()
        now = time.monotonic()
        delay = self._start + self._count * self._interval - now
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -2 * self._interval:
            # skip the slots missed: time stamps stay on the wall clock, like a capture device
            self._count = int((now - self._start) / self._interval)
        count = self._count
        self._count += 1
        return count


class PacketVideoTrack(_PacedTrack):
    """Pre-encoded H.264 access units as ``av.Packet`` at ``fps``, looped.

    Keyframe requests (the server's PLI on a join) are honoured like a real encoder
    would, without encoding: the next access unit sent is the clip's next IDR (the clip
    jumps ahead to its next GOP), which is a valid place to restart the bitstream.
    """

    kind = "video"

    def __init__(self, units: list[tuple[bytes, bool]], fps: int = 30) -> None:
        super().__init__(1.0 / fps)
        self._units = units
        self._keyframes = [i for i, (_, key) in enumerate(units) if key]
        self._tick = VIDEO_CLOCK // fps
        self._pos = 0
        self._keyframe_requested = False
        self.keyframes_sent = 0
        self.keyframe_requests = 0

    def request_keyframe(self) -> None:
        self.keyframe_requests += 1
        self._keyframe_requested = True

    async def recv(self) -> av.Packet:  # type: ignore[override]
        count = await self._pace()
        if self._keyframe_requested:
            self._keyframe_requested = False
            if not self._units[self._pos][1]:
                self._pos = next((k for k in self._keyframes if k > self._pos), 0)
        data, key = self._units[self._pos]
        self._pos = (self._pos + 1) % len(self._units)
        if key:
            self.keyframes_sent += 1
        packet = av.Packet(data)
        packet.pts = count * self._tick
        packet.time_base = fractions.Fraction(1, VIDEO_CLOCK)
        return packet


class PacketAudioTrack(_PacedTrack):
    """Pre-encoded 20 ms Opus packets as ``av.Packet``, looped."""

    kind = "audio"

    def __init__(self, packets: list[bytes]) -> None:
        super().__init__(0.02)
        self._packets = packets

    async def recv(self) -> av.Packet:  # type: ignore[override]
        count = await self._pace()
        packet = av.Packet(self._packets[count % len(self._packets)])
        packet.pts = count * (AUDIO_CLOCK // 50)
        packet.time_base = fractions.Fraction(1, AUDIO_CLOCK)
        return packet


def honour_keyframe_requests(session: PeerSession, track: PacketVideoTrack) -> None:
    """Point the video sender's PLI/FIR handling at ``track`` (aiortc's stock handler only
    flags its own encoder, which pre-encoded packets never pass through)."""
    for sender in session.pc.getSenders():
        if sender.track is track:
            sender._send_keyframe = track.request_keyframe  # type: ignore[method-assign]


# --- the student: a real peer that counts clear RTP headers ----------------------------

def _rtp_payload(packet: bytes) -> bytes:
    """The payload of a decrypted RTP packet (skips CSRCs and a header extension)."""
    offset = 12 + 4 * (packet[0] & 0x0F)
    if packet[0] & 0x10 and len(packet) >= offset + 4:
        offset += 4 + 4 * ((packet[offset + 2] << 8) | packet[offset + 3])
    end = len(packet)
    if packet[0] & 0x20 and end > offset:
        end -= packet[-1]
    return packet[offset:end]


JUMP = 1000  # a sequence number this far from the highest is a discontinuity, not loss
FREEZE_GAP = 0.5  # no video frame for longer than this is a freeze (what a viewer notices)
NTP_UNIX_OFFSET = 2208988800  # seconds from the NTP epoch (1900) to the Unix epoch (1970)

# Feedback (like a browser's): NACK a missing packet at once, again every NACK_RETRY
# seconds up to NACK_TRIES times; a video packet still missing after GIVE_UP seconds is
# lost for good, and the picture cannot continue without a keyframe: PLI (at most one
# per PLI_INTERVAL). Gaps wider than NACK_MAX go straight to a PLI.
NACK_RETRY = 0.1
NACK_TRIES = 3
GIVE_UP = 1.0
PLI_INTERVAL = 1.0
NACK_MAX = 256


def delay_bin(ms: float) -> int:
    """Histogram bin of a delay: 1 ms wide below 100 ms, 5 ms below 1 s, 50 ms below 10 s,
    500 ms below 60 s; one last bin for anything slower."""
    if ms < 100:
        return max(0, int(ms))
    if ms < 1000:
        return 100 + int((ms - 100) / 5)
    if ms < 10000:
        return 280 + int((ms - 1000) / 50)
    if ms < 60000:
        return 460 + int((ms - 10000) / 500)
    return 560


def delay_bin_upper(index: int) -> float:
    """The upper edge of a :func:`delay_bin` bin, in ms (percentiles err on the slow side;
    the last bin, "a minute or more", reads as 60,000)."""
    if index < 100:
        return index + 1.0
    if index < 280:
        return 100 + (index - 99) * 5.0
    if index < 460:
        return 1000 + (index - 279) * 50.0
    if index < 560:
        return 10000 + (index - 459) * 500.0
    return 60000.0


def histogram_percentile(hist: dict[int, int], p: float) -> Optional[float]:
    """Nearest-rank percentile (``p`` in 0-100) of a :func:`delay_bin` histogram, in ms."""
    total = sum(hist.values())
    if not total:
        return None
    rank = max(1, math.ceil(p * total / 100))
    seen = 0
    for index in sorted(hist):
        seen += hist[index]
        if seen >= rank:
            return delay_bin_upper(index)
    return None


def merge_histograms(histograms: Any) -> dict[int, int]:
    merged: dict[int, int] = {}
    for hist in histograms:
        for index, count in hist.items():
            merged[int(index)] = merged.get(int(index), 0) + count
    return merged


class _Stream:
    """One SSRC's counters, as a student sees it."""

    __slots__ = ("received", "first", "highest", "frames", "video", "duplicates", "seen", "jumps",
                 "_t0", "_ts0", "_last_ts", "min_offset", "offset", "max_offset",
                 "clock", "jitter", "_arrival", "_timestamp", "repaired", "missing", "lost_for_good",
                 "needs_keyframe", "freeze_s", "freezes", "first_frame_at", "last_frame_at",
                 "sr", "delay_hist", "window_hist", "delay_sum", "delay_n", "delay_max", "ssrc")

    def __init__(self, seq: int, video: bool, ssrc: int = 0) -> None:
        self.received = 1
        self.first = self.highest = seq  # highest is extended (keeps counting past 65535)
        self.frames = 0
        self.video = video
        self.ssrc = ssrc
        self.duplicates = 0
        self.seen = bytearray(65536)  # per sequence number: received?
        self.seen[seq] = 1
        self.jumps = 0
        self._t0: Optional[float] = None
        self._ts0 = 0
        self._last_ts = 0
        self.min_offset = math.inf
        self.offset = 0.0
        self.max_offset = 0.0
        # interarrival jitter (RFC 3550 6.4.1), in RTP clock units
        self.clock = VIDEO_CLOCK if video else AUDIO_CLOCK
        self.jitter = 0.0
        self._arrival: Optional[float] = None
        self._timestamp = 0
        # feedback: missing 16-bit sequence number -> [first noticed, NACKs sent, last NACK]
        self.repaired = 0
        self.missing: dict[int, list] = {}
        self.lost_for_good = 0
        self.needs_keyframe = False
        # freezes and end-to-end delay (video)
        self.freeze_s = 0.0
        self.freezes = 0
        self.first_frame_at: Optional[float] = None
        self.last_frame_at: Optional[float] = None
        self.sr: Optional[tuple[float, int]] = None  # (sender's wall clock, RTP timestamp) of the last SR
        self.delay_hist: dict[int, int] = {}
        self.window_hist: dict[int, int] = {}
        self.delay_sum = 0.0
        self.delay_n = 0
        self.delay_max = 0.0

    def arrived(self, now: float, timestamp: int) -> None:
        """An in-order packet: update the interarrival jitter. Like aiortc and browsers,
        only packets of a new timestamp count (a frame's packets share one)."""
        if self._arrival is not None and timestamp != self._timestamp:
            d = (now - self._arrival) * self.clock - (((timestamp - self._timestamp + 0x80000000) & 0xFFFFFFFF)
                                                      - 0x80000000)
            self.jitter += (abs(d) - self.jitter) / 16
        self._arrival = now
        self._timestamp = timestamp

    def note_missing(self, start: int, count: int, now: float) -> None:
        """``count`` sequence numbers from ``start`` (extended) were skipped: NACK them."""
        if count > NACK_MAX:
            self.needs_keyframe = self.video
            return
        missing = self.missing
        for i in range(count):
            missing[(start + i) & 0xFFFF] = [now, 0, 0.0]

    def sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> None:
        """An RTCP SR for this SSRC: the teacher's wall clock at an RTP timestamp (the server
        passes the teacher's NTP time through), the basis of end-to-end delay."""
        wall = (ntp_timestamp >> 32) - NTP_UNIX_OFFSET + (ntp_timestamp & 0xFFFFFFFF) / 2 ** 32
        self.sr = (wall, rtp_timestamp)

    def frame_end(self, now: float, timestamp: int) -> None:
        """Arrival of a video frame's last packet: one frame, and one sample of transit
        delay relative to the RTP clock (arrival - capture, up to a constant); the gap
        since the previous frame (a freeze when > FREEZE_GAP); and, once a sender report
        has tied the RTP clock to the teacher's wall clock, the end-to-end delay."""
        self.frames += 1
        if self.last_frame_at is None:
            self.first_frame_at = now
        elif now - self.last_frame_at > FREEZE_GAP:
            self.freeze_s += now - self.last_frame_at
            self.freezes += 1
        self.last_frame_at = now
        if self._t0 is None:
            self._t0, self._ts0, self._last_ts = now, timestamp, timestamp
        elif ((timestamp - self._last_ts) & 0xFFFFFFFF) < 0x80000000:
            self._last_ts = timestamp
        else:
            return  # an older frame's late packet: no clock sample
        offset = (now - self._t0) - ((timestamp - self._ts0) & 0xFFFFFFFF) / VIDEO_CLOCK
        self.offset = offset
        if offset < self.min_offset:
            self.min_offset = offset
        if offset > self.max_offset:
            self.max_offset = offset
        if self.sr is not None:
            wall, rtp = self.sr
            sent = wall + (((timestamp - rtp + 0x80000000) & 0xFFFFFFFF) - 0x80000000) / self.clock
            ms = max(0.0, 1000 * (time.time() - sent))
            index = delay_bin(ms)
            self.delay_hist[index] = self.delay_hist.get(index, 0) + 1
            self.window_hist[index] = self.window_hist.get(index, 0) + 1
            self.delay_sum += ms
            self.delay_n += 1
            if ms > self.delay_max:
                self.delay_max = ms

    def ongoing_freeze(self, now: float) -> float:
        """Seconds of a freeze still in progress at ``now`` (0 if frames are flowing)."""
        if self.last_frame_at is None or now - self.last_frame_at <= FREEZE_GAP:
            return 0.0
        return now - self.last_frame_at

    def take_max_delay(self) -> tuple[float, float]:
        """(current, highest since the last call) queueing delay: transit delay above the
        lowest this stream has seen. Resets the highest."""
        if self._t0 is None:
            return 0.0, 0.0
        current = self.offset - self.min_offset
        highest = self.max_offset - self.min_offset
        self.max_offset = self.offset
        return current, highest


class _ReceptionReport:
    """What aiortc's receiver reads for its RTCP receiver reports, from a :class:`_Stream`.

    The student's RTP never reaches aiortc, so its own statistics stay empty and its RRs
    would say nothing; with this in their place the server gets the reports a browser
    sends (fraction lost, cumulative loss, highest sequence number, jitter, LSR/DLSR)."""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._expected_prior = 0
        self._received_prior = 0

    def _counts(self) -> tuple[int, int]:
        s = self._stream
        return s.highest - s.first + 1, s.received - s.duplicates

    @property
    def fraction_lost(self) -> int:
        expected, received = self._counts()
        expected_interval, received_interval = expected - self._expected_prior, received - self._received_prior
        self._expected_prior, self._received_prior = expected, received
        lost = expected_interval - received_interval
        return 0 if expected_interval <= 0 or lost <= 0 else min(255, (lost << 8) // expected_interval)

    @property
    def packets_lost(self) -> int:
        expected, received = self._counts()
        return max(0, min(expected - received, 0x7FFFFF))

    @property
    def max_seq(self) -> int:
        return self._stream.highest & 0xFFFF

    @property
    def jitter(self) -> int:
        return int(self._stream.jitter)


def _clear(flags: bytearray, start: int, count: int) -> None:
    """Zero ``count`` entries of a 65,536-entry ring from ``start``."""
    count = min(count, 0x10000)
    end = start + count
    if end <= 0x10000:
        flags[start:end] = bytes(count)
    else:
        flags[start:] = bytes(0x10000 - start)
        flags[:end - 0x10000] = bytes(end - 0x10000)


class CountingStudent:
    """A WHEP student that never decrypts or decodes its steady-state media.

    After :meth:`join`, the aioice socket protocols of the peer connection get a
    ``datagram_received`` wrapper (RFC 7983 demultiplexing on the first byte):

    * 0-3 (STUN): to aioice as before, so ICE checks and consent freshness work (the
      server drops a peer whose consent fails);
    * 20-63 (DTLS): to aioice/aiortc as before;
    * 128-191 with a second byte of 192-208 (RTCP SR/RR/SDES/BYE/APP/RTPFB/PSFB, the
      same test aiortc's ``is_rtcp`` uses): to aiortc as before;
    * other 128-191 (RTP): counted here from the clear header (SSRC, sequence number,
      marker bit, payload type, timestamp) and dropped. SRTP encrypts only the payload,
      so loss (from sequence numbers: 1 - distinct packets received / span of sequence
      numbers), duplicates (a 64 K-entry seen-flag table per SSRC), discontinuities (a
      sequence number more than 1,000 away from the highest seen: a forwarding bug, which
      also makes the loss figure meaningless), frame rate (marker bits on the video SSRC),
      interarrival jitter (RFC 3550) and freezes (no video frame for > 500 ms) need no
      key. The RTP timestamp against the arrival time of each video frame's last packet
      gives the transit delay up to a constant; its excess over the lowest seen is the
      queueing delay (server, sockets and this client's own lag: ``student_worker_main``
      also reports its event loop's lag to tell them apart). Once the server's RTCP
      sender report (which carries the teacher's NTP time) has tied the RTP clock to
      wall-clock time, the same arrival gives the end-to-end delay from the teacher's
      send to this student (meaningful when teacher and student share a clock, as in
      the harness: both run on the load machine).

    First keyframe: to time a join we must see whether a video payload starts an
    IDR/SPS, and the payload is encrypted. Until the first keyframe is seen, video
    packets are decrypted here with the DTLS transport's own receive SRTP session (the
    one aiortc would use; skipping packets in it is like loss, so nothing is disturbed)
    and checked with :func:`skyclass.media.rtp.h264_is_keyframe`; after that no packet
    is ever decrypted. Packets that arrive in the instant before the client has
    finished its DTLS handshake (the server may send right after its own end of it) are
    held and checked, with their arrival time, once the SRTP session exists.

    aiortc's receivers get no RTP at all, so their decoder threads are never started
    (:func:`skyclass.media.aiortc_glue.prevent_decoder`). By default students send no
    NACK or PLI and their receiver reports carry no report blocks: the loss measured is
    the raw loss of the forwarding path (what ``fanout_bench`` wants). With
    ``feedback=True`` (the load-test harness) a student behaves like a browser: its RRs
    report what it counted, it NACKs missing packets (the server repairs them from its
    cache; repaired packets are counted, so loss is known before and after repair) and
    sends a PLI when video cannot be repaired; the caller must call :meth:`maintain`
    every ~50 ms for retries.
    """

    def __init__(self, name: str, feedback: bool = False) -> None:
        self.name = name
        self.feedback = feedback
        self.session: Optional[PeerSession] = None
        self.streams: dict[bytes, _Stream] = {}  # by SSRC (4 raw bytes)
        self.video_payload_types: set[int] = set()
        self.posted_at: Optional[float] = None
        self.refusal: Optional[dict] = None  # status and Retry-After of a refused WHEP POST
        self.answered_at: Optional[float] = None
        self.ice_connected_at: Optional[float] = None
        self.connected_at: Optional[float] = None
        self.first_packet_at: Optional[float] = None
        self.keyframe_at: Optional[float] = None
        self.stopped_at: Optional[float] = None
        self.state = "new"
        self.counting = True
        self.nacks = 0       # RTCP NACK packets sent
        self.nacked = 0      # sequence numbers asked for
        self.plis = 0
        self.last_sample: tuple = (0,) * len(SAMPLE_FIELDS)
        self._dtls = None
        self._held: list[tuple[bytes, float]] = []
        self._receivers: dict[str, Any] = {}
        self._pending = False
        self._nack_scheduled = False
        self._last_pli = 0.0

    async def join(self, base_url: str, room: str, token: str) -> None:
        self.state = "joining"
        session = await watch(base_url, room, token)
        self.session = session
        self.posted_at = session.posted_at
        self.answered_at = session.answered_at
        pc = session.pc
        # Nothing has connected yet: setRemoteDescription only scheduled ICE, whose
        # checks need the network, so receivers have not started and no RTP has come.
        for transceiver in pc.getTransceivers():
            aiortc_glue.prevent_decoder(transceiver.receiver)
            self._receivers.setdefault(transceiver.kind, transceiver.receiver)
        answer = aiortc_sdp.SessionDescription.parse(pc.remoteDescription.sdp)
        for media in answer.media:
            if media.kind == "video":
                self.video_payload_types.update(c.payloadType for c in media.rtp.codecs)
        self._dtls = pc.getTransceivers()[0].receiver.transport  # BUNDLE: one transport
        connection = self._dtls.transport._connection  # aioice Connection (private, aioice 0.13)
        for protocol in connection._protocols:
            protocol.datagram_received = self._make_handler(protocol.datagram_received)
        if self.feedback:
            self._tap_sender_reports()

        @pc.on("connectionstatechange")
        def on_state() -> None:
            state = pc.connectionState
            if state == "connected" and self.connected_at is None:
                self.connected_at = time.monotonic()
            self.state = state

        @pc.on("iceconnectionstatechange")
        def on_ice_state() -> None:
            if pc.iceConnectionState in ("connected", "completed") and self.ice_connected_at is None:
                self.ice_connected_at = time.monotonic()

    def _tap_sender_reports(self) -> None:
        """See the server's SRs (decrypted by aiortc) before aiortc routes them: their NTP
        time gives end-to-end delay. aiortc routes an SR by the SSRC its RTP brought in,
        and none came in, so :meth:`_adopt` also registers each SSRC with its receiver."""
        from aiortc.rtp import RtcpSrPacket

        router = self._dtls._rtp_router  # private (aiortc 1.16)
        original = router.route_rtcp
        streams = self.streams

        def route_rtcp(packet):  # type: ignore[no-untyped-def]
            if isinstance(packet, RtcpSrPacket):
                stream = streams.get(packet.ssrc.to_bytes(4, "big"))
                if stream is not None:
                    stream.sender_report(packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)
            return original(packet)

        router.route_rtcp = route_rtcp

    def _adopt(self, stream: _Stream) -> None:
        """A new SSRC: let its receiver report on it (RRs, LSR/DLSR from its SRs)."""
        receiver = self._receivers.get("video" if stream.video else "audio")
        if receiver is None:
            return
        try:
            self._dtls._rtp_router.ssrc_table[stream.ssrc] = receiver
            receiver._RTCRtpReceiver__remote_streams[stream.ssrc] = _ReceptionReport(stream)
        except AttributeError:  # aiortc moved its internals: reports stay empty, counting goes on
            logger.warning("student=%s cannot attach reception reports", self.name)

    def _make_handler(self, original):
        streams = self.streams
        video_pts = self.video_payload_types
        monotonic = time.monotonic
        feedback = self.feedback

        def datagram_received(data: bytes, addr: tuple) -> None:
            if len(data) < 12 or not 127 < data[0] < 192 or 191 < data[1] < 209:
                original(data, addr)
                return
            if not self.counting:
                return
            now = monotonic()
            key = data[8:12]
            seq = (data[2] << 8) | data[3]
            timestamp = (data[4] << 24) | (data[5] << 16) | (data[6] << 8) | data[7]
            stream = streams.get(key)
            if stream is None:
                stream = streams[key] = _Stream(seq, (data[1] & 0x7F) in video_pts, int.from_bytes(key, "big"))
                stream.arrived(now, timestamp)
                if feedback:
                    self._adopt(stream)
                if self.first_packet_at is None:
                    self.first_packet_at = now
            else:
                stream.received += 1
                seen = stream.seen
                highest = stream.highest
                delta = (seq - highest) & 0xFFFF
                if 0 < delta < 0x8000:
                    if delta > 1:  # new highest: the sequence numbers skipped are missing (for now)
                        _clear(seen, (highest + 1) & 0xFFFF, delta - 1)
                        if delta > JUMP:
                            stream.jumps += 1
                        elif feedback:
                            stream.note_missing(highest + 1, delta - 1, now)
                            self._pending = True
                            self._schedule_nack()
                    stream.highest = highest + delta
                    seen[seq] = 1
                    stream.arrived(now, timestamp)
                elif seen[seq]:
                    stream.duplicates += 1  # already counted
                    return
                else:
                    seen[seq] = 1  # late, fills a gap
                    missing = stream.missing
                    if missing and seq in missing:
                        del missing[seq]
                        stream.repaired += 1  # a NACKed packet came back
                    elif 0x10000 - delta > JUMP:
                        stream.jumps += 1
            if data[1] & 0x80 and stream.video:
                stream.frame_end(now, timestamp)
            if stream.video and self.keyframe_at is None:
                self._look_for_keyframe(data, now)

        return datagram_received

    def _look_for_keyframe(self, data: bytes, arrived: float) -> None:
        srtp = getattr(self._dtls, "_rx_srtp", None)
        if srtp is None:
            if len(self._held) < 256:
                self._held.append((data, arrived))
            return
        held, self._held = self._held, []
        for packet, at in held + [(data, arrived)]:
            try:
                plain = srtp.unprotect(packet)
            except Exception:
                continue
            if h264_is_keyframe(_rtp_payload(plain)):
                self.keyframe_at = at
                self._held = []
                return

    # --- feedback (feedback=True) -------------------------------------------------------

    def _schedule_nack(self) -> None:
        """NACK new gaps once this burst of datagrams has been read (one RTCP packet per
        stream rather than one per gap)."""
        if not self._nack_scheduled:
            self._nack_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_nacks)

    def _flush_nacks(self) -> None:
        self._nack_scheduled = False
        self.maintain(time.monotonic(), new_only=True)

    def _send(self, stream: _Stream, coroutine_factory: str, *args: Any) -> None:
        receiver = self._receivers.get("video" if stream.video else "audio")
        if receiver is not None and self.session is not None:
            asyncio.ensure_future(getattr(receiver, coroutine_factory)(stream.ssrc, *args))

    def maintain(self, now: float, new_only: bool = False) -> None:
        """Send due NACKs (new gaps, retries), give up on packets too old to repair, and
        send a PLI when video cannot continue without a keyframe."""
        if not self._pending or not self.counting:
            return
        pending = False
        for stream in self.streams.values():
            if stream.missing:
                due: list[int] = []
                for seq, entry in list(stream.missing.items()):
                    first, tries, last = entry
                    if now - first > GIVE_UP:
                        del stream.missing[seq]
                        stream.lost_for_good += 1
                        stream.needs_keyframe = stream.video
                    elif tries == 0 or (not new_only and tries < NACK_TRIES and now - last >= NACK_RETRY):
                        entry[1], entry[2] = tries + 1, now
                        due.append(seq)
                if due:
                    self.nacks += 1
                    self.nacked += len(due)
                    self._send(stream, "_send_rtcp_nack", sorted(due))
                pending = pending or bool(stream.missing)
            if stream.needs_keyframe:
                if now - self._last_pli >= PLI_INTERVAL:
                    stream.needs_keyframe = False
                    self._last_pli = now
                    self.plis += 1
                    self._send(stream, "_send_rtcp_pli")
                else:
                    pending = True
        self._pending = pending

    # --- reading the counters -----------------------------------------------------------

    def stop_counting(self) -> None:
        """The student leaves: count nothing more; a freeze in progress ends here."""
        if not self.counting:
            return
        now = time.monotonic()
        for stream in self.streams.values():
            if stream.video:
                ongoing = stream.ongoing_freeze(now)
                if ongoing:
                    stream.freeze_s += ongoing
                    stream.freezes += 1
                    stream.last_frame_at = now
        self.last_sample = self.sample(now)
        self.counting = False
        self.stopped_at = now

    def sample(self, now: float) -> tuple:
        """Cumulative counters in :data:`SAMPLE_FIELDS` order (differences of two samples
        describe a window; ``delay_max`` is the highest since the previous sample)."""
        if not self.counting:
            return self.last_sample
        rx = exp = repaired = frames = 0
        freeze = delay_sum = delay_max = 0.0
        delay_n = 0
        jitter = 0.0
        for stream in self.streams.values():
            rx += stream.received - stream.duplicates
            exp += stream.highest - stream.first + 1
            repaired += stream.repaired
            if stream.video:
                frames += stream.frames
                freeze += stream.freeze_s + stream.ongoing_freeze(now)
                delay_sum += stream.delay_sum
                delay_n += stream.delay_n
                delay_max = max(delay_max, stream.delay_max)
                stream.delay_max = 0.0
                jitter = max(jitter, 1000 * stream.jitter / stream.clock)
        self.last_sample = (int(self.keyframe_at is not None), rx, exp, repaired, frames, round(freeze, 3),
                            self.nacks, self.plis, round(delay_sum, 1), delay_n, round(delay_max, 1), round(jitter, 2))
        return self.last_sample

    def take_window_histogram(self) -> dict[int, int]:
        """End-to-end delay histogram (:func:`delay_bin`) of video frames since the last call."""
        merged: dict[int, int] = {}
        for stream in self.streams.values():
            if stream.window_hist:
                for index, count in stream.window_hist.items():
                    merged[index] = merged.get(index, 0) + count
                stream.window_hist = {}
        return merged

    def summary(self) -> dict[str, Any]:
        """The whole session: loss before and after repair, feedback sent, freezes, jitter,
        end-to-end delay (percentiles and the sparse histogram, for merging)."""
        end = self.stopped_at or time.monotonic()
        rx = exp = dup = repaired = jumps = frames = freezes = 0
        freeze = watch = 0.0
        jitter: dict[str, float] = {}
        hist: dict[int, int] = {}
        for stream in self.streams.values():
            kind = "video" if stream.video else "audio"
            rx += stream.received - stream.duplicates
            exp += stream.highest - stream.first + 1
            dup += stream.duplicates
            repaired += stream.repaired
            jumps += stream.jumps
            jitter[kind] = max(jitter.get(kind, 0.0), round(1000 * stream.jitter / stream.clock, 2))
            if stream.video:
                frames += stream.frames
                freezes += stream.freezes
                freeze += stream.freeze_s + (stream.ongoing_freeze(end) if self.counting else 0.0)
                if stream.first_frame_at is not None:
                    watch = max(watch, end - stream.first_frame_at)
                for index, count in stream.delay_hist.items():
                    hist[index] = hist.get(index, 0) + count
        return {
            "streams": len(self.streams), "rx": rx, "exp": exp, "dup": dup, "repaired": repaired, "jumps": jumps,
            "lost_raw": max(0, exp - rx + repaired), "lost_residual": max(0, exp - rx),
            "frames": frames, "watch_s": round(watch, 3), "fps": round(frames / watch, 2) if watch > 0 else 0.0,
            "freeze_s": round(freeze, 3), "freezes": freezes,
            "nacks": self.nacks, "nacked": self.nacked, "plis": self.plis, "jitter_ms": jitter,
            "delay_ms": {"p50": histogram_percentile(hist, 50), "p95": histogram_percentile(hist, 95),
                         "max": delay_bin_upper(max(hist)) if hist else None, "n": sum(hist.values())},
            "delay_hist": hist,
        }

    def totals(self) -> dict[str, Any]:
        """Cumulative counters (differences of two calls describe a window), plus the video
        queueing delay now and its highest since the previous call."""
        rx = exp = dup = jumps = video_rx = video_exp = frames = 0
        delay = max_delay = 0.0
        for stream in self.streams.values():
            expected = stream.highest - stream.first + 1
            rx += stream.received
            exp += expected
            dup += stream.duplicates
            jumps += stream.jumps
            if stream.video:
                video_rx += stream.received - stream.duplicates
                video_exp += expected
                frames += stream.frames
                delay, max_delay = stream.take_max_delay()
        return {"rx": rx, "exp": exp, "dup": dup, "jumps": jumps, "ssrcs": len(self.streams), "video_rx": video_rx,
                "video_exp": video_exp, "frames": frames, "delay": delay, "max_delay": max_delay,
                "state": self.state}

    def join_times(self) -> dict[str, Optional[float]]:
        def since_post(t: Optional[float]) -> Optional[float]:
            return None if t is None or self.posted_at is None else t - self.posted_at

        return {"posted_at": self.posted_at, "connected": since_post(self.connected_at),
                "first_packet": since_post(self.first_packet_at), "keyframe": since_post(self.keyframe_at)}

    def event_times(self) -> dict[str, Optional[float]]:
        """When each step of the join happened (``time.monotonic()``): POST, answer, ICE
        connected, DTLS connected (connection state "connected"), first RTP, first keyframe."""
        return {"posted_at": self.posted_at, "answered_at": self.answered_at,
                "ice_connected_at": self.ice_connected_at, "connected_at": self.connected_at,
                "first_packet_at": self.first_packet_at, "keyframe_at": self.keyframe_at}

    async def close(self) -> None:
        if self.session is not None:
            try:
                await asyncio.wait_for(self.session.close(delete=True), 5)
            except Exception:
                await self.session.pc.close()
            self.session = None


# What :meth:`CountingStudent.sample` returns, in order.
SAMPLE_FIELDS = ("keyframe", "rx", "exp", "repaired", "frames", "freeze_s", "nacks", "plis",
                 "delay_sum_ms", "delay_n", "delay_max_ms", "jitter_ms")


# --- processes ------------------------------------------------------------------------

def process_cpu() -> float:
    """This process's CPU seconds (user + system), for client-side cost per student."""
    t = os.times()
    return t.user + t.system


def serve_pipe(conn, handlers: dict, host_addresses: Optional[list[str]] = ["127.0.0.1"]) -> None:  # noqa: B006
    """Run an asyncio loop answering ``{"op": ..., **args}`` messages on ``conn``, one
    reply per message, until an ``exit`` message.

    ``host_addresses``: the only ICE host candidates this process's peers offer (media to
    a local server stays on 127.0.0.1, testing.md); None lets aioice gather the machine's
    interfaces, which a load machine driving a remote deployment needs."""
    aiortc_glue.restrict_host_addresses(host_addresses)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        async def handle(message: dict) -> None:
            op = message.pop("op")
            try:
                if op == "exit":
                    result: Any = {"ok": True}
                else:
                    result = await handlers[op](**message)
            except Exception as exc:  # report, keep serving
                logger.exception("op %s failed", op)
                result = {"error": f"{exc.__class__.__name__}: {exc}"}
            conn.send(result)
            if op == "exit" and not done.done():
                done.set_result(None)

        def readable() -> None:
            try:
                message = conn.recv()
            except EOFError:
                loop.remove_reader(conn.fileno())
                if not done.done():
                    done.set_result(None)
                return
            asyncio.ensure_future(handle(message))

        loop.add_reader(conn.fileno(), readable)
        await done
        loop.remove_reader(conn.fileno())

    asyncio.run(main())


def student_worker_main(conn, worker_id: int) -> None:
    """A process of simulated students. Ops: ``join``, ``totals``, ``close_all``, ``exit``."""
    students: dict[str, CountingStudent] = {}

    async def join_one(student: CountingStudent, url: str, room: str, token: str, at: Optional[float],
                       limit: asyncio.Semaphore, timeout: float) -> None:
        if at is not None:
            await asyncio.sleep(max(0.0, at - time.monotonic()))
        async with limit:
            try:
                await asyncio.wait_for(student.join(url, room, token), timeout)
                assert student.session is not None
                await asyncio.wait_for(student.session.connected.wait(), timeout)
            except Exception as exc:
                student.state = f"failed: {exc.__class__.__name__}: {exc}"
                if isinstance(exc, SignallingFailed):  # a refusal: what admission control said
                    student.refusal = {"status": exc.status, "retry_after": exc.headers.get("Retry-After")}

    async def join(url: str, room: str, students_: list, concurrency: int = 8, timeout: float = 30.0,
                   wait_keyframe: float = 0.0) -> dict:
        """Join ``students_`` = [(name, token, start_at_monotonic_or_None)], wait until
        connected (and, if ``wait_keyframe``, until each saw a keyframe or that many
        seconds passed)."""
        limit = asyncio.Semaphore(concurrency)
        new = []
        for name, token, at in students_:
            student = students[name] = CountingStudent(name)
            new.append(join_one(student, url, room, token, at, limit, timeout))
        await asyncio.gather(*new)
        if wait_keyframe:
            deadline = time.monotonic() + wait_keyframe
            joined = [students[n] for n, _, _ in students_]
            while time.monotonic() < deadline and any(s.keyframe_at is None for s in joined):
                await asyncio.sleep(0.05)
        return {"worker": worker_id, "connected": sum(1 for n, _, _ in students_ if students[n].connected_at),
                "failed": [students[n].state for n, _, _ in students_ if students[n].connected_at is None],
                "refused": [students[n].refusal for n, _, _ in students_ if students[n].refusal is not None],
                "join": {n: students[n].join_times() for n, _, _ in students_}}

    lag = {"max": 0.0}

    async def watch_lag() -> None:
        """This process's event-loop lag: if it is high, delays measured here are ours."""
        while True:
            before = time.monotonic()
            await asyncio.sleep(0.05)
            lag["max"] = max(lag["max"], time.monotonic() - before - 0.05)

    lag_task: list = []

    async def totals() -> dict:
        if not lag_task:
            lag_task.append(asyncio.ensure_future(watch_lag()))
        max_lag, lag["max"] = lag["max"], 0.0
        return {"worker": worker_id, "time": time.monotonic(), "cpu": process_cpu(), "max_loop_lag": max_lag,
                "students": {name: s.totals() for name, s in students.items()}}

    async def close_all() -> dict:
        await asyncio.gather(*(s.close() for s in students.values()), return_exceptions=True)
        students.clear()
        return {"ok": True}

    serve_pipe(conn, {"join": join, "totals": totals, "close_all": close_all})


def teacher_main(conn, clip_path: str, fps: int = 30) -> None:
    """The teacher's process. Ops: ``publish``, ``unpublish``, ``cpu``, ``exit``."""
    units = load_h264_access_units(Path(clip_path))
    opus = make_opus_packets()
    state: dict[str, Any] = {}

    async def publish_op(url: str, room: str, token: str, timeout: float = 20.0) -> dict:
        video, audio = PacketVideoTrack(units, fps), PacketAudioTrack(opus)
        session = await publish(url, room, token, [video, audio])
        honour_keyframe_requests(session, video)
        state.update(session=session, video=video)
        await asyncio.wait_for(session.connected.wait(), timeout)
        return {"ok": True, "connected_in": time.monotonic() - session.posted_at}

    async def unpublish() -> dict:
        session = state.pop("session", None)
        video = state.pop("video", None)
        if session is not None:
            try:
                await asyncio.wait_for(session.close(delete=True), 5)
            except Exception:
                await session.pc.close()
        return {"ok": True, "keyframes_sent": getattr(video, "keyframes_sent", 0),
                "keyframe_requests": getattr(video, "keyframe_requests", 0)}

    async def cpu() -> dict:
        """CPU so far, and RTP packets sent (retransmissions included) on the current session."""
        sent = 0
        session = state.get("session")
        if session is not None:
            for sender in session.pc.getSenders():
                for stats in (await sender.getStats()).values():
                    if stats.type == "outbound-rtp":
                        sent += stats.packetsSent
        return {"time": time.monotonic(), "cpu": process_cpu(), "packets_sent": sent,
                "state": session.pc.connectionState if session is not None else None}

    serve_pipe(conn, {"publish": publish_op, "unpublish": unpublish, "cpu": cpu})

"""A room's media: the teacher's tracks in (Producers), one rewritten copy per student out (Consumers).

Vocabulary after mediasoup: a :class:`Router` holds one :class:`TrackStream` per media
kind; a :class:`Producer` feeds a stream with the teacher's decrypted RTP; a
:class:`Consumer` is one student's copy of a stream. Per incoming packet the stream does
the work once (sequence/timestamp mapping, keyframe peek, cache insert); per consumer
it only writes a 12-byte header, SRTP-protects and sends.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass, fields
from typing import Callable, Optional, Protocol

from aiortc import RTCRtpReceiver, RTCRtpTransceiver
from aiortc.rtp import RtpPacket

from . import aiortc_glue
from .keyframe import KeyframeRequester
from .packetcache import CachedPacket, PacketCache
from .rtp import build_header, keyframe_detector, seq_add, seq_gt, ts_add

logger = logging.getLogger(__name__)

NTP_EPOCH_OFFSET = 2208988800  # seconds from 1900 (NTP) to 1970 (Unix)


def ntp_now() -> int:
    """The current wall-clock time as a 64-bit NTP timestamp."""
    now = time.time() + NTP_EPOCH_OFFSET
    return (int(now) << 32) | int((now % 1) * (1 << 32))


@dataclass
class MediaCounters:
    """Node-wide forwarding counters, read by the metrics endpoint. Plain ints: the hot
    path increments them without locks or label lookups."""

    packets_in: int = 0
    bytes_in: int = 0
    packets_out: int = 0
    bytes_out: int = 0
    keyframe_requests_received: int = 0
    keyframe_requests_sent: int = 0
    nacks_received: int = 0
    retransmissions: int = 0
    dropped_slow_viewer: int = 0

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class PacketSink(Protocol):
    """A subscriber inside the server (the recorder, a relay to another node): it gets
    the stream's packets in the router's sequence/timestamp space, unencrypted."""

    def on_rtp(self, seq: int, timestamp: int, marker: int, payload: bytes, entry_point: bool) -> None: ...

    def on_sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> None: ...


class Consumer:
    """One student's copy of a track: its own SSRC, payload type and sequence space.

    The student starts at a clean entry point (a keyframe for video, any packet for
    audio) and its sequence numbers start below 32768 from there, so SRTP's rollover
    counter guess is safe. If its socket is full the packet is dropped for this student
    only; nobody else waits.
    """

    __slots__ = (
        "stream", "peer_id", "kind", "ssrc", "payload_type", "_pt_by_mime", "_sender",
        "_binding", "_waiting", "_seq_delta", "packets", "octets", "dropped", "_closed",
    )

    def __init__(self, stream: "TrackStream", transceiver: RTCRtpTransceiver, peer_id: str) -> None:
        params = aiortc_glue.sender_parameters(transceiver)
        self.stream = stream
        self.peer_id = peer_id
        self.kind = stream.kind
        self.ssrc = params.ssrc
        # Every codec the student agreed to, so a teacher who reconnects with another
        # negotiated codec is still playable: only the payload type changes.
        self._pt_by_mime = aiortc_glue.negotiated_payload_types(transceiver)
        self.payload_type = -1
        self.codec_changed(stream.mime_type or params.mime_type)
        self._sender = transceiver.sender
        self._binding: Optional[aiortc_glue.SenderBinding] = None
        self._waiting = True
        self._seq_delta = 0
        self.packets = 0
        self.octets = 0
        self.dropped = 0
        self._closed = False
        aiortc_glue.hook_sender_feedback(self._sender, self._on_keyframe_request, self._on_nack)

    def codec_changed(self, mime_type: str) -> None:
        self.payload_type = self._pt_by_mime.get(mime_type.lower(), -1)

    @property
    def playable(self) -> bool:
        return self.payload_type >= 0

    @property
    def connected(self) -> bool:
        return self._binding is not None

    def bind(self, binding: aiortc_glue.SenderBinding) -> None:
        """Start forwarding to this student (its DTLS/SRTP is up)."""
        if self._closed:
            return
        self._binding = binding
        if self.stream.detect_keyframe is not None:
            # A joining student needs a keyframe; the requester coalesces join storms.
            self.stream.request_keyframe()

    def forward(self, seq: int, ts: int, marker: int, payload: bytes, entry_point: bool) -> None:
        binding = self._binding
        if binding is None or self.payload_type < 0:
            return
        if self._waiting:
            if not entry_point:
                return
            self._waiting = False
            self._seq_delta = (random.randint(1000, 20000) - seq) & 0xFFFF
        data = build_header(marker, self.payload_type, (seq + self._seq_delta) & 0xFFFF, ts, self.ssrc) + payload
        counters = self.stream.counters
        if binding.send_rtp(data):
            self.packets += 1
            self.octets += len(payload)
            counters.packets_out += 1
            counters.bytes_out += len(data)
        else:
            self.dropped += 1
            counters.dropped_slow_viewer += 1

    def _on_keyframe_request(self) -> None:
        self.stream.counters.keyframe_requests_received += 1
        self.stream.request_keyframe()

    async def _on_nack(self, seq: int) -> None:
        """Repair one lost packet from the track's cache, rewritten for this student."""
        stream = self.stream
        stream.counters.nacks_received += 1
        binding = self._binding
        if binding is None or self._waiting:
            return
        entry = stream.cache.get((seq - self._seq_delta) & 0xFFFF)
        if entry is None:
            return
        data = build_header(entry.marker, self.payload_type, seq, entry.timestamp, self.ssrc) + entry.payload
        if binding.send_rtp(data):
            stream.counters.retransmissions += 1

    def report(self, ntp_timestamp: int, rtp_timestamp: int) -> None:
        """Refresh the sender report the stock sender will send for this student."""
        aiortc_glue.update_sender_report(self._sender, ntp_timestamp, rtp_timestamp, self.packets, self.octets)

    def close(self) -> None:
        self._closed = True
        self._binding = None
        self.stream.remove_consumer(self)


class Producer:
    """The teacher's track feeding a stream: decrypted once, never decoded."""

    def __init__(
        self, stream: "TrackStream", receiver: RTCRtpReceiver, peer_id: str, payload_types: frozenset[int]
    ) -> None:
        self.stream = stream
        self.receiver = receiver
        self.peer_id = peer_id
        # Only the room's codec is forwarded: a stray payload type would be garbage to students.
        self.payload_types = payload_types
        self.media_ssrc: Optional[int] = None
        self.closed = False
        self.created_at = time.monotonic()
        self.last_rtp_at: Optional[float] = None
        aiortc_glue.prevent_decoder(receiver)
        aiortc_glue.tap_receiver(receiver, self._on_rtp)
        aiortc_glue.tap_sender_reports(receiver, self._on_sender_report)

    def _on_rtp(self, packet: RtpPacket, arrival_time_ms: int) -> None:
        if self.closed or self.stream.producer is not self or packet.payload_type not in self.payload_types:
            return
        self.media_ssrc = packet.ssrc
        self.last_rtp_at = time.monotonic()
        self.stream.on_rtp(packet)

    def _on_sender_report(self, ssrc: int, ntp_timestamp: int, rtp_timestamp: int) -> None:
        if not self.closed and self.stream.producer is self:
            self.stream.on_sender_report(ssrc, ntp_timestamp, rtp_timestamp)

    def idle_for(self, now: float) -> float:
        """Seconds since this track last delivered RTP (or since it was created)."""
        return now - (self.last_rtp_at if self.last_rtp_at is not None else self.created_at)

    def send_pli(self) -> None:
        if self.media_ssrc is None or self.closed:
            return
        if not aiortc_glue.receiver_ready(self.receiver):
            return
        asyncio.ensure_future(aiortc_glue.send_pli(self.receiver, self.media_ssrc))

    def close(self) -> None:
        self.closed = True
        self.stream.detach_producer(self)


class TrackStream:
    """One kind of media in a room as students see it: a single RTP stream whose
    sequence numbers and timestamps run on across teacher reconnects."""

    def __init__(self, room: str, kind: str, counters: MediaCounters, keyframe_interval: float = 0.5,
                 slot: Optional[str] = None) -> None:
        self.room = room
        self.kind = kind
        self.slot = slot or kind
        self.counters = counters
        self.mime_type: Optional[str] = None
        self.clock_rate = 90000 if kind == "video" else 48000
        self.detect_keyframe: Optional[Callable[[bytes], bool]] = None
        self.cache = PacketCache()
        self.producer: Optional[Producer] = None
        self._consumers: list[Consumer] = []
        self._sinks: list[PacketSink] = []
        # last teacher SR mapped into our timestamp space: (ntp, rtp, monotonic when seen)
        self.sender_report: Optional[tuple[int, int, float]] = None
        self.keyframes = KeyframeRequester(self._send_keyframe_request, keyframe_interval)
        # Where coalesced keyframe requests go: the teacher's PLI at the origin; set by
        # the relay at an edge, to ask the origin.
        self.upstream_keyframe: Optional[Callable[[], None]] = None
        self.closed = False
        # mapping from the current source's seq/ts to ours
        self._source_ssrc: Optional[int] = None
        self._seq_offset = 0
        self._ts_offset = 0
        self._last_seq: Optional[int] = None
        self._last_ts = random.getrandbits(32)
        self._last_arrival = 0.0
        self.packets_in = 0

    @property
    def last_packet_at(self) -> float:
        """``time.monotonic()`` of the newest packet forwarded (0 before the first)."""
        return self._last_arrival

    # codec ---------------------------------------------------------------------------
    def set_codec(self, mime_type: str, clock_rate: int) -> None:
        """Fix the room's codec for this kind (the teacher's, or the first agreed)."""
        self.mime_type = mime_type
        self.clock_rate = clock_rate
        self.detect_keyframe = keyframe_detector(mime_type)
        for consumer in self._consumers:
            consumer.codec_changed(mime_type)

    # producers -----------------------------------------------------------------------
    def attach_producer(self, receiver: RTCRtpReceiver, peer_id: str, mime_type: str, clock_rate: int,
                        payload_types: frozenset[int]) -> Producer:
        """Make ``receiver`` the source of this stream, replacing any previous teacher track."""
        if self.producer is not None:
            self.producer.closed = True
        if (self.mime_type or "").lower() != mime_type.lower():
            self.set_codec(mime_type, clock_rate)
        producer = Producer(self, receiver, peer_id, payload_types)
        self.producer = producer
        logger.info("room=%s slot=%s producer attached peer=%s", self.room, self.slot, peer_id)
        return producer

    def detach_producer(self, producer: Producer) -> None:
        if self.producer is producer:
            self.producer = None
            logger.info("room=%s slot=%s producer detached peer=%s", self.room, self.slot, producer.peer_id)

    def on_rtp(self, packet: RtpPacket) -> None:
        """Map one incoming packet into the stream and fan it out."""
        counters = self.counters
        payload = packet.payload
        counters.packets_in += 1
        counters.bytes_in += len(payload) + 12
        self.packets_in += 1
        if packet.ssrc != self._source_ssrc:
            self._switch_source(packet)
        seq = (packet.sequence_number + self._seq_offset) & 0xFFFF
        if not payload:
            # Padding-only probe: nothing to forward. Close the hole it leaves in our
            # sequence space so students do not NACK for it.
            if self._last_seq is not None and seq == seq_add(self._last_seq, 1):
                self._seq_offset = (self._seq_offset - 1) & 0xFFFF
            return
        ts = (packet.timestamp + self._ts_offset) & 0xFFFFFFFF
        detect = self.detect_keyframe
        self._fan_out(seq, ts, packet.marker, payload, detect(payload) if detect is not None else True)

    def on_relayed(self, seq: int, ts: int, marker: int, payload: bytes, entry_point: bool) -> None:
        """A packet from the origin node, already in the room's sequence/timestamp space."""
        self.counters.packets_in += 1
        self.counters.bytes_in += len(payload) + 12
        self.packets_in += 1
        self._fan_out(seq, ts, marker, payload, entry_point)

    def on_relayed_sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> None:
        self.sender_report = (ntp_timestamp, rtp_timestamp, time.monotonic())
        for sink in self._sinks:
            sink.on_sender_report(ntp_timestamp, rtp_timestamp)

    def _fan_out(self, seq: int, ts: int, marker: int, payload: bytes, entry_point: bool) -> None:
        if self._last_seq is None or seq_gt(seq, self._last_seq):
            self._last_seq = seq
            self._last_ts = ts
            self._last_arrival = time.monotonic()
        self.cache.put(CachedPacket(seq, ts, marker, payload))
        for consumer in self._consumers:
            consumer.forward(seq, ts, marker, payload, entry_point)
        for sink in self._sinks:
            sink.on_rtp(seq, ts, marker, payload, entry_point)

    def on_sender_report(self, ssrc: int, ntp_timestamp: int, rtp_timestamp: int) -> None:
        if ssrc != self._source_ssrc:
            return
        rtp = (rtp_timestamp + self._ts_offset) & 0xFFFFFFFF
        self.sender_report = (ntp_timestamp, rtp, time.monotonic())
        for sink in self._sinks:
            sink.on_sender_report(ntp_timestamp, rtp)

    def _switch_source(self, packet: RtpPacket) -> None:
        """A new teacher stream (reconnect, encoder restart): continue our numbering."""
        if self._last_seq is None:
            self._seq_offset = (random.randint(1000, 20000) - packet.sequence_number) & 0xFFFF
            self._ts_offset = (self._last_ts - packet.timestamp) & 0xFFFFFFFF
        else:
            elapsed = max(time.monotonic() - self._last_arrival, 0.001)
            next_ts = ts_add(self._last_ts, int(elapsed * self.clock_rate))
            self._seq_offset = (seq_add(self._last_seq, 1) - packet.sequence_number) & 0xFFFF
            self._ts_offset = (next_ts - packet.timestamp) & 0xFFFFFFFF
        logger.info(
            "room=%s slot=%s new source ssrc=%d (was %s)", self.room, self.slot, packet.ssrc, self._source_ssrc
        )
        self._source_ssrc = packet.ssrc
        self.sender_report = None
        if self.detect_keyframe is not None:
            self.request_keyframe()

    # consumers -----------------------------------------------------------------------
    def add_consumer(self, transceiver: RTCRtpTransceiver, peer_id: str) -> Consumer:
        consumer = Consumer(self, transceiver, peer_id)
        self._consumers.append(consumer)
        return consumer

    def remove_consumer(self, consumer: Consumer) -> None:
        try:
            self._consumers.remove(consumer)
        except ValueError:
            pass

    @property
    def consumers(self) -> list[Consumer]:
        return list(self._consumers)

    def add_sink(self, sink: PacketSink) -> None:
        self._sinks.append(sink)
        if self.detect_keyframe is not None:
            self.request_keyframe()

    def remove_sink(self, sink: PacketSink) -> None:
        try:
            self._sinks.remove(sink)
        except ValueError:
            pass

    # keyframes -----------------------------------------------------------------------
    def request_keyframe(self) -> None:
        self.keyframes.request()

    def _send_keyframe_request(self) -> None:
        if self.upstream_keyframe is not None:
            self.upstream_keyframe()
        elif self.producer is not None:
            self.counters.keyframe_requests_sent += 1
            self.producer.send_pli()

    # RTCP ----------------------------------------------------------------------------
    def refresh_sender_reports(self) -> None:
        """Pair "now" in NTP with our RTP clock, so the students' sender reports (A/V sync,
        RTT) describe what they receive: from the teacher's last SR when there is one
        (keeps the teacher's own audio/video alignment), else from the last packet."""
        if self._last_seq is None:
            return
        now = time.monotonic()
        if self.sender_report is not None:
            sr_ntp, sr_rtp, seen = self.sender_report
            elapsed = now - seen
            ntp = sr_ntp + int(elapsed * (1 << 32))
            rtp_now = ts_add(sr_rtp, int(elapsed * self.clock_rate))
        else:
            rtp_now = ts_add(self._last_ts, int((now - self._last_arrival) * self.clock_rate))
            ntp = ntp_now()
        for consumer in self._consumers:
            consumer.report(ntp, rtp_now)

    def close(self) -> None:
        self.closed = True
        self.keyframes.close()
        self._sinks.clear()
        for consumer in list(self._consumers):
            consumer.close()
        if self.producer is not None:
            self.producer.close()


# A room's streams, by slot. The teacher publishes into the main slots; a student given
# the floor publishes into the speaker slots. Students' offers pre-allocate them: their
# first audio/video m-lines receive the teacher, the second ones the speaker, so a new
# speaker reaches everyone without renegotiation (the slot's sequence space simply
# continues, as on a teacher reconnect).
SLOTS: dict[str, str] = {"audio": "audio", "video": "video", "speaker.audio": "audio", "speaker.video": "video"}
SPEAKER_PREFIX = "speaker."


def slot_for(kind: str, ordinal: int) -> Optional[str]:
    """The slot the ``ordinal``-th (0-based) m-line of ``kind`` in a student's offer receives."""
    if ordinal == 0:
        return kind
    if ordinal == 1:
        return SPEAKER_PREFIX + kind
    return None


class Router:
    """A room's media plane: one stream per slot, a housekeeping task for RTCP."""

    def __init__(self, room: str, counters: MediaCounters, keyframe_interval: float = 0.5) -> None:
        self.room = room
        self.counters = counters
        self.streams = {slot: TrackStream(room, kind, counters, keyframe_interval, slot=slot)
                        for slot, kind in SLOTS.items()}
        self.started_at: Optional[float] = None
        self._task: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._housekeeping())

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for stream in self.streams.values():
                stream.refresh_sender_reports()

    @property
    def live(self) -> bool:
        """The teacher is publishing (a speaker alone does not make a lesson live)."""
        return any(self.streams[kind].producer is not None for kind in ("audio", "video"))

    def receiving(self, within: float) -> bool:
        """The teacher's media arrived within the last ``within`` seconds (from a producer here
        or relayed from the room's origin)."""
        now = time.monotonic()
        return any(now - self.streams[kind].last_packet_at < within for kind in ("audio", "video"))

    def codecs(self) -> dict[str, Optional[str]]:
        """The codec of each slot that has one."""
        return {slot: stream.mime_type for slot, stream in self.streams.items()}

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        for stream in self.streams.values():
            stream.close()

"""The relay protocol: a room's plain RTP from the node that ingests it to the nodes that fan it out.

A fan-out worker process is an edge that happens to be local; a later edge node on
another machine speaks the same datagrams. See ``docs/relay-protocol.md`` for the design
(framing, loss, ordering, back-pressure). In short:

* one datagram per RTP packet per edge (not per student), already in the router's
  sequence/timestamp space, so every edge's students see one continuous stream;
* edges say which rooms they want every second (``SUBSCRIBE``; idempotent, doubles as a
  keepalive: an edge that falls silent for ``SUBSCRIPTION_TTL`` is dropped);
* loss on the hop is detected by sequence gaps and repaired with ``NACK`` from the
  origin's packet cache; reordering is harmless (edges key everything by sequence);
* keyframe requests travel up (``KEYFRAME``) and are coalesced at both ends;
* back-pressure is the socket: a full edge buffer drops datagrams, which the edge
  NACKs; the origin never waits for an edge.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import socket
import struct
import time
from typing import Callable, Optional

from .rtp import seq_add, seq_gt

logger = logging.getLogger(__name__)

MSG_RTP = 0x52  # 'R'
MSG_SENDER_REPORT = 0x53  # 'S'
MSG_STREAM_INFO = 0x49  # 'I'
MSG_SUBSCRIBE = 0x55  # 'U'
MSG_KEYFRAME = 0x4B  # 'K'
MSG_NACK = 0x4E  # 'N'

_RTP = struct.Struct("!BIHIB")  # type, stream id, seq, timestamp, flags
_SR = struct.Struct("!BIQI")  # type, stream id, ntp, rtp
_ID = struct.Struct("!BI")
FLAG_MARKER = 0x01
FLAG_ENTRY_POINT = 0x02

SUBSCRIPTION_TTL = 5.0
SUBSCRIBE_INTERVAL = 1.0
SOCKET_BUFFER = 1024 * 1024  # ~0.7 s of ten 1 Mbps rooms: bounded delay, not seconds of backlog


def relay_key(secret: str) -> str:
    """The subscription key every node derives from the secret they already share (tokens)."""
    return hmac.new(secret.encode(), b"skyclass relay v1", hashlib.sha256).hexdigest()[:32]


def encode_rtp(stream_id: int, seq: int, timestamp: int, marker: int, entry_point: bool, payload: bytes) -> bytes:
    flags = (FLAG_MARKER if marker else 0) | (FLAG_ENTRY_POINT if entry_point else 0)
    return _RTP.pack(MSG_RTP, stream_id, seq, timestamp, flags) + payload


def encode_json(kind: int, body: dict, stream_id: int = 0) -> bytes:
    return _ID.pack(kind, stream_id) + json.dumps(body, separators=(",", ":")).encode()


def encode_nack(stream_id: int, seqs: list[int]) -> bytes:
    return _ID.pack(MSG_NACK, stream_id) + struct.pack(f"!{len(seqs)}H", *seqs)


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCKET_BUFFER)
        except OSError:
            pass
    sock.setblocking(False)
    return sock


class Endpoint:
    """A UDP socket read in batches.

    asyncio's datagram transport reads one datagram per event-loop iteration; in a
    worker whose loop also serves hundreds of students' sockets (and their handshakes
    during a join storm), the relay feed then drains at the loop's pace and the room
    falls seconds behind in the socket buffer. Reading everything that is queued on
    each wake-up keeps the feed real-time.
    """

    BATCH = 512

    def __init__(self, sock: socket.socket, handler: Callable[[bytes, tuple], None]) -> None:
        self._sock = sock
        self._handler = handler
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(sock.fileno(), self._read_ready)
        self.closed = False

    def _read_ready(self) -> None:
        recvfrom = self._sock.recvfrom
        handler = self._handler
        for _ in range(self.BATCH):
            try:
                data, addr = recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ICMP port unreachable from an edge that died: its subscription will lapse.
                logger.debug("relay socket error: %s", exc)
                continue
            try:
                handler(data, addr)
            except Exception:
                logger.exception("relay: bad datagram from %s", addr)

    def sendto(self, data: bytes, addr: tuple) -> None:
        """Send one datagram; raises BlockingIOError when the socket buffer is full."""
        try:
            self._sock.sendto(data, addr)
        except (ConnectionRefusedError, OSError) as exc:
            if isinstance(exc, BlockingIOError):
                raise
            logger.debug("relay send to %s failed: %s", addr, exc)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()


async def open_endpoint(handler: Callable[[bytes, tuple], None], host: str = "127.0.0.1", port: int = 0
                        ) -> tuple[Endpoint, tuple]:
    sock = _udp_socket()
    sock.bind((host, port))
    return Endpoint(sock, handler), sock.getsockname()


class RelaySink:
    """Origin side: one edge's subscription to one stream; a PacketSink of that stream."""

    __slots__ = ("stream_id", "_sendto", "addr", "sent")

    def __init__(self, stream_id: int, sendto: Callable[[bytes, tuple], None], addr: tuple) -> None:
        self.stream_id = stream_id
        self._sendto = sendto
        self.addr = addr
        self.sent = 0

    def on_rtp(self, seq: int, timestamp: int, marker: int, payload: bytes, entry_point: bool) -> None:
        try:
            self._sendto(encode_rtp(self.stream_id, seq, timestamp, marker, entry_point, payload), self.addr)
            self.sent += 1
        except (BlockingIOError, InterruptedError):
            pass  # the edge will NACK it

    def on_sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> None:
        self._sendto(_SR.pack(MSG_SENDER_REPORT, self.stream_id, ntp_timestamp, rtp_timestamp), self.addr)


class RelayOrigin:
    """The node that ingests rooms: serves edges' subscriptions from its streams.

    ``lookup(room)`` returns the room's streams by slot (``{"audio": TrackStream, ...}``)
    or None if the room is not here.
    """

    def __init__(self, lookup: Callable[[str], Optional[dict]], key: Optional[str] = None) -> None:
        self._lookup = lookup
        # Subscriptions must carry this key (derived from the nodes' shared secret): a relay
        # reachable from other machines must not hand a room's media to whoever asks.
        self._key = key
        self.refused = 0
        self._transport: Optional[Endpoint] = None
        self.address: Optional[tuple] = None
        self._stream_ids: dict[int, object] = {}  # id -> TrackStream
        self._ids_by_stream: dict[int, int] = {}  # id(TrackStream) -> stream id
        self._next_id = 1
        # edge addr -> {stream id: (sink, stream)}, and when it last subscribed
        self._edges: dict[tuple, dict[int, tuple[RelaySink, object]]] = {}
        self._last_seen: dict[tuple, float] = {}
        self._task: Optional[asyncio.Task[None]] = None
        self.retransmissions = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> tuple:
        self._transport, self.address = await open_endpoint(self._on_datagram, host, port)
        self._task = asyncio.ensure_future(self._expire())
        return self.address

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        for addr in list(self._edges):
            self._drop_edge(addr)
        if self._transport:
            self._transport.close()

    def _stream_id(self, stream: object) -> int:
        key = id(stream)
        sid = self._ids_by_stream.get(key)
        if sid is None or self._stream_ids.get(sid) is not stream:
            sid = self._next_id
            self._next_id += 1
            self._ids_by_stream[key] = sid
            self._stream_ids[sid] = stream
        return sid

    def _on_datagram(self, data: bytes, addr: tuple) -> None:
        kind = data[0]
        if kind == MSG_SUBSCRIBE:
            self._subscribe(addr, json.loads(data[_ID.size:]))
        elif kind == MSG_KEYFRAME:
            _, sid = _ID.unpack_from(data)
            stream = self._stream_ids.get(sid)
            if stream is not None:
                stream.counters.keyframe_requests_received += 1  # type: ignore[attr-defined]
                stream.request_keyframe()  # type: ignore[attr-defined]
        elif kind == MSG_NACK:
            _, sid = _ID.unpack_from(data)
            entry = self._edges.get(addr, {}).get(sid)
            if entry is None:
                return
            sink, stream = entry
            n = (len(data) - _ID.size) // 2
            for seq in struct.unpack_from(f"!{n}H", data, _ID.size):
                cached = stream.cache.get(seq)  # type: ignore[attr-defined]
                if cached is not None:
                    self.retransmissions += 1
                    sink.on_rtp(cached.seq, cached.timestamp, cached.marker, cached.payload, False)

    def _subscribe(self, addr: tuple, body: dict) -> None:
        """An edge's full list of wanted rooms: add what is new, drop what is gone."""
        if self._key is not None and not hmac.compare_digest(str(body.get("key", "")), self._key):
            self.refused += 1
            if self.refused in (1, 100) or self.refused % 1000 == 0:
                logger.warning("relay: subscription from %s without the relay key refused (%d so far)",
                               addr, self.refused)
            return
        self._last_seen[addr] = time.monotonic()
        current = self._edges.setdefault(addr, {})
        wanted: set[int] = set()
        for room in body.get("rooms", []):
            streams = self._lookup(room)
            if not streams:
                continue
            for slot, stream in streams.items():
                sid = self._stream_id(stream)
                wanted.add(sid)
                # Codec and identity every time: cheap, and an edge that restarted learns them.
                info = {"room": room, "slot": slot, "mime": stream.mime_type, "clock": stream.clock_rate}
                self._transport.sendto(encode_json(MSG_STREAM_INFO, info, sid), addr)  # type: ignore[union-attr]
                if sid not in current:
                    sink = RelaySink(sid, self._transport.sendto, addr)  # type: ignore[union-attr]
                    stream.add_sink(sink)
                    current[sid] = (sink, stream)
                    if stream.sender_report is not None:
                        ntp, rtp, _ = stream.sender_report
                        sink.on_sender_report(ntp, rtp)
        for sid in list(current):
            if sid not in wanted:
                sink, stream = current.pop(sid)
                stream.remove_sink(sink)  # type: ignore[attr-defined]

    def _drop_edge(self, addr: tuple) -> None:
        for sink, stream in self._edges.pop(addr, {}).values():
            stream.remove_sink(sink)  # type: ignore[attr-defined]
        self._last_seen.pop(addr, None)

    async def _expire(self) -> None:
        while True:
            await asyncio.sleep(SUBSCRIBE_INTERVAL)
            now = time.monotonic()
            for addr, seen in list(self._last_seen.items()):
                if now - seen > SUBSCRIPTION_TTL:
                    logger.info("relay: edge %s silent for %.0fs, dropping its subscriptions", addr, now - seen)
                    self._drop_edge(addr)
            # forget ids of streams that closed
            for sid, stream in list(self._stream_ids.items()):
                if getattr(stream, "closed", False):
                    del self._stream_ids[sid]
                    self._ids_by_stream.pop(id(stream), None)


class RelayEdge:
    """The fan-out side: receives rooms' streams from an origin and feeds local TrackStreams.

    ``stream_for(room, slot)`` returns the local TrackStream to feed (or None: not wanted here);
    ``rooms()`` the rooms this edge currently serves.
    """

    def __init__(self, origin: tuple, stream_for: Callable[[str, str], Optional[object]],
                 rooms: Callable[[], list[str]], key: Optional[str] = None) -> None:
        self.origin = origin
        self._key = key
        self._stream_for = stream_for
        self._rooms = rooms
        self._transport: Optional[Endpoint] = None
        self._streams: dict[int, object] = {}
        self._expected: dict[int, int] = {}
        self._task: Optional[asyncio.Task[None]] = None
        self.received = 0
        self.nacks_sent = 0

    async def start(self, host: str = "127.0.0.1") -> None:
        """``host``: the local address to send from (one that reaches the origin)."""
        self._transport, _ = await open_endpoint(self._on_datagram, host)
        self._task = asyncio.ensure_future(self._subscribe_loop())

    def close(self) -> None:
        if self._task:
            self._task.cancel()
        if self._transport:
            self._transport.close()

    def subscribe_now(self) -> None:
        """Send the subscription at once (a new room), not at the next tick."""
        if self._transport is not None:
            body: dict = {"rooms": self._rooms()}
            if self._key is not None:
                body["key"] = self._key
            self._transport.sendto(encode_json(MSG_SUBSCRIBE, body), self.origin)

    async def _subscribe_loop(self) -> None:
        while True:
            self.subscribe_now()
            await asyncio.sleep(SUBSCRIBE_INTERVAL)

    def request_keyframe(self, stream_id: int) -> None:
        if self._transport is not None:
            self._transport.sendto(_ID.pack(MSG_KEYFRAME, stream_id), self.origin)

    def _on_datagram(self, data: bytes, addr: tuple) -> None:
        kind = data[0]
        if kind == MSG_RTP:
            _, sid, seq, ts, flags = _RTP.unpack_from(data)
            stream = self._streams.get(sid)
            if stream is None:
                return
            self.received += 1
            expected = self._expected.get(sid)
            if expected is None or seq_gt(seq, expected) or seq == expected:
                if expected is not None and seq != expected:
                    self._nack(sid, expected, seq)
                self._expected[sid] = seq_add(seq, 1)
            stream.on_relayed(seq, ts, flags & FLAG_MARKER, data[_RTP.size:], bool(flags & FLAG_ENTRY_POINT))  # type: ignore[attr-defined]
        elif kind == MSG_SENDER_REPORT:
            _, sid, ntp, rtp = _SR.unpack_from(data)
            stream = self._streams.get(sid)
            if stream is not None:
                stream.on_relayed_sender_report(ntp, rtp)  # type: ignore[attr-defined]
        elif kind == MSG_STREAM_INFO:
            _, sid = _ID.unpack_from(data)
            info = json.loads(data[_ID.size:])
            stream = self._stream_for(info["room"], info["slot"])
            if stream is None:  # a room this side let go of a moment ago
                self._streams.pop(sid, None)
                return
            if self._streams.get(sid) is not stream:
                self._streams[sid] = stream
                stream.upstream_keyframe = lambda sid=sid: self.request_keyframe(sid)  # type: ignore[attr-defined]
            if info.get("mime") and (stream.mime_type or "").lower() != info["mime"].lower():  # type: ignore[attr-defined]
                stream.set_codec(info["mime"], info["clock"])  # type: ignore[attr-defined]

    def _nack(self, sid: int, first_missing: int, received: int) -> None:
        missing = []
        seq = first_missing
        while seq != received and len(missing) < 64:
            missing.append(seq)
            seq = seq_add(seq, 1)
        if missing and len(missing) < 64 and self._transport is not None:
            self.nacks_sent += len(missing)
            self._transport.sendto(encode_nack(sid, missing), self.origin)

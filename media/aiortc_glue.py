"""Every private attribute of aiortc/aioice that skyclass touches, in one place.

aiortc is an endpoint library, not an SFU: it has no public API to tap decrypted RTP
before its jitter buffer, to send pre-encoded RTP on a negotiated sender, or to be the
DTLS server. We pin ``aiortc==1.16.0`` / ``aioice==0.13.0`` and confine the private
access here; ``tests/test_aiortc_glue.py`` fails loudly if an upgrade moves any of it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable, Optional

import aioice.ice
from aiortc import RTCPeerConnection, RTCRtpReceiver, RTCRtpSender, RTCRtpTransceiver
from aiortc.codecs import is_rtx
from aiortc.mediastreams import MediaStreamTrack
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.clock import current_datetime
from aiortc.rtp import RtpPacket, unwrap_rtx

logger = logging.getLogger(__name__)

RtpTap = Callable[[RtpPacket, int], None]


# --- ICE -------------------------------------------------------------------------

def restrict_host_addresses(addresses: Optional[Iterable[str]]) -> None:
    """Make every ICE agent in this process offer exactly ``addresses`` as host candidates.

    aioice skips loopback when gathering, so a loopback-only test machine would offer no
    candidate at all; and a server on a multi-homed host should offer only the interfaces
    students can reach. ``None`` restores aioice's own interface discovery.
    """
    if not hasattr(aioice.ice, "_skyclass_original_get_host_addresses"):
        aioice.ice._skyclass_original_get_host_addresses = aioice.ice.get_host_addresses  # type: ignore[attr-defined]
    original = aioice.ice._skyclass_original_get_host_addresses  # type: ignore[attr-defined]
    if addresses is None:
        aioice.ice.get_host_addresses = original
        return
    fixed = list(addresses)

    def get_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
        return [a for a in fixed if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]

    aioice.ice.get_host_addresses = get_host_addresses


# --- peer connection ---------------------------------------------------------------

_shared_certificate: Optional[RTCCertificate] = None


def use_shared_certificate(pc: RTCPeerConnection) -> None:
    """Give ``pc`` the process-wide DTLS certificate instead of a fresh one.

    aiortc generates a key pair per peer connection; a join storm of thousands of
    students would pay for that on every join. One certificate per server process is
    what browsers do per profile. Must be called before any transceiver exists.
    """
    global _shared_certificate
    if _shared_certificate is None:
        _shared_certificate = RTCCertificate.generateCertificate()
    pc._RTCPeerConnection__certificates = [_shared_certificate]  # type: ignore[attr-defined]


def answer_dtls_as_server(pc: RTCPeerConnection, offer_setup: Optional[str]) -> None:
    """Be the DTLS server when the offer lets us choose (``a=setup:actpass``).

    aiortc's default is DTLS client with ECDSA-only suites, which fails against RSA
    certificates (GStreamer: "no shared cipher"); as server every client tried connects.
    Call after ``setRemoteDescription`` and before ``createAnswer``.
    """
    if offer_setup != "actpass":
        return
    for transceiver in pc.getTransceivers():
        transport = transceiver.receiver.transport
        if transport._role == "auto":
            transport._set_role("server")


# --- receive side (the teacher's tracks) -----------------------------------------------

def tap_receiver(receiver: RTCRtpReceiver, tap: RtpTap) -> None:
    """Route ``receiver``'s decrypted RTP to ``tap`` instead of its jitter buffer and decoder.

    Keeps what an SFU wants from the stock receiver: receiver statistics (so RTCP
    receiver reports to the teacher stay true), RTX unwrapping, and NACK generation
    upstream (loss on the teacher's link is repaired by the teacher). The decoder thread
    is never started: see :func:`prevent_decoder`.
    """
    codecs = receiver._RTCRtpReceiver__codecs  # type: ignore[attr-defined]
    remote_streams = receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
    rtx_ssrc = receiver._RTCRtpReceiver__rtx_ssrc  # type: ignore[attr-defined]
    nack_generator = receiver._RTCRtpReceiver__nack_generator  # type: ignore[attr-defined]
    active_ssrc = receiver._RTCRtpReceiver__active_ssrc  # type: ignore[attr-defined]
    stream_statistics = _stream_statistics_class()

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        codec = codecs.get(packet.payload_type)
        if codec is None:
            return
        active_ssrc[packet.ssrc] = current_datetime()
        stats = remote_streams.get(packet.ssrc)
        if stats is None:
            stats = remote_streams[packet.ssrc] = stream_statistics(codec.clockRate)
        stats.add(packet)
        if is_rtx(codec):
            original_ssrc = rtx_ssrc.get(packet.ssrc)
            apt = codec.parameters.get("apt")
            if original_ssrc is None or len(packet.payload) < 2 or apt not in codecs:
                return
            packet = unwrap_rtx(packet, payload_type=apt, ssrc=original_ssrc)
        if nack_generator is not None and nack_generator.add(packet):
            await receiver._send_rtcp_nack(packet.ssrc, sorted(nack_generator.missing))
        tap(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]


def prevent_decoder(receiver: RTCRtpReceiver) -> None:
    """Stop ``receive()`` from starting a decoder thread we would never feed."""

    class _NoThread:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def start(self) -> None:
            pass

        def join(self) -> None:
            pass

    import aiortc.rtcrtpreceiver as rtcrtpreceiver_module

    original_receive = receiver.receive

    async def receive(parameters: object) -> None:
        real_thread = rtcrtpreceiver_module.threading.Thread
        rtcrtpreceiver_module.threading.Thread = _NoThread  # type: ignore[misc]
        try:
            await original_receive(parameters)  # type: ignore[arg-type]
        finally:
            rtcrtpreceiver_module.threading.Thread = real_thread  # type: ignore[misc]

    receiver.receive = receive  # type: ignore[method-assign]


def _stream_statistics_class() -> type:
    from aiortc.rtcrtpreceiver import StreamStatistics

    return StreamStatistics


async def send_pli(receiver: RTCRtpReceiver, media_ssrc: int) -> None:
    """Ask the teacher's encoder for a keyframe (RTCP PLI, RFC 4585 6.3.1)."""
    await receiver._send_rtcp_pli(media_ssrc)


def receiver_ready(receiver: RTCRtpReceiver) -> bool:
    """True once the receiver may send RTCP (it knows its own RTCP SSRC)."""
    return receiver._RTCRtpReceiver__rtcp_ssrc is not None  # type: ignore[attr-defined]


# --- send side (each student's copy) ---------------------------------------------------

class ParkedTrack(MediaStreamTrack):
    """A track whose ``recv()`` never returns.

    The stock ``RTCRtpSender`` needs a track to negotiate, and with no track it polls
    every 20 ms; with this one its RTP loop parks for good and costs nothing, while we
    push packets ourselves through :class:`SenderBinding`.
    """

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self._never: asyncio.Future[None] = asyncio.get_event_loop().create_future()

    async def recv(self):  # type: ignore[override]
        await self._never
        raise asyncio.CancelledError

    def stop(self) -> None:
        if not self._never.done():
            self._never.cancel()
        super().stop()


@dataclass
class SenderParameters:
    """What a student's negotiated sender needs from us to forward RTP to it."""

    ssrc: int
    payload_type: int
    clock_rate: int
    mime_type: str
    rtx_ssrc: int
    rtx_payload_type: Optional[int]
    mid: Optional[str]


def sender_parameters(transceiver: RTCRtpTransceiver) -> SenderParameters:
    """Read the SSRC, payload types and mid negotiated for a student's sender."""
    sender = transceiver.sender
    codecs = transceiver._codecs
    primary = codecs[0]
    rtx_pt = None
    for codec in codecs:
        if is_rtx(codec) and codec.parameters.get("apt") == primary.payloadType:
            rtx_pt = codec.payloadType
            break
    return SenderParameters(
        ssrc=sender._ssrc,
        payload_type=primary.payloadType,
        clock_rate=primary.clockRate,
        mime_type=primary.mimeType,
        rtx_ssrc=sender._rtx_ssrc,
        rtx_payload_type=rtx_pt,
        mid=transceiver.mid,
    )


class SenderBinding:
    """A student's sender reduced to what forwarding needs: SRTP protect and a socket.

    Going straight to the nominated candidate pair's datagram transport skips aioice's
    and asyncio's per-packet coroutines; a full socket buffer raises ``BlockingIOError``
    and the packet is dropped for this student only.
    """

    __slots__ = ("_dtls", "_protect", "_protect_rtcp", "_sendto", "_addr")

    def __init__(self, dtls: RTCDtlsTransport) -> None:
        self._dtls = dtls
        self._protect = dtls._tx_srtp.protect
        self._protect_rtcp = dtls._tx_srtp.protect_rtcp
        pair = dtls.transport._connection._nominated[1]
        # The socket itself, not asyncio's transport: its sendto() adds ~0.7 us of Python
        # per packet (15% of a send) for buffering we do not want (a full buffer drops).
        self._sendto = pair.protocol.transport._sock.sendto
        self._addr = pair.remote_addr

    def send_rtp(self, packet: bytes) -> int:
        """Protect and send one RTP packet; returns bytes sent, 0 if dropped."""
        data = self._protect(packet)
        try:
            self._sendto(data, self._addr)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError:
            # Socket closed under us: the consumer is being torn down.
            return 0
        return len(data)


def dtls_connected(dtls: RTCDtlsTransport) -> bool:
    return dtls.state == "connected" and dtls._tx_srtp is not None


def hook_sender_feedback(
    sender: RTCRtpSender,
    on_keyframe_request: Callable[[], None],
    on_nack: Callable[[int], Awaitable[None]],
) -> None:
    """Send a student's PLI/FIR and NACKs to the router instead of the (absent) encoder."""
    sender._send_keyframe = on_keyframe_request  # type: ignore[method-assign]
    sender._retransmit = on_nack  # type: ignore[method-assign]


def update_sender_report(
    sender: RTCRtpSender, ntp_timestamp: int, rtp_timestamp: int, packets: int, octets: int
) -> None:
    """Keep the stock sender's RTCP sender reports true for forwarded packets.

    Students use SRs for A/V sync and RTT; the stock counters only move on the stock
    send path, which we bypass.
    """
    sender._RTCRtpSender__ntp_timestamp = ntp_timestamp  # type: ignore[attr-defined]
    sender._RTCRtpSender__rtp_timestamp = rtp_timestamp  # type: ignore[attr-defined]
    sender._RTCRtpSender__packet_count = packets  # type: ignore[attr-defined]
    sender._RTCRtpSender__octet_count = octets  # type: ignore[attr-defined]


def negotiated_codecs(transceiver: RTCRtpTransceiver) -> list:
    """The codecs negotiated on ``transceiver``, preferred first, RTX excluded."""
    return [c for c in transceiver._codecs if not is_rtx(c)]


def negotiated_payload_types(transceiver: RTCRtpTransceiver) -> dict[str, int]:
    """Lower-case MIME type → the payload type the peer agreed for it (first wins)."""
    result: dict[str, int] = {}
    for codec in negotiated_codecs(transceiver):
        result.setdefault(codec.mimeType.lower(), codec.payloadType)
    return result


def set_consent_timeout(seconds: float) -> None:
    """Drop a vanished peer after about ``seconds`` without ICE consent (RFC 7675).

    aioice checks every 5 s and gives up after 6 failures (~30 s): a student who closed
    the lid would count as a viewer for half a minute. We keep 4 failed checks spread
    over ``seconds``.
    """
    aioice.ice.CONSENT_FAILURES = 4
    aioice.ice.CONSENT_INTERVAL = max(seconds / 4, 0.5)


def _ice_connections(pc: RTCPeerConnection) -> list:
    """The aioice connections under ``pc``'s transceivers, each once (BUNDLE shares one)."""
    connections: dict[int, object] = {}
    for transceiver in pc.getTransceivers():
        connection = transceiver.receiver.transport.transport._connection
        connections.setdefault(id(connection), connection)
    return list(connections.values())


def observe_rtp(receiver: RTCRtpReceiver, observer: Callable[[RtpPacket], bool]) -> None:
    """Let ``observer`` see each decrypted RTP packet before the stock receiver does.

    Returning False drops the packet (as if lost on the network): tests use it to inject
    loss that the receiver then NACKs. Client-side only; the server uses :func:`tap_receiver`.
    """
    original = receiver._handle_rtp_packet

    async def handle_rtp_packet(packet: RtpPacket, arrival_time_ms: int) -> None:
        if observer(packet):
            await original(packet, arrival_time_ms)

    receiver._handle_rtp_packet = handle_rtp_packet  # type: ignore[method-assign]


def vanish(pc: RTCPeerConnection) -> None:
    """Close ``pc``'s sockets without a word: no DTLS close_notify, no RTCP BYE, no DELETE.

    This is a student whose laptop lid closed or whose Wi-Fi dropped; load tests and
    tests use it to check the server notices by ICE consent alone.
    """
    for connection in _ice_connections(pc):
        for protocol in list(connection._protocols):
            if protocol.transport is not None:
                protocol.transport.close()
        # Stop aioice's own consent task, or it would notice first and close politely.
        task = connection._query_consent_task
        if task is not None:
            task.cancel()


def intercept_datagrams(pc: RTCPeerConnection, accept: Callable[[bytes], bool]) -> None:
    """Show every datagram ``pc`` receives to ``accept`` before ICE/DTLS/SRTP see it.

    Returning False drops it as the network would: before SRTP, so a later retransmission
    of the same packet is not mistaken for a replay. Load-test students also use it to
    count RTP from the clear header without decrypting. Call after the local description
    is set (the sockets exist from then on).
    """
    for connection in _ice_connections(pc):
        for protocol in connection._protocols:
            original = protocol.datagram_received

            def datagram_received(data: bytes, addr: tuple, _original=original) -> None:
                if accept(data):
                    _original(data, addr)

            protocol.datagram_received = datagram_received


def stop_consent_checks(pc: RTCPeerConnection) -> None:
    """Stop aioice's ICE consent checks (RFC 7675) on ``pc``.

    Studio encoders in the ICE-lite style (FFmpeg's WHIP muxer) never answer consent
    requests, so aioice would hang up on a healthy teacher after its timeout. For a
    publisher the media itself is the proof of life: the server watches RTP arrival
    instead (``RoomRegistry`` watchdog).
    """
    for connection in _ice_connections(pc):
        task = connection._query_consent_task
        if task is not None and not task.done():
            task.cancel()
        connection._query_consent_task = None


def tap_sender_reports(receiver: RTCRtpReceiver, tap: Callable[[int, int, int], None]) -> None:
    """Call ``tap(ssrc, ntp_timestamp, rtp_timestamp)`` for each RTCP SR the teacher sends.

    SRs pair the teacher's RTP clocks with wall-clock time: the only sound basis for
    audio/video sync in students' sender reports and in recordings.
    """
    from aiortc.rtp import RtcpSrPacket

    original = receiver._handle_rtcp_packet

    async def handle_rtcp_packet(packet) -> None:  # type: ignore[no-untyped-def]
        if isinstance(packet, RtcpSrPacket):
            tap(packet.ssrc, packet.sender_info.ntp_timestamp, packet.sender_info.rtp_timestamp)
        await original(packet)

    receiver._handle_rtcp_packet = handle_rtcp_packet  # type: ignore[method-assign]

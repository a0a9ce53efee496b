"""Fail loudly if an aiortc/aioice upgrade moves what media/aiortc_glue.py reaches into.

Two layers: the private names exist where the glue expects them (cheap, precise error
messages), and the glue functions still *work* against a fresh receiver/sender and over a
real in-process loopback connection (catches a rename that keeps the name but changes
the meaning, e.g. a dict that is replaced instead of filled).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import inspect
import threading

import aioice
import aioice.ice
import aiortc
import aiortc.rtcrtpreceiver as rtcrtpreceiver_module
import pytest
from aiortc import (
    RTCConfiguration,
    RTCPeerConnection,
    RTCRtpCodecParameters,
    RTCRtpReceiver,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc.rtcdtlstransport import RTCCertificate, RTCDtlsTransport
from aiortc.rtcrtpreceiver import RemoteStreamTrack
from aiortc.rtcrtpparameters import RTCRtpDecodingParameters, RTCRtpReceiveParameters, RTCRtpRtxParameters
from aiortc.rtp import RtcpSenderInfo, RtcpSrPacket, RtpPacket

from skyclass.media import aiortc_glue
from skyclass.media.rtp import build_header

VP8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90000, payloadType=96)
VP8_RTX = RTCRtpCodecParameters(mimeType="video/rtx", clockRate=90000, payloadType=97, parameters={"apt": 96})


def test_pinned_versions() -> None:
    assert aiortc.__version__ == "1.16.0", "aiortc upgraded: re-check every private access in media/aiortc_glue.py"
    assert importlib.metadata.version("aiortc") == "1.16.0"
    assert importlib.metadata.version("aioice") == "0.13.0", "aioice upgraded: re-check media/aiortc_glue.py"


# --- names --------------------------------------------------------------------------------

RECEIVER_PRIVATE = ("__codecs", "__remote_streams", "__rtx_ssrc", "__nack_generator", "__active_ssrc",
                    "__rtcp_ssrc")
SENDER_PRIVATE = ("__ntp_timestamp", "__rtp_timestamp", "__packet_count", "__octet_count")


async def test_private_attributes_on_fresh_objects() -> None:
    pc = RTCPeerConnection()
    try:
        assert isinstance(pc._RTCPeerConnection__certificates, list)  # type: ignore[attr-defined]
        assert all(isinstance(c, RTCCertificate) for c in pc._RTCPeerConnection__certificates)  # type: ignore[attr-defined]
        video = pc.addTransceiver("video", direction="recvonly")
        audio = pc.addTransceiver("audio", direction="sendonly")
        for transceiver in (video, audio):
            receiver, sender = transceiver.receiver, transceiver.sender
            for name in RECEIVER_PRIVATE:
                assert hasattr(receiver, "_RTCRtpReceiver" + name), f"RTCRtpReceiver lost {name}"
            for name in SENDER_PRIVATE:
                assert hasattr(sender, "_RTCRtpSender" + name), f"RTCRtpSender lost {name}"
            assert isinstance(receiver._RTCRtpReceiver__codecs, dict)  # type: ignore[attr-defined]
            assert isinstance(receiver._RTCRtpReceiver__remote_streams, dict)  # type: ignore[attr-defined]
            assert isinstance(receiver._RTCRtpReceiver__rtx_ssrc, dict)  # type: ignore[attr-defined]
            assert isinstance(receiver._RTCRtpReceiver__active_ssrc, dict)  # type: ignore[attr-defined]
            # the peer connection gives the receiver its sender's SSRC for RTCP
            assert receiver._RTCRtpReceiver__rtcp_ssrc == sender._ssrc  # type: ignore[attr-defined]
            assert isinstance(sender._ssrc, int) and isinstance(sender._rtx_ssrc, int)
            assert isinstance(transceiver._codecs, list)
            dtls = receiver.transport
            assert isinstance(dtls, RTCDtlsTransport)
            assert dtls._role == "auto" and callable(dtls._set_role)
            assert hasattr(dtls, "_tx_srtp") and dtls._tx_srtp is None
            assert hasattr(dtls.transport, "_connection")
            assert hasattr(dtls.transport._connection, "_nominated")
        # video has a NACK generator, audio none: tap_receiver relies on both
        assert video.receiver._RTCRtpReceiver__nack_generator is not None  # type: ignore[attr-defined]
        assert audio.receiver._RTCRtpReceiver__nack_generator is None  # type: ignore[attr-defined]
    finally:
        await pc.close()


def test_private_methods_and_module_names() -> None:
    for name in ("_send_rtcp_pli", "_send_rtcp_nack", "_handle_rtp_packet", "receive"):
        assert inspect.iscoroutinefunction(getattr(RTCRtpReceiver, name)), name
    assert list(inspect.signature(RTCRtpReceiver._send_rtcp_pli).parameters) == ["self", "media_ssrc"]
    assert list(inspect.signature(RTCRtpReceiver._send_rtcp_nack).parameters) == ["self", "media_ssrc", "lost"]
    assert list(inspect.signature(RTCRtpReceiver._handle_rtp_packet).parameters) == [
        "self", "packet", "arrival_time_ms"]
    assert callable(RTCRtpSender._send_keyframe)
    assert inspect.iscoroutinefunction(RTCRtpSender._retransmit)
    assert list(inspect.signature(RTCRtpSender._retransmit).parameters) == ["self", "sequence_number"]
    assert callable(RTCDtlsTransport._set_role)
    # prevent_decoder swaps the Thread class the receiver module looks up
    assert rtcrtpreceiver_module.threading is threading
    assert hasattr(rtcrtpreceiver_module, "StreamStatistics")
    stats = rtcrtpreceiver_module.StreamStatistics(90000)
    assert callable(stats.add)
    # aioice module globals the glue replaces
    assert callable(aioice.ice.get_host_addresses)
    assert list(inspect.signature(aioice.ice.get_host_addresses).parameters) == ["use_ipv4", "use_ipv6"]
    assert isinstance(aioice.ice.CONSENT_INTERVAL, (int, float))
    assert isinstance(aioice.ice.CONSENT_FAILURES, int)
    assert inspect.iscoroutinefunction(RTCRtpReceiver._handle_rtcp_packet)  # tap_sender_reports
    assert list(inspect.signature(RTCRtpReceiver._handle_rtcp_packet).parameters) == ["self", "packet"]
    assert {"ssrc", "sender_info"} <= set(inspect.signature(RtcpSrPacket).parameters)
    assert {"ntp_timestamp", "rtp_timestamp"} <= set(inspect.signature(RtcpSenderInfo).parameters)
    connection = aioice.Connection(ice_controlling=True)
    assert connection._protocols == [] and connection._query_consent_task is None  # vanish, stop_consent_checks
    assert isinstance(connection._nominated, dict)  # SenderBinding
    assert callable(aioice.ice.StunProtocol.datagram_received)  # intercept_datagrams
    assert hasattr(aioice.ice, "CandidatePair")
    assert "remote_addr" in dir(aioice.ice.CandidatePair) and "protocol" in inspect.signature(
        aioice.ice.CandidatePair.__init__).parameters


# --- ICE globals ----------------------------------------------------------------------------

def test_restrict_host_addresses_and_restore() -> None:
    try:
        aiortc_glue.restrict_host_addresses(None)
        original = aioice.ice.get_host_addresses
        assert original.__module__ == "aioice.ice" and original.__name__ == "get_host_addresses"

        aiortc_glue.restrict_host_addresses(["127.0.0.1"])
        assert aioice.ice.get_host_addresses is not original
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(use_ipv4=False, use_ipv6=True) == []

        aiortc_glue.restrict_host_addresses(["127.0.0.1", "::1"])
        assert aioice.ice.get_host_addresses(True, False) == ["127.0.0.1"]
        assert aioice.ice.get_host_addresses(False, True) == ["::1"]

        aiortc_glue.restrict_host_addresses(None)
        assert aioice.ice.get_host_addresses is original  # restored, even after two restrictions
    finally:
        aiortc_glue.restrict_host_addresses(["127.0.0.1"])


async def test_aioice_gathers_from_the_restricted_addresses() -> None:
    """aioice must still look get_host_addresses up as a module global at gathering time."""
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])
    connection = aioice.Connection(ice_controlling=True)
    try:
        await connection.gather_candidates()
        hosts = {c.host for c in connection.local_candidates if c.type == "host"}
        assert hosts == {"127.0.0.1"}
    finally:
        await connection.close()


def test_set_consent_timeout() -> None:
    interval, failures = aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES
    try:
        aiortc_glue.set_consent_timeout(4)
        assert aioice.ice.CONSENT_FAILURES == 4 and aioice.ice.CONSENT_INTERVAL == 1.0
        aiortc_glue.set_consent_timeout(0.1)
        assert aioice.ice.CONSENT_INTERVAL == 0.5  # floor
    finally:
        aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES = interval, failures


# --- receive side -----------------------------------------------------------------------------

def rtp(seq: int, ssrc: int = 1111, pt: int = 96, payload: bytes = b"\x10\x00\x9d") -> RtpPacket:
    return RtpPacket(payload_type=pt, sequence_number=seq, timestamp=seq * 3000, ssrc=ssrc, payload=payload)


async def test_tap_and_prevent_decoder_on_a_real_receiver() -> None:
    """The order the Producer uses: tap and prevent_decoder first, then aiortc's receive()
    fills the codec/RTX tables the tap already holds references to."""
    pc = RTCPeerConnection()
    receiver = pc.addTransceiver("video", direction="recvonly").receiver
    receiver._track = RemoteStreamTrack(kind="video")  # as setRemoteDescription does
    tapped: list[RtpPacket] = []
    nacks: list[tuple[int, list[int]]] = []
    real_thread = rtcrtpreceiver_module.threading.Thread
    try:
        aiortc_glue.prevent_decoder(receiver)
        aiortc_glue.tap_receiver(receiver, lambda packet, arrival: tapped.append(packet))

        async def record_nack(media_ssrc: int, lost: list[int]) -> None:
            nacks.append((media_ssrc, lost))

        receiver._send_rtcp_nack = record_nack  # type: ignore[method-assign]
        await receiver.receive(RTCRtpReceiveParameters(
            codecs=[VP8, VP8_RTX],
            encodings=[RTCRtpDecodingParameters(ssrc=1111, payloadType=96, rtx=RTCRtpRtxParameters(ssrc=2222))],
        ))
        # no decoder thread was started, and the real Thread class is back
        assert rtcrtpreceiver_module.threading.Thread is real_thread
        decoder = receiver._RTCRtpReceiver__decoder_thread  # type: ignore[attr-defined]
        assert not isinstance(decoder, threading.Thread)
        assert not any(t.name == "video-decoder" for t in threading.enumerate() if t.is_alive())

        await receiver._handle_rtp_packet(rtp(100), 0)
        await receiver._handle_rtp_packet(rtp(101), 20)
        assert [p.sequence_number for p in tapped] == [100, 101]
        assert 1111 in receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]
        assert 1111 in receiver._RTCRtpReceiver__active_ssrc  # type: ignore[attr-defined]
        assert receiver._RTCRtpReceiver__remote_streams[1111].packets_received == 2  # type: ignore[attr-defined]

        # unknown payload type: dropped before the tap
        await receiver._handle_rtp_packet(rtp(102, pt=111), 40)
        assert len(tapped) == 2

        # a gap upstream: a NACK to the teacher for exactly the missing packets
        await receiver._handle_rtp_packet(rtp(105), 60)
        assert nacks == [(1111, [102, 103, 104])]
        assert tapped[-1].sequence_number == 105

        # the teacher's retransmission on RTX comes out unwrapped as the original packet
        rtx = RtpPacket(payload_type=97, sequence_number=7, timestamp=103 * 3000, ssrc=2222,
                        payload=(103).to_bytes(2, "big") + b"\x10\x00\x9d")
        await receiver._handle_rtp_packet(rtx, 80)
        repaired = tapped[-1]
        assert (repaired.ssrc, repaired.payload_type, repaired.sequence_number) == (1111, 96, 103)
        assert repaired.payload == b"\x10\x00\x9d"
        # RTX from an SSRC nobody announced is ignored
        rtx.ssrc = 3333
        await receiver._handle_rtp_packet(rtx, 90)
        assert tapped[-1] is repaired
    finally:
        rtcrtpreceiver_module.threading.Thread = real_thread  # type: ignore[misc]
        await receiver.stop()
        await pc.close()


async def test_tapped_receiver_keeps_synchronization_sources_usable() -> None:
    pc = RTCPeerConnection()
    receiver = pc.addTransceiver("video", direction="recvonly").receiver
    try:
        receiver._RTCRtpReceiver__codecs[96] = VP8  # type: ignore[attr-defined]
        aiortc_glue.tap_receiver(receiver, lambda packet, arrival: None)
        await receiver._handle_rtp_packet(rtp(1), 0)
        sources = receiver.getSynchronizationSources()
        assert [s.source for s in sources] == [1111]
    finally:
        await pc.close()


async def test_send_pli_and_receiver_ready() -> None:
    pc = RTCPeerConnection()
    # a bare receiver: no RTCP SSRC until the peer connection assigns one
    receiver = RTCRtpReceiver("video", pc.addTransceiver("video", direction="recvonly").receiver.transport)
    sent: list[object] = []

    async def capture(packet: object) -> None:
        sent.append(packet)

    receiver._send_rtcp = capture  # type: ignore[method-assign]
    try:
        assert not aiortc_glue.receiver_ready(receiver)
        await aiortc_glue.send_pli(receiver, 1111)
        assert sent == []  # aiortc sends no RTCP before it knows its SSRC
        receiver._set_rtcp_ssrc(4242)
        assert aiortc_glue.receiver_ready(receiver)
        await aiortc_glue.send_pli(receiver, 1111)
        assert len(sent) == 1
        pli = sent[0]
        assert (pli.fmt, pli.ssrc, pli.media_ssrc) == (1, 4242, 1111)  # type: ignore[attr-defined]
    finally:
        await pc.close()


# --- send side over a real loopback connection --------------------------------------------------------

async def _wait(condition, timeout: float) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def test_sender_glue_over_loopback() -> None:
    """A student (aiortc, recvonly) and a server-side sender built exactly as signalling.py does,
    with the client-side helpers (observe_rtp, intercept_datagrams, vanish) on the student."""
    aiortc_glue.restrict_host_addresses(["127.0.0.1"])
    student = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    server = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    other = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    track = aiortc_glue.ParkedTrack("video")
    try:
        aiortc_glue.use_shared_certificate(server)
        aiortc_glue.use_shared_certificate(other)
        assert server._RTCPeerConnection__certificates == other._RTCPeerConnection__certificates  # type: ignore[attr-defined]

        student_receiver = student.addTransceiver("video", direction="recvonly").receiver
        await student.setLocalDescription(await student.createOffer())
        offer = student.localDescription.sdp
        assert "a=setup:actpass" in offer

        # client-side taps: every datagram, every decrypted RTP packet (dropping seq 3), every SR
        datagrams: list[bytes] = []
        aiortc_glue.intercept_datagrams(student, lambda data: datagrams.append(data) or True)
        observed: list[int] = []

        def observe(packet: RtpPacket) -> bool:
            observed.append(packet.sequence_number)
            return packet.sequence_number != 3

        aiortc_glue.observe_rtp(student_receiver, observe)
        reports: list[tuple[int, int, int]] = []
        aiortc_glue.tap_sender_reports(student_receiver, lambda *report: reports.append(report))

        transceiver = server.addTransceiver(track, direction="sendonly")
        await server.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        aiortc_glue.answer_dtls_as_server(server, "actpass")
        dtls = transceiver.sender.transport
        assert dtls._role == "server"
        await server.setLocalDescription(await server.createAnswer())
        answer = server.localDescription.sdp
        assert "a=setup:passive" in answer
        fingerprint = [f for f in server._RTCPeerConnection__certificates[0].getFingerprints()  # type: ignore[attr-defined]
                       if f.algorithm == "sha-256"][0].value
        assert fingerprint in answer  # the shared certificate is the one negotiated

        codecs = aiortc_glue.negotiated_codecs(transceiver)
        assert codecs and all(c.mimeType.lower() != "video/rtx" for c in codecs)
        payload_types = aiortc_glue.negotiated_payload_types(transceiver)
        assert payload_types[codecs[0].mimeType.lower()] == codecs[0].payloadType
        params = aiortc_glue.sender_parameters(transceiver)
        assert params.ssrc == transceiver.sender._ssrc and params.rtx_ssrc == transceiver.sender._rtx_ssrc
        assert params.payload_type == codecs[0].payloadType and params.clock_rate == 90000
        assert params.mid == transceiver.mid and params.rtx_payload_type is not None

        keyframe_requests: list[int] = []
        nacked: list[int] = []

        async def on_nack(seq: int) -> None:
            nacked.append(seq)

        aiortc_glue.hook_sender_feedback(transceiver.sender, lambda: keyframe_requests.append(1), on_nack)

        await student.setRemoteDescription(RTCSessionDescription(sdp=answer, type="answer"))
        assert await _wait(lambda: aiortc_glue.dtls_connected(dtls), 15), "loopback DTLS never connected"
        assert await _wait(lambda: student.connectionState == "connected", 10)
        assert datagrams, "intercept_datagrams saw nothing of ICE/DTLS"

        # consent checks: running by default, stopped for good by stop_consent_checks
        connection = dtls.transport._connection
        consent = connection._query_consent_task
        assert consent is not None and not consent.done()
        aiortc_glue.stop_consent_checks(server)
        assert connection._query_consent_task is None
        await asyncio.sleep(0)
        assert consent.cancelled() or consent.done()

        binding = aiortc_glue.SenderBinding(dtls)
        ssrc, pt = params.ssrc, params.payload_type
        datagrams_before = len(datagrams)
        for seq in range(1, 11):
            sent = binding.send_rtp(build_header(0, pt, seq, seq * 3000, ssrc) + b"\x10\x02\x00\x9d\x01\x2a" * 20)
            assert sent > 12 + 120  # protected: header + payload + SRTP auth tag

        student_streams = student_receiver._RTCRtpReceiver__remote_streams  # type: ignore[attr-defined]

        def inbound_packets() -> int:
            return student_streams[ssrc].packets_received if ssrc in student_streams else 0

        assert await _wait(lambda: sorted(set(observed)) == list(range(1, 11)), 5), observed
        assert len(datagrams) - datagrams_before >= 10
        # seq 3 was dropped by the observer: the stock receiver never counted it ...
        assert await _wait(lambda: inbound_packets() == 9, 5), inbound_packets()
        # ... and NACKed it, which reaches our hook instead of aiortc's own retransmission
        assert await _wait(lambda: 3 in nacked, 5), nacked

        # the student's PLI and NACK reach the router hooks instead of an encoder
        assert aiortc_glue.receiver_ready(student_receiver)
        await student_receiver._send_rtcp_pli(ssrc)
        await student_receiver._send_rtcp_nack(ssrc, [4, 6])
        assert await _wait(lambda: keyframe_requests and {4, 6} <= set(nacked), 5), (keyframe_requests, nacked)

        # sender reports describe what we forwarded: stats now, and the next RTCP SR on the wire
        ntp = (3_900_000_000 << 32) | 0x80000000
        aiortc_glue.update_sender_report(transceiver.sender, ntp, 30000, 10, 1200)
        stats = [s for s in (await transceiver.sender.getStats()).values() if s.type == "outbound-rtp"]
        assert stats and stats[0].packetsSent == 10 and stats[0].bytesSent == 1200
        assert await _wait(lambda: (ssrc, ntp, 30000) in reports, 5), reports
        # the tap passes SRs on: the stock receiver still records them
        remote = [s for s in (await student_receiver.getStats()).values() if s.type == "remote-outbound-rtp"]
        assert remote and remote[0].packetsSent == 10

        # vanish: the student's sockets close without a word and its consent task stops
        student_connection = student_receiver.transport.transport._connection
        assert student_connection._protocols
        aiortc_glue.vanish(student)
        await asyncio.sleep(0)
        assert all(p.transport is None or p.transport.is_closing() for p in student_connection._protocols)
        task = student_connection._query_consent_task
        assert task is None or task.cancelled() or task.done()
        assert binding.send_rtp(build_header(0, pt, 11, 33000, ssrc) + b"\x00") > 0  # server side unaffected
    finally:
        track.stop()
        await student.close()
        await server.close()
        await other.close()


async def test_answer_dtls_as_server_leaves_explicit_setup_alone() -> None:
    pc = RTCPeerConnection()
    try:
        transceiver = pc.addTransceiver("video", direction="recvonly")
        aiortc_glue.answer_dtls_as_server(pc, "active")
        assert transceiver.receiver.transport._role == "auto"
        aiortc_glue.answer_dtls_as_server(pc, None)
        assert transceiver.receiver.transport._role == "auto"
        aiortc_glue.answer_dtls_as_server(pc, "actpass")
        assert transceiver.receiver.transport._role == "server"
    finally:
        await pc.close()


async def test_parked_track_never_yields() -> None:
    track = aiortc_glue.ParkedTrack("audio")
    assert track.kind == "audio"
    recv = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.1)
    assert not recv.done()
    track.stop()
    with pytest.raises(asyncio.CancelledError):
        await recv
    assert track.readyState == "ended"

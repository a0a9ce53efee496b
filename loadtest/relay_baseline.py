"""The baseline skyclass is measured against: a plain aiortc WHIP/WHEP server with MediaRelay.

This is what aiortc's own examples do to show one source to many viewers: the teacher's
tracks are decoded once (aiortc's receiver decodes every incoming track), and each
student gets ``MediaRelay.subscribe(track)`` on its own sender, so aiortc encodes the
frames again for every viewer (libx264 for H.264, libopus for audio). Nothing here
forwards RTP. It speaks just enough WHIP/WHEP for ``loadtest.clients`` (POST an offer,
201 + Location + answer, DELETE); tokens are accepted and ignored.

    python -m skyclass.loadtest.relay_baseline --host 127.0.0.1 --port 8090 --ice-address 127.0.0.1
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
from typing import Optional

from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.contrib.media import MediaRelay
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from skyclass.media import aiortc_glue

logger = logging.getLogger(__name__)


class RelayRoom:
    def __init__(self) -> None:
        self.relay = MediaRelay()
        self.tracks: dict[str, MediaStreamTrack] = {}
        self.drains: list[asyncio.Task] = []

    def add_source(self, track: MediaStreamTrack) -> None:
        """Keep the teacher's decoded track consumed even with no student (one relay
        subscriber that discards frames), so decoding runs once, from the start, and
        frames do not pile up in the track's queue."""
        self.tracks[track.kind] = track
        sink = self.relay.subscribe(track, buffered=False)

        async def drain() -> None:
            try:
                while True:
                    await sink.recv()
            except (MediaStreamError, asyncio.CancelledError):
                pass

        self.drains.append(asyncio.ensure_future(drain()))


def _prefer_h264(pc: RTCPeerConnection) -> None:
    for transceiver in pc.getTransceivers():
        if transceiver.kind == "video":
            caps = RTCRtpSender.getCapabilities("video").codecs
            h264 = [c for c in caps if c.mimeType.lower() == "video/h264"]
            rest = [c for c in caps if c.mimeType.lower() != "video/h264"]
            transceiver.setCodecPreferences(h264 + rest)


async def _answer(request: web.Request, pc: RTCPeerConnection) -> web.Response:
    await pc.setLocalDescription(await pc.createAnswer())
    session = secrets.token_urlsafe(8)
    request.app["pcs"][session] = pc
    location = f"/{request.match_info['kind']}/{request.match_info['room']}/{session}"
    return web.Response(status=201, text=pc.localDescription.sdp, content_type="application/sdp",
                        headers={"Location": location})


def _close_when_gone(pc: RTCPeerConnection) -> None:
    @pc.on("connectionstatechange")
    async def on_state() -> None:
        if pc.connectionState in ("failed", "closed"):
            await pc.close()


async def post(request: web.Request) -> web.Response:
    kind, room_name = request.match_info["kind"], request.match_info["room"]
    offer = await request.text()
    rooms: dict[str, RelayRoom] = request.app["rooms"]
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    _close_when_gone(pc)
    if kind == "whip":
        room = rooms[room_name] = RelayRoom()

        @pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            room.add_source(track)

        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        return await _answer(request, pc)
    room: Optional[RelayRoom] = rooms.get(room_name)
    if room is None or not room.tracks:
        await pc.close()
        return web.Response(status=404, text="no teacher in this room\n")
    await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
    for transceiver in pc.getTransceivers():
        source = room.tracks.get(transceiver.kind)
        if source is not None:
            pc.addTrack(room.relay.subscribe(source, buffered=False))
    _prefer_h264(pc)
    return await _answer(request, pc)


async def delete(request: web.Request) -> web.Response:
    pc = request.app["pcs"].pop(request.match_info["session"], None)
    if pc is None:
        return web.Response(status=404, text="no such session\n")
    await pc.close()
    return web.Response(status=200, text="session ended\n")


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _shutdown(app: web.Application) -> None:
    await asyncio.gather(*(pc.close() for pc in app["pcs"].values()), return_exceptions=True)


def create_app() -> web.Application:
    app = web.Application()
    app["rooms"] = {}
    app["pcs"] = {}
    app.router.add_post("/{kind:whip|whep}/{room}", post)
    app.router.add_delete("/{kind:whip|whep}/{room}/{session}", delete)
    app.router.add_get("/healthz", healthz)
    app.on_shutdown.append(_shutdown)
    return app


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="MediaRelay baseline WHIP/WHEP server (decode once, encode per viewer)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--ice-address", action="append", default=None,
                        help="host candidate address to offer (repeatable), e.g. 127.0.0.1")
    parser.add_argument("--log-level", default="WARNING")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    aiortc_glue.restrict_host_addresses(args.ice_address)
    web.run_app(create_app(), host=args.host, port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

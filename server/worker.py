"""A fan-out worker: one process per core holding students' peer connections.

It is an edge that happens to be local: rooms' plain RTP arrives from the origin (the
front process, which holds the teachers) over the relay protocol (media/relay.py), and
this process does the per-student work — ICE, DTLS, SRTP and sends — on its own core.
The front talks to it over HTTP on a unix socket: create a viewer from an offer, end
one, report status.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

from aiohttp import web

from skyclass.media import aiortc_glue
from skyclass.media.relay import RelayEdge

from .errors import HttpError
from .rooms import RoomRegistry
from .signalling import open_viewer

logger = logging.getLogger(__name__)


class _EdgeRooms:
    """Bridges the relay edge and this worker's rooms (which exist while they have viewers)."""

    def __init__(self, registry: RoomRegistry) -> None:
        self.registry = registry

    def stream_for(self, room: str, slot: str) -> object:
        return self.registry.get_or_create(room).router.streams[slot]

    def rooms(self) -> list[str]:
        return [name for name, room in self.registry.rooms.items() if room.viewers]


async def create_viewer(request: web.Request) -> web.Response:
    body = await request.json()
    registry: RoomRegistry = request.app["rooms"]
    edge: RelayEdge = request.app["edge"]
    room = registry.get_or_create(body["room"])
    # The origin told the front the room's codecs: negotiate against them.
    for slot, mime in (body.get("codecs") or {}).items():
        stream = room.router.streams.get(slot)
        if stream is not None and mime and (stream.mime_type or "").lower() != mime.lower():
            stream.set_codec(mime, 90000 if stream.kind == "video" else 48000)
    try:
        session, answer = await open_viewer(registry, body["room"], body["name"], body["offer"], body["kinds"],
                                            session_id=body["session_id"])
    except HttpError as exc:
        return web.json_response({"status": exc.status, "error": exc.error, "detail": exc.detail}, status=exc.status)
    edge.subscribe_now()
    return web.json_response({"answer": answer, "session_id": session.id}, status=201)


async def delete_viewer(request: web.Request) -> web.Response:
    registry: RoomRegistry = request.app["rooms"]
    session = registry.sessions.get(request.match_info["session"])
    if session is None:
        return web.json_response({"error": "not found"}, status=404)
    await registry.close_session(session, reason="DELETE")
    return web.json_response({"ok": True})


async def status(request: web.Request) -> web.Response:
    registry: RoomRegistry = request.app["rooms"]
    edge: RelayEdge = request.app["edge"]
    counters = registry.counters.as_dict()
    counters["relay_received"] = edge.received
    counters["relay_nacks_sent"] = edge.nacks_sent
    counters["cpu_seconds"] = time.process_time()
    return web.json_response({
        "pid": os.getpid(),
        "viewers": list(registry.sessions),
        "rooms": len(registry.rooms),
        "counters": counters,
    })


async def _start_edge(app: web.Application) -> None:
    app["rooms"].start()
    await app["edge"].start()


async def _stop(app: web.Application) -> None:
    app["edge"].close()
    await app["rooms"].close()


def create_worker_app(origin: tuple[str, int], peer_timeout: float, keyframe_interval: float) -> web.Application:
    registry = RoomRegistry(keyframe_interval=keyframe_interval, peer_timeout=peer_timeout)
    bridge = _EdgeRooms(registry)
    app = web.Application()
    app["rooms"] = registry
    app["edge"] = RelayEdge(origin, bridge.stream_for, bridge.rooms)
    app.router.add_post("/viewers", create_viewer)
    app.router.add_delete("/viewers/{session}", delete_viewer)
    app.router.add_get("/status", status)
    app.on_startup.append(_start_edge)
    app.on_shutdown.append(_stop)
    return app


async def _main(args: argparse.Namespace) -> None:
    aiortc_glue.restrict_host_addresses(args.ice_address or None)
    aiortc_glue.set_consent_timeout(args.peer_timeout)
    host, port = args.origin.rsplit(":", 1)
    app = create_worker_app((host, int(port)), args.peer_timeout, args.keyframe_interval)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    Path(args.socket).unlink(missing_ok=True)
    await web.UnixSite(runner, args.socket).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # If the front dies, so do we: our stdin is its pipe.
    loop.add_reader(sys.stdin.fileno(), lambda: stop.set() if not sys.stdin.buffer.read1(1) else None)
    logger.info("worker %s ready on %s (origin %s)", args.index, args.socket, args.origin)
    await stop.wait()
    await runner.cleanup()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="skyclass-worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--origin", required=True, help="host:port of the origin's relay endpoint")
    parser.add_argument("--ice-address", action="append")
    parser.add_argument("--peer-timeout", type=float, default=10.0)
    parser.add_argument("--keyframe-interval", type=float, default=0.5)
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"%(asctime)s %(levelname)s worker{args.index} %(name)s: %(message)s")
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()

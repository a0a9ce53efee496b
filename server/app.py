"""The aiohttp application: signalling, API, health, metrics and pages wired together."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from aiohttp import web

from skyclass.media import aiortc_glue
from skyclass.recordings import http as replay_http
from skyclass.recordings.recorder import RecorderSettings, RecordingManager

from . import classroom_api, metrics, ops, signalling
from .cluster import Cluster
from .config import Config
from .errors import HttpError, error_middleware
from .rooms import RoomRegistry
from .workerpool import WorkerPool

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"


async def api_rooms(request: web.Request) -> web.Response:
    rooms: RoomRegistry = request.app["rooms"]
    return web.json_response({"rooms": [room.state() for room in rooms.rooms.values()]})


async def api_room(request: web.Request) -> web.Response:
    rooms: RoomRegistry = request.app["rooms"]
    name = request.match_info["room"]
    room = rooms.get(name)
    if room is None:
        # An empty room is not an error for a page polling before the lesson starts.
        return web.json_response({"room": name, "live": False, "publisher": None, "viewers": 0,
                                  "codecs": {}, "started_at": None})
    return web.json_response(room.state())


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "uptime": time.monotonic() - request.app["started"]})


async def readyz(request: web.Request) -> web.Response:
    """Ready while a student could still be admitted somewhere on this node."""
    pool = request.app.get("workers")
    if pool is not None:
        ready = pool.ready
        detail = pool.worker_stats()
    else:
        rooms: RoomRegistry = request.app["rooms"]
        viewers = sum(len(r.viewers) for r in rooms.rooms.values())
        ready = viewers < request.app["config"].max_viewers_per_worker
        detail = [{"worker": None, "viewers": viewers}]
    return web.json_response({"ready": ready, "workers": detail}, status=200 if ready else 503)


async def metrics_handler(request: web.Request) -> web.Response:
    body = metrics.render(request.app["metrics"])
    return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})


def _page(name: str):
    async def handler(request: web.Request) -> web.FileResponse:
        path = WEB_DIR / name
        if not path.exists():
            raise HttpError(404, "not found", f"page {name} is missing")
        return web.FileResponse(path, headers={"Cache-Control": "no-cache"})

    return handler


async def _on_startup(app: web.Application) -> None:
    app["rooms"].start()
    config: Config = app["config"]
    if config.workers > 0:
        pool = WorkerPool(config, app["rooms"])
        app["workers"] = pool
        await pool.start()


async def _on_shutdown(app: web.Application) -> None:
    pool = app.get("workers")
    if pool is not None:
        await pool.close()
    await app["rooms"].close()


def create_app(config: Config) -> web.Application:
    aiortc_glue.restrict_host_addresses(config.ice_addresses or None)
    aiortc_glue.set_consent_timeout(config.peer_timeout)
    app = web.Application(middlewares=[error_middleware], client_max_size=256 * 1024)
    app["config"] = config
    app["secret"] = config.resolved_secret()
    app["rooms"] = RoomRegistry(keyframe_interval=config.keyframe_interval, peer_timeout=config.peer_timeout)
    app["metrics"] = metrics.make_registry(app["rooms"], lambda: app.get("workers"))
    app["started"] = time.monotonic()
    signalling.add_routes(app)
    app.router.add_get("/api/rooms", api_rooms)
    app.router.add_get("/api/rooms/{room}", api_room)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_get("/", _page("index.html"))
    app.router.add_get("/teach/{room}", _page("teach.html"))
    app.router.add_get("/watch/{room}", _page("watch.html"))
    app.router.add_get("/ops", _page("ops.html"))
    ops.add_routes(app)
    recorder = RecordingManager(RecorderSettings(
        root=config.data / "recordings", disabled_rooms=tuple(config.no_record),
        grace=config.peer_timeout if config.record_grace is None else config.record_grace,
        node=classroom_api.node_id_for(config), origin=config.base_url()))
    app["rooms"].observers.append(recorder)
    replay_http.add_routes(app, recorder)
    classroom_api.setup(app)  # timetable, roles, events websocket, attendance (after the registry exists)
    if WEB_DIR.exists():
        app.router.add_static("/static/", WEB_DIR)
    app.on_startup.append(_on_startup)
    app.on_shutdown.append(_on_shutdown)
    if config.redis:
        _add_cluster(app, config)
    return app


def _add_cluster(app: web.Application, config: Config) -> None:
    """Several nodes on one Redis: students of a room taught elsewhere are served here as an
    edge of it, and publishers are sent to the room's node (cluster.py)."""
    cluster = Cluster(config, app["rooms"], app["state"], classroom_api.node_id_for(config), app["secret"])
    app["cluster"] = cluster

    async def start(app: web.Application) -> None:
        await cluster.start()

    async def stop(app: web.Application) -> None:
        await cluster.close()

    app.on_startup.append(start)
    app.on_shutdown.append(stop)

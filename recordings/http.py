"""Replay over HTTP: the catalogue API, HLS playlists and segments, the single-file download, the page.

The only module of ``recordings/`` that knows aiohttp. Segments and init segments never
change once they exist (they appear by rename when complete), so they are served as
immutable with range support (``FileResponse``: sendfile, ``Accept-Ranges``, ``Range``,
ETag); the playlist is ``no-cache`` while the lesson runs and cacheable once it has ended.

With a shared catalogue (several nodes, one Redis) any node lists and describes every
recording and serves the replay page; the media requests of a recording held by another node
are redirected (307) to that node's ``origin``.
"""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Optional

from aiohttp import web

from .catalogue import ID_PATTERN, RecordingInfo
from .playlist import PLAYLIST_NAME
from .recorder import RecordingManager
from .remux import download_path, remux

logger = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent.parent / "web"
ID = r"{id:[A-Za-z0-9][A-Za-z0-9_-]{0,127}}"
_MEDIA_FILE = re.compile(r"^(init_\d+\.(mp4|webm)|seg_\d{5}\.(m4s|webm))$")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
CONTENT_TYPES = {
    ".m3u8": "application/vnd.apple.mpegurl",
    ".m4s": "video/iso.segment",
    ".mp4": "video/mp4",
    ".webm": "video/webm",
}
IMMUTABLE = "public, max-age=31536000, immutable"
MANAGER_KEY = web.AppKey("recordings", RecordingManager)
WEB_DIR_KEY = web.AppKey("recordings_web_dir", Path)


def _manager(request: web.Request) -> RecordingManager:
    return request.app[MANAGER_KEY]


async def _info(request: web.Request) -> RecordingInfo:
    recording_id = request.match_info["id"]
    info = await _manager(request).store.get(recording_id) if ID_PATTERN.match(recording_id) else None
    if info is None:
        raise web.HTTPNotFound(text=f"no recording {recording_id!r}")
    return info


async def list_recordings(request: web.Request) -> web.Response:
    query = request.query
    date = query.get("date") or None
    if date is not None and not _DATE.match(date):
        raise web.HTTPBadRequest(text="date must be YYYY-MM-DD")
    infos = await _manager(request).store.list(
        room=query.get("room") or None, grade=query.get("grade") or None,
        subject=query.get("subject") or None, date=date)
    return web.json_response({"recordings": [i.public() for i in infos]}, headers={"Cache-Control": "no-cache"})


async def get_recording(request: web.Request) -> web.Response:
    info = await _info(request)
    return web.json_response(info.public(), headers={"Cache-Control": "no-cache"})


def _directory(request: web.Request) -> Path:
    return _manager(request).settings.root / request.match_info["id"]


def _elsewhere(request: web.Request, info: RecordingInfo) -> web.HTTPException:
    """A recording another node holds (a shared catalogue lists every node's): send the
    client there, or say why not."""
    if info.origin:
        return web.HTTPTemporaryRedirect(info.origin.rstrip("/") + request.path_qs,
                                         headers={"Access-Control-Allow-Origin": "*"})
    return web.HTTPNotFound(text=f"recording {info.id} is on node {info.node or '?'}, whose address is not known "
                                 "(start every node with --public-url)")


def _is_remote(request: web.Request, info: RecordingInfo) -> bool:
    here = _manager(request).settings.node
    return bool(info.node and here and info.node != here and not _directory(request).is_dir())


async def playlist(request: web.Request) -> web.StreamResponse:
    info = await _info(request)
    if _is_remote(request, info):
        raise _elsewhere(request, info)
    path = _directory(request) / PLAYLIST_NAME
    if not path.exists():
        # The lesson has begun but its first segment is still being built.
        raise web.HTTPNotFound(text="no segment recorded yet", headers={"Retry-After": "2"})
    cache = "no-cache" if info.state == "recording" else "public, max-age=3600"
    return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES[".m3u8"], "Cache-Control": cache,
                                           "Access-Control-Allow-Origin": "*"})


async def media_file(request: web.Request) -> web.StreamResponse:
    """An init or media segment. No catalogue lookup: the file's existence is the check,
    which keeps this path as close to a static file server as possible."""
    name = request.match_info["name"]
    if not _MEDIA_FILE.match(name):
        raise web.HTTPNotFound(text="no such file")
    path = _directory(request) / name
    if not path.is_file():
        info = await _manager(request).store.get(request.match_info["id"])
        if info is not None and _is_remote(request, info):
            raise _elsewhere(request, info)
        raise web.HTTPNotFound(text="no such file")
    return web.FileResponse(path, headers={"Content-Type": CONTENT_TYPES[path.suffix], "Cache-Control": IMMUTABLE,
                                           "Access-Control-Allow-Origin": "*"})


_remux_locks: dict[str, asyncio.Lock] = {}


async def download(request: web.Request) -> web.StreamResponse:
    """The whole lesson as one file (remuxed on first request, then kept)."""
    info = await _info(request)
    wanted = request.match_info["ext"]
    have = "webm" if info.container == "webm" else "mp4"
    if wanted != have:
        raise web.HTTPNotFound(text=f"this lesson downloads as /replay/{info.id}.{have}")
    if _is_remote(request, info):
        raise _elsewhere(request, info)
    if info.state == "recording":
        raise web.HTTPConflict(text="the lesson is still being recorded: the download exists once it ends")
    directory = _directory(request)
    path = download_path(directory, info.container)
    if not path.exists():
        lock = _remux_locks.setdefault(info.id, asyncio.Lock())
        async with lock:
            if not path.exists():
                try:
                    await asyncio.to_thread(remux, directory, info.container, f"room={info.room} recording={info.id}")
                except Exception as exc:
                    logger.exception("room=%s recording=%s remux failed", info.room, info.id)
                    raise web.HTTPInternalServerError(text=f"could not build the download: {exc}") from exc
    filename = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{info.room}-{info.id}") + "." + have
    return web.FileResponse(path, headers={
        "Content-Type": CONTENT_TYPES["." + have], "Cache-Control": "public, max-age=86400",
        "Content-Disposition": f'inline; filename="{filename}"'})


async def page(request: web.Request) -> web.StreamResponse:
    await _info(request)
    path = request.app[WEB_DIR_KEY] / "replay.html"
    if not path.exists():
        raise web.HTTPNotFound(text="replay page missing")
    return web.FileResponse(path, headers={"Cache-Control": "no-cache"})


def add_routes(app: web.Application, manager: RecordingManager, web_dir: Optional[Path] = None) -> None:
    """Register the replay routes and the manager's start-up (catalogue scan, crash repair)
    and shutdown (finish open recordings) hooks."""
    app[MANAGER_KEY] = manager
    app[WEB_DIR_KEY] = web_dir or WEB_DIR
    app.router.add_get("/api/recordings", list_recordings)
    app.router.add_get(f"/api/recordings/{ID}", get_recording)
    app.router.add_get(f"/replay/{ID}/index.m3u8", playlist)
    app.router.add_get(f"/replay/{ID}/{{name}}", media_file)
    app.router.add_get(f"/replay/{ID}.{{ext:mp4|webm}}", download)
    app.router.add_get(f"/replay/{ID}", page)

    async def on_startup(app: web.Application) -> None:
        await manager.start()

    async def on_cleanup(app: web.Application) -> None:
        await manager.close()

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)

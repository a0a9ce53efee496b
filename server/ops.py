"""The ops view of a node: ``GET /api/ops`` (a JSON snapshot for the ``/ops`` dashboard) and the page.

Prometheus (``/metrics``) is the durable, scrapeable interface; this snapshot is what a person
watching the 8:00 bell needs on one screen without a Prometheus stack: readiness, each fan-out
worker's load against its admission cap, the rooms with their teacher, students, speakers and
recording, the node's forwarding counters and CPU, and — with Redis — which node every room
lives on. Counters are cumulative; the page turns them into rates between two polls, so the
server keeps no history and any number of dashboards cost one cheap read each.

Ops only: the snapshot names teachers and rooms across the node (a student's or teacher's
token gets 403, no token 401).
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

from aiohttp import web

from skyclass.recordings.http import MANAGER_KEY

from .auth import authenticate
from .errors import HttpError
from .metrics import node_counters
from .rooms import RoomRegistry

logger = logging.getLogger(__name__)

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss_bytes() -> Optional[int]:
    """This process's resident memory now (``ru_maxrss`` would be the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return None


def _recording_of(app: web.Application, room: str) -> Optional[dict]:
    manager = app.get(MANAGER_KEY)
    recording = manager.active.get(room) if manager is not None else None
    if recording is None:
        return None
    info = recording.info
    return {"id": info.id, "state": info.state, "duration": round(info.duration, 1), "segments": info.segments}


async def snapshot(app: web.Application) -> dict[str, Any]:
    """Everything the dashboard shows, read now."""
    config = app["config"]
    rooms: RoomRegistry = app["rooms"]
    pool = app.get("workers")
    workers: list[dict] = pool.worker_stats() if pool is not None else []
    capacity = config.max_viewers_per_worker
    classroom = app.get("classroom")
    websockets = {name: len(local.clients) for name, local in classroom.rooms.items()} if classroom else {}
    room_rows = []
    for room in sorted(rooms.rooms.values(), key=lambda r: r.name):
        row = room.state()
        row["recording"] = _recording_of(app, room.name)
        row["websockets"] = websockets.get(room.name, 0)
        room_rows.append(row)
    front_cpu = time.process_time()
    worker_rows = [{"worker": w["worker"], "up": w["up"], "viewers": w["viewers"], "capacity": capacity,
                    "restarts": w["restarts"], "pid": w["pid"],
                    "cpu_seconds": round(float(w["counters"].get("cpu_seconds", 0.0)), 3)} for w in workers]
    viewers = sum(len(r.viewers) for r in rooms.rooms.values())
    if pool is not None:
        ready = bool(pool.ready)
        slots = sum(capacity for w in workers if w["up"])
    else:
        ready = viewers < capacity
        slots = capacity
    cluster: dict[str, str] = {}
    state = app.get("state")
    if state is not None:
        try:
            cluster = await state.room_nodes()
        except Exception:  # a Redis hiccup must not take the dashboard down with it
            logger.warning("node=%s ops: room registry unavailable", getattr(state, "node_id", "?"), exc_info=True)
    return {
        "node": getattr(classroom, "node_id", None) or f"{config.host}:{config.port}",
        "time": time.time(),
        "uptime": round(time.monotonic() - app["started"], 1),
        "ready": ready,
        "store": "redis" if config.redis else "in-process",
        "front": {"pid": os.getpid(), "cpu_seconds": round(front_cpu, 3), "rss_bytes": _rss_bytes()},
        "cpu_seconds": round(front_cpu + sum(w["cpu_seconds"] for w in worker_rows), 3),
        "cores": os.cpu_count(),
        "counters": node_counters(rooms, workers),
        "capacity": {"per_worker": capacity, "workers": len(workers), "slots": slots, "viewers": viewers},
        "workers": worker_rows,
        "rooms": room_rows,
        "totals": {
            "rooms": len(room_rows),
            "live": sum(1 for r in room_rows if r["live"]),
            "viewers": viewers,
            "speakers": sum(len(r["speakers"]) for r in room_rows),
            "websockets": sum(websockets.values()),
            "recording": sum(1 for r in room_rows if r["recording"]),
        },
        "cluster": {"rooms": cluster, "nodes": sorted(set(cluster.values()))},
    }


async def api_ops(request: web.Request) -> web.Response:
    claims = authenticate(request)
    if claims.role != "ops":
        raise HttpError(403, "forbidden", f"the ops view is for ops tokens, not {claims.role!r}")
    return web.json_response(await snapshot(request.app), headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/ops", api_ops)

"""Rooms across nodes: a room lives on the node its teacher publishes to; other nodes are its edges.

A grade's lesson has thousands of students, more than one machine serves, so the students
of one room must be able to sit on several nodes. Redis says where each room lives (the
classroom keeps ``room → node`` fresh while a teacher publishes) and how to reach each node
(``node_info``: its relay origin and its URL, advertised here). Then:

* a student's WHEP request may land on any node (a plain load balancer in front is enough):
  when the room lives elsewhere, this node subscribes to the room at its origin over the relay
  protocol (``docs/relay-protocol.md``, the same datagrams the local fan-out workers speak)
  and serves the student from its own workers. One relay stream per room per node crosses
  the network, whatever the number of students there; keyframe requests and NACKs go up the
  same way and are coalesced at each hop;
* a teacher's or speaker's WHIP request for a room living elsewhere is forwarded there, and
  so is the DELETE of the session it creates: a room has one ingress, whose packet cache and
  keyframe aggregation every edge relies on. Forwarded rather than redirected (RFC 9725
  allows a 307) because browsers drop ``Authorization`` on a cross-origin redirect and not
  every encoder follows one; the media itself goes straight to the room's node (its ICE
  candidates are in the answer).

An edge never re-serves a relayed room to other nodes (no loops, one hop from the origin).
The cross-node relay listens on ``--relay-address`` and only answers subscriptions that carry
the key derived from the secret the nodes already share for tokens.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable, Callable, Optional

import aiohttp
from aiohttp import web

from skyclass.media.relay import RelayEdge, RelayOrigin, relay_key

from .config import Config
from .errors import HttpError
from .rooms import Room, RoomRegistry
from .state import State

logger = logging.getLogger(__name__)

NODE_INFO_TTL = 6.0  # a node that stops advertising (dead) is not sent anyone after this long
ADVERTISE_EVERY = 2.0
FORWARD_TIMEOUT = 15.0
FORWARD_KEEP = 12 * 3600.0
REFRESH_INTERVAL = 1.0  # how soon students waiting here follow a teacher who starts elsewhere
CODEC_WAIT = 2.0  # how long a joining student's answer waits to learn the room's codecs
IDLE_GRACE = 5.0  # a relayed room with no student here is let go after this long


class Cluster:
    def __init__(self, config: Config, registry: RoomRegistry, state: State, node_id: str, secret: str) -> None:
        self.config = config
        self.registry = registry
        self.state = state
        self.node_id = node_id
        self.key = relay_key(secret)
        self.host, self.port = _host_port(config.relay_address)
        self.url = config.base_url()
        self.origin = RelayOrigin(self._ingested_streams, key=self.key)
        self.edges: dict[tuple, RelayEdge] = {}
        # room -> (home node, its relay address, when we linked it)
        self.upstream: dict[str, tuple[str, tuple, float]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._http: Optional[aiohttp.ClientSession] = None
        # WHIP sessions forwarded to another node: session id -> (its base URL, when)
        self.forwarded: dict[str, tuple[str, float]] = {}
        self._unreachable: set[tuple[str, str]] = set()  # (room, node) already warned about

    # lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        address = await self.origin.start(self.host, self.port)
        self.port = address[1]
        await self._advertise()
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FORWARD_TIMEOUT))
        # Separate loops: a slow refresh (many rooms, Redis lagging) must never let this node's
        # advertisement lapse, or other nodes would take its rooms over while it still serves them.
        self._tasks = [asyncio.ensure_future(self._every(ADVERTISE_EVERY, self._advertise, "advertise")),
                       asyncio.ensure_future(self._every(REFRESH_INTERVAL, self.refresh, "refresh"))]
        logger.info("node=%s cluster relay origin %s:%d, url %s", self.node_id, self.host, self.port, self.url)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for edge in self.edges.values():
            edge.close()
        self.edges.clear()
        self.origin.close()
        if self._http is not None:
            await self._http.close()

    async def _advertise(self) -> None:
        await self.state.set_node_info(self.node_id, {"relay": [self.host, self.port], "url": self.url}, NODE_INFO_TTL)

    async def _every(self, interval: float, step: Callable[[], Awaitable[None]], what: str) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await step()
            except asyncio.CancelledError:
                raise
            except Exception:  # Redis away for a moment: keep relaying what we relay
                logger.warning("node=%s cluster %s failed", self.node_id, what, exc_info=True)

    # signalling hooks -----------------------------------------------------------------
    async def _other_home(self, room_name: str) -> Optional[str]:
        """The node a room lives on, when its teacher is not publishing here and that is another node."""
        room = self.registry.get(room_name)
        if room is not None and room.publisher is not None:
            return None
        home = await self.state.room_node(room_name)
        return home if home and home != self.node_id else None

    async def home_elsewhere(self, room_name: str) -> Optional[str]:
        """The base URL of the live node a room lives on, when that is not this node."""
        home = await self._other_home(room_name)
        if home is None:
            return None
        info = await self.state.node_info(home)
        return str(info["url"]).rstrip("/") if info and info.get("url") else None

    async def forward_publish(self, request: web.Request, home: str) -> web.Response:
        """POST the publisher's offer to the room's node; answer with its answer. The session's
        resource stays under this node's URL (its DELETE is forwarded too)."""
        assert self._http is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "content-type")}
        try:
            async with self._http.post(home + request.path_qs, data=await request.read(), headers=headers,
                                       allow_redirects=False) as resp:
                body, status = await resp.read(), resp.status
                location = resp.headers.get("Location")
                passed = {k: v for k, v in resp.headers.items() if k.lower() in ("location", "retry-after", "link")}
                content_type = resp.headers.get("Content-Type", "text/plain")
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise HttpError(503, "room's node unreachable", f"the room lives on {home}, which did not answer: {exc}",
                            headers={"Retry-After": "2"}) from None
        if status == 201 and location:
            session_id = location.rstrip("/").rsplit("/", 1)[-1]
            self._remember(session_id, home)
            passed["Access-Control-Expose-Headers"] = "Location"
            logger.info("room=%s peer=%s publisher forwarded to the room's node %s", request.match_info["room"],
                        session_id, home)
        return web.Response(status=status, body=body, headers={**passed, "Content-Type": content_type})

    async def forward_delete(self, request: web.Request, session_id: str) -> Optional[web.Response]:
        """DELETE of a session this node forwarded: ended on the room's node. None if not ours."""
        found = self.forwarded.get(session_id)
        if found is None or self._http is None:
            return None
        home = found[0]
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        try:
            async with self._http.delete(home + request.path_qs, headers=headers) as resp:
                body, status = await resp.read(), resp.status
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise HttpError(503, "room's node unreachable", f"{home} did not answer: {exc}",
                            headers={"Retry-After": "2"}) from None
        if status < 400 or status == 404:
            self.forwarded.pop(session_id, None)
        return web.Response(status=status, body=body, content_type="text/plain")

    def _remember(self, session_id: str, home: str) -> None:
        now = time.time()
        if len(self.forwarded) > 10_000:  # sessions never DELETEd (a closed laptop): forget old ones
            for sid, (_, at) in list(self.forwarded.items()):
                if now - at > FORWARD_KEEP:
                    del self.forwarded[sid]
        self.forwarded[session_id] = (home, now)

    async def prepare_viewer(self, room_name: str) -> None:
        """Before a student joins here: when the room lives elsewhere, start relaying it and
        wait (briefly) for its codecs, so the student's answer offers the teacher's."""
        home = await self._other_home(room_name)
        if home is None:
            return
        room = self.registry.get_or_create(room_name)
        if not await self._link(room, home):
            return
        deadline = time.monotonic() + CODEC_WAIT
        streams = room.router.streams
        while time.monotonic() < deadline and not (streams["video"].mime_type or streams["audio"].mime_type):
            await asyncio.sleep(0.05)

    # rooms ------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Point every room with students here and its teacher elsewhere at the node it lives on
        (students who came before the teacher follow them there); let go of the rest."""
        now = time.monotonic()
        for room in list(self.registry.rooms.values()):
            if room.publisher is not None:
                self._unlink(room)  # the teacher is here now: ingested locally
            elif room.viewers:
                home = await self.state.room_node(room.name)
                if home and home != self.node_id:
                    await self._link(room, home)
                else:
                    self._unlink(room)
        for name, (_, _, linked_at) in list(self.upstream.items()):
            room = self.registry.get(name)
            if room is None:
                self.upstream.pop(name, None)
            elif not room.viewers and room.publisher is None and now - linked_at > IDLE_GRACE:
                self._unlink(room)
                if room.idle:
                    self.registry.drop_room(room)
        for addr in list(self.edges):
            if not self._rooms_from(addr):
                edge = self.edges.pop(addr)
                edge.subscribe_now()  # an empty list: the origin drops our subscriptions at once
                edge.close()
                logger.info("node=%s relay edge to %s closed (no room left)", self.node_id, addr)

    async def _link(self, room: Room, home: str) -> bool:
        info = await self.state.node_info(home)
        if not info or not info.get("relay"):
            if (room.name, home) not in self._unreachable:  # once, not every second
                self._unreachable.add((room.name, home))
                logger.warning("room=%s lives on node %s, which is not reachable (no relay advertised)",
                               room.name, home)
            return False
        self._unreachable.discard((room.name, home))
        host, port = info["relay"]
        addr = (str(host), int(port))
        current = self.upstream.get(room.name)
        if current is not None and current[:2] == (home, addr):
            return True
        self.upstream[room.name] = (home, addr, time.monotonic())
        room.upstream = home
        edge = self.edges.get(addr)
        if edge is None:
            edge = RelayEdge(addr, self._relayed_stream, lambda addr=addr: self._rooms_from(addr), key=self.key)
            await edge.start(self.host)
            self.edges[addr] = edge
        edge.subscribe_now()
        if current is not None and current[1] in self.edges:
            self.edges[current[1]].subscribe_now()  # the previous origin: it drops the room now
        logger.info("room=%s relayed from node %s (%s:%d) to this node's students", room.name, home, *addr)
        return True

    def _unlink(self, room: Room) -> None:
        if self.upstream.pop(room.name, None) is not None:
            logger.info("room=%s no longer relayed from node %s", room.name, room.upstream)
        room.upstream = None

    def _rooms_from(self, addr: tuple) -> list[str]:
        return [name for name, (_, a, _) in self.upstream.items() if a == addr and name in self.registry.rooms]

    def _relayed_stream(self, room_name: str, slot: str) -> Optional[object]:
        room = self.registry.get(room_name)
        if room is None or room.upstream is None:
            return None
        return room.router.streams.get(slot)

    def _ingested_streams(self, room_name: str) -> Optional[dict]:
        """What other nodes may subscribe to: rooms whose teacher publishes here."""
        room = self.registry.get(room_name)
        if room is None or room.upstream is not None:
            return None
        return room.router.streams


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text.strip("[]"), 0
    return host.strip("[]"), int(port)

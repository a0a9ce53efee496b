"""Rooms on this node: a media Router plus the WHIP/WHEP sessions attached to it."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

from aiortc import RTCPeerConnection

from skyclass.media.router import Consumer, MediaCounters, Producer, Router

logger = logging.getLogger(__name__)

UPSTREAM_SILENCE = 3.0  # a relayed room without packets this long is not live (its teacher is gone)


@dataclass(eq=False)
class Session:
    """One WHIP (publisher) or WHEP (viewer) peer connection."""

    kind: str  # "whip" | "whep"
    room: str
    name: str
    pc: Optional[RTCPeerConnection]  # None for a viewer served by a fan-out worker
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    created_at: float = field(default_factory=time.time)
    producers: list[Producer] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    closed: bool = False
    worker: Optional[int] = None  # the fan-out worker that holds this viewer's peer connection
    speaker: bool = False  # a student publishing into the speaker slots

    @property
    def location(self) -> str:
        return f"/{self.kind}/{self.room}/{self.id}"


class RoomObserver(Protocol):
    """Told about publishers coming and going (the recorder, the state store, events)."""

    def publisher_joined(self, room: "Room", session: Session) -> None: ...

    def publisher_left(self, room: "Room", session: Session, ended: bool) -> None:
        """``ended`` is True when the teacher ended the lesson (DELETE); False when the
        connection was lost or replaced, and the teacher may be back in a moment."""

    def room_closed(self, room: "Room") -> None: ...

    # Optional (looked up with getattr, so observers without them keep working):
    # viewer_joined / viewer_left (WHEP sessions, wherever their worker is) and
    # speaker_joined / speaker_left (students publishing into the speaker slots),
    # each called as hook(room, session) — attendance and the classroom's events use them.


class Room:
    def __init__(self, name: str, counters: MediaCounters, keyframe_interval: float) -> None:
        self.name = name
        self.router = Router(name, counters, keyframe_interval)
        self.router.start()
        self.publisher: Optional[Session] = None
        self.speakers: dict[str, Session] = {}
        self.viewers: dict[str, Session] = {}
        self.started_at: Optional[float] = None
        # The node this room is relayed from when its teacher publishes elsewhere (this node
        # is then an edge of it: see cluster.py); None when the lesson is ingested here.
        self.upstream: Optional[str] = None

    def state(self) -> dict:
        relayed = self.upstream is not None and self.router.receiving(UPSTREAM_SILENCE)
        return {
            "room": self.name,
            "live": (self.publisher is not None and self.router.live) or relayed,
            "publisher": self.publisher.name if self.publisher else None,
            "upstream": self.upstream,
            "viewers": len(self.viewers),
            "speakers": [s.name for s in self.speakers.values()],
            "codecs": {k: v for k, v in self.router.codecs().items() if v},
            "started_at": self.started_at,
        }

    @property
    def idle(self) -> bool:
        return self.publisher is None and not self.viewers and not self.speakers


class RoomRegistry:
    """The rooms of this node. A room exists while anyone is in it: created by the first
    publisher or viewer, dropped (with its codec choice) when the last one leaves."""

    def __init__(self, keyframe_interval: float = 0.5, peer_timeout: float = 10.0) -> None:
        self.counters = MediaCounters()
        self.keyframe_interval = keyframe_interval
        self.peer_timeout = peer_timeout
        self.rooms: dict[str, Room] = {}
        self.sessions: dict[str, Session] = {}
        self.observers: list[RoomObserver] = []
        # Ends a viewer held by a fan-out worker (set by the worker pool).
        self.close_remote: Optional[Callable[[Session], Awaitable[None]]] = None
        self._watchdog: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        if self._watchdog is None:
            self._watchdog = asyncio.ensure_future(self._watch_publishers())

    async def _watch_publishers(self) -> None:
        """End a publisher whose media stopped for ``peer_timeout`` seconds.

        Publishers are not checked by ICE consent (studio encoders do not answer it);
        a teacher who sends nothing for that long is gone, and students get a clean
        "not live" instead of a frozen picture.
        """
        while True:
            await asyncio.sleep(min(1.0, self.peer_timeout / 4))
            now = time.monotonic()
            for room in list(self.rooms.values()):
                session = room.publisher
                if session is None or not session.producers:
                    continue
                if min(p.idle_for(now) for p in session.producers) > self.peer_timeout:
                    try:
                        await self.close_session(session, reason=f"no media for {self.peer_timeout:.0f}s")
                    except Exception:
                        # One failing close must not end the watchdog: every later lost
                        # teacher would then stay "live" (and recorded) for ever.
                        logger.exception("room=%s peer=%s closing a silent publisher failed", room.name, session.id)

    def get(self, name: str) -> Optional[Room]:
        return self.rooms.get(name)

    def get_or_create(self, name: str) -> Room:
        room = self.rooms.get(name)
        if room is None:
            room = self.rooms[name] = Room(name, self.counters, self.keyframe_interval)
            logger.info("room=%s created", name)
        return room

    def add_session(self, session: Session) -> None:
        room = self.get_or_create(session.room)
        self.sessions[session.id] = session
        if session.kind == "whip" and session.speaker:
            room.speakers[session.id] = session
            self._notify("speaker_joined", room, session)
        elif session.kind == "whip":
            previous = room.publisher
            room.publisher = session
            if room.started_at is None:
                room.started_at = time.time()
            if previous is not None and previous is not session:
                logger.info("room=%s publisher %s replaced by %s", room.name, previous.id, session.id)
                asyncio.ensure_future(self.close_session(previous, reason="replaced"))
            self._notify("publisher_joined", room, session)
        else:
            room.viewers[session.id] = session
            self._notify("viewer_joined", room, session)

    def _notify(self, hook: str, room: Room, session: Session, *args: Any) -> None:
        for observer in self.observers:
            method = getattr(observer, hook, None)
            if method is not None:
                try:
                    method(room, session, *args)
                except Exception:
                    # An observer (recorder, classroom) that fails must not stop the
                    # session's own bookkeeping or the other observers.
                    logger.exception("room=%s peer=%s observer %s failed", room.name, session.id, hook)

    async def close_session(self, session: Session, reason: str, ended: bool = False,
                            remote_ended: bool = False) -> None:
        """End ``session``. ``remote_ended``: its worker already dropped it (or died)."""
        if session.closed:
            return
        session.closed = True
        self.sessions.pop(session.id, None)
        for consumer in session.consumers:
            consumer.close()
        for producer in session.producers:
            producer.close()
        room = self.rooms.get(session.room)
        if room is not None:
            if room.publisher is session:
                # started_at stays: a teacher who reconnects continues the same lesson.
                room.publisher = None
                self._notify("publisher_left", room, session, ended)
            if room.viewers.pop(session.id, None) is not None:
                self._notify("viewer_left", room, session)
            if room.speakers.pop(session.id, None) is not None:
                self._notify("speaker_left", room, session)
            if room.idle:
                self.drop_room(room)
        logger.info("room=%s peer=%s %s session closed: %s", session.room, session.id, session.kind, reason)
        if session.pc is not None:
            await session.pc.close()
        elif self.close_remote is not None and not remote_ended:
            await self.close_remote(session)

    def drop_room(self, room: Room) -> None:
        """Forget an empty room (and with it its codec choice)."""
        if self.rooms.get(room.name) is room:
            del self.rooms[room.name]
        room.router.close()
        for observer in self.observers:
            observer.room_closed(room)
        logger.info("room=%s closed (empty)", room.name)

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await asyncio.gather(*(self.close_session(s, "shutdown") for s in list(self.sessions.values())))

"""Shared classroom state: one async interface, two stores.

``InProcessState`` is the embedded default for a single node: plain dicts, events
delivered by an in-process broadcast, and the few things that must survive a restart
(timetable, revoked tokens, bans, attendance, replay watch time) kept as JSON files
under ``DATA/state/``. ``RedisState`` (``--redis URL``) holds what several nodes must
share — rooms and where they live, presence counts per node, the timetable, Q&A and
chat history, hands, the floor, attendance, revocations — and fans events out over
Redis pub/sub (one pattern subscription per node, so per-event work is O(1) per node).

Both stores speak plain JSON-able dicts so the classroom logic above them is
identical; the test suite runs against both.
"""

from __future__ import annotations

import asyncio
import bisect
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

# handler(room, envelope): called on the event loop for every event of every room.
EventHandler = Callable[[str, dict], None]

HISTORY_CAP = 5000          # entries kept per room (oldest dropped)
QUESTION_TTL = 2 * 86400    # Q&A of a lesson is kept two days in the store (the jsonl log keeps it for good)
ATTENDANCE_SAVE_INTERVAL = 15.0  # in-process store: seconds between attendance writes to disk
PRESENCE_STALE = 15.0       # a node's presence entry older than this is ignored (node gone)
REDIS_CONNECTIONS = 64     # per node
GLOBAL_ROOM = "*"           # events for every room (token revocations)


class State(ABC):
    """What the classroom needs from a store. Every method is a coroutine except
    :meth:`subscribe`; values are JSON-able dicts/lists/strings."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._handlers: list[EventHandler] = []

    def subscribe(self, handler: EventHandler) -> None:
        """Receive every event published by any node (this one included)."""
        self._handlers.append(handler)

    def _dispatch(self, room: str, envelope: dict) -> None:
        for handler in self._handlers:
            try:
                handler(room, envelope)
            except Exception:  # one bad handler must not silence the others
                logger.exception("room=%s event handler failed", room)

    async def start(self) -> None:
        """Connect and start delivering events."""

    async def close(self) -> None:
        """Stop delivering events and release connections."""

    # events ------------------------------------------------------------------------
    @abstractmethod
    async def publish(self, room: str, envelope: dict) -> None: ...

    # rooms and where they live -----------------------------------------------------
    @abstractmethod
    async def set_room_node(self, room: str, node: str, ttl: float) -> None: ...

    @abstractmethod
    async def room_node(self, room: str) -> Optional[str]: ...

    @abstractmethod
    async def clear_room_node(self, room: str, node: str) -> None:
        """Forget the room's node, only if it is still ``node`` (another may have taken over)."""

    @abstractmethod
    async def room_nodes(self) -> dict[str, str]: ...

    # nodes: how to reach each one (its relay origin, its URL), while it is alive -------
    @abstractmethod
    async def set_node_info(self, node: str, info: dict, ttl: float) -> None: ...

    @abstractmethod
    async def node_info(self, node: str) -> Optional[dict]: ...

    # presence: one entry per node per room, summed by readers -----------------------
    @abstractmethod
    async def put_presence(self, room: str, node: str, entry: Optional[dict]) -> None:
        """``entry`` None removes this node's entry."""

    @abstractmethod
    async def presence(self, room: str) -> dict[str, dict]: ...

    # lesson live state -----------------------------------------------------------------
    @abstractmethod
    async def set_live(self, room: str, info: Optional[dict]) -> None: ...

    @abstractmethod
    async def live(self, room: str) -> Optional[dict]: ...

    # timetable ---------------------------------------------------------------------
    @abstractmethod
    async def put_lessons(self, lessons: list[dict], replace: bool = False) -> None: ...

    @abstractmethod
    async def lessons(self) -> list[dict]: ...

    @abstractmethod
    async def delete_lesson(self, lesson_id: str) -> bool: ...

    @abstractmethod
    async def timetable_version(self) -> str:
        """Changes whenever the timetable does; lets nodes cache it cheaply."""

    # chat / Q&A history (time-ordered per room) -------------------------------------
    @abstractmethod
    async def append_history(self, room: str, entry: dict) -> None:
        """``entry`` has a float ``ts`` and a unique ``id``."""

    @abstractmethod
    async def history(self, room: str, since: float = 0.0, until: float = float("inf"),
                      limit: int = 1000) -> list[dict]:
        """Entries with since <= ts <= until, oldest first, the newest ``limit`` of them."""

    # questions of a lesson -----------------------------------------------------------
    @abstractmethod
    async def put_question(self, scope: str, question: dict) -> None: ...

    @abstractmethod
    async def question(self, scope: str, qid: str) -> Optional[dict]: ...

    @abstractmethod
    async def questions(self, scope: str) -> list[dict]: ...

    # hands and the floor ---------------------------------------------------------------
    @abstractmethod
    async def set_hand(self, room: str, name: str, raised: bool) -> bool:
        """Raise/lower; True when it changed."""

    @abstractmethod
    async def hands(self, room: str) -> list[dict]:
        """[{name, ts}] oldest first."""

    @abstractmethod
    async def clear_hands(self, room: str) -> None: ...

    @abstractmethod
    async def swap_floor(self, room: str, floor: Optional[dict]) -> Optional[dict]:
        """Atomically set the floor ({holder, muted, since} or None); return the previous one."""

    @abstractmethod
    async def floor(self, room: str) -> Optional[dict]: ...

    # attendance --------------------------------------------------------------------------
    @abstractmethod
    async def put_attendance(self, lesson: str, node: str, records: dict[str, dict], seen: float) -> None:
        """This node's records (name → {role, intervals}) and its liveness timestamp."""

    @abstractmethod
    async def attendance(self, lesson: str) -> tuple[dict[str, dict[str, dict]], dict[str, float]]:
        """({node: {name: record}}, {node: seen})."""

    @abstractmethod
    async def add_watch_time(self, key: str, name: str, seconds: float) -> float: ...

    @abstractmethod
    async def watch_time(self, key: str) -> dict[str, float]: ...

    # revocations and bans -----------------------------------------------------------------
    @abstractmethod
    async def revoke(self, jti: str, until: float) -> None: ...

    @abstractmethod
    async def is_revoked(self, jti: str) -> bool: ...

    @abstractmethod
    async def ban(self, room: str, name: str, until: float) -> None: ...

    async def revoked_or_banned(self, jti: str, room: str, name: str) -> tuple[bool, bool]:
        """(token revoked, ``name`` banned from ``room``) in one go: checked on every join."""
        return (bool(jti) and await self.is_revoked(jti)), await self.is_banned(room, name)

    async def room_snapshot(self, room: str, scope: str, since: float, limit: int) -> dict:
        """What a joiner's welcome needs, in one go: history, questions, floor, hands, live."""
        return {"history": await self.history(room, since=since, limit=limit),
                "questions": await self.questions(scope), "floor": await self.floor(room),
                "hands": await self.hands(room), "live": await self.live(room)}

    @abstractmethod
    async def is_banned(self, room: str, name: str) -> bool: ...


# ---------------------------------------------------------------------------------------
# in-process


class _JsonFile:
    """A small JSON document on disk, written atomically (tmp + rename)."""

    def __init__(self, path: Path, default: Any) -> None:
        self.path = path
        self.default = default
        self.mtime: float = -1.0

    def load(self) -> Any:
        try:
            stat = self.path.stat()
            with self.path.open() as f:
                value = json.load(f)
            self.mtime = stat.st_mtime_ns
            return value
        except FileNotFoundError:
            return json.loads(json.dumps(self.default))
        except (OSError, ValueError) as exc:
            logger.error("state file %s unreadable (%s); starting empty", self.path, exc)
            return json.loads(json.dumps(self.default))

    def changed_on_disk(self) -> bool:
        try:
            return self.path.stat().st_mtime_ns != self.mtime
        except FileNotFoundError:
            return self.mtime != -1.0

    def save(self, value: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(self.path.suffix + f".{os.getpid()}.tmp")
        with tmp.open("w") as f:
            json.dump(value, f, separators=(",", ":"))
        os.replace(tmp, self.path)
        self.mtime = self.path.stat().st_mtime_ns


def timetable_file(data: Path) -> Path:
    """Where the in-process store keeps the timetable (``skyclass timetable import`` writes it too)."""
    return data / "state" / "timetable.json"


class InProcessState(State):
    """Single-node store. Events are delivered on the next loop iteration, like pub/sub."""

    def __init__(self, node_id: str, data: Optional[Path] = None) -> None:
        super().__init__(node_id)
        self.data = data
        self._rooms: dict[str, tuple[str, float]] = {}
        self._nodes: dict[str, tuple[dict, float]] = {}
        self._presence: dict[str, dict[str, dict]] = {}
        self._live: dict[str, dict] = {}
        self._history: dict[str, list[tuple[float, dict]]] = {}
        self._questions: dict[str, dict[str, dict]] = {}
        self._hands: dict[str, dict[str, float]] = {}
        self._floor: dict[str, dict] = {}
        self._version = 0
        base = data / "state" if data is not None else None
        self._files: dict[str, Optional[_JsonFile]] = {
            "timetable": _JsonFile(timetable_file(data), {}) if data is not None else None,
            "revoked": _JsonFile(base / "revoked.json", {}) if base else None,
            "bans": _JsonFile(base / "bans.json", {}) if base else None,
            "watch": _JsonFile(base / "watch.json", {}) if base else None,
        }
        self._lessons: dict[str, dict] = self._load("timetable")
        self._revoked: dict[str, float] = self._load("revoked")
        self._bans: dict[str, float] = self._load("bans")
        self._watch: dict[str, dict[str, float]] = self._load("watch")
        self._attendance: dict[str, dict[str, dict[str, dict]]] = {}
        self._attendance_seen: dict[str, dict[str, float]] = {}
        self._attendance_dir = base / "attendance" if base else None
        self._attendance_dirty: set[str] = set()
        self._attendance_saved_at = 0.0

    def _load(self, name: str) -> dict:
        f = self._files[name]
        return f.load() if f is not None else {}

    def _save(self, name: str, value: Any) -> None:
        f = self._files[name]
        if f is not None:
            f.save(value)

    async def publish(self, room: str, envelope: dict) -> None:
        # Round-trip through JSON so both stores deliver exactly the same thing.
        copy = json.loads(json.dumps(envelope))
        asyncio.get_running_loop().call_soon(self._dispatch, room, copy)

    async def set_room_node(self, room: str, node: str, ttl: float) -> None:
        self._rooms[room] = (node, time.time() + ttl)

    async def room_node(self, room: str) -> Optional[str]:
        found = self._rooms.get(room)
        if found is None or found[1] < time.time():
            return None
        return found[0]

    async def clear_room_node(self, room: str, node: str) -> None:
        if self._rooms.get(room, ("",))[0] == node:
            del self._rooms[room]

    async def room_nodes(self) -> dict[str, str]:
        now = time.time()
        return {room: node for room, (node, until) in self._rooms.items() if until >= now}

    async def set_node_info(self, node: str, info: dict, ttl: float) -> None:
        self._nodes[node] = (json.loads(json.dumps(info)), time.time() + ttl)

    async def node_info(self, node: str) -> Optional[dict]:
        found = self._nodes.get(node)
        return found[0] if found is not None and found[1] >= time.time() else None

    async def put_presence(self, room: str, node: str, entry: Optional[dict]) -> None:
        if entry is None:
            entries = self._presence.get(room)
            if entries is not None:
                entries.pop(node, None)
                if not entries:
                    del self._presence[room]
        else:
            self._presence.setdefault(room, {})[node] = entry

    async def presence(self, room: str) -> dict[str, dict]:
        return dict(self._presence.get(room, {}))

    async def set_live(self, room: str, info: Optional[dict]) -> None:
        if info is None:
            self._live.pop(room, None)
        else:
            self._live[room] = info

    async def live(self, room: str) -> Optional[dict]:
        return self._live.get(room)

    def _reload_timetable(self) -> None:
        f = self._files["timetable"]
        if f is not None and f.changed_on_disk():
            self._lessons = f.load()
            self._version += 1

    async def put_lessons(self, lessons: list[dict], replace: bool = False) -> None:
        self._reload_timetable()
        if replace:
            self._lessons = {}
        for lesson in lessons:
            self._lessons[lesson["id"]] = lesson
        self._version += 1
        self._save("timetable", self._lessons)

    async def lessons(self) -> list[dict]:
        self._reload_timetable()
        return list(self._lessons.values())

    async def delete_lesson(self, lesson_id: str) -> bool:
        self._reload_timetable()
        if self._lessons.pop(lesson_id, None) is None:
            return False
        self._version += 1
        self._save("timetable", self._lessons)
        return True

    async def timetable_version(self) -> str:
        self._reload_timetable()
        return str(self._version)

    async def append_history(self, room: str, entry: dict) -> None:
        log = self._history.setdefault(room, [])
        item = (float(entry["ts"]), entry)
        if not log or log[-1][0] <= item[0]:
            log.append(item)
        else:
            bisect.insort(log, item, key=lambda x: x[0])
        if len(log) > HISTORY_CAP:
            del log[: len(log) - HISTORY_CAP]

    async def history(self, room: str, since: float = 0.0, until: float = float("inf"),
                      limit: int = 1000) -> list[dict]:
        log = self._history.get(room, [])
        lo = bisect.bisect_left(log, since, key=lambda x: x[0])
        hi = bisect.bisect_right(log, until, key=lambda x: x[0])
        lo = max(lo, hi - limit)
        return [entry for _, entry in log[lo:hi]]

    async def put_question(self, scope: str, question: dict) -> None:
        self._questions.setdefault(scope, {})[question["id"]] = question

    async def question(self, scope: str, qid: str) -> Optional[dict]:
        return self._questions.get(scope, {}).get(qid)

    async def questions(self, scope: str) -> list[dict]:
        return sorted(self._questions.get(scope, {}).values(), key=lambda q: q["ts"])

    async def set_hand(self, room: str, name: str, raised: bool) -> bool:
        hands = self._hands.setdefault(room, {})
        if raised:
            if name in hands:
                return False
            hands[name] = time.time()
            return True
        return hands.pop(name, None) is not None

    async def hands(self, room: str) -> list[dict]:
        return [{"name": n, "ts": t} for n, t in sorted(self._hands.get(room, {}).items(), key=lambda x: x[1])]

    async def clear_hands(self, room: str) -> None:
        self._hands.pop(room, None)

    async def swap_floor(self, room: str, floor: Optional[dict]) -> Optional[dict]:
        previous = self._floor.pop(room, None)
        if floor is not None:
            self._floor[room] = floor
        return previous

    async def floor(self, room: str) -> Optional[dict]:
        return self._floor.get(room)

    async def put_attendance(self, lesson: str, node: str, records: dict[str, dict], seen: float) -> None:
        self._attendance.setdefault(lesson, {}).setdefault(node, {}).update(records)
        self._attendance_seen.setdefault(lesson, {})[node] = seen
        if records:
            self._attendance_dirty.add(lesson)
        self._persist_attendance()

    def _persist_attendance(self, force: bool = False) -> None:
        """Write changed lessons' attendance to disk, each at most every ATTENDANCE_SAVE_INTERVAL
        (a 5,000-student lesson is a large document: rewriting it on every join would cost more
        than the lesson's events) — and all of them on close."""
        if self._attendance_dir is None:
            self._attendance_dirty.clear()
            return
        now = time.monotonic()
        if not force and now - self._attendance_saved_at < ATTENDANCE_SAVE_INTERVAL:
            return
        self._attendance_saved_at = now
        for lesson in list(self._attendance_dirty):
            _JsonFile(self._attendance_dir / f"{_file_safe(lesson)}.json", {}).save(
                {"lesson": lesson, "nodes": self._attendance[lesson], "seen": self._attendance_seen[lesson]})
        self._attendance_dirty.clear()

    async def close(self) -> None:
        self._persist_attendance(force=True)

    async def attendance(self, lesson: str) -> tuple[dict[str, dict[str, dict]], dict[str, float]]:
        if lesson not in self._attendance and self._attendance_dir is not None:
            saved = _JsonFile(self._attendance_dir / f"{_file_safe(lesson)}.json", {}).load()
            if saved:
                self._attendance[lesson] = saved.get("nodes", {})
                self._attendance_seen[lesson] = saved.get("seen", {})
        return self._attendance.get(lesson, {}), self._attendance_seen.get(lesson, {})

    async def add_watch_time(self, key: str, name: str, seconds: float) -> float:
        per = self._watch.setdefault(key, {})
        per[name] = per.get(name, 0.0) + seconds
        self._save("watch", self._watch)
        return per[name]

    async def watch_time(self, key: str) -> dict[str, float]:
        return dict(self._watch.get(key, {}))

    def _prune(self, table: dict[str, float]) -> None:
        now = time.time()
        for key in [k for k, until in table.items() if until < now]:
            del table[key]

    async def revoke(self, jti: str, until: float) -> None:
        self._prune(self._revoked)
        self._revoked[jti] = until
        self._save("revoked", self._revoked)

    async def is_revoked(self, jti: str) -> bool:
        until = self._revoked.get(jti)
        return until is not None and until >= time.time()

    async def ban(self, room: str, name: str, until: float) -> None:
        self._prune(self._bans)
        self._bans[f"{room}\n{name}"] = until
        self._save("bans", self._bans)

    async def is_banned(self, room: str, name: str) -> bool:
        until = self._bans.get(f"{room}\n{name}")
        return until is not None and until >= time.time()


def _file_safe(name: str) -> str:
    """A name usable as one path component whatever the room/lesson is called."""
    from urllib.parse import quote

    return quote(name, safe="-_.@") or "_"


# ---------------------------------------------------------------------------------------
# Redis


class RedisState(State):
    """Multi-node store on Redis. Keys live under ``prefix``; events travel on
    ``{prefix}ev:{room}`` channels, read by one pattern subscription per node."""

    def __init__(self, node_id: str, url: str, prefix: str = "skyclass:") -> None:
        super().__init__(node_id)
        import redis.asyncio as aioredis

        self.url = url
        self.prefix = prefix
        # A blocking pool: a join burst (thousands of students in a few seconds) waits for a
        # free connection instead of failing with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(url, max_connections=REDIS_CONNECTIONS, timeout=20,
                                                        decode_responses=True, health_check_interval=15)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._listener: Optional[asyncio.Task[None]] = None
        self._subscribed = asyncio.Event()

    def k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    async def start(self) -> None:
        await self.redis.ping()
        self._listener = asyncio.ensure_future(self._listen())
        await asyncio.wait_for(self._subscribed.wait(), 10)
        logger.info("node=%s state on redis %s", self.node_id, self.url)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            try:
                await self._listener
            except (asyncio.CancelledError, Exception):
                pass
        await self.redis.aclose()

    async def _listen(self) -> None:
        """Deliver events; on a lost connection, resubscribe (events meanwhile are lost,
        which the classroom tolerates: presence is re-sent and clients refetch on welcome)."""
        import redis.exceptions

        pattern = self.k("ev", "*")
        cut = len(self.k("ev", ""))
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(pattern)
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None or message.get("type") != "pmessage":
                        continue
                    try:
                        envelope = json.loads(message["data"])
                    except ValueError:
                        logger.warning("undecodable event on %s", message.get("channel"))
                        continue
                    self._dispatch(message["channel"][cut:], envelope)
            except asyncio.CancelledError:
                await pubsub.aclose()
                raise
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                logger.error("node=%s redis pub/sub lost (%s); resubscribing", self.node_id, exc)
                await pubsub.aclose()
                await asyncio.sleep(1.0)

    async def publish(self, room: str, envelope: dict) -> None:
        await self.redis.publish(self.k("ev", room), json.dumps(envelope, separators=(",", ":")))

    async def set_room_node(self, room: str, node: str, ttl: float) -> None:
        await self.redis.set(self.k("node", room), node, px=int(ttl * 1000))
        await self.redis.hset(self.k("nodes"), room, node)

    async def room_node(self, room: str) -> Optional[str]:
        return await self.redis.get(self.k("node", room))

    _CLEAR_IF = """
    if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
    if redis.call('HGET', KEYS[2], ARGV[2]) == ARGV[1] then redis.call('HDEL', KEYS[2], ARGV[2]) end
    return 1
    """

    async def clear_room_node(self, room: str, node: str) -> None:
        await self.redis.eval(self._CLEAR_IF, 2, self.k("node", room), self.k("nodes"), node, room)

    async def room_nodes(self) -> dict[str, str]:
        listed = await self.redis.hgetall(self.k("nodes"))
        if not listed:
            return {}
        rooms = list(listed)
        alive = await self.redis.mget([self.k("node", r) for r in rooms])
        return {room: node for room, node in zip(rooms, alive) if node}

    async def set_node_info(self, node: str, info: dict, ttl: float) -> None:
        await self.redis.set(self.k("nodeinfo", node), json.dumps(info, separators=(",", ":")), px=int(ttl * 1000))

    async def node_info(self, node: str) -> Optional[dict]:
        raw = await self.redis.get(self.k("nodeinfo", node))
        return json.loads(raw) if raw else None

    async def put_presence(self, room: str, node: str, entry: Optional[dict]) -> None:
        key = self.k("presence", room)
        if entry is None:
            await self.redis.hdel(key, node)
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, node, json.dumps(entry, separators=(",", ":")))
            pipe.expire(key, int(PRESENCE_STALE * 4))
            await pipe.execute()

    async def presence(self, room: str) -> dict[str, dict]:
        raw = await self.redis.hgetall(self.k("presence", room))
        return {node: json.loads(value) for node, value in raw.items()}

    async def set_live(self, room: str, info: Optional[dict]) -> None:
        if info is None:
            await self.redis.delete(self.k("live", room))
        else:
            await self.redis.set(self.k("live", room), json.dumps(info), ex=86400)

    async def live(self, room: str) -> Optional[dict]:
        raw = await self.redis.get(self.k("live", room))
        return json.loads(raw) if raw else None

    async def put_lessons(self, lessons: list[dict], replace: bool = False) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            if replace:
                pipe.delete(self.k("lessons"))
            if lessons:
                pipe.hset(self.k("lessons"), mapping={l["id"]: json.dumps(l) for l in lessons})
            pipe.incr(self.k("lessons", "version"))
            await pipe.execute()

    async def lessons(self) -> list[dict]:
        return [json.loads(v) for v in (await self.redis.hgetall(self.k("lessons"))).values()]

    async def delete_lesson(self, lesson_id: str) -> bool:
        removed = await self.redis.hdel(self.k("lessons"), lesson_id)
        if removed:
            await self.redis.incr(self.k("lessons", "version"))
        return bool(removed)

    async def timetable_version(self) -> str:
        return str(await self.redis.get(self.k("lessons", "version")) or "0")

    async def append_history(self, room: str, entry: dict) -> None:
        key = self.k("hist", room)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {json.dumps(entry, separators=(",", ":")): float(entry["ts"])})
            pipe.zremrangebyrank(key, 0, -HISTORY_CAP - 1)
            await pipe.execute()

    async def history(self, room: str, since: float = 0.0, until: float = float("inf"),
                      limit: int = 1000) -> list[dict]:
        hi = "+inf" if until == float("inf") else repr(until)
        raw = await self.redis.zrevrangebyscore(self.k("hist", room), hi, repr(since), start=0, num=limit)
        return [json.loads(v) for v in reversed(raw)]

    async def put_question(self, scope: str, question: dict) -> None:
        key = self.k("q", scope)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hset(key, question["id"], json.dumps(question))
            pipe.expire(key, QUESTION_TTL)
            await pipe.execute()

    async def question(self, scope: str, qid: str) -> Optional[dict]:
        raw = await self.redis.hget(self.k("q", scope), qid)
        return json.loads(raw) if raw else None

    async def questions(self, scope: str) -> list[dict]:
        raw = await self.redis.hgetall(self.k("q", scope))
        return sorted((json.loads(v) for v in raw.values()), key=lambda q: q["ts"])

    async def set_hand(self, room: str, name: str, raised: bool) -> bool:
        key = self.k("hands", room)
        if raised:
            changed = await self.redis.hsetnx(key, name, repr(time.time()))
            await self.redis.expire(key, 86400)
            return bool(changed)
        return bool(await self.redis.hdel(key, name))

    async def hands(self, room: str) -> list[dict]:
        raw = await self.redis.hgetall(self.k("hands", room))
        return [{"name": n, "ts": float(t)} for n, t in sorted(raw.items(), key=lambda x: float(x[1]))]

    async def clear_hands(self, room: str) -> None:
        await self.redis.delete(self.k("hands", room))

    async def swap_floor(self, room: str, floor: Optional[dict]) -> Optional[dict]:
        key = self.k("floor", room)
        if floor is None:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.get(key)
                pipe.delete(key)
                previous, _ = await pipe.execute()
        else:
            previous = await self.redis.set(key, json.dumps(floor), get=True, ex=86400)
        return json.loads(previous) if previous else None

    async def floor(self, room: str) -> Optional[dict]:
        raw = await self.redis.get(self.k("floor", room))
        return json.loads(raw) if raw else None

    async def put_attendance(self, lesson: str, node: str, records: dict[str, dict], seen: float) -> None:
        key = self.k("att", lesson)
        async with self.redis.pipeline(transaction=False) as pipe:
            if records:
                pipe.hset(key, mapping={f"{node}\n{name}": json.dumps(r) for name, r in records.items()})
            pipe.hset(self.k("attseen", lesson), node, repr(seen))
            pipe.expire(key, 90 * 86400)
            pipe.expire(self.k("attseen", lesson), 90 * 86400)
            await pipe.execute()

    async def attendance(self, lesson: str) -> tuple[dict[str, dict[str, dict]], dict[str, float]]:
        raw = await self.redis.hgetall(self.k("att", lesson))
        seen = await self.redis.hgetall(self.k("attseen", lesson))
        nodes: dict[str, dict[str, dict]] = {}
        for field_, value in raw.items():
            node, _, name = field_.partition("\n")
            nodes.setdefault(node, {})[name] = json.loads(value)
        return nodes, {n: float(t) for n, t in seen.items()}

    async def add_watch_time(self, key: str, name: str, seconds: float) -> float:
        return float(await self.redis.hincrbyfloat(self.k("watch", key), name, seconds))

    async def watch_time(self, key: str) -> dict[str, float]:
        return {n: float(v) for n, v in (await self.redis.hgetall(self.k("watch", key))).items()}

    async def revoke(self, jti: str, until: float) -> None:
        await self.redis.set(self.k("revoked", jti), "1", exat=max(int(until) + 1, int(time.time()) + 1))

    async def is_revoked(self, jti: str) -> bool:
        return bool(await self.redis.exists(self.k("revoked", jti)))

    async def ban(self, room: str, name: str, until: float) -> None:
        await self.redis.set(self.k("ban", room, name), "1", exat=max(int(until) + 1, int(time.time()) + 1))

    async def is_banned(self, room: str, name: str) -> bool:
        return bool(await self.redis.exists(self.k("ban", room, name)))

    async def revoked_or_banned(self, jti: str, room: str, name: str) -> tuple[bool, bool]:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.exists(self.k("revoked", jti or "-"))
            pipe.exists(self.k("ban", room, name))
            revoked, banned = await pipe.execute()
        return bool(jti) and bool(revoked), bool(banned)

    async def room_snapshot(self, room: str, scope: str, since: float, limit: int) -> dict:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrevrangebyscore(self.k("hist", room), "+inf", repr(since), start=0, num=limit)
            pipe.hgetall(self.k("q", scope))
            pipe.get(self.k("floor", room))
            pipe.hgetall(self.k("hands", room))
            pipe.get(self.k("live", room))
            history, questions, floor, hands, live = await pipe.execute()
        return {
            "history": [json.loads(v) for v in reversed(history)],
            "questions": sorted((json.loads(v) for v in questions.values()), key=lambda q: q["ts"]),
            "floor": json.loads(floor) if floor else None,
            "hands": [{"name": n, "ts": float(t)} for n, t in sorted(hands.items(), key=lambda x: float(x[1]))],
            "live": json.loads(live) if live else None,
        }


def make_state(node_id: str, redis_url: Optional[str], data: Optional[Path]) -> State:
    """The store the configuration asks for: Redis with ``--redis``, else in-process."""
    if redis_url:
        return RedisState(node_id, redis_url)
    return InProcessState(node_id, data)

"""Attendance: per lesson, who was there, from when, for how long; and replay watch time.

A participant is present while any of their connections to the lesson is open on any
node: the websocket of the page, a WHEP session (watching), a WHIP session (teaching or
speaking). Each node keeps its own participants' presence intervals and writes the
changed ones to the store at most once a second (a 5,000-student join burst is one
batched write per second, not 5,000), plus a per-node "seen" heartbeat: an interval
still open on a node that stopped heart-beating is closed at its last heartbeat.
The report merges every node's intervals per name (a student may watch through one
node and chat through another without being counted twice).
"""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

from .state import State

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
HEARTBEAT_INTERVAL = 5.0
STALE_AFTER = 3 * HEARTBEAT_INTERVAL
ROLE_RANK = {"teacher": 3, "assistant": 2, "ops": 1, "student": 0}
FORGET_AFTER = 12 * 3600
MAX_WATCH_PING = 300.0  # seconds one replay ping may report


@dataclass
class _Record:
    role: str
    intervals: list[list[Optional[float]]] = field(default_factory=list)  # [start, end|None]
    active: set[str] = field(default_factory=set)

    def to_json(self) -> dict:
        return {"role": self.role, "intervals": self.intervals}


class Attendance:
    """This node's attendance bookkeeping; join/leave are synchronous and O(1)."""

    def __init__(self, state: State, node_id: str) -> None:
        self.state = state
        self.node_id = node_id
        # Records are written per incarnation of the node: after a restart this process
        # knows nothing of the last one's records, so it must not overwrite them; the old
        # incarnation's open intervals end at its last heartbeat.
        self.writer = f"{node_id}#{secrets.token_hex(4)}"
        self._records: dict[str, dict[str, _Record]] = {}  # lesson -> name -> record
        self._keys: dict[str, tuple[str, str]] = {}  # connection key -> (lesson, name)
        self._dirty: dict[str, set[str]] = {}
        self._last_activity: dict[str, float] = {}
        self._task: Optional[asyncio.Task[None]] = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        now = time.time()
        for key in list(self._keys):
            self.leave(key, now)
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self.flush()
        except Exception as exc:
            logger.warning("node=%s final attendance flush failed: %s", self.node_id, exc)

    def join(self, lesson: str, name: str, role: str, key: str, now: Optional[float] = None) -> None:
        """Connection ``key`` (e.g. "ws:<id>", "whep:<session>") of ``name`` opened."""
        if key in self._keys:
            return
        now = time.time() if now is None else now
        record = self._records.setdefault(lesson, {}).get(name)
        if record is None:
            record = self._records[lesson][name] = _Record(role=role)
        elif ROLE_RANK.get(role, 0) > ROLE_RANK.get(record.role, 0):
            record.role = role
        if not record.active:
            record.intervals.append([now, None])
        record.active.add(key)
        self._keys[key] = (lesson, name)
        self._dirty.setdefault(lesson, set()).add(name)
        self._last_activity[lesson] = now

    def leave(self, key: str, now: Optional[float] = None) -> None:
        found = self._keys.pop(key, None)
        if found is None:
            return
        lesson, name = found
        record = self._records[lesson][name]
        record.active.discard(key)
        if not record.active and record.intervals and record.intervals[-1][1] is None:
            record.intervals[-1][1] = time.time() if now is None else now
        self._dirty.setdefault(lesson, set()).add(name)
        self._last_activity[lesson] = time.time()

    def present(self, lesson: str) -> int:
        return sum(1 for r in self._records.get(lesson, {}).values() if r.active)

    async def _run(self) -> None:
        last_beat = 0.0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            beat = time.monotonic() - last_beat >= HEARTBEAT_INTERVAL
            try:
                await self.flush(heartbeat=beat)
            except Exception as exc:  # the store is away: keep the records and retry
                logger.warning("node=%s attendance flush failed: %s", self.node_id, exc)
                continue
            if beat:
                last_beat = time.monotonic()

    async def flush(self, heartbeat: bool = False) -> None:
        now = time.time()
        dirty, self._dirty = self._dirty, {}
        try:
            for lesson, names in dirty.items():
                records = self._records.get(lesson, {})
                await self.state.put_attendance(lesson, self.writer,
                                                {n: records[n].to_json() for n in names if n in records}, now)
            if heartbeat:
                for lesson, records in self._records.items():
                    if lesson not in dirty and any(r.active for r in records.values()):
                        await self.state.put_attendance(lesson, self.writer, {}, now)
        except Exception:
            for lesson, names in dirty.items():
                self._dirty.setdefault(lesson, set()).update(names)
            raise
        # A lesson nobody has been in for FORGET_AFTER needs no memory here (its records are
        # in the store; keeping them until then lets a returning student extend his own).
        for lesson in [l for l, t in self._last_activity.items() if now - t > FORGET_AFTER]:
            records = self._records.get(lesson, {})
            if not any(r.active for r in records.values()) and lesson not in self._dirty:
                self._records.pop(lesson, None)
                del self._last_activity[lesson]

    async def add_watch(self, key: str, name: str, seconds: float) -> float:
        seconds = max(0.0, min(float(seconds), MAX_WATCH_PING))
        return await self.state.add_watch_time(key, name, seconds)

    async def report(self, lesson: str, now: Optional[float] = None) -> dict:
        """Merged attendance of ``lesson`` across nodes, plus replay watch time."""
        await self.flush()
        now = time.time() if now is None else now
        nodes, seen = await self.state.attendance(lesson)
        merged: dict[str, dict] = {}
        for node, records in nodes.items():
            node_seen = seen.get(node, now)
            alive = now - node_seen <= STALE_AFTER
            for name, record in records.items():
                entry = merged.setdefault(name, {"role": record.get("role", "student"), "intervals": []})
                if ROLE_RANK.get(record.get("role"), 0) > ROLE_RANK.get(entry["role"], 0):
                    entry["role"] = record["role"]
                for start, end in record.get("intervals", []):
                    open_ = end is None
                    entry["intervals"].append((start, (now if alive else node_seen) if open_ else end,
                                               open_ and alive))
        watch = await self.state.watch_time(lesson)
        people = []
        for name in sorted(set(merged) | set(watch)):
            entry = merged.get(name, {"role": "student", "intervals": []})
            spans = sorted(entry["intervals"])
            total, cur_s, cur_e = 0.0, None, None
            for s, e, _ in spans:  # union of intervals: a name on two nodes counts once
                if cur_e is None or s > cur_e:
                    if cur_e is not None:
                        total += cur_e - cur_s
                    cur_s, cur_e = s, e
                else:
                    cur_e = max(cur_e, e)
            if cur_e is not None:
                total += cur_e - cur_s
            present = any(open_ for _, _, open_ in spans)
            people.append({
                "name": name,
                "role": entry["role"],
                "present": present,
                "first_join": min((s for s, _, _ in spans), default=None),
                "last_leave": None if present or not spans else max(e for _, e, _ in spans),
                "joins": len(spans),
                "live_seconds": round(total, 1),
                "replay_seconds": round(watch.get(name, 0.0), 1),
            })
        students = [p for p in people if p["role"] == "student"]
        return {
            "lesson": lesson,
            "generated_at": now,
            "participants": people,
            "totals": {
                "participants": len(people),
                "students": len(students),
                "present": sum(1 for p in people if p["present"]),
                "students_live": sum(1 for p in students if p["live_seconds"] > 0),
                "students_replay_only": sum(1 for p in students if p["live_seconds"] == 0 and p["replay_seconds"] > 0),
            },
        }


CSV_COLUMNS = ("name", "role", "present", "first_join", "last_leave", "live_seconds", "joins", "replay_seconds")


def report_csv(report: dict) -> str:
    def iso(ts: Optional[float]) -> str:
        return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds") if ts else ""

    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for p in report["participants"]:
        writer.writerow([p["name"], p["role"], "yes" if p["present"] else "no", iso(p["first_join"]),
                         iso(p["last_leave"]), p["live_seconds"], p["joins"], p["replay_seconds"]])
    return out.getvalue()

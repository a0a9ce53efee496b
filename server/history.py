"""The durable copy of a room's chat and Q&A: JSON lines under DATA/classroom/<room>/<date>.jsonl.

The store keeps recent history for late joiners; this log keeps it for good, next to the
recordings, so a replay page can show the questions beside the video (it asks
``GET /api/rooms/{room}/history?since=&until=`` with the recording's start and end).
Each line is one entry: ``{"id", "ts", "type", "name", "role", "text", ...}``, ``ts`` in
epoch seconds. One node writes a room's log (the node where the room lives), so a
multi-node deployment does not end up with the same line in several files.

When a recording ends, its public entries are also copied into the recording's own folder
(``RECORDING_HISTORY``), so the Q&A stays with the video when the room's log is pruned or the
folder is archived or moved to another server.
"""

from __future__ import annotations

import json
import logging
from datetime import date as Date
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Iterator, Optional

from skyclass.recordings.playlist import write_atomic

from .state import _file_safe

logger = logging.getLogger(__name__)

MAX_OPEN_FILES = 64
RECORDING_HISTORY = "history.jsonl"


class HistoryLog:
    def __init__(self, data: Path) -> None:
        self.root = data / "classroom"
        self._files: dict[Path, IO[str]] = {}

    def path(self, room: str, day: Date) -> Path:
        return self.root / _file_safe(room) / f"{day.isoformat()}.jsonl"

    def append(self, room: str, entry: dict) -> None:
        path = self.path(room, datetime.fromtimestamp(float(entry["ts"])).date())
        f = self._files.get(path)
        if f is None:
            if len(self._files) >= MAX_OPEN_FILES:
                self._files.pop(next(iter(self._files))).close()
            path.parent.mkdir(parents=True, exist_ok=True)
            f = self._files[path] = path.open("a", encoding="utf-8")
        f.write(json.dumps(entry, separators=(",", ":"), ensure_ascii=False) + "\n")
        f.flush()

    def read(self, room: str, since: float, until: float, limit: int = 5000) -> list[dict]:
        """Entries in [since, until] from the daily files that can hold them."""
        first = datetime.fromtimestamp(max(since, 0)).date()
        last = datetime.fromtimestamp(min(until, datetime.now().timestamp() + 86400)).date()
        if (last - first).days > 62:  # a replay spans hours; do not scan years of files
            first = last - timedelta(days=62)
        out: list[dict] = []
        day: Optional[Date] = first
        while day is not None and day <= last:
            out.extend(e for e in _entries(self.path(room, day)) if since <= float(e.get("ts", 0)) <= until)
            day = day + timedelta(days=1)
        out.sort(key=lambda e: e["ts"])
        return out[-limit:]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def _entries(path: Path) -> Iterator[dict]:
    """The entries of a JSON-lines file (none if it does not exist), skipping a line torn by a crash."""
    if not path.is_file():
        return
    with path.open(encoding="utf-8") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                yield entry


def write_recording_history(directory: Path, entries: list[dict]) -> None:
    """Keep ``entries`` with a recording: written whole, then renamed, so a crash leaves the old
    copy or the new one, never half of one."""
    if directory.is_dir():
        text = "".join(json.dumps(e, separators=(",", ":"), ensure_ascii=False) + "\n" for e in entries)
        write_atomic(directory / RECORDING_HISTORY, text.encode("utf-8"))


def read_recording_history(directory: Path) -> list[dict]:
    """The entries kept with a recording; none if it has no copy (still recording, or older)."""
    return [e for e in _entries(directory / RECORDING_HISTORY) if "id" in e and "ts" in e]

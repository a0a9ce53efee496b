"""HLS media playlists (RFC 8216): EVENT while the lesson runs, VOD once it has ended.

The playlist is rewritten whole (to a temporary name, then renamed) after every segment,
so on disk it always lists exactly the complete segments: it doubles as the recording's
journal for crash repair.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PLAYLIST_NAME = "index.m3u8"


@dataclass
class SegmentEntry:
    uri: str
    duration: float
    init: str
    discontinuity: bool = False
    size: int = 0


def render(entries: list[SegmentEntry], ended: bool, target: float) -> str:
    """The playlist text. ``target`` is the nominal segment length; the header's target
    duration is never below what a listed segment needs (RFC 8216 §4.3.3.1)."""
    longest = max((e.duration for e in entries), default=target)
    target_duration = max(int(math.ceil(target * 2)), int(math.floor(longest + 0.5)), 1)
    if not ended:
        # EVENT playlists must not change their target duration: leave room for long GOPs.
        target_duration = max(target_duration, 6)
    lines = [
        "#EXTM3U",
        "#EXT-X-VERSION:7",
        f"#EXT-X-TARGETDURATION:{target_duration}",
        "#EXT-X-MEDIA-SEQUENCE:0",
        f"#EXT-X-PLAYLIST-TYPE:{'VOD' if ended else 'EVENT'}",
        "#EXT-X-INDEPENDENT-SEGMENTS",
    ]
    current_init: Optional[str] = None
    for entry in entries:
        if entry.init != current_init:
            if current_init is not None and entry.discontinuity:
                lines.append("#EXT-X-DISCONTINUITY")
            lines.append(f'#EXT-X-MAP:URI="{entry.init}"')
            current_init = entry.init
        lines.append(f"#EXTINF:{entry.duration:.3f},")
        lines.append(entry.uri)
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


def parse(text: str) -> tuple[list[SegmentEntry], bool]:
    """Entries and whether the playlist is ended (has EXT-X-ENDLIST); our own format only."""
    entries: list[SegmentEntry] = []
    init = ""
    duration: Optional[float] = None
    discontinuity = False
    ended = False
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("#EXT-X-MAP:"):
            value = line.split("URI=", 1)[1]
            init = value.split(",")[0].strip('"')
        elif line.startswith("#EXTINF:"):
            duration = float(line[8:].split(",")[0])
        elif line == "#EXT-X-DISCONTINUITY":
            discontinuity = True
        elif line == "#EXT-X-ENDLIST":
            ended = True
        elif line and not line.startswith("#") and duration is not None:
            entries.append(SegmentEntry(line, duration, init, discontinuity))
            duration = None
            discontinuity = False
    return entries, ended


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` so that readers (and a crash) see either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)

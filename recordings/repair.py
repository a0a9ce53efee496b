"""Start-up: find every recording on disk, and repair the ones a crash (kill -9, power) left open.

An open recording (``meta.json`` still says ``recording``) lost at most what its writer held
in memory: on disk are whole segments (written under a temporary name, then renamed) and a
playlist listing them (rewritten the same way after each one). Repair removes temporary
files, keeps listed segments that exist, adds a segment that was renamed just before the
crash but not yet listed (its timing read back from the file), then writes the playlist as
VOD and marks the recording ``repaired``.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path
from typing import Optional

from . import fmp4, webm
from .catalogue import META_NAME, RecordingInfo, load_meta, save_meta
from .playlist import PLAYLIST_NAME, SegmentEntry, parse, render, write_atomic

logger = logging.getLogger(__name__)

_SEGMENT = re.compile(r"^seg_(\d{5})\.(m4s|webm)$")
_TIMESCALES = {fmp4.VIDEO_TRACK_ID: 90000, fmp4.AUDIO_TRACK_ID: 48000}


def _segment_duration(path: Path) -> Optional[float]:
    """Seconds of media in a segment file, or None if it is damaged."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if path.suffix == ".m4s":
        timing = fmp4.read_fragment_timing(data)
        if timing is None or not timing.tracks:
            return None
        tid = fmp4.VIDEO_TRACK_ID if fmp4.VIDEO_TRACK_ID in timing.tracks else min(timing.tracks)
        return timing.tracks[tid][1] / _TIMESCALES.get(tid, 90000)
    span = webm.read_segment_timing(data)
    if span is None:
        return None
    return (span[1] - span[0]) / 1000 + 0.033


def _newest_init(directory: Path) -> str:
    inits = sorted(directory.glob("init_*.*"), key=lambda p: int(re.sub(r"\D", "", p.stem) or 0))
    return inits[-1].name if inits else ""


def repair(directory: Path, info: RecordingInfo) -> RecordingInfo:
    """Close an interrupted recording so it plays to the end of what was saved."""
    for tmp in directory.glob("*.tmp"):
        tmp.unlink(missing_ok=True)
    entries: list[SegmentEntry] = []
    playlist = directory / PLAYLIST_NAME
    if playlist.exists():
        listed, _ = parse(playlist.read_text())
        entries = [e for e in listed if (directory / e.uri).exists() and (directory / e.init).exists()]
    known = {e.uri for e in entries}
    orphans = sorted((p for p in directory.iterdir() if _SEGMENT.match(p.name) and p.name not in known),
                     key=lambda p: p.name)
    last_index = max((int(_SEGMENT.match(e.uri).group(1)) for e in entries), default=-1)  # type: ignore[union-attr]
    for path in orphans:
        index = int(_SEGMENT.match(path.name).group(1))  # type: ignore[union-attr]
        if index != last_index + 1:
            continue  # only the one right after the listed ones can be whole
        duration = _segment_duration(path)
        init = entries[-1].init if entries else _newest_init(directory)
        if duration is None or not init:
            logger.warning("room=%s recording=%s dropping damaged %s", info.room, info.id, path.name)
            continue
        entries.append(SegmentEntry(path.name, duration, init))
        last_index = index
        logger.info("room=%s recording=%s recovered unlisted %s", info.room, info.id, path.name)
    for path in directory.iterdir():
        if _SEGMENT.match(path.name) and path.name not in {e.uri for e in entries}:
            path.unlink(missing_ok=True)
    write_atomic(playlist, render(entries, ended=True, target=2.0).encode())
    info.segments = len(entries)
    info.duration = round(sum(e.duration for e in entries), 3)
    info.size = sum(p.stat().st_size for p in directory.iterdir()
                    if p.name.startswith(("seg_", "init_")))
    if entries:
        info.ended_at = (directory / entries[-1].uri).stat().st_mtime
        info.container = "webm" if entries[-1].uri.endswith(".webm") else "fmp4"
    else:
        info.ended_at = info.started_at
    info.state = "repaired"
    save_meta(directory, info)
    logger.info("room=%s recording=%s repaired: %d segments, %.1f s", info.room, info.id, len(entries), info.duration)
    return info


def load_all(root: Path) -> list[RecordingInfo]:
    """Every recording under ``root``; open ones are repaired first (this runs at start-up,
    when no writer can own them)."""
    infos: list[RecordingInfo] = []
    if not root.exists():
        return infos
    started = time.monotonic()
    for directory in sorted(root.iterdir()):
        if not directory.is_dir() or not (directory / META_NAME).exists():
            continue
        info = load_meta(directory)
        if info is None:
            continue
        if info.state == "recording":
            try:
                info = repair(directory, info)
            except OSError:
                logger.exception("room=%s recording=%s repair failed", info.room, info.id)
                continue
        infos.append(info)
    logger.info("recordings: scanned %s in %.2f s", root, time.monotonic() - started)
    return infos

"""Samples on the recording's timeline → HLS segments on disk (fMP4, or WebM for VP8).

A segment starts on a video key frame once the previous one is at least ``min_segment``
long (the recorder asks the teacher for a key frame every ``target`` seconds, so segments
come out about ``target`` long). A change of codec configuration (new SPS/PPS, another
picture size, a track appearing or going) cuts a segment too and starts a new init
segment. Audio goes into the segment its time falls in; a segment is written once every
track has moved past its end (or has gone quiet), so A/V stay together.

Each segment is written to a temporary name and renamed, then the playlist is rewritten:
a crash loses only what is still in memory (the segment being built).
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from . import fmp4, webm
from .depacketize import OPUS_CONFIG, Sample, TrackConfig
from .playlist import PLAYLIST_NAME, SegmentEntry, render, write_atomic

logger = logging.getLogger(__name__)

VIDEO_GRACE = 5.0  # seconds of audio to wait for the first video key frame before going audio-only
TRACK_IDLE = 3.0  # a track silent this long (on the timeline) is treated as gone
STALL = 1.0  # write a segment without waiting for a track that is this far behind


@dataclass
class _Cut:
    t: float
    configs: dict[str, TrackConfig]


@dataclass
class _Pending:
    t: float
    sample: Sample


@dataclass
class WriterStats:
    segments: int = 0
    duration: float = 0.0
    size: int = 0
    video_frames: int = 0
    audio_packets: int = 0
    dropped_samples: int = 0
    codecs: dict[str, str] = field(default_factory=dict)


def container_for(configs: dict[str, TrackConfig]) -> str:
    video = configs.get("video")
    return "webm" if video is not None and video.codec == "vp8" else "fmp4"


class SegmentWriter:
    """Not thread-safe: owned by one recording's writer thread."""

    def __init__(self, directory: Path, log_prefix: str, target: float = 2.0, min_segment: float = 1.5,
                 on_segment: Optional[Callable[[WriterStats], None]] = None) -> None:
        self.directory = directory
        self.log_prefix = log_prefix
        self.target = target
        self.min_segment = min_segment
        self.on_segment = on_segment
        self.expected: set[str] = set()
        self.entries: list[SegmentEntry] = []
        self.stats = WriterStats()
        self._cuts: list[_Cut] = []
        self._pending: dict[str, list[_Pending]] = {"video": [], "audio": []}
        self._origin: Optional[float] = None
        self._last_t: dict[str, float] = {}
        self._first_audio_t: Optional[float] = None
        self._max_t = float("-inf")
        self._last_dts: dict[str, int] = {}
        self._init_configs: Optional[dict[str, TrackConfig]] = None
        self._init_uri = ""
        self._inits = 0
        self._frame_ticks: list[int] = []
        self._closed = False

    # --- input -----------------------------------------------------------------------
    def expect(self, kinds: set[str]) -> None:
        """The kinds the current publisher sends: a video key frame then opens a segment
        with an audio track before the first audio packet has arrived, and vice versa."""
        self.expected = set(kinds)

    def add(self, t: float, sample: Sample) -> None:
        """Add one access unit at ``t`` seconds on the recording timeline."""
        kind = sample.kind
        last = self._last_t.get(kind)
        if last is not None and t < last - 0.5:
            self.stats.dropped_samples += 1  # far in the past: a stray late frame
            return
        self._last_t[kind] = max(t, last if last is not None else t)
        self._max_t = max(self._max_t, t)
        if kind == "video":
            if sample.keyframe and sample.config is not None:
                self._video_keyframe(t, sample.config)
            if not self._cuts:
                self.stats.dropped_samples += 1
                return
        else:
            if self._first_audio_t is None:
                self._first_audio_t = t
            self._audio_point(t)
        self._pending[kind].append(_Pending(t, sample))
        if not self._cuts:
            # Before the first segment: keep only audio that may still belong to it.
            audio = self._pending["audio"]
            while audio and audio[0].t < t - VIDEO_GRACE - 1:
                audio.pop(0)
        self._flush_ready(force=False)

    def _active(self, kind: str, now: float) -> bool:
        last = self._last_t.get(kind)
        if last is None:
            return kind in self.expected
        return now - last < TRACK_IDLE or kind in self.expected and now - last < TRACK_IDLE * 2

    def _configs_at(self, t: float, video: Optional[TrackConfig]) -> dict[str, TrackConfig]:
        configs: dict[str, TrackConfig] = {}
        if video is not None:
            configs["video"] = video
        if self._active("audio", t):
            configs["audio"] = OPUS_CONFIG
        return configs

    def _video_keyframe(self, t: float, config: TrackConfig) -> None:
        configs = self._configs_at(t, config)
        if not self._cuts:
            if self._origin is None:
                self._origin = t
            self._cuts.append(_Cut(t, configs))
            return
        last = self._cuts[-1]
        if t <= last.t:
            return
        if configs != last.configs or t - last.t >= self.min_segment:
            self._cuts.append(_Cut(t, configs))

    def _audio_point(self, t: float) -> None:
        """Audio cuts segments only while there is no video to cut on."""
        video_waiting = "video" in self.expected and "video" not in self._last_t and \
            self._first_audio_t is not None and t - self._first_audio_t < VIDEO_GRACE
        if video_waiting or self._active("video", t) and "video" in self._last_t:
            return
        configs = {"audio": OPUS_CONFIG}
        if not self._cuts:
            if self._origin is None:
                self._origin = t
            self._cuts.append(_Cut(t, configs))
            return
        last = self._cuts[-1]
        if t > last.t and (configs != last.configs or t - last.t >= self.target):
            self._cuts.append(_Cut(t, configs))

    # --- output ----------------------------------------------------------------------
    def _flush_ready(self, force: bool) -> None:
        while len(self._cuts) >= 2:
            start, end = self._cuts[0], self._cuts[1]
            if not force:
                for kind in start.configs:
                    behind = self._last_t.get(kind, float("-inf"))
                    if behind < end.t and self._max_t - end.t < STALL:
                        return  # this track may still deliver samples for the segment
            self._write_segment(start, end.t)
            self._cuts.pop(0)

    def finish(self) -> None:
        """Write everything still in memory and mark the playlist ended (VOD)."""
        if self._closed:
            return
        self._flush_ready(force=True)
        if self._cuts:
            self._write_segment(self._cuts[0], None)
            self._cuts.clear()
        self._closed = True
        self._write_playlist(ended=True)

    def _ticks(self, t: float, timescale: int) -> int:
        return int(round((t - (self._origin or 0.0)) * timescale))

    def _take(self, kind: str, end: Optional[float]) -> tuple[list[_Pending], Optional[_Pending]]:
        """Samples of ``kind`` before ``end`` (all if None), and the first one after it."""
        pending = self._pending[kind]
        n = 0
        while n < len(pending) and (end is None or pending[n].t < end):
            n += 1
        taken = pending[:n]
        del pending[:n]
        return taken, (pending[0] if pending else None)

    def _write_segment(self, cut: _Cut, end: Optional[float]) -> None:
        runs: dict[str, fmp4.TrackRun] = {}
        seg_end = 0.0
        for kind in ("video", "audio"):
            samples, following = self._take(kind, end)
            # drop what came before this segment (audio ahead of the first key frame, strays)
            samples = [p for p in samples if p.t >= cut.t - 1e-6]
            config = cut.configs.get(kind)
            if config is None or not samples:
                continue
            timescale = config.timescale
            dts = []
            for p in samples:
                d = self._ticks(p.t, timescale)
                last = self._last_dts.get(kind)
                if last is not None and d <= last:
                    d = last + 1
                self._last_dts[kind] = d
                dts.append(d)
            durations = [max(1, b - a) for a, b in zip(dts, dts[1:])]
            if following is not None:
                tail = self._ticks(following.t, timescale) - dts[-1]
            elif kind == "video" and end is not None:
                tail = self._ticks(end, timescale) - dts[-1]
            elif kind == "audio":
                tail = samples[-1].sample.samples or 960
            else:
                tail = int(statistics.median(self._frame_ticks)) if self._frame_ticks else 3000
            # A frame lasts until the next one (no holes for players to trip on), but never past 2 s.
            durations.append(max(1, min(tail, 2 * timescale)))
            if kind == "video":
                self._frame_ticks = (self._frame_ticks + durations[:-1])[-30:]
                self.stats.video_frames += len(samples)
            else:
                self.stats.audio_packets += len(samples)
            # Keep the next segment's decode times after ours.
            self._last_dts[kind] = dts[-1] + durations[-1] - 1
            seg_end = max(seg_end, (dts[-1] + durations[-1]) / timescale)
            runs[kind] = fmp4.TrackRun(kind, dts[0], durations, [len(p.sample.data) for p in samples],
                                       [p.sample.keyframe for p in samples], [p.sample.data for p in samples])
        if not runs:
            return
        seg_start = (cut.t - (self._origin or 0.0))
        if end is not None:
            duration = end - cut.t
        else:
            duration = max(seg_end - seg_start, 0.001)
        configs = {k: c for k, c in cut.configs.items() if k in runs or k in cut.configs}
        discontinuity = False
        if configs != self._init_configs:
            discontinuity = self._init_configs is not None
            self._write_init(configs)
        container = container_for(configs)
        index = len(self.entries)
        if container == "webm":
            blocks = []
            for kind, run in runs.items():
                t = run.base_dts
                for size_d, key, data in zip(run.durations, run.keyframes, run.data):
                    blocks.append((t * 1000 // configs[kind].timescale, kind, key, data))
                    t += size_d
            blocks.sort(key=lambda b: (b[0], b[1] != "video"))
            body = webm.media_segment(blocks)
            uri = f"seg_{index:05d}.webm"
        else:
            body = fmp4.media_segment(index + 1, [runs[k] for k in ("video", "audio") if k in runs])
            uri = f"seg_{index:05d}.m4s"
        write_atomic(self.directory / uri, body)
        self.entries.append(SegmentEntry(uri, duration, self._init_uri, discontinuity, len(body)))
        self.stats.segments += 1
        self.stats.duration += duration
        self.stats.size += len(body)
        self._write_playlist(ended=False)
        if self.on_segment is not None:
            self.on_segment(self.stats)

    def _write_init(self, configs: dict[str, TrackConfig]) -> None:
        container = container_for(configs)
        if container == "webm":
            data = webm.init_segment(configs.values())
            uri = f"init_{self._inits}.webm"
        else:
            data = fmp4.init_segment(configs.values())
            uri = f"init_{self._inits}.mp4"
        write_atomic(self.directory / uri, data)
        self._inits += 1
        self._init_configs = dict(configs)
        self._init_uri = uri
        self.stats.size += len(data)
        self.stats.codecs = {k: c.codec_string for k, c in configs.items()}
        logger.info("%s init segment %s: %s", self.log_prefix, uri,
                    ", ".join(f"{c.codec_string} {c.width}x{c.height}" if k == "video" else c.codec_string
                              for k, c in configs.items()))

    def _write_playlist(self, ended: bool) -> None:
        text = render(self.entries, ended, self.target)
        write_atomic(self.directory / PLAYLIST_NAME, text.encode())

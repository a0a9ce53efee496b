"""The recorder: one more subscriber of a room's streams, writing the lesson to disk as HLS.

Live path cost: a :class:`_Tap` is the router's :class:`~skyclass.media.router.PacketSink`;
per packet it appends one tuple to a deque and returns. Everything else (reordering,
depacketization, timing, muxing, file I/O) happens on the recording's own writer thread,
which drains the deque a few times a second. Students never wait for the disk.

Timing: each teacher track's RTP timestamps are mapped to the teacher's wall clock through
its RTCP sender reports (the same NTP clock for audio and video, hence lip sync), and each
publisher session is then placed on the recording's timeline. A teacher who reconnects
(new session, maybe a new Router) continues the same recording a moment after the last
media; an outage longer than ``MAX_GAP`` is cut out rather than recorded as dead air.

A student given the floor is tapped too (the speaker audio slot) and mixed into the
teacher's audio by :mod:`.mixer`, on the writer thread, only while they speak.
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import fnmatch
import logging
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional, Protocol

from skyclass.media.router import TrackStream

from .catalogue import MemoryStore, RecordingInfo, RecordingStore, classify_room, save_meta
from .depacketize import Unwrapper, depacketizer_for
from .mixer import SpeakerMixer
from .writer import SegmentWriter, WriterStats

logger = logging.getLogger(__name__)

NTP_EPOCH_OFFSET = 2208988800
SR_WAIT = 2.5  # seconds to hold a new publisher's media for its first sender reports
REORDER_WAIT = 0.3  # seconds a sequence hole may stay open before it counts as loss
REORDER_MAX = 400  # packets held behind a hole at most
SR_TOLERANCE = 0.03  # re-anchor a track when a sender report disagrees by more than this (s)
MAX_GAP = 1.0  # a silence longer than this on the timeline is cut out...
GAP_KEEP = 0.05  # ...down to this
QUEUE_LIMIT = 10_000  # packets (~50 s of a 1 Mbps lesson) held for a stuck writer before the oldest go
_RTP, _SR, _ATTACH, _DETACH, _SPEAKER_ON, _SPEAKER_OFF = 0, 1, 2, 3, 4, 5


class RoomLike(Protocol):
    name: str
    router: Any


class SessionLike(Protocol):
    id: str
    name: str


@dataclass
class RecorderSettings:
    """Recording policy, filled by the server from its configuration."""

    root: Path
    enabled: bool = True
    disabled_rooms: tuple[str, ...] = ()  # room names or fnmatch patterns ("tutoring-*", "*")
    grace: float = 10.0  # wait this long for a teacher whose connection was lost
    segment_target: float = 2.0
    node: str = ""  # this node's name in a shared catalogue
    origin: Optional[str] = None  # this node's base URL, where other nodes send replay requests


def _name_thread(name: str) -> None:
    """Give the writer thread an OS-visible name (``/proc/PID/task/TID/comm``) so its CPU
    can be measured from outside (``loadtest/record_bench``)."""
    try:
        libc = ctypes.CDLL(None)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


class _Source:
    """One publisher session: its tracks share one wall clock (the teacher's)."""

    def __init__(self, session_id: str, speaker: bool = False) -> None:
        self.session_id = session_id
        self.speaker = speaker  # a student with the floor: mixed into the teacher's audio
        self.taps: list["_Tap"] = []
        self.shift: Optional[float] = None  # teacher time → recording timeline
        self.offset: Optional[float] = None  # teacher time minus our monotonic clock
        self.ready = False
        self.held: list[tuple["_Tap", Any, float]] = []
        self.first_held: Optional[float] = None


class _Tap:
    """A router sink for one kind; the hot path is :meth:`on_rtp`. The other attributes are
    the writer thread's per-track state."""

    def __init__(self, queue: collections.deque, source: _Source, stream: TrackStream) -> None:
        self._queue = queue
        self.source = source
        self.stream = stream
        self.kind = stream.kind
        self.mime_type = stream.mime_type or ""
        self.clock_rate = stream.clock_rate
        # writer-thread state
        self.depacketizer = depacketizer_for(self.mime_type)
        self.seq = Unwrapper(16)
        self.ts = Unwrapper(32)
        self.next_seq: Optional[int] = None
        self.buffer: dict[int, tuple[int, int, bytes, float]] = {}
        self.hole_since: Optional[float] = None
        self.anchor: Optional[tuple[int, float]] = None  # (ext RTP ts, teacher time)
        self.anchored_by_sr = False
        self.packets = 0
        self.lost = 0

    # --- live path (event loop) -------------------------------------------------------
    def on_rtp(self, seq: int, timestamp: int, marker: int, payload: bytes, entry_point: bool) -> None:
        self._queue.append((_RTP, self, seq, timestamp, marker, payload, time.monotonic()))

    def on_sender_report(self, ntp_timestamp: int, rtp_timestamp: int) -> None:
        self._queue.append((_SR, self, ntp_timestamp, rtp_timestamp, 0, b"", time.monotonic()))

    # --- writer thread ----------------------------------------------------------------
    def teacher_time(self, ext_ts: int) -> float:
        anchor_ts, anchor_t = self.anchor  # type: ignore[misc]
        return anchor_t + (ext_ts - anchor_ts) / self.clock_rate


class Recording:
    """One lesson's recording: a directory, a writer thread and the taps feeding it."""

    def __init__(self, info: RecordingInfo, directory: Path, settings: RecorderSettings,
                 loop: asyncio.AbstractEventLoop, store: RecordingStore) -> None:
        self.info = info
        self.directory = directory
        self.settings = settings
        self.loop = loop
        self.store = store
        self.log = f"room={info.room} recording={info.id}"
        self.session_id: Optional[str] = None
        self.grace_handle: Optional[asyncio.TimerHandle] = None
        self.finishing = False
        self.cpu_seconds = 0.0
        self.meta_dirty = False  # set on the loop when the catalogue facts change; saved by the writer
        self._queue: collections.deque = collections.deque(maxlen=QUEUE_LIMIT)
        self._taps: list[_Tap] = []
        self._speaker_taps: list[_Tap] = []
        self._mixer = SpeakerMixer(self.log)  # writer thread
        self._teacher: Optional[_Source] = None  # writer thread: the publisher now attached
        self._keyframe_handle: Optional[asyncio.TimerHandle] = None
        self._wake = threading.Event()
        self._done: asyncio.Future[None] = loop.create_future()
        self._writer: Optional[SegmentWriter] = None
        self._media_end: Optional[float] = None
        self._media_end_arrival: Optional[float] = None
        self._last_arrival: Optional[float] = None
        self._all_taps: dict[int, _Tap] = {}  # writer thread: taps that delivered something
        self._thread = threading.Thread(target=self._run, name=f"recorder-{info.id}", daemon=True)

    # --- event loop side --------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def attach(self, session_id: str, router: Any) -> None:
        """Subscribe to the publisher's streams on ``router`` (replacing any earlier ones)."""
        self.detach()
        self.session_id = session_id
        source = _Source(session_id)
        # The teacher's slots; a student given the floor comes through attach_speaker.
        for slot in ("video", "audio"):
            stream = router.streams.get(slot)
            if stream is None:
                continue
            producer = stream.producer
            if producer is None or producer.peer_id != session_id or not stream.mime_type:
                continue
            if depacketizer_for(stream.mime_type) is None:
                logger.warning("%s cannot record %s: codec not supported", self.log, stream.mime_type)
                continue
            tap = _Tap(self._queue, source, stream)
            source.taps.append(tap)
            self._taps.append(tap)
        self._queue.append((_ATTACH, source, 0, 0, 0, b"", time.monotonic()))
        for tap in source.taps:
            tap.stream.add_sink(tap)  # also asks the teacher for a key frame
        logger.info("%s attached to session %s: %s", self.log, session_id,
                    ", ".join(t.mime_type for t in source.taps) or "no recordable tracks")
        self._schedule_keyframes()

    def detach(self) -> None:
        """Stop receiving (teacher gone or replaced); what was received is still written."""
        if not self._taps:
            return
        for tap in self._taps:
            tap.stream.remove_sink(tap)
        source = self._taps[0].source
        self._taps = []
        self._queue.append((_DETACH, source, 0, 0, 0, b"", time.monotonic()))
        if self._keyframe_handle is not None:
            self._keyframe_handle.cancel()
            self._keyframe_handle = None

    def attach_speaker(self, session_id: str, router: Any) -> None:
        """A student was given the floor: their voice goes into the recording's audio.

        Only audio: a replay has one picture, the teacher's (the speaker's camera is live only)."""
        self.detach_speaker()
        stream = router.streams.get("speaker.audio")
        producer = stream.producer if stream is not None else None
        if producer is None or producer.peer_id != session_id or (stream.mime_type or "").lower() != "audio/opus":
            return
        source = _Source(session_id, speaker=True)
        tap = _Tap(self._queue, source, stream)
        source.taps.append(tap)
        self._speaker_taps = [tap]
        self._queue.append((_SPEAKER_ON, source, 0, 0, 0, b"", time.monotonic()))
        stream.add_sink(tap)
        logger.info("%s recording speaker %s", self.log, session_id)

    def detach_speaker(self, session_id: Optional[str] = None) -> None:
        """The floor was taken back (``session_id``: only if it is still that speaker's)."""
        if not self._speaker_taps:
            return
        source = self._speaker_taps[0].source
        if session_id is not None and source.session_id != session_id:
            return
        for tap in self._speaker_taps:
            tap.stream.remove_sink(tap)
        self._speaker_taps = []
        self._queue.append((_SPEAKER_OFF, source, 0, 0, 0, b"", time.monotonic()))

    def _schedule_keyframes(self) -> None:
        """Ask for a key frame every segment length, so segments can start on one.

        Teachers' encoders send key frames rarely (libx264 in aiortc: every 250 frames;
        browsers: on request only). The router coalesces this with students' requests."""
        if self._keyframe_handle is not None:
            self._keyframe_handle.cancel()

        def fire() -> None:
            for tap in self._taps:
                if tap.kind == "video":
                    tap.stream.request_keyframe()
            self._keyframe_handle = self.loop.call_later(self.settings.segment_target, fire)

        self._keyframe_handle = self.loop.call_later(self.settings.segment_target, fire)

    def cancel_grace(self) -> None:
        if self.grace_handle is not None:
            self.grace_handle.cancel()
            self.grace_handle = None

    async def finish(self) -> None:
        """Write what is left, end the playlist (VOD) and mark the recording complete."""
        self.finishing = True
        self.cancel_grace()
        self.detach()
        self.detach_speaker()
        self._wake.set()
        await asyncio.shield(self._done)

    def _publish(self) -> None:
        asyncio.ensure_future(self.store.put(self.info))

    # --- writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        _name_thread("skyrec")
        started = time.thread_time()
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            save_meta(self.directory, self.info)
            self._writer = SegmentWriter(self.directory, self.log, self.settings.segment_target,
                                         min_segment=min(1.5, self.settings.segment_target * 0.75),
                                         on_segment=self._on_segment)
            while True:
                stop = self._wake.wait(0.2)
                if self.meta_dirty:
                    self.meta_dirty = False
                    save_meta(self.directory, self.info)
                self._drain()
                self.cpu_seconds = time.thread_time() - started
                if stop:
                    break
            self._finalise()
        except Exception:
            logger.exception("%s writer failed: recording stops here", self.log)
            self.loop.call_soon_threadsafe(self.detach)  # stop queueing packets nobody will read
            try:
                self._finalise()
            except Exception:
                logger.exception("%s could not finalise", self.log)
        finally:
            self.cpu_seconds = time.thread_time() - started
            self.loop.call_soon_threadsafe(self._set_done)

    def _set_done(self) -> None:
        if not self._done.done():
            self._done.set_result(None)

    def _drain(self) -> None:
        queue = self._queue
        now = time.monotonic()
        while queue:
            item = queue.popleft()
            try:
                op = item[0]
                if op == _RTP:
                    self._on_packet(item[1], item[2], item[3], item[4], item[5], item[6])
                elif op == _SR:
                    self._on_sr(item[1], item[2], item[3], item[6])
                elif op == _ATTACH:
                    self._teacher = item[1]
                    self._writer.expect({t.kind for t in item[1].taps})  # type: ignore[union-attr]
                elif op == _SPEAKER_ON:
                    self._mixer.speaker_started()
                elif op == _SPEAKER_OFF:
                    self._on_detach(item[1])
                    self._mixer.speaker_stopped()
                else:
                    self._on_detach(item[1])
            except Exception:
                logger.exception("%s dropped a packet it could not process", self.log)
        for tap in list(self._all_taps.values()):
            self._check_hole(tap, now)
        for source in self._sources():
            if not source.ready and source.first_held is not None and now - source.first_held > SR_WAIT:
                self._release(source)
        self._write_mixed(self._mixer.release(now))

    def _write_mixed(self, samples: list) -> None:
        for t, sample in samples:
            self._writer.add(t, sample)  # type: ignore[union-attr]

    def _sources(self) -> list[_Source]:
        return list({id(t.source): t.source for t in self._all_taps.values()}.values())

    def _register(self, tap: _Tap) -> None:
        self._all_taps[id(tap)] = tap

    # packets: reorder, detect loss, depacketize
    def _on_packet(self, tap: _Tap, seq: int, ts: int, marker: int, payload: bytes, arrival: float) -> None:
        if tap.depacketizer is None:
            return
        self._register(tap)
        tap.packets += 1
        self._last_arrival = arrival
        ext = tap.seq(seq)
        if tap.next_seq is None:
            tap.next_seq = ext
        if ext < tap.next_seq or ext in tap.buffer:
            return  # duplicate or too late
        tap.buffer[ext] = (ts, marker, payload, arrival)
        self._pop_in_order(tap)
        if tap.buffer and tap.hole_since is None:
            tap.hole_since = arrival
        if len(tap.buffer) > REORDER_MAX:
            self._skip_hole(tap)

    def _pop_in_order(self, tap: _Tap) -> None:
        buffer = tap.buffer
        while tap.next_seq in buffer:
            ts, marker, payload, arrival = buffer.pop(tap.next_seq)  # type: ignore[arg-type]
            tap.next_seq += 1  # type: ignore[operator]
            for sample in tap.depacketizer.push(tap.ts(ts), marker, payload):
                self._on_sample(tap, sample, arrival)
        tap.hole_since = None if not buffer else tap.hole_since

    def _check_hole(self, tap: _Tap, now: float) -> None:
        if tap.buffer and tap.hole_since is not None and now - tap.hole_since > REORDER_WAIT:
            self._skip_hole(tap)

    def _skip_hole(self, tap: _Tap) -> None:
        first = min(tap.buffer)
        tap.lost += first - tap.next_seq  # type: ignore[operator]
        tap.next_seq = first
        tap.depacketizer.lost()
        tap.hole_since = None
        self._pop_in_order(tap)

    # timing: sender reports → teacher time → recording timeline
    def _on_sr(self, tap: _Tap, ntp: int, rtp: int, arrival: float) -> None:
        if tap.source.speaker:
            return  # a speaker is timed by arrival (their clock is not the teacher's)
        self._register(tap)
        teacher = ntp / (1 << 32) - NTP_EPOCH_OFFSET
        ext = tap.ts(rtp)
        if tap.anchor is not None:
            drift = teacher - tap.teacher_time(ext)
            if abs(drift) <= SR_TOLERANCE and tap.anchored_by_sr:
                return
            if tap.anchored_by_sr:
                logger.info("%s %s re-anchored by %+.3f s on a sender report", self.log, tap.kind, drift)
        tap.anchor = (ext, teacher)
        tap.anchored_by_sr = True
        source = tap.source
        if not source.ready and all(t.anchored_by_sr for t in source.taps):
            self._release(source)

    def _release(self, source: _Source) -> None:
        """Start timing a publisher's media: SRs are in, or we waited long enough for them."""
        source.ready = True
        held, source.held = source.held, []
        for tap, sample, arrival in held:
            self._place(tap, sample, arrival)

    def _on_sample(self, tap: _Tap, sample, arrival: float) -> None:
        source = tap.source
        if source.speaker:
            teacher = self._teacher
            if teacher is not None and teacher.ready and teacher.offset is not None and teacher.shift is not None:
                self._mixer.speaker_audio(sample, arrival + teacher.offset + teacher.shift)
            return
        if not source.ready:
            if source.first_held is None:
                source.first_held = arrival
            source.held.append((tap, sample, arrival))
            return
        self._place(tap, sample, arrival)

    def _place(self, tap: _Tap, sample, arrival: float) -> None:
        source = tap.source
        if tap.anchor is None:
            # No sender report (some encoders never send one): time by arrival, in the
            # teacher's clock if another track of this publisher has taught us the offset.
            tap.anchor = (sample.ext_ts, arrival + (source.offset or 0.0))
            logger.info("%s %s timed by arrival (no sender report yet)", self.log, tap.kind)
        teacher = tap.teacher_time(sample.ext_ts)
        if source.offset is None:
            source.offset = teacher - arrival
        if source.shift is None:
            if self._media_end is None:
                source.shift = -teacher
            else:
                gap = arrival - (self._media_end_arrival or arrival)
                gap = gap if 0.0 <= gap <= MAX_GAP else GAP_KEEP
                source.shift = self._media_end + gap - teacher
                logger.info("%s session %s continues the recording at %.2f s (after %.2f s)",
                            self.log, source.session_id, self._media_end + gap, gap)
        t = teacher + source.shift
        if self._media_end is not None and t > self._media_end + MAX_GAP:
            cut = t - self._media_end - GAP_KEEP
            source.shift -= cut
            t -= cut
            logger.info("%s %.1f s without media cut out at %.2f s", self.log, cut, t)
        if self._media_end is None or t > self._media_end:
            self._media_end = t
            self._media_end_arrival = arrival
        if sample.kind == "audio":
            self._write_mixed(self._mixer.teacher_audio(t, sample, arrival))
        else:
            self._writer.add(t, sample)  # type: ignore[union-attr]

    def _on_detach(self, source: _Source) -> None:
        for tap in source.taps:
            if tap.depacketizer is None:
                continue
            while tap.buffer:
                self._skip_hole(tap)
            for sample in tap.depacketizer.flush():
                self._on_sample(tap, sample, self._last_arrival or time.monotonic())
        if not source.ready:
            self._release(source)
        for tap in source.taps:
            self._all_taps.pop(id(tap), None)
            if tap.packets:
                logger.info("%s %s track done: %d packets, %d lost, %d frames skipped", self.log, tap.kind,
                            tap.packets, tap.lost, tap.depacketizer.dropped_frames if tap.depacketizer else 0)

    def _on_segment(self, stats: WriterStats) -> None:
        info = self.info
        info.duration = round(stats.duration, 3)
        info.size = stats.size
        info.segments = stats.segments
        info.codecs = dict(stats.codecs)
        info.container = "webm" if stats.codecs.get("video") == "vp8" else "fmp4"
        self.loop.call_soon_threadsafe(self._publish)

    def _finalise(self) -> None:
        self._drain()
        for source in self._sources():
            self._on_detach(source)
        self._mixer.speaker_stopped()
        self._write_mixed(self._mixer.release(time.monotonic(), everything=True))
        writer = self._writer
        if writer is not None:
            writer.finish()
            self._on_segment(writer.stats)
        info = self.info
        last = self._last_arrival
        info.ended_at = time.time() - (time.monotonic() - last if last is not None else 0.0)
        if writer is None or writer.stats.segments == 0:
            logger.info("%s no media recorded: removing it", self.log)
            info.state = "empty"
            shutil.rmtree(self.directory, ignore_errors=True)
            return
        info.state = "complete"
        save_meta(self.directory, info)
        stats = writer.stats
        logger.info("%s complete: %.1f s, %d segments, %d bytes, %d video frames, %d audio packets "
                    "(%d mixed with a speaker), cpu %.2f s", self.log, stats.duration, stats.segments, stats.size,
                    stats.video_frames, stats.audio_packets, self._mixer.mixed_packets, time.thread_time())


def new_recording_id(room: str) -> str:
    slug = "".join(c if c.isalnum() or c in "-_" else "-" for c in room)[:40].strip("-_") or "room"
    return f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{slug}-{secrets.token_hex(2)}"


class RecordingManager:
    """Every lesson recorded (unless the policy says otherwise): a RoomRegistry observer."""

    def __init__(self, settings: RecorderSettings, store: Optional[RecordingStore] = None,
                 describe: Optional[Callable[[str, float], Awaitable[Optional[dict]]]] = None) -> None:
        """``describe(room, started_at)`` may look the lesson up (e.g. in the timetable) and
        return ``grade``, ``subject``, ``title`` (and ``lesson``, its id); without it (or when it knows nothing) they
        come from the teacher's token claims or the room's name (:func:`classify_room`)."""
        self.settings = settings
        self.store: RecordingStore = store if store is not None else MemoryStore()
        self.describe = describe
        # Called with each recording that ended with media, once its files are final: what
        # else belongs with it on disk (the classroom adds the lesson's Q&A there).
        self.finished_hooks: list[Callable[[RecordingInfo, Path], Awaitable[None]]] = []
        self.active: dict[str, Recording] = {}
        self._finishing: set[asyncio.Task[None]] = set()

    def records(self, room: str) -> bool:
        if not self.settings.enabled:
            return False
        return not any(fnmatch.fnmatchcase(room, pattern) for pattern in self.settings.disabled_rooms)

    async def start(self) -> None:
        """Index what is on disk, repairing recordings a crash left open."""
        from .repair import load_all

        infos = await asyncio.to_thread(load_all, self.settings.root)
        for info in infos:
            # the files are here now, wherever they were recorded
            info.node, info.origin = self.settings.node or None, self.settings.origin
            await self.store.put(info)
        logger.info("recordings: %d in the catalogue (%s)", len(infos), self.settings.root)

    async def close(self) -> None:
        """Server shutdown: finish every open recording now."""
        for name, recording in list(self.active.items()):
            self._finish(name, recording)
        if self._finishing:
            await asyncio.gather(*self._finishing, return_exceptions=True)

    # RoomObserver ------------------------------------------------------------------
    def publisher_joined(self, room: RoomLike, session: SessionLike) -> None:
        if not self.records(room.name):
            logger.info("room=%s not recorded (policy)", room.name)
            return
        recording = self.active.get(room.name)
        if recording is None:
            loop = asyncio.get_running_loop()
            grade, subject, title = classify_room(room.name, getattr(getattr(session, "claims", None), "extra", None))
            info = RecordingInfo(id=new_recording_id(room.name), room=room.name, title=title, teacher=session.name,
                                 started_at=time.time(), grade=grade, subject=subject,
                                 node=self.settings.node or None, origin=self.settings.origin)
            recording = Recording(info, self.settings.root / info.id, self.settings, loop, self.store)
            self.active[room.name] = recording
            recording.start()
            asyncio.ensure_future(self.store.put(info))
            if self.describe is not None:
                asyncio.ensure_future(self._describe(recording))
            logger.info("room=%s recording=%s started (teacher %s)", room.name, info.id, session.name)
        else:
            logger.info("room=%s recording=%s continues with session %s", room.name, recording.info.id, session.id)
        recording.cancel_grace()
        recording.attach(session.id, room.router)
        for speaker in getattr(room, "speakers", {}).values():  # the floor was given before the teacher came
            recording.attach_speaker(speaker.id, room.router)

    def publisher_left(self, room: RoomLike, session: SessionLike, ended: bool) -> None:
        recording = self.active.get(room.name)
        if recording is None or recording.session_id != session.id:
            return  # not recorded, or already replaced by a newer session
        recording.detach()
        if ended:
            self._finish(room.name, recording)
        else:
            logger.info("%s teacher lost: finishing in %.0f s unless they come back", recording.log,
                        self.settings.grace)
            recording.cancel_grace()
            recording.grace_handle = asyncio.get_running_loop().call_later(
                self.settings.grace, self._finish, room.name, recording)

    async def _describe(self, recording: Recording) -> None:
        info = recording.info
        try:
            facts = await self.describe(info.room, info.started_at)  # type: ignore[misc]
        except Exception:
            logger.exception("%s lesson lookup failed", recording.log)
            return
        if not facts:
            return
        for name in ("grade", "subject", "title", "lesson"):
            if facts.get(name):
                setattr(info, name, str(facts[name]))
        recording.meta_dirty = True
        await self.store.put(info)

    def speaker_joined(self, room: RoomLike, session: SessionLike) -> None:
        recording = self.active.get(room.name)
        if recording is not None:
            recording.attach_speaker(session.id, room.router)

    def speaker_left(self, room: RoomLike, session: SessionLike) -> None:
        recording = self.active.get(room.name)
        if recording is not None:
            recording.detach_speaker(session.id)

    def room_closed(self, room: RoomLike) -> None:
        # The router is gone (its sinks with it); a recording in its grace period waits on.
        return

    def _finish(self, name: str, recording: Recording) -> None:
        if self.active.get(name) is recording:
            del self.active[name]
        if recording.finishing:
            return

        async def run() -> None:
            await recording.finish()
            if recording.info.state == "empty":
                await self.store.delete(recording.info.id)
                return
            await self.store.put(recording.info)
            for hook in self.finished_hooks:
                try:
                    await hook(recording.info, recording.directory)
                except Exception:
                    logger.exception("%s finished hook %r failed", recording.log, hook)

        task = asyncio.ensure_future(run())
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

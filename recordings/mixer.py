"""A student who has the floor, mixed into the recording's audio track.

Live, a speaker is just another Producer: students receive the teacher and the speaker as
separate tracks and their browsers mix them, so nothing is decoded on the live path. A
replay, though, has one audio track (HLS players on TVs and phones play exactly one), so
the recorder mixes the speaker into the teacher's audio on its own writer thread:

- while nobody speaks, the teacher's Opus packets are copied untouched (no transcoding);
- while a speaker's audio overlaps a teacher packet, that packet is decoded, the speaker's
  voice added, and the sum encoded again with libopus: 20 ms in, 20 ms out, about 0.2 ms of
  one core per packet, and only for the minutes a student actually speaks.

The speaker's packets are placed on the recording's timeline by their arrival (through the
teacher's clock, the same mapping the teacher's media gets), smoothed by their RTP
timestamps, which is what live students hear too. The teacher's audio waits ``MIX_DELAY``
for the speaker's audio of the same moment; the segment writer tolerates that much skew.
"""

from __future__ import annotations

import collections
import logging
from typing import Optional

import av
import numpy as np

from .depacketize import OPUS_CONFIG, Sample

logger = logging.getLogger(__name__)

RATE = 48000
MIX_DELAY = 0.3  # seconds teacher audio waits for the speaker's audio of the same moment
SPEECH_KEEP = 2.0  # seconds of the speaker's decoded audio kept behind the mixing point
REANCHOR = 0.25  # a speaker packet this much later than its RTP timestamps predict re-anchors
RUN_GAP = 0.03  # a hole in the teacher's audio longer than this ends a mixed run
MIX_BITRATE = 64000


def _decoder() -> av.CodecContext:
    return av.CodecContext.create("opus", "r")


def _decode(decoder: av.CodecContext, payload: bytes) -> Optional[np.ndarray]:
    """One Opus packet → float PCM, shape (channels, samples); None if it cannot be decoded."""
    try:
        frames = decoder.decode(av.Packet(payload))
    except av.error.FFmpegError:
        return None
    if not frames:
        return None
    return np.concatenate([f.to_ndarray() for f in frames], axis=1).astype(np.float32)


class _Run:
    """One stretch of mixed audio: its own encoder, output packets placed 20 ms apart."""

    def __init__(self, t: float, channels: int) -> None:
        self.encoder = av.CodecContext.create("libopus", "w")
        self.encoder.sample_rate = RATE
        self.encoder.layout = "stereo" if channels == 2 else "mono"
        self.encoder.format = "s16"
        self.encoder.bit_rate = MIX_BITRATE
        self.encoder.open()
        self.channels = channels
        self.start = t
        self.samples_in = 0
        self.packets_out = 0

    @property
    def next_t(self) -> float:
        return self.start + self.samples_in / RATE

    def encode(self, pcm: np.ndarray) -> list[tuple[float, Sample]]:
        """``pcm`` (channels, n) float in [-1, 1] → the Opus packets it completes, timed."""
        interleaved = (np.clip(pcm, -1.0, 1.0).T.reshape(1, -1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(interleaved, format="s16", layout=self.encoder.layout.name)
        frame.sample_rate = RATE
        frame.pts = self.samples_in
        self.samples_in += pcm.shape[1]
        out = []
        for packet in self.encoder.encode(frame):
            size = packet.duration or self.encoder.frame_size or 960
            t = self.start + self.packets_out * (self.encoder.frame_size or 960) / RATE
            self.packets_out += 1
            out.append((t, Sample("audio", 0, bytes(packet), True, OPUS_CONFIG, size)))
        return out


class SpeakerMixer:
    """Owned by one recording's writer thread (not thread-safe)."""

    def __init__(self, log: str) -> None:
        self.log = log
        self.speaking = False
        self.mixed_packets = 0
        self.copied_packets = 0
        self._held: collections.deque[tuple[float, Sample, float]] = collections.deque()
        self._speech: collections.deque[tuple[float, np.ndarray]] = collections.deque()  # (t, mono pcm)
        self._teacher_decoder: Optional[av.CodecContext] = None
        self._speaker_decoder: Optional[av.CodecContext] = None
        self._anchor: Optional[tuple[int, float]] = None  # speaker (ext RTP ts, timeline t)
        self._run: Optional[_Run] = None

    @property
    def engaged(self) -> bool:
        """Teacher audio goes through the hold (rather than straight to the writer)."""
        return self.speaking or bool(self._held)

    # --- the speaker ---------------------------------------------------------------------
    def speaker_started(self) -> None:
        self.speaking = True
        self._speaker_decoder = _decoder()
        self._anchor = None
        if self._teacher_decoder is None:
            self._teacher_decoder = _decoder()
        logger.info("%s speaker's audio mixed into the recording from now on", self.log)

    def speaker_stopped(self) -> None:
        self.speaking = False
        self._speaker_decoder = None

    def speaker_audio(self, sample: Sample, t_arrival: float) -> None:
        """A speaker packet that arrived at ``t_arrival`` on the recording's timeline."""
        if self._speaker_decoder is None:
            return
        pcm = _decode(self._speaker_decoder, sample.data)
        if pcm is None:
            return
        if self._anchor is None:
            self._anchor = (sample.ext_ts, t_arrival)
        t = self._anchor[1] + (sample.ext_ts - self._anchor[0]) / RATE
        # Early arrival means less network delay than at the anchor: move the anchor so
        # timing follows the fastest path; a much later one (a pause, a clock jump) re-anchors.
        if t_arrival < t or t_arrival - t > REANCHOR:
            self._anchor = (sample.ext_ts, t_arrival)
            t = t_arrival
        self._speech.append((t, pcm.mean(axis=0)))

    # --- the teacher ---------------------------------------------------------------------
    def teacher_audio(self, t: float, sample: Sample, arrival: float) -> list[tuple[float, Sample]]:
        """A teacher packet placed at ``t``: returned at once when nobody speaks, else held."""
        if not self.engaged:
            self._end_run()
            self.copied_packets += 1
            return [(t, sample)]
        self._held.append((t, sample, arrival))
        return []

    def release(self, now: float, everything: bool = False) -> list[tuple[float, Sample]]:
        """Teacher audio held at least ``MIX_DELAY`` (by arrival), mixed where speech overlaps."""
        out: list[tuple[float, Sample]] = []
        while self._held and (everything or now - self._held[0][2] >= MIX_DELAY):
            t, sample, _ = self._held.popleft()
            out.extend(self._mix_one(t, sample))
        if not self._held and not self.speaking:
            out.extend(self._end_run())
            self._speech.clear()
            self._teacher_decoder = None
        return out

    def _mix_one(self, t: float, sample: Sample) -> list[tuple[float, Sample]]:
        pcm = _decode(self._teacher_decoder, sample.data) if self._teacher_decoder is not None else None
        n = pcm.shape[1] if pcm is not None else sample.samples
        speech = self._speech_between(t, n)
        if pcm is None or speech is None:
            self.copied_packets += 1
            return self._end_run() + [(t, sample)]
        run = self._run
        if run is not None and (abs(t - run.next_t) > RUN_GAP or run.channels != pcm.shape[0]):
            self._end_run()
            run = None
        if run is None:
            run = self._run = _Run(t, pcm.shape[0])
        self.mixed_packets += 1
        return run.encode(pcm + speech[np.newaxis, :])

    def _end_run(self) -> list[tuple[float, Sample]]:
        # The encoder's last few ms (its look-ahead) are dropped: the next packet is the
        # teacher's own, starting where the run's input ended.
        self._run = None
        return []

    def _speech_between(self, t: float, n: int) -> Optional[np.ndarray]:
        """The speaker's audio over [t, t + n samples), or None if there is none."""
        speech = self._speech
        while speech and speech[0][0] + speech[0][1].shape[0] / RATE < t - SPEECH_KEEP:
            speech.popleft()
        out: Optional[np.ndarray] = None
        end = t + n / RATE
        for start, pcm in speech:
            if start >= end:
                break
            stop = start + pcm.shape[0] / RATE
            if stop <= t:
                continue
            first = max(0, int(round((t - start) * RATE)))
            into = max(0, int(round((start - t) * RATE)))
            count = min(pcm.shape[0] - first, n - into)
            if count <= 0:
                continue
            if out is None:
                out = np.zeros(n, dtype=np.float32)
            out[into:into + count] += pcm[first:first + count]
        return out
